"""The settings of one fix, in the groups ``vsonnx fix --help`` shows them: data, method, choice (distill's
settings are ``method.settings['distill']``), preprocessing, output, runtime.

``FixOptions.of(**keywords)`` builds them from the flat keywords of ``vsonnx.fix`` and the README
(``batch_size=64, val_split=0.2, ...``); ``FixOptions.KEYWORDS`` lists those keywords. Each entry point of
vsonnx.recalibrate ignores the settings that do not concern it.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from .methods.synthesized import DEFAULT_SAMPLES, DEFAULT_STEPS
from .errors import VsonnxError
from .settings import check_settings


@dataclass(frozen=True)
class DataOptions:
    """How the calibration data is read: first ``limit`` samples after a seeded shuffle; ``seed`` also seeds
    the held-out split, the dropout masks and the methods' own draws."""

    limit: int | None = None
    shuffle: bool = True
    seed: int = 0


@dataclass(frozen=True)
class MethodOptions:
    """Which BNs (``scope``: "sites" = sites and downstream, "all"), the data-free synthesis, and per registry
    method its own settings (e.g. ``{"distill": {"steps": 50, "lr": 0.01, "scores": None, "loss": None}}``)."""

    scope: str = "sites"
    synthetic: int = DEFAULT_SAMPLES  # synthetic inputs of --data-free (0: the closed form)
    synthetic_steps: int = DEFAULT_STEPS
    settings: dict = field(default_factory=dict)


@dataclass(frozen=True)
class ChoiceOptions:
    """Choosing among candidates: labelled or unlabelled ``val`` data (first ``val_limit`` samples) or a held-out
    fraction ``val_split`` of the calibration data; ``val_masks`` dropout masks in the label-free ensemble;
    ``force`` writes the default candidate when the original wins."""

    val: str | Path | None = None
    val_limit: int | None = None
    val_split: float | None = None
    val_masks: int = 8
    force: bool = False

    def __post_init__(self):
        if self.val is not None and self.val_split is not None:
            raise VsonnxError("--val and --val-split are alternatives: the candidates are ranked on one validation "
                              "set.", "pass --val DATA to rank on your own data, or --val-split F to hold out a "
                              "fraction of --calib.")

    @property
    def choosing(self) -> bool:
        return self.val is not None or self.val_split is not None


@dataclass(frozen=True)
class OutputOptions:
    """Where the fixed model goes (default ``MODEL.fixed.onnx``); ``in_place`` allows it to be the input."""

    path: str | Path | None = None
    in_place: bool = False


@dataclass(frozen=True)
class RuntimeOptions:
    """onnxruntime: ``batch_size`` (None: the model's static batch size, else 128), ``device``, ``threads``;
    ``progress`` bars on stderr."""

    batch_size: int | None = None
    device: str = "auto"
    threads: int | None = None
    progress: bool = False


_GROUPS = {"data": DataOptions, "method": MethodOptions, "choice": ChoiceOptions, "output": OutputOptions,
           "runtime": RuntimeOptions}
_RENAMED = {"output": ("output", "path"), "method_options": ("method", "settings")}


@dataclass(frozen=True)
class FixOptions:
    """Every setting of a fix, grouped (see the module docstring); ``preprocess``: the image preprocessing
    (vsonnx.data.preprocess) that overrides the model's metadata."""

    data: DataOptions = field(default_factory=DataOptions)
    method: MethodOptions = field(default_factory=MethodOptions)
    choice: ChoiceOptions = field(default_factory=ChoiceOptions)
    output: OutputOptions = field(default_factory=OutputOptions)
    runtime: RuntimeOptions = field(default_factory=RuntimeOptions)
    preprocess: dict | None = None

    def __post_init__(self):
        check_settings(batch_size=self.runtime.batch_size, seed=self.data.seed, threads=self.runtime.threads)

    @classmethod
    def of(cls, **keywords) -> FixOptions:
        """From the flat keywords of ``vsonnx.fix`` (``KEYWORDS``); a TypeError names unknown ones."""
        unknown = set(keywords) - set(KEYWORDS)
        if unknown:
            raise TypeError(f"unexpected fix option(s) {sorted(unknown)}; known: {', '.join(sorted(KEYWORDS))}")
        grouped: dict[str, dict] = {g: {} for g in _GROUPS}
        for key, value in keywords.items():
            if key != "preprocess":
                group, name = KEYWORDS[key]
                grouped[group][name] = value
        return cls(**{g: _GROUPS[g](**values) for g, values in grouped.items()},
                   preprocess=keywords.get("preprocess"))

    def with_batch_size(self, batch_size: int) -> FixOptions:
        return replace(self, runtime=replace(self.runtime, batch_size=batch_size))

    def writing_to(self, path: str | Path) -> FixOptions:
        return replace(self, output=replace(self.output, path=path))


def _keywords() -> dict[str, tuple[str, str]]:
    """Flat keyword -> (group, field): every field under its own name, but ``output`` (the path) and
    ``method_options`` (per-method settings)."""
    flat = {f.name: (g, f.name) for g, kind in _GROUPS.items() for f in fields(kind)}
    for keyword, (group, name) in _RENAMED.items():
        flat.pop(name, None)
        flat[keyword] = (group, name)
    flat["preprocess"] = ("", "preprocess")
    return flat


KEYWORDS = _keywords()
FixOptions.KEYWORDS = KEYWORDS
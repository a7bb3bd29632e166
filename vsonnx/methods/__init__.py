"""The estimators of new BN statistics, one module each, and the registry that names them.

Every estimator takes an ``EstimateRequest`` and returns a ``Estimate`` (vsonnx.stats). The
registry is the one place that says what a method needs (data or none, torch), how many passes it makes,
and its label in reports (the batch-size rule is the table's note): the CLI's choices, the ``--val``
candidates, the demo, the benchmark and tools/reproduce.py all read it. Adding a method = one module here + one entry below.

| name         | data  | torch | passes            | batch rule | what it computes                               |
|--------------|-------|-------|-------------------|------------|------------------------------------------------|
| batch        | yes   | no    | 1                 | >= 1 (*)   | the paper's Adjust (PyTorch momentum=None)     |
| population   | yes   | no    | one per BN level  | >= 1       | exact inference statistics                     |
| relative     | yes   | no    | 1 (2 sessions)    | >= 1 (*)   | dropout-on -> off change carried to the stored |
| distill      | yes   | yes   | 200 steps         | >= 1       | BN constants fitted to the dropout ensemble    |
| synthesized  | no    | yes   | synthesis steps   | -          | the same change, on inputs synthesised from BN |
| closed_form  | no    | no    | 0                 | -          | the paper's formulas, sites only               |
| named_sites  | yes   | no    | levels (+1)       | >= 1       | population with Dropout re-inserted by name    |

(*) a batch must give each BN at least 2 values per channel (one sample does for a 2-D BN: H x W values,
as PyTorch's train-mode BN allows; batches that do not are skipped with a note, and a BN left without
statistics is refused by the rewrite pass, rule 3).

Modules are imported when an estimator is first used, so reading the registry (``vsonnx --help``) is free.
"""
from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..errors import VsonnxError

if TYPE_CHECKING:
    import onnx

    from ..data import Source
    from ..sites import ScanReport
    from ..stats import Estimate


@dataclass
class EstimateRequest:
    """What an estimator gets: the model, the BN names to estimate, the scan report of the model, the data
    (None for data-free methods) and the run settings."""

    model: onnx.ModelProto
    targets: list[str]
    report: ScanReport
    source: Source | None = None
    batch_size: int = 128
    device: str = "auto"
    threads: int | None = None
    progress: bool = False
    seed: int = 0
    options: dict[str, Any] = field(default_factory=dict)  # method-specific (synthetic samples, steps, sites)


@dataclass(frozen=True)
class Method:
    name: str
    label: str  # what reports and model metadata call it
    module: str  # vsonnx.methods.<module>.estimate
    needs_data: bool
    needs_torch: bool
    passes: str
    selectable: bool = True  # a --method choice and a --val candidate (calibrated methods)
    settings: dict[str, Any] = field(default_factory=dict)  # method options and their defaults (CLI, estimate)

    @property
    def available(self) -> bool:
        """False when the method needs torch and torch is not installed."""
        import importlib.util

        return not self.needs_torch or importlib.util.find_spec("torch") is not None

    @property
    def estimate(self) -> Callable[[EstimateRequest], Estimate]:
        return importlib.import_module(f"{__name__}.{self.module}").estimate

    def run(self, request: EstimateRequest) -> Estimate:
        """The estimate, timed; refuses a batch size below 1 (smaller batches than a BN can use are skipped by
        the estimators themselves: the table's note (*))."""
        import time

        if self.needs_data and request.batch_size < 1:
            raise VsonnxError(f"batch size must be positive, got {request.batch_size}.", "pass --batch-size 2 or more.")
        start = time.perf_counter()
        result = self.estimate(request)
        result.seconds = time.perf_counter() - start
        return result


REGISTRY: dict[str, Method] = {m.name: m for m in (
    Method("batch", "batch", "batch", True, False, "1 pass"),
    Method("population", "population", "population", True, False, "one pass per BN level"),
    Method("relative", "relative", "relative", True, False, "1 pass, dropout on and off side by side"),
    Method("distill", "distill", "distill", True, True, "a teacher pass and a student step per batch",
           settings={"steps": 200, "lr": 0.01, "scores": None, "loss": None}),
    Method("synthesized", "data-free (synthetic inputs)", "synthesized", False, True, "synthesis steps",
           selectable=False),
    Method("closed_form", "data-free (closed form)", "closed_form", False, False, "0", selectable=False),
    Method("named_sites", "population (named dropout sites)", "named_sites", True, False, "levels (+1)",
           selectable=False),
)}
CALIBRATED = tuple(name for name, m in REGISTRY.items() if m.selectable)


def get(name: str) -> Method:
    """The registry entry ``name``; a user error listing the choices otherwise."""
    if name not in REGISTRY:
        raise VsonnxError(f"unknown method '{name}'.", f"use one of {', '.join(CALIBRATED)}.")
    return REGISTRY[name]


def estimate(name: str, model: onnx.ModelProto, targets: list[str], source: Source | None = None, *,
             report: ScanReport | None = None, **settings) -> Estimate:
    """Run registry method ``name`` on ``model`` for the BNs ``targets``; ``settings``: the other
    EstimateRequest fields (batch_size, device, threads, progress, seed, options).

    Example:
        result = estimate("population", model, ["bn1", "bn2"], ArraySource.from_arrays(model, x, None))
    """
    from ..sites import find_sites

    request = EstimateRequest(model, targets, report or find_sites(model), source, **settings)
    return get(name).run(request)

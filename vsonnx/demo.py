"""`vsonnx demo`: the whole story on a reference CIFAR-10 model.

scan the model, fix it with the calibrated methods of ``DEMO_METHODS`` on shuffled training images and without
data (synthetic inputs), the torch-based ones when torch is installed, and evaluate the original and the fixed
models on the test images (decoded once, all models on the same batches).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from .accuracy import EvalReport, score_together
from .data import ArraySource, InputSpec, Preprocess, open_source
from .settings import check_settings
from .data.cifar import find_cifar, load_python_release
from .errors import VsonnxError
from .model import load_model, scratch_folder
from .methods import CALIBRATED, REGISTRY
from .methods.synthesized import DEFAULT_SAMPLES, DEFAULT_STEPS
from .recalibrate import FixOptions, fix_calibrated, fix_data_free
from .sites import find_sites

DEFAULT_MODEL = "preresnet20-a05.onnx"
# the paper's method, the best re-estimation and the best fit; population (about batch's accuracy, slower)
# is left out so that the demo stays within two minutes on two cores
DEMO_METHODS = ("batch", "relative", "distill")
DEMO_DISTILL_STEPS = 100  # half the default: the distillation is the slowest fix (about 30 s on 2 cores)


def models_dir() -> Path:
    """The repository's models/ folder (present in a source checkout or an editable install)."""
    return Path(__file__).resolve().parents[1] / "models"


@dataclass
class DemoReport:
    model: str
    sites: int
    batchnorms: int
    calib_samples: int
    results: list[EvalReport]
    fix_seconds: dict[str, float]
    notes: list[str] = field(default_factory=list)
    total_seconds: float = 0.0  # the whole demo, data loading included

    def to_dict(self) -> dict:
        return {"model": self.model, "sites": self.sites, "batchnorms": self.batchnorms,
                "calib_samples": self.calib_samples, "fix_seconds": self.fix_seconds,
                "results": [r.to_dict() for r in self.results], "notes": self.notes,
                "total_seconds": self.total_seconds}


def _sources(model, data: Path | None, calib_limit: int, test_limit: int | None, seed: int):
    kind, root = find_cifar("cifar10", data)
    if kind == "folder":
        calib = open_source(root / "train", model, shuffle=True, seed=seed, limit=calib_limit)
        test = open_source(root / "test", model, shuffle=True, seed=seed, limit=test_limit)
        return calib, test
    release = load_python_release(root, "cifar10")
    pre = Preprocess.resolve(model, InputSpec.all_of(model))
    (tx, ty), (vx, vy) = release["train"], release["test"]
    calib = ArraySource.from_arrays(model, pre.apply(tx), ty, seed=seed, limit=calib_limit, name=str(root / "train"))
    test = ArraySource.from_arrays(model, pre.apply(vx), vy, seed=seed, limit=test_limit, name=str(root / "test"))
    return calib, test


def run_demo(data: Path | None = None, model_path: Path | None = None, *, calib_limit: int = 5000,
             test_limit: int | None = None, batch_size: int = 128, device: str = "auto",
             threads: int | None = None, seed: int = 0, out_dir: Path | None = None, progress: bool = False,
             synthetic: int = DEFAULT_SAMPLES, synthetic_steps: int = DEFAULT_STEPS,
             distill_steps: int = DEMO_DISTILL_STEPS) -> DemoReport:
    """``synthetic=0`` (or no torch) leaves the data-free fix out."""
    start = time.perf_counter()
    model_path = Path(model_path) if model_path else models_dir() / DEFAULT_MODEL
    check_settings(batch_size=batch_size, seed=seed, threads=threads)
    if not model_path.exists():
        raise VsonnxError(f"reference model '{model_path}' not found.",
                          "run from a source checkout (models/ holds the reference models) or pass --model.")
    model = load_model(model_path)
    scan = find_sites(model, str(model_path))
    calib, test = _sources(model, data, calib_limit, test_limit, seed)
    with scratch_folder("demo") as tmp:
        folder = Path(out_dir) if out_dir else Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        fixed, seconds = {}, {}
        options = FixOptions.of(batch_size=batch_size, device=device, threads=threads, progress=progress, seed=seed,
                                synthetic=synthetic, synthetic_steps=synthetic_steps,
                                method_options={"distill": {"steps": distill_steps}})
        notes = [f"{m} fix skipped: torch is not installed (pip install 'vsonnx[train]')."
                 for m in DEMO_METHODS if not REGISTRY[m].available]
        for method in [m for m in DEMO_METHODS if m in CALIBRATED and REGISTRY[m].available]:
            out = folder / f"{model_path.stem}.{method}.onnx"
            report = fix_calibrated(model_path, calib, method, options.writing_to(out))
            fixed[method], seconds[method] = out, round(report.seconds or 0.0, 2)
        if synthetic > 0 and not REGISTRY["synthesized"].available:
            notes.append("data-free fix skipped: torch is not installed (pip install 'vsonnx[train]').")
        elif synthetic > 0:
            out = folder / f"{model_path.stem}.data-free.onnx"
            report = fix_data_free(model_path, options.writing_to(out))
            fixed["data-free"], seconds["data-free"] = out, round(report.seconds or 0.0, 2)
        names = {"original": model_path, **{f"fixed ({m})": p for m, p in fixed.items()}}
        results = list(score_together({name: load_model(path) for name, path in names.items()}, test,
                                      device=device, threads=threads, progress=progress).values())
    return DemoReport(str(model_path), len(scan.sites), len(scan.batchnorms), calib.size or 0, results, seconds,
                      notes, round(time.perf_counter() - start, 1))

"""Label-free signals of the choice among candidates (issue 23), measured on the suite and kept per member.

On the held-out part of the calibration images (what ``fix --val-split`` holds out; labels unused), for the
original model and every candidate of ``vsonnx.recalibrate.candidate_models``:

- the logits of each model (dropout off), and the logits of the original with dropout on under ``MASKS``
  seeded masks (seed 1: other masks than the fix's ranking draws);
- per model, with p = the masks' mean softmax (the ensemble), q = softmax(model logits), c = argmax p:
  ``ce`` = mean -log q_c (the criterion ``fix`` ranks by, here with more masks), ``kl`` = mean KL(p || q),
  ``agree`` = share of images with argmax q = c, ``entropy`` = mean H(q), ``consensus`` = share of images
  where argmax q is the candidates' majority class, ``brier`` = mean sum (q - p)^2;
- ``ensemble_spread``: mean over images of the masks' disagreement (share of masks whose class is not c), how
  noisy the dropout ensemble itself is.

``measure`` writes the arrays to ``runs/suite-signals/NAME.npz`` (not committed: ~1 MB a member) and returns
the per-model means that tools/suite.py stores in models/suite.json.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

MASKS = 32
SEED = 1
SIGNALS = ("ce", "kl", "agree", "entropy", "consensus", "brier")


def _softmax(x: np.ndarray) -> np.ndarray:
    z = x - x.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def collect(candidates, threads: int | None, batch_size: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """(model logits [models, n, classes] of the original then every candidate, ensemble logits [MASKS, n,
    classes]) on ``candidates.held_out`` (a vsonnx.recalibrate.CandidateModels)."""
    from vsonnx.ensemble import DropoutEnsemble, scores_session, scores_tensor
    from vsonnx.runtime import run

    scores = scores_tensor(candidates.original)
    ensemble = DropoutEnsemble(candidates.original, scores, channelwise=candidates.channelwise, seed=SEED,
                               device="cpu", threads=threads)
    sessions = [scores_session(m, scores, device="cpu", threads=threads)
                for m in [candidates.original, *candidates.models]]
    models, masks = [[] for _ in sessions], [[] for _ in range(MASKS)]
    for batch in candidates.held_out.batches(batch_size):
        for k, session in enumerate(sessions):
            models[k].append(np.asarray(run(session, [scores.tensor], batch.feeds)[0], np.float32))
        for k in range(MASKS):
            masks[k].append(ensemble.sample(batch.feeds).astype(np.float32))
    return np.stack([np.concatenate(m) for m in models]), np.stack([np.concatenate(m) for m in masks])


def per_sample(logits: np.ndarray, ensemble: np.ndarray) -> dict[str, np.ndarray]:
    """Per-model, per-image signals (see the module docstring): each [models, n]."""
    p = _softmax(ensemble.astype(np.float64)).mean(axis=0)
    c = p.argmax(axis=1)
    q = _softmax(logits.astype(np.float64))
    log_q = np.log(np.maximum(q, 1e-300))
    rows = np.arange(len(c))
    votes = logits[1:].argmax(axis=2)  # candidates only
    majority = np.array([np.bincount(v, minlength=logits.shape[2]).argmax() for v in votes.T])
    return {"ce": -log_q[:, rows, c],
            "kl": (p * (np.log(np.maximum(p, 1e-300)) - log_q)).sum(axis=2),
            "agree": (logits.argmax(axis=2) == c).astype(np.float64),
            "entropy": -(q * log_q).sum(axis=2),
            "consensus": (logits.argmax(axis=2) == majority).astype(np.float64),
            "brier": ((q - p) ** 2).sum(axis=2)}


def measure(name: str, candidates, threads: int | None, out_dir: Path) -> dict:
    """The signals of one member (means per model, keyed by model name), its arrays saved under ``out_dir``."""
    logits, ensemble = collect(candidates, threads)
    out_dir.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out_dir / f"{name}.npz", logits=logits.astype(np.float16),
                        ensemble=ensemble.astype(np.float16), names=np.array(["original", *candidates.names]))
    signals = per_sample(logits, ensemble)
    classes = ensemble.argmax(axis=2)
    centre = _softmax(ensemble.astype(np.float64)).mean(axis=0).argmax(axis=1)
    models = ["original", *candidates.names]
    return {"held_out": int(logits.shape[1]), "masks": MASKS,
            "ensemble_spread": round(float((classes != centre).mean()), 4),
            "models": {m: {s: round(float(signals[s][k].mean()), 5) for s in SIGNALS} for k, m in enumerate(models)}}


# --------------------------------------------------------------------------------------------------
# rules of choice, compared on the stored signals (models/suite.json)
# --------------------------------------------------------------------------------------------------
SINGLE = ("batch", "population", "relative", "distill", "data-free")
LOWER_IS_BETTER = {"ce": True, "kl": True, "brier": True, "entropy": True, "agree": False, "consensus": False}


def by_signal(signal: str):
    """Rule: the candidate (never the original) best by the held-out ``signal``."""
    def rule(entry: dict) -> str:
        models = {k: v for k, v in entry["signals"]["models"].items() if k != "original"}
        sign = 1 if LOWER_IS_BETTER[signal] else -1
        return min(models, key=lambda k: sign * models[k][signal])
    rule.__name__ = f"best {signal}"
    return rule


def fixed(name: str):
    def rule(entry: dict) -> str:
        return name
    rule.__name__ = f"always {name}"
    return rule


def actual(column: str):
    """What the fix chose (the column's candidate, as recorded)."""
    def rule(entry: dict) -> str:
        return entry["chosen"][column]
    rule.__name__ = f"fix ({column})"
    return rule


def trusted_agreement(threshold: float = 0.6):
    """Rule: trust the dropout ensemble only where the population candidate (statistics measured on the data,
    no reference to the stored ones) agrees with its classes on at least ``threshold`` of the held-out images;
    then the candidate that agrees with them most often, else population. The ensemble runs the stored
    statistics with dropout on, so stale stored statistics (cumulative BN momentum) make it, and every
    candidate fitted towards it (relative, distill), worse than the data's own statistics."""
    def rule(entry: dict) -> str:
        models = {k: v for k, v in entry["signals"]["models"].items() if k != "original"}
        if models["population"]["agree"] < threshold:
            return "population"
        return max(models, key=lambda k: models[k]["agree"])
    rule.__name__ = f"trusted agree ({threshold:g})"
    return rule


def agreement_margin(points: float = 2.0):
    """Hypothesis M (tools/suite_members.py, twelfth batch; not the fix's rule): the fix's label-free choice,
    except that a challenger replacing relative (the candidate with the fewest disagreements with the ensemble,
    ``fix_scores``) must also disagree with it on at least ``points`` percent of the held-out images fewer than
    relative does; else relative. The fallbacks to population (trust, stochastic depth) stay. It failed the test
    registered before the twelfth batch (resnext11-b02: relative 0.11 below distill), so it stays a comparison."""
    def rule(entry: dict) -> str:
        chosen = entry["chosen"]["label-free"]
        scores = {k: v for k, v in entry["signals"]["fix_scores"].items() if k not in ("criterion", "original")}
        if chosen == "relative" or chosen != min(scores, key=scores.get):
            return chosen
        return chosen if 100 * (scores["relative"] - scores[chosen]) >= points else "relative"
    rule.__name__ = f"margin {points:g} (M)"
    return rule


def small_shift_population(threshold: float = 0.16):
    """Hypothesis P (tools/suite_members.py, thirteenth batch; not the fix's rule): the fix's label-free choice,
    except population where the original disagrees with the dropout ensemble's classes on under ``threshold``
    of the held-out images (``fix_scores``): a small shift, where the fixes differ little. It failed the test
    registered before the thirteenth batch (pre8-a01: population 0.22 below the fix's distill; dense10-a01:
    0.22 below), so it stays a comparison."""
    def rule(entry: dict) -> str:
        small = entry["signals"]["fix_scores"]["original"] < threshold
        return "population" if small else entry["chosen"]["label-free"]
    rule.__name__ = f"small shift {threshold:g} (P)"
    return rule


def gap(entry: dict, choice: str) -> float:
    """Test top-1 of ``choice`` minus the best single method's (points)."""
    top = {**entry.get("candidates_top1", {}), **entry["top1"]}
    return top[choice] - max(entry["top1"][m] for m in SINGLE if m in entry["top1"])


def compare_rules(entries: list[dict], rules: list) -> list[tuple[str, float, float, float]]:
    """(rule, median gap, worst gap, mean gap) over ``entries``, best median first."""
    rows = []
    for rule in rules:
        gaps = [gap(e, rule(e)) for e in entries]
        rows.append((rule.__name__, float(np.median(gaps)), float(min(gaps)), float(np.mean(gaps))))
    return sorted(rows, key=lambda r: (-r[1], -r[2]))


def main(argv=None) -> None:
    import argparse
    import json

    p = argparse.ArgumentParser(description="Compare label-free rules of choice on one half of the suite.")
    p.add_argument("--half", choices=("design", "check"), default="design")
    p.add_argument("--results", type=Path, default=Path(__file__).resolve().parents[1] / "models" / "suite.json")
    p.add_argument("--only", help="comma-separated members (instead of a half), each listed with its choices")
    args = p.parse_args(argv)
    only = args.only.split(",") if args.only else None
    entries = [e for e in json.loads(args.results.read_text())
               if "signals" in e and (e["name"] in only if only else e["half"] == args.half)]
    listed = [actual("label-free"), actual("labelled"), agreement_margin(), small_shift_population()]
    rules = [*listed, *(by_signal(s) for s in SIGNALS), trusted_agreement(),
             *(fixed(m) for m in ("batch", "population", "relative", "distill"))]
    print(f"{args.only or args.half + ' half'}: {len(entries)} member(s) with signals; gap = test top-1 of the "
          "choice minus the best single method's (points)")
    for name, median, worst, mean in compare_rules(entries, rules):
        print(f"  {name:22s} median {median:+.2f}  worst {worst:+.2f}  mean {mean:+.2f}")
    for e in entries if only else []:
        print(f"  {e['name']}: " + "; ".join(f"{r.__name__} {r(e)} {gap(e, r(e)):+.2f}" for r in listed))


if __name__ == "__main__":
    main()

"""The variance-shift suite (issue 23): small CIFAR-10 networks chosen to vary what decides which correction
wins — architecture, placement, rate, noise, augmentation, BN momentum, training length, optimiser — each
trainable on 2 CPU cores in minutes, plus no-dropout twins.

``MEMBERS`` maps a name to its ``tools/train.py`` arguments; ``halves(seed)`` is the seeded design/check
assignment (stratified by architecture: each architecture's members are shuffled and dealt alternately), fixed
before any rule is tuned and written to ``models/suite/halves.json`` by ``python tools/suite.py assign``.
``FRESH`` members were chosen and trained after every rule had been fixed (vsonnx at commit ``RULES_FIXED_AT``):
nothing was ever decided on them, so they all belong to the check half and leave the seeded deal of the others
unchanged.
"""
from __future__ import annotations

import random

HALVES_SEED = 20261203
TRAIN_THREADS = 1

_PRE8 = ["--arch", "preresnet", "--depth", "8"]
_PRE14 = ["--arch", "preresnet", "--depth", "14"]
_PLAIN = ["--arch", "plain", "--depth", "6", "--width", "16"]
_DENSE = ["--arch", "densenet", "--depth", "10", "--growth", "12"]
_WRN = ["--arch", "wrn", "--depth", "10", "--widen", "2", "--limit-train", "25000"]
_RESNEXT = ["--arch", "resnext", "--depth", "11", "--cardinality", "4", "--base-width", "4", "--width", "16",
            "--limit-train", "20000"]


def _drop(placement: str, rate: float, *extra: str) -> list[str]:
    return ["--placement", placement, "--dropout", str(rate), *extra]


MEMBERS: dict[str, list[str]] = {
    "pre8-a05": [*_PRE8, *_drop("a", 0.5), "--epochs", "3"],
    "plain6-a03": [*_PLAIN, *_drop("a", 0.3), "--epochs", "4"],
    "dense10-a03": [*_DENSE, *_drop("a", 0.3), "--epochs", "2"],
    "pre8-b05": [*_PRE8, *_drop("b", 0.5), "--epochs", "3"],
    "plain6mlp-a05": [*_PLAIN, "--head", "mlp", *_drop("a", 0.5), "--epochs", "4"],
    "pre8-sd02": [*_PRE8, *_drop("depth", 0.2), "--epochs", "3"],
    "resnext11-a03": [*_RESNEXT, *_drop("a", 0.3), "--epochs", "2"],
    "wrn10-2-b03": [*_WRN, *_drop("b", 0.3), "--epochs", "2"],
    "pre8-a03-bnm001": [*_PRE8, *_drop("a", 0.3), "--bn-momentum", "0.01", "--epochs", "3"],
    "plain6-2d-a02": [*_PLAIN, *_drop("a", 0.2, "--noise", "dropout2d"), "--epochs", "4"],
    "pre8-a03-cumulative": [*_PRE8, *_drop("a", 0.3), "--bn-momentum", "cumulative", "--epochs", "3"],
    "dense10-b02": [*_DENSE, *_drop("b", 0.2), "--epochs", "2"],
    "pre8-a04-adam": [*_PRE8, *_drop("a", 0.4), "--optimizer", "adam", "--lr", "0.002", "--epochs", "3"],
    "plain6-b03": [*_PLAIN, *_drop("b", 0.3), "--epochs", "4"],
    "pre8-a02-noaug": [*_PRE8, *_drop("a", 0.2), "--no-augment", "--epochs", "3"],
    "pre8-a03-short": [*_PRE8, *_drop("a", 0.3), "--epochs", "1"],
    "plain9mlp-a02-adam-noaug": ["--arch", "plain", "--depth", "9", "--width", "12", "--head", "mlp",
                                 *_drop("a", 0.2), "--optimizer", "adam", "--lr", "0.002", "--no-augment",
                                 "--epochs", "3"],
    "resnext11-b05": [*_RESNEXT, *_drop("b", 0.5), "--epochs", "2"],
    "pre8-2d-a03": [*_PRE8, *_drop("a", 0.3, "--noise", "dropout2d"), "--epochs", "3"],
    "dense10-a04-bnm001": [*_DENSE, *_drop("a", 0.4), "--bn-momentum", "0.01", "--epochs", "2"],
    "pre14-a01": [*_PRE14, *_drop("a", 0.1), "--epochs", "2"],
    "pre8-a03-long": [*_PRE8, *_drop("a", 0.3), "--epochs", "6"],
    "pre8-none": [*_PRE8, "--epochs", "3"],
    "plain6-none": [*_PLAIN, "--epochs", "4"],
}

RULES_FIXED_AT = "e1de711"
FRESH: dict[str, list[str]] = {
    "pre8-b02-adam": [*_PRE8, *_drop("b", 0.2), "--optimizer", "adam", "--lr", "0.002", "--epochs", "3"],
    "plain6-a04-long": [*_PLAIN, *_drop("a", 0.4), "--epochs", "8"],
    "plain6mlp-b04-noaug": [*_PLAIN, "--head", "mlp", *_drop("b", 0.4), "--no-augment", "--epochs", "4"],
    "pre8-2d-a05-bnm001": [*_PRE8, *_drop("a", 0.5, "--noise", "dropout2d"), "--bn-momentum", "0.01",
                           "--epochs", "3"],
    "plain6-2d-b03": [*_PLAIN, *_drop("b", 0.3, "--noise", "dropout2d"), "--epochs", "4"],
    "pre8-a04-cumulative": [*_PRE8, *_drop("a", 0.4), "--bn-momentum", "cumulative", "--epochs", "2"],
    # second batch (session 16), chosen before any of its results, where the check half was thin: stochastic
    # depth (none there), DenseNet's concat sites, WRN, an MLP head with slow BN statistics
    "pre8-sd04": [*_PRE8, *_drop("depth", 0.4), "--epochs", "3"],
    "dense10-a05-adam": [*_DENSE, *_drop("a", 0.5), "--optimizer", "adam", "--lr", "0.002", "--epochs", "2"],
    "wrn10-2-a04-noaug": [*_WRN, *_drop("a", 0.4), "--no-augment", "--epochs", "2"],
    "plain6mlp-a03-bnm001": [*_PLAIN, "--head", "mlp", *_drop("a", 0.3), "--bn-momentum", "0.01", "--epochs", "4"],
    # third batch (session 16), chosen after the second's results, before its own: the two situations where the
    # label-free choice lost most there (stochastic depth, dropout before a conv)
    "pre8-sd03-bnm001": [*_PRE8, *_drop("depth", 0.3), "--bn-momentum", "0.01", "--epochs", "3"],
    "pre8-b04-noaug": [*_PRE8, *_drop("b", 0.4), "--no-augment", "--epochs", "3"],
    # fourth batch (session 17), chosen before any of its results: the trust test on a cumulative BN average in
    # another architecture (an MLP head; both cumulative members so far are PreResNets), and short training
    # (one epoch: only in the design half so far)
    "plain6mlp-a04-cumulative": [*_PLAIN, "--head", "mlp", *_drop("a", 0.4), "--bn-momentum", "cumulative",
                                 "--epochs", "4"],
    "pre8-a02-short": [*_PRE8, *_drop("a", 0.2), "--epochs", "1"],
    # fifth batch (session 17), chosen with the fourth, before any result of either, to be trained after it:
    # the two situations where the choices still miss most (stochastic depth, dropout before a conv), each with
    # something the suite has not combined with them (Adam; a plain CNN at rate 0.5)
    "pre8-sd02-adam": [*_PRE8, *_drop("depth", 0.2), "--optimizer", "adam", "--lr", "0.002", "--epochs", "3"],
    "plain6-b05": [*_PLAIN, *_drop("b", 0.5), "--epochs", "4"],
    # sixth batch (session 17), chosen after the fourth's results, before the fifth's: the two architectures
    # with no fresh member at placement b or none at all (DenseNet's concat sites at b, ResNeXt)
    "dense10-b04-bnm001": [*_DENSE, *_drop("b", 0.4), "--bn-momentum", "0.01", "--epochs", "2"],
    "resnext11-a04-noaug": [*_RESNEXT, *_drop("a", 0.4), "--no-augment", "--epochs", "2"],
    # seventh batch (session 17), chosen after the fifth's results, before its own, to test what the check half's
    # three stochastic-depth members suggest (relative 0.14-0.35 below population on each; pooled -0.26, paired
    # 95% about [-0.47, -0.05]; on the design half's pre8-sd02 relative was 0.04 above): does population beat
    # relative on stochastic depth? No rule changed. Decided before their results: the label-free choice becomes
    # population on networks whose every site is stochastic depth only if population's test top-1 is at least
    # relative's on both.
    "pre8-sd05": [*_PRE8, *_drop("depth", 0.5), "--epochs", "3"],
    "pre8-sd03-noaug": [*_PRE8, *_drop("depth", 0.3), "--no-augment", "--epochs", "3"],
    # eighth batch (session 17), chosen after the stochastic-depth rule was adopted, before its own results: that
    # rule on a deeper PreResNet and with slow BN statistics
    "pre14-sd03": [*_PRE14, *_drop("depth", 0.3), "--epochs", "2"],
    "pre8-sd04-bnm001": [*_PRE8, *_drop("depth", 0.4), "--bn-momentum", "0.01", "--epochs", "3"],
    # ninth batch (session 18), chosen before its results: the stochastic-depth rule off PreResNets (every suite
    # stochastic-depth member so far is one), on Wide ResNets, once plain and once with Adam. Decided before
    # training: the rule holds there if population's test top-1 is at least relative's on both and within 0.2
    # of the best single method on both; otherwise the note says it fails on WRN (no rule changes this session).
    "wrn10-2-sd03": [*_WRN, *_drop("depth", 0.3), "--epochs", "2"],
    "wrn10-2-sd04-adam": [*_WRN, *_drop("depth", 0.4), "--optimizer", "adam", "--lr", "0.002", "--epochs", "2"],
    # tenth batch (session 18), chosen with the ninth, before any result of either: channel dropout (Dropout2d)
    # off plain CNNs and PreResNets, where the label-free misses cluster (the ensemble at or below the fixes):
    # before a conv in a DenseNet (the situation of the suite's one resolved labelled miss, plain6-2d-b03), and
    # right before BN in a ResNeXt. No decision registered: checks of the rules as they stand.
    "dense10-2d-b03": [*_DENSE, *_drop("b", 0.3, "--noise", "dropout2d"), "--epochs", "2"],
    "resnext11-2d-a03": [*_RESNEXT, *_drop("a", 0.3, "--noise", "dropout2d"), "--epochs", "2"],
    # eleventh batch (session 18), chosen after the ninth's and tenth's results, before its own: placement b,
    # where both choices miss most often (by 0.1-0.3, unresolved), in the two architectures with fewest members
    # there (a deeper PreResNet, trained longer; a ResNeXt with slow BN statistics). Checks, no decision.
    "pre14-b03-long": [*_PRE14, *_drop("b", 0.3), "--epochs", "4"],
    "resnext11-b03-bnm001": [*_RESNEXT, *_drop("b", 0.3), "--bn-momentum", "0.01", "--epochs", "2"],
    # twelfth batch (session 18), chosen after the eleventh's results, before its own, to test what the check half
    # suggests (the design half cannot: there every challenger agreed with the ensemble 3+ points more than
    # relative): distill replaces relative also where it agrees with the ensemble only 0.5-2 points more often,
    # and there it lost to relative on 8 of 9 check members (by up to 0.53). Hypothesis M, not adopted: the
    # challenger must also disagree with the ensemble at least 2 points (of held-out images) less often than
    # relative (mean, fix_scores). Decided before training: M is kept for adoption only if, over this batch,
    # the label-free choice under M has a total top-1 at least the current rule's and is nowhere below it by
    # more than 0.1. Small-shift networks (placement b at low rates, Dropout2d), where the gap is small.
    "pre8-b03": [*_PRE8, *_drop("b", 0.3), "--epochs", "3"],
    "wrn10-2-b02": [*_WRN, *_drop("b", 0.2), "--epochs", "2"],
    "dense10-2d-a02": [*_DENSE, *_drop("a", 0.2, "--noise", "dropout2d"), "--epochs", "2"],
    "resnext11-b02": [*_RESNEXT, *_drop("b", 0.2), "--epochs", "2"],
    # thirteenth batch (session 18), chosen after the twelfth's results, before its own, to test what the check
    # half suggests (the design half cannot: its original disagrees with the ensemble on 18% of held-out images
    # or more everywhere): where the shift is small the fixes differ little and population was the best or
    # within 0.32 on all 13 check members (not stochastic depth, not the trust fallback) whose original disagrees
    # with the ensemble on under 16% of held-out images, while the label-free choice missed by up to 0.38 (sum
    # -1.37 against population's -1.00). Hypothesis P, not adopted: there choose population. Decided before
    # training: P is kept for adoption only if, over this batch's members where it applies, its total top-1 is
    # at least the current rule's and nowhere below it by more than 0.1. Small shifts: low rates, placement b.
    "pre8-a01": [*_PRE8, *_drop("a", 0.1), "--epochs", "3"],
    "pre8-b02": [*_PRE8, *_drop("b", 0.2), "--epochs", "3"],
    "dense10-b03": [*_DENSE, *_drop("b", 0.3), "--epochs", "2"],
    "dense10-a01": [*_DENSE, *_drop("a", 0.1), "--epochs", "2"],
}
# check members a rule was later decided on, so no longer a check of it: rule -> members
DECIDED_ON = {"stochastic depth: population (vsonnx.choose, session 17)": ("pre8-sd02-adam", "pre8-sd03-bnm001",
                                                                             "pre8-sd04")}
SEEDED = dict(MEMBERS)  # the members dealt into halves by the seed
MEMBERS.update(FRESH)

TWINS = {"pre8-a05": "pre8-none", "pre8-b05": "pre8-none", "plain6-a03": "plain6-none",
         "plain6-b03": "plain6-none"}


def arch_of(name: str) -> str:
    args = MEMBERS[name]
    return args[args.index("--arch") + 1]


def halves(seed: int = HALVES_SEED) -> dict[str, str]:
    """Name -> ``design`` or ``check`` for every member with dropout; stratified by architecture."""
    rng = random.Random(seed)
    by_arch: dict[str, list[str]] = {}
    for name in sorted(SEEDED):
        if name not in TWINS.values():
            by_arch.setdefault(arch_of(name), []).append(name)
    assignment, turn = {}, 0
    for arch in sorted(by_arch):
        names = by_arch[arch]
        rng.shuffle(names)
        for name in names:
            assignment[name] = ("design", "check")[turn % 2]
            turn += 1
    assignment.update(dict.fromkeys(FRESH, "check"))
    return dict(sorted(assignment.items()))

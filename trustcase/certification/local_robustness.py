"""Local robustness, proved: around sampled inputs, does the prediction stay the same for every input of
an L-infinity ball? Answered per input and radius by `decide` on the model's layer graph, cheapest first:

- `verified`: proved by IBP, CROWN, alpha-CROWN, then branch and bound (`bab.decide`: input splitting for
  few inputs, beta-CROWN ReLU splitting otherwise), float64, each bound clearing its row by the rounding of its
  own arithmetic (`bab.allowance`, `bab.MARGIN_RULE`): no input of the ball
  gives another class a score >= the predicted one (a tie counts as a change);
- `falsified`: an input of the ball that changes the prediction, found by the attack engine of the
  adversarial check or at a corner the bounds point to, and re-checked by a plain float32 forward pass;
- `unknown`: neither within the time budget. Unknown is not verified: the verified fraction is a lower
  bound of the robust fraction, the falsified fraction a lower bound of the fragile one.

Radii are in the input scaled to [0, 1] (value / (max - min) of model.value_range), the convention of the
Lipschitz and smoothing checks, but in L-infinity; the ball is clipped to the value range (inputs outside
it are not in the domain). A falsified radius makes every larger one falsified (the counterexample is
inside the larger ball); a verified one makes every smaller one verified.

The check `local_robustness` packs the verdicts as evidence.
A layer the layer graph (`graph.from_model`) cannot read makes the check "not run", with the layer named.
"""

from __future__ import annotations

import math
import statistics

import numpy as np
import torch

from trustcase import clock, seeding
from trustcase.certification import bab
from trustcase.certification import propagation as P
from trustcase.certification.bab import INPUT_SPLIT_MAX, MAX_SPLIT
from trustcase.certification.vnnlib import Conjunction, Property, Region
from trustcase.robustness.attacks import Budget, _fooled, attack_region

VERDICTS = ("verified", "falsified", "unknown")


def change_property(name: str, lower: np.ndarray, upper: np.ndarray, predicted: int, n_classes: int) -> Property:
    """'Some input of the box gives a class j != predicted a score >= the predicted one', one row per j."""
    rows = []
    for j in range(n_classes):
        if j != predicted:
            a = np.zeros((1, n_classes))
            a[0, predicted], a[0, j] = 1.0, -1.0  # y_pred - y_j <= 0
            rows.append(Conjunction(A=a, b=np.zeros(1), strict=np.zeros(1, bool)))
    return Property(name=name, n_inputs=len(lower), n_outputs=n_classes,
                    regions=[Region(lower=np.asarray(lower, np.float64), upper=np.asarray(upper, np.float64),
                                    outputs=rows)])


STAGES = ("ibp", "crown", "alpha-crown")
DECIDERS = ("ibp", "crown", "alpha-crown", "bab", "attack engine", "corner")  # how `decide`'s `method` begins


def decisions(answers: list[dict]) -> dict:
    """How the balls of a run were decided: how many `decide` answers each of `DECIDERS` gave (by the start of
    its `method`), and the median seconds of one answer."""
    return {"decided_by": {m: sum(1 for a in answers if (a["method"] or "").startswith(m)) for m in DECIDERS},
            "median_seconds": round(statistics.median(a["seconds"] for a in answers), 3)}


def decide(g, forward, x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, predicted: int, timeout: float,
           seed: int = 0, item_seed: int | None = None, limit: int | None = None, prove: bool = True,
           max_split: int = MAX_SPLIT) -> dict:
    """verified / falsified / unknown: does every input of the box [lo, hi] around x (model inputs, (1, ...))
    keep `predicted` strictly above every other class?

    IBP first (milliseconds: it decides most balls of a network trained with interval bounds), then
    falsification (the adversarial check's attack engine: FGSM, PGD, then APGD on the margin), then CROWN
    (intermediate bounds of every unstable neuron refined, or of the `limit` loosest per layer) and alpha-CROWN
    on the layer graph, each only if the one before did not decide, then branch and bound on the ReLUs when at
    most `max_split` are unstable, within `timeout` seconds;
    after each bound, the corner of the box that minimises its linear bound is tried as a witness, then used
    as an attack start. Every witness is re-checked by a plain float32 forward pass and lies in the box.
    prove=False: the attack only (a smaller ball around x was not proved, so this one would not be either).
    The attack's random starts follow `item_seed` (the item's seed, `trustcase.seeding`), else (seed, x).
    """
    if item_seed is None:
        item_seed = seeding.item_seed(seed, "local_robustness", seeding.content_id(x), "attack")
    if timeout <= 0:
        raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
    t0 = clock.now()
    deadline = t0 + timeout
    label = torch.tensor([predicted])
    lo32, hi32 = lo.float(), hi.float()

    def falsified(adv: torch.Tensor, how: str) -> dict | None:
        adv = torch.minimum(torch.maximum(adv.float(), lo32), hi32)
        with torch.no_grad():
            ok = _fooled(forward(adv), label.expand(len(adv)))
        if not ok.any():
            return None
        return {"verdict": "falsified", "method": f"{how}, re-checked by a forward pass",
                "counterexample": adv[int(torch.nonzero(ok)[0])].numpy(), "margin": None,
                "seconds": clock.now() - t0}

    def attack(start: torch.Tensor, apgd_steps: int, restarts: int) -> dict | None:
        # the adversarial check's engine (FGSM, PGD, then APGD), a tie counting as a change of class
        adv, fooled = attack_region("auto", forward, start.float(), label, lo32, hi32,
                                    Budget(restarts=restarts, apgd_steps=apgd_steps), seeds=np.array([item_seed]),
                                    hit=_fooled)
        return falsified(adv, "attack engine (FGSM, PGD, APGD)") if fooled.any() else None

    with torch.no_grad():
        n = forward(x.float()).shape[1]
    C = torch.zeros(n - 1, n, dtype=torch.float64)
    C[:, predicted] = 1.0
    C[torch.arange(n - 1), [j for j in range(n) if j != predicted]] = -1.0
    box_lo, box_hi = lo.double(), hi.double()
    need = bab.allowance(g, box_lo, box_hi, C)  # bounds of C y - need above 0 clear their own float64 rounding
    best, bounds = -np.inf, None
    for stage in STAGES:
        if stage == "crown":  # what IBP leaves open: a counterexample may exist, and is cheaper to find
            found = attack(x, 50, 1)
            if found:
                return found
            if not prove:
                return {"verdict": "unknown", "method": "", "counterexample": None, "margin": None,
                        "seconds": clock.now() - t0,
                        "reason": "no counterexample; a smaller ball was not proved"}
        elif stage == "ibp" and not prove:
            continue
        if clock.now() > deadline:
            break
        r = P.lower_bound(g, box_lo, box_hi, C, stage, bounds=bounds, limit=limit, deadline=deadline,
                          target=0.0, rhs=need)
        if stage != "ibp":
            bounds = r.bounds  # alpha-CROWN reuses CROWN's intermediate bounds
        best = max(best, float((r.lower + need).min()))
        if (r.lower > 0).all():
            return {"verdict": "verified", "method": stage, "counterexample": None, "margin": best,
                    "seconds": clock.now() - t0}
        if r.lam is not None:  # the corner minimising the linear bound of the worst row: the likeliest witness
            worst = r.lam[0, int(r.lower[0].argmin())]
            corner = torch.where(worst > 0, box_lo[0], box_hi[0])[None]
            found = falsified(corner, f"corner of the box picked by {stage}") or (
                clock.now() < deadline and attack(corner, 50, 1))
            if found:
                return found
    reason = f"no proof and no counterexample within {timeout:g} s (best lower bound of the margin {best:.4g})"
    unstable = sum(int(((bounds[g.nodes[r].inputs[0]][0] < 0) & (bounds[g.nodes[r].inputs[0]][1] > 0)).sum())
                   for r in g.relus) if bounds is not None else None
    low_dim = math.prod(g.nodes[0].shape) <= INPUT_SPLIT_MAX
    if unstable is not None and unstable > max_split and not low_dim:
        reason = f"{reason}; {unstable} unstable ReLUs, more than ReLU branch and bound takes on ({max_split})"
    elif clock.now() < deadline:
        shape = g.nodes[0].shape

        def candidate(xs: np.ndarray) -> dict | None:  # the search's witness is this function's verdict
            return falsified(torch.from_numpy(xs).reshape(len(xs), *shape), "corner of a box of branch and bound")

        conj = [(C[i:i + 1].numpy(), np.zeros(1)) for i in range(len(C))]  # y_pred - y_j <= 0: j catches up
        out = bab.decide(g, box_lo[0].numpy(), box_hi[0].numpy(), conj, deadline, candidate=candidate)
        if out.verdict == "holds":
            return {"verdict": "verified", "method": f"bab: {out.method} ({out.boxes} boxes or domains)",
                    "counterexample": None, "margin": best, "seconds": clock.now() - t0}
        if out.verdict == "violated":
            return out.counterexample
        reason = f"{reason}; branch and bound: {out.reason}"
    return {"verdict": "unknown", "method": "", "counterexample": None, "margin": best,
            "seconds": clock.now() - t0, "reason": reason}

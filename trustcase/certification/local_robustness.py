"""Local robustness, proved: around sampled inputs, does the prediction stay the same for every input of
an L-infinity ball? Answered per input and radius by the formal machinery of `properties` and `bounds`:

- `verified`: proved by CROWN + interval bounds with input splitting (float64, margin `bounds.TOLERANCE`)
  that no input of the ball gives another class a score >= the predicted one (a tie counts as a change);
- `falsified`: an input of the ball that changes the prediction, found by the bounds' corners or by
  sampling + PGD, and re-checked by a plain float32 forward pass;
- `unknown`: neither within the time budget. Unknown is not verified: the verified fraction is a lower
  bound of the robust fraction, the falsified fraction a lower bound of the fragile one.

Radii are in the input scaled to [0, 1] (value / (max - min) of model.value_range), the convention of the
Lipschitz and smoothing checks, but in L-infinity; the ball is clipped to the value range (inputs outside
it are not in the domain). A falsified radius makes every larger one falsified (the counterexample is
inside the larger ball); a verified one makes every smaller one verified.

Check `local_robustness` (stage "formal"), per radius r, scope {split, perturbation {linf_radius, r}}:
- `local_robustness_verified`: fraction of the sampled inputs proved robust at r (Clopper-Pearson);
- `local_robustness_falsified`: fraction with a verified counterexample at r.
Summary keys: radii, verified, falsified, unknown (counts per radius), items, timeout, seconds.
Artefact: per-item CSV (id, label, prediction, one verdict per radius).
Requirements: `metric: local_robustness_verified, scope: {perturbation: {name: linf_radius, max_amplitude: r}}`.
Networks of Linear and ReLU layers only (e.g. ACAS Xu); anything else is "not run", with the layer named.
"""

from __future__ import annotations

import time

import numpy as np

from trustcase.certification import bounds as B
from trustcase.certification.properties import falsify, plain_check
from trustcase.certification.vnnlib import Conjunction, Property, Region

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


def verify_ball(layers: list[B.Affine], forward, prop: Property, timeout: float, seed: int = 0) -> str:
    """verified / falsified / unknown for one box: proof first (small balls are mostly proved at once),
    then a search for a counterexample with what is left of the budget."""
    t0 = time.perf_counter()
    region = prop.regions[0]

    def candidate(xs: np.ndarray):
        return plain_check(forward, prop, np.clip(xs, region.lower, region.upper))

    out = B.prove(layers, region.lower, region.upper, [(c.A, c.b) for c in region.outputs],
                  t0 + 0.8 * timeout, candidate=candidate)
    if out.verdict == "holds":
        return "verified"
    if out.verdict == "violated":
        return "falsified"
    found = falsify(forward, prop, t0 + timeout, seed, samples=1024, restarts=16, steps=50)
    return "falsified" if found is not None else "unknown"



"""Randomized smoothing of a detector's "indication present" decision against a closed form: a detector whose one
detection scores sigmoid(k (w.x + b)) indicates at threshold 1/2 exactly when w.x + b >= 0, a half-space, so the
smoothed decision's exact L2 radius is |w.x + b| / ||w|| (inputs scaled to [0, 1]), the distance to the boundary."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_detection_attacks import steel_context

from trustcase.certification.detection_smoothing import IndicationPresent, indication_labels
from trustcase.certification.smoothing import certify, predict
from trustcase.checks.randomized_smoothing import RandomizedSmoothing
from trustcase.schemas import ModelSpec
from trustcase.tasks.detection import Detection

SIDE = 4
W = np.zeros((SIDE, SIDE), np.float32)
W[0, 0], W[1, 2] = 0.6, -0.8  # ||w|| = 1


class HalfSpace(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("w", torch.from_numpy(W).flatten())

    def forward(self, x):
        s = torch.sigmoid(8.0 * (x.flatten(1) @ self.w - 0.1))  # b = -0.1
        box = torch.tensor([0.0, 0.0, 2.0, 2.0]).expand(len(x), 4)
        return torch.cat([box, s[:, None], torch.zeros_like(s)[:, None]], 1)[:, None]


@pytest.fixture(scope="module")
def decision(tmp_path_factory):
    path = tmp_path_factory.mktemp("smooth") / "half.pt"
    torch.jit.script(HalfSpace()).save(str(path))
    spec = ModelSpec(format="torchscript", path=path, input_shape=[1, SIDE, SIDE], class_names=["crazing", "scratches"],
                     critical_class="crazing", value_range=[0, 1], normalisation={"mean": [0.0], "std": [1.0]},
                     score_threshold=0.5)
    return IndicationPresent(Detection().load_model(spec), 0.5)


def _image(a, b):
    x = np.full((1, SIDE, SIDE, 1), 0.5, np.float32)
    x[0, 0, 0, 0], x[0, 1, 2, 0] = a, b
    return x


@pytest.mark.parametrize("a, b, present", [(0.9, 0.2, 1), (0.1, 0.6, 0)])
def test_the_certified_radius_of_the_indication_decision_is_below_the_distance_and_approaches_it(decision, a, b,
                                                                                                   present):
    x = _image(a, b)
    w = W.astype(np.float64).ravel()
    exact = abs(w @ x[0, ..., 0].astype(np.float64).ravel() - 0.1) / np.linalg.norm(w)
    gaps = []
    for n in (200, 20000):
        c, r, _ = certify(decision, x, sigma=0.25, n0=50, n=n, alpha=0.001, batch_size=1000, seed=1)
        assert c[0] == present and r[0] <= exact
        gaps.append(exact - r[0])
    assert gaps[1] < gaps[0] and gaps[1] < 0.1 * exact
    assert predict(decision, x, sigma=0.25, n=1000, alpha=0.001, seed=1)[0] == present


def test_a_tie_at_the_threshold_is_an_indication_and_labels_follow_the_boxes(decision):
    x = _image(0.1 / 0.6, 0.0)  # w.x + b = 0 up to float32: the score is 1/2 within a few ulps
    score = float(decision.detector.forward(decision.to_input(x))[0, 0, 4])
    assert decision.forward(decision.to_input(x)).argmax(1).item() == int(score >= 0.5)
    assert indication_labels([np.zeros((0, 5)), np.ones((2, 5))]).tolist() == [0, 1]


def test_the_smoothing_check_certifies_the_steel_detector_decision(tmp_path):
    ctx = steel_context(tmp_path, "randomized_smoothing")
    check = RandomizedSmoothing(RandomizedSmoothing.Params(n0=4, n=16, max_items=3, batch_size=16, sigma=0.05))
    out = check(ctx)
    by = {m.metric: m for m in out.measurements if not m.scope.perturbation}
    assert by["smoothing_accuracy"].n == 3
    assert any("indication present" in v for v in out.validity)
    assert all(m.value is None or 0 <= m.value <= 1 for m in out.measurements if m.metric != "smoothing_median_radius")


def test_lipschitz_says_why_it_does_not_apply_to_a_detector(tmp_path):
    from trustcase.checks.lipschitz import Lipschitz
    from trustcase.errors import Unsupported

    ctx = steel_context(tmp_path, "lipschitz")
    with pytest.raises(Unsupported, match="not applicable to a detector.*randomized_smoothing"):
        Lipschitz(Lipschitz.Params())(ctx)

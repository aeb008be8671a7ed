"""The conformance suite (trustcase.testing) per task: the checks taught detection keep every promise on the
synthetic detection case (boxes of bright squares, a box-filter detector), and every other registered check says
it is not applicable, with its reason."""

from __future__ import annotations

import numpy as np
import pytest

from trustcase.checks import REGISTRY, Context, build, check_class
from trustcase.data.streaming import DataSource
from trustcase.errors import Unsupported
from trustcase.schemas import CheckSpec
from trustcase.testing import check_conformance, synthetic_boxes, synthetic_case, synthetic_images

TAUGHT = {
    "data_quality": {},
    "performance": {},
    "perturbation_sweep": {"perturbations": {"gaussian_blur": [1.0], "gaussian_noise": [0.05]}},
    "odd_monitor": {"perturbations": {"brightness": [0.4]}},
    "adversarial": {"attacks": ["fgsm_linf"], "linf": [8.0], "objectives": ["vanishing"], "max_items": 4,
                    "distance": False},
    "lipschitz": {},  # not applicable to a detector, with the reason
    "root_causes": {"k_max": 4, "representatives": 2},  # the synthetic detector misses no square: no error
    "randomized_smoothing": {"n0": 8, "n": 32, "max_items": 4},
}


@pytest.mark.parametrize("name", sorted(TAUGHT))
def test_conformance_of_the_checks_taught_detection(name, tmp_path):
    uc, model = synthetic_case([{"check": name, "params": TAUGHT[name]}], task="detection")
    report = check_conformance(name, TAUGHT[name], use_case=uc, model=model, workdir=tmp_path / "runs")
    assert all(v.startswith(("ok", "skipped")) for v in report.values()), report
    # only lipschitz declines a detector; a taught check that declines would pass the line above
    assert ("applies" in report) == (name == "lipschitz"), report


def test_the_synthetic_detector_finds_every_square_and_nothing_else(tmp_path):
    items, plain = synthetic_boxes("test"), synthetic_images("test")
    assert all(np.array_equal(a.image, b.image) for a, b in zip(items, plain, strict=True))
    uc, model = synthetic_case(task="detection")
    ctx = Context(use_case=uc, model=model, data=DataSource(uc.data, 0, uc.model), seed=0, workdir=tmp_path)
    ms = {m.metric: m for m in build(CheckSpec(check="performance"))(ctx).measurements if not m.scope.subgroup}
    assert ms["indication_recall"].value == 1 and ms["false_indications_per_image"].value == 0
    assert ms["ap:defect"].value == pytest.approx(1, abs=1e-12)  # every box exactly: AP 1 at every IoU


def test_every_other_check_says_why_it_does_not_apply(tmp_path):
    uc, model = synthetic_case(task="detection")
    ctx = Context(use_case=uc, model=model, data=DataSource(uc.data, 0, uc.model), seed=0, workdir=tmp_path)
    others = [n for n in sorted(set(REGISTRY) - set(TAUGHT)) if "detection" not in check_class(n).tasks]
    assert others
    for name in others:
        cls = check_class(name)
        with pytest.raises(Unsupported, match="not taught the detection task"):
            cls(cls.Params.model_construct())(ctx)  # its parameters do not matter: it must stop before reading them

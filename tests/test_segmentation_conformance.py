"""The conformance suite (trustcase.testing) per task: the checks taught segmentation keep every promise on the
synthetic segmentation case (masks of bright squares, a fitted per-pixel model), and every other registered check
says it is not applicable, with its reason."""

from __future__ import annotations

import pytest

from trustcase.checks import REGISTRY, Context, build, check_class
from trustcase.data.streaming import DataSource
from trustcase.errors import Unsupported
from trustcase.schemas import CheckSpec
from trustcase.testing import check_conformance, synthetic_case

TAUGHT = {
    "data_quality": {},
    "performance": {},
    "perturbation_sweep": {"perturbations": {"gaussian_blur": [1.0], "gaussian_noise": [0.05]}},
    "odd_monitor": {"perturbations": {"brightness": [0.4]}},  # the synthetic model exports no features: pooled logits
    "root_causes": {"k_max": 4, "representatives": 2},
}


@pytest.mark.parametrize("name", sorted(TAUGHT))
def test_conformance_of_the_checks_taught_segmentation(name, tmp_path):
    uc, model = synthetic_case([{"check": name, "params": TAUGHT[name]}], task="segmentation")
    report = check_conformance(name, TAUGHT[name], use_case=uc, model=model, workdir=tmp_path / "runs")
    assert all(v.startswith(("ok", "skipped")) for v in report.values()), report
    if not check_class(name).needs_gradients:  # root_causes says a black box has no internal relevance
        assert report["black_box"] == "ok (runs)"  # per-pixel probabilities through the real black-box class


def test_the_synthetic_segmenter_finds_the_squares(tmp_path):
    uc, model = synthetic_case(task="segmentation")
    ctx = Context(use_case=uc, model=model, data=DataSource(uc.data, 0, uc.model), seed=0, workdir=tmp_path)
    ms = {m.metric: m for m in build(CheckSpec(check="performance"))(ctx).measurements if not m.scope.subgroup}
    assert ms["image_recall"].value == 1 and ms["iou:defect"].value > 0.5


def test_every_other_check_says_why_it_does_not_apply(tmp_path):
    uc, model = synthetic_case(task="segmentation")
    ctx = Context(use_case=uc, model=model, data=DataSource(uc.data, 0, uc.model), seed=0, workdir=tmp_path)
    for name in sorted(set(REGISTRY) - set(TAUGHT)):
        cls = check_class(name)
        check = cls(cls.Params.model_construct())  # its parameters do not matter: it must stop before reading them
        if "segmentation" in check.tasks:
            continue  # taught segmentation since (certified segmentation, attacks, explanations)
        with pytest.raises(Unsupported, match="not taught the segmentation task"):
            check(ctx)

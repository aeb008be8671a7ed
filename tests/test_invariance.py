"""Evidence does not depend on how the work is cut: the checks of the real tiny solar-cell model (real ELPV
images) give the same evidence at two batch sizes and at two shard counts, and the same seed gives the same
evidence twice (trustcase.testing compares measurements, curves, artefacts, validity and summary)."""

from __future__ import annotations

import pytest

from trustcase.models.loading import load_classifier
from trustcase.schemas import load_use_case
from trustcase.testing import check_conformance

PLAN = {
    "performance": {},
    "data_quality": {},
    "perturbation_sweep": {"perturbations": {"gaussian_blur": [1.0], "gaussian_noise": [0.05], "brightness": [0.2]}},
    "randomized_smoothing": {"n0": 16, "n": 64, "max_items": 24},
    "lipschitz": {"ascent_points": 4, "ascent_steps": 3},
    "adversarial": {"attacks": ["fgsm_linf", "pgd_linf"], "steps": 2, "restarts": 1, "max_items": 12,
                    "distance": False},
    "odd_monitor": {"perturbations": {"brightness": [0.3], "gaussian_blur": [2.0]}},
    "explainability": {"methods": ["smoothgrad", "occlusion"], "options": {"smoothgrad": {"samples": 4}},
                       "items": 6, "sensitivity_items": 2, "gallery": 1},
}


# the default run keeps the cheap ones (every check is also checked on synthetic data by test_conformance)
FAST = {"performance", "randomized_smoothing", "lipschitz"}


@pytest.mark.parametrize("name", [n if n in FAST else pytest.param(n, marks=pytest.mark.slow) for n in sorted(PLAN)])
def test_same_evidence_at_two_batch_sizes_and_shard_counts(name, tiny_case, tmp_path):
    uc = load_use_case(tiny_case)
    model = load_classifier(uc.model)
    report = check_conformance(name, PLAN[name], use_case=uc, model=model, workdir=tmp_path, batch_sizes=(32, 7),
                               properties=("deterministic", "batching", "shards"))
    assert all(v.startswith(("ok", "skipped")) for v in report.values()), report
    if name in ("perturbation_sweep", "adversarial"):
        assert report["shards"] == "ok"

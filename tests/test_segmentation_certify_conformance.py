"""The conformance suite (trustcase.testing) of the checks taught segmentation here: randomized smoothing
(certified segmentation), adversarial (attacks on a segmenter) and explainability (explanations of a region) keep
every promise on the synthetic segmentation case (masks of bright squares, a fitted per-pixel model)."""

from __future__ import annotations

import pytest

from trustcase.testing import check_conformance, synthetic_case

TAUGHT = {
    "randomized_smoothing": {"n0": 8, "n": 48, "alpha": 0.01, "max_items": 6, "radii": [0.05], "batch_size": 64},
    "adversarial": {"attacks": ["pgd_linf"], "linf": [8.0], "steps": 3, "restarts": 1, "max_items": 6},
    "explainability": {"region_methods": ["saliency", "occlusion"], "methods": ["saliency", "occlusion"],
                       "options": {"occlusion": {"window": 4, "stride": 4}}, "items": 4, "steps": 4},
}


@pytest.mark.parametrize("name", sorted(TAUGHT))
def test_conformance_on_a_segmenter(name, tmp_path):
    uc, model = synthetic_case([{"check": name, "params": TAUGHT[name]}], task="segmentation")
    report = check_conformance(name, TAUGHT[name], use_case=uc, model=model, workdir=tmp_path / "runs")
    assert all(v.startswith(("ok", "skipped")) for v in report.values()), report

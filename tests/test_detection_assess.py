"""`trustcase assess` on the steel-defect use case end to end: real NEU-DET images, a real TorchScript CenterNet
(seeded, untrained: this tests the flow, not the detector), real Prefect and MLflow."""

from __future__ import annotations

import pytest
from subset_assess import assess_subset, case_module

dataset_root = case_module("steel_defects", "neu").dataset_root

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_harness"),
              pytest.mark.skipif(not (dataset_root() / "images").is_dir(),
                                 reason=f"NEU-DET is not at {dataset_root()} (set TRUSTCASE_NEUDET)")]


def _edit(raw: dict) -> None:
    for check in raw["plan"]["checks"]:
        if check["check"] == "randomized_smoothing":  # the flow, not the certificate: few samples
            check["params"].update(n=16, max_items=4)
    assert {"check": "lipschitz"} in raw["plan"]["checks"]  # not applicable to a detector, with the reason
    raw["requirements"] = [r for r in raw["requirements"] if r["id"] not in ("D9-glare", "D10-darker")]


def test_assess_the_steel_defect_case_on_a_subset(tmp_path, tracking_uri):
    a, html = assess_subset("steel_defects", "CenterNet", tmp_path, tracking_uri, _edit)
    by_check = {o.check: o for o in a.outcomes}
    assert {"data_quality", "performance", "perturbation_sweep"} <= set(by_check)
    assert any(m.metric == "map50" and m.value is not None for m in by_check["performance"].measurements)
    assert any(m.metric == "bad_boxes" for m in by_check["data_quality"].measurements)
    assert "lipschitz" in html and "not applicable to a detector" in html

"""`trustcase assess` on the steel-defect use case end to end: real NEU-DET images, a real TorchScript CenterNet
(seeded, untrained: this tests the flow, not the detector), real Prefect and MLflow."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import yaml

from trustcase.flows.assess import assess
from trustcase.schemas import Assessment

STEEL = Path(__file__).resolve().parents[1] / "use_cases" / "steel_defects"
sys.path.insert(0, str(STEEL))
from neu import dataset_root  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_harness"),
              pytest.mark.skipif(not (dataset_root() / "images").is_dir(),
                                 reason=f"NEU-DET is not at {dataset_root()} (set TRUSTCASE_NEUDET)")]


def test_assess_the_steel_defect_case_on_a_subset(tmp_path, tracking_uri):
    from train import CenterNet

    torch.manual_seed(0)
    model = tmp_path / "detector.pt"
    torch.jit.script(CenterNet().eval()).save(str(model))
    raw = yaml.safe_load((STEEL / "use_case.yaml").read_text())
    raw["model"]["path"] = str(model)
    raw["data"].update(path=str(STEEL), max_samples={"train": 24, "validation": 12, "test": 24})
    for check in raw["plan"]["checks"]:
        if check["check"] == "perturbation_sweep":
            check["params"]["perturbations"] = {"gaussian_blur": [1.0], "dead_pixels": [0.01]}
        if check["check"] == "randomized_smoothing":  # the flow, not the certificate: few samples
            check["params"].update(n=16, max_items=4)
    assert {"check": "lipschitz"} in raw["plan"]["checks"]  # not applicable to a detector, with the reason
    raw["requirements"] = [r for r in raw["requirements"] if r["id"] not in ("D9-glare", "D10-darker")]
    (tmp_path / "uc.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    r = assess(str(tmp_path / "uc.yaml"), str(tmp_path / "out"), None, tracking_uri)
    assert r.complete
    a = Assessment.model_validate_json((tmp_path / "out" / "assessment.json").read_text())
    assert {e.claim_id for e in a.evidence} == {x.id for x in a.requirements}
    by_check = {o.check: o for o in a.outcomes}
    assert {"data_quality", "performance", "perturbation_sweep"} <= set(by_check)
    assert any(m.metric == "map50" and m.value is not None for m in by_check["performance"].measurements)
    assert any(m.metric == "bad_boxes" for m in by_check["data_quality"].measurements)
    assert (tmp_path / "out" / "report.html").is_file()
    html = (tmp_path / "out" / "report.html").read_text()
    assert "lipschitz" in html and "not applicable to a detector" in html

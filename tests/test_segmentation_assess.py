"""`trustcase assess` on the magnetic-tile use case end to end: real images and masks, a real TorchScript U-Net
(seeded, untrained: this tests the flow, not the segmenter), real Prefect and MLflow."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import yaml

from trustcase.flows.assess import assess
from trustcase.schemas import Assessment

TILES = Path(__file__).resolve().parents[1] / "use_cases" / "magnetic_tiles"
sys.path.insert(0, str(TILES))
from tiles import dataset_root  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_harness"),
              pytest.mark.skipif(not (dataset_root() / "MT_Free").is_dir(),
                                 reason=f"no magnetic tiles at {dataset_root()} (set TRUSTCASE_MAGNETIC_TILES)")]


def test_assess_the_magnetic_tile_case_on_a_subset(tmp_path, tracking_uri):
    from train import UNet

    torch.manual_seed(0)
    model = tmp_path / "segmenter.pt"
    torch.jit.script(UNet().eval()).save(str(model))
    raw = yaml.safe_load((TILES / "use_case.yaml").read_text())
    raw["model"]["path"] = str(model)
    raw["data"].update(path=str(TILES), max_samples={"train": 24, "validation": 12, "test": 24})
    for check in raw["plan"]["checks"]:
        if check["check"] == "perturbation_sweep":
            check["params"]["perturbations"] = {"gaussian_blur": [1.0], "dead_pixels": [0.01]}
    raw["plan"]["checks"].append({"check": "label_issues"})  # not taught segmentation: not applicable
    raw["requirements"] = [r for r in raw["requirements"] if r["id"] not in ("S9-glare", "S10-darker")]
    (tmp_path / "uc.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    r = assess(str(tmp_path / "uc.yaml"), str(tmp_path / "out"), None, tracking_uri)
    assert r.complete
    a = Assessment.model_validate_json((tmp_path / "out" / "assessment.json").read_text())
    assert {e.claim_id for e in a.evidence} == {x.id for x in a.requirements}
    by_check = {o.check: o for o in a.outcomes}
    assert {"data_quality", "performance", "perturbation_sweep"} <= set(by_check)
    perf = by_check["performance"]
    assert any(m.metric == "iou:defect" and m.value is not None and m.interval for m in perf.measurements)
    assert any(m.metric == "image_recall" and m.scope.subgroup == {"defect": "crack"} for m in perf.measurements)
    assert [x.kind for x in perf.artefacts] == ["image"]  # the overlays
    assert any(m.metric == "bad_masks" for m in by_check["data_quality"].measurements)
    html = (tmp_path / "out" / "report.html").read_text()
    assert "label_issues" in html and "not taught the segmentation task" in html
    assert "segmenter of defect pixels" in html and "IoU" in html

"""`trustcase assess` on the magnetic-tile use case end to end: real images and masks, a real TorchScript U-Net
(seeded, untrained: this tests the flow, not the segmenter), real Prefect and MLflow."""

from __future__ import annotations

import pytest
from subset_assess import assess_subset, case_module

dataset_root = case_module("magnetic_tiles", "tiles").dataset_root

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_harness"),
              pytest.mark.skipif(not (dataset_root() / "MT_Free").is_dir(),
                                 reason=f"no magnetic tiles at {dataset_root()} (set TRUSTCASE_MAGNETIC_TILES)")]


def _edit(raw: dict) -> None:
    raw["plan"]["checks"].append({"check": "label_issues"})  # not taught segmentation: not applicable
    raw["requirements"] = [r for r in raw["requirements"] if r["id"] not in ("S9-glare", "S10-darker")]


def test_assess_the_magnetic_tile_case_on_a_subset(tmp_path, tracking_uri):
    a, html = assess_subset("magnetic_tiles", "UNet", tmp_path, tracking_uri, _edit)
    by_check = {o.check: o for o in a.outcomes}
    assert {"data_quality", "performance", "perturbation_sweep"} <= set(by_check)
    perf = by_check["performance"]
    assert any(m.metric == "iou:defect" and m.value is not None and m.interval for m in perf.measurements)
    assert any(m.metric == "image_recall" and m.scope.subgroup == {"defect": "crack"} for m in perf.measurements)
    assert [x.kind for x in perf.artefacts] == ["image"]  # the overlays
    assert any(m.metric == "bad_masks" for m in by_check["data_quality"].measurements)
    assert "label_issues" in html and "not taught the segmentation task" in html
    assert "segmenter of defect pixels" in html and "IoU" in html

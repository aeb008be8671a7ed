"""A detector's evidence as the report shows it: figures per ODD subgroup, the precision-recall and operating curves
(exact against the operating point's figures), example images with their boxes, and the argument's words."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_argument import provenance
from test_detection import CLASSES, LOADER, _Bright, _voc

from trustcase.tasks.detection_metrics import DetectionTally, average_precision, precision_envelope


def _scene(rng, n_images=30):
    truths, dets, groups = [], [], []
    for i in range(n_images):
        g = np.array([(x, y, x + 20, y + 20, rng.integers(0, 2)) for x, y in rng.uniform(0, 150, (3, 2))])
        d = [(*(box[:4] + rng.normal(0, 3, 4)), rng.uniform(), box[4] if rng.uniform() < 0.8 else 1 - box[4])
             for box in g if rng.uniform() < 0.8]
        d += [(x, y, x + 15, y + 15, rng.uniform(), rng.integers(0, 2)) for x, y in rng.uniform(0, 150, (2, 2))]
        truths.append(g.astype(np.float64))
        dets.append(np.array(d, np.float64).reshape(-1, 6))
        groups.append({"light": "dim" if i % 3 == 0 else "bright", "line": f"L{i % 2}"})
    return truths, dets, groups


def _tally(truths, dets, ids, groups=None):
    t = DetectionTally(CLASSES, 0.5, "performance", seed=0)
    for s in range(0, len(ids), 7):
        t.update(dets[s:s + 7], truths[s:s + 7], ids[s:s + 7], groups[s:s + 7] if groups else None)
    return t


def test_a_subgroup_is_measured_as_its_images_alone():
    truths, dets, groups = _scene(np.random.default_rng(0))
    ids = [f"{i}.png" for i in range(len(truths))]
    whole = _tally(truths, dets, ids, groups).compute("test", 0.95, 50, subgroups=True)
    assert {tuple(m.scope.subgroup.items()) for m in whole} == {
        (), (("light", "dim"),), (("light", "bright"),), (("line", "L0"),), (("line", "L1"),)}
    for name, value in (("light", "dim"), ("line", "L1")):
        keep = [i for i, g in enumerate(groups) if g[name] == value]
        alone = {m.metric: m for m in _tally([truths[i] for i in keep], [dets[i] for i in keep],
                                             [ids[i] for i in keep]).compute("test", 0.95, 50)}
        mine = {m.metric: m for m in whole if m.scope.subgroup == {name: value}}
        assert mine.keys() == alone.keys()
        for metric, m in mine.items():
            # the same detections and the same images' bootstrap weights (integers): the same sums
            assert m.value == pytest.approx(alone[metric].value, abs=1e-12), metric
            assert m.n == alone[metric].n
            assert (m.interval.lower, m.interval.upper) == pytest.approx(
                (alone[metric].interval.lower, alone[metric].interval.upper), abs=1e-12), metric


def test_the_curves_pass_through_the_operating_point():
    truths, dets, _ = _scene(np.random.default_rng(1))
    ids = [f"{i}.png" for i in range(len(truths))]
    tally = _tally(truths, dets, ids)
    ms = {m.metric: m for m in tally.compute("test", 0.95, 50)}
    at = tally.at_thresholds(np.array([0.2, 0.5, 0.9]), 0.95, 50)
    assert at["recall"][1] == pytest.approx(ms["indication_recall"].value, abs=1e-12)
    assert (at["recall_lower"][1], at["recall_upper"][1]) == pytest.approx(
        (ms["indication_recall"].interval.lower, ms["indication_recall"].interval.upper), abs=1e-12)
    assert at["false"][1] == pytest.approx(ms["false_indications_per_image"].value, abs=1e-12)
    for name in CLASSES:
        assert at[f"recall:{name}"][1] == pytest.approx(ms[f"recall:{name}"].value, abs=1e-12)
    assert list(at["recall"]) == sorted(at["recall"], reverse=True)  # a higher threshold never finds more
    assert list(at["false"]) == sorted(at["false"], reverse=True)
    pr = tally.precision_recall()
    for name in CLASSES:  # the curve's mean is the AP (101 points, COCO)
        assert pr[name].mean() == pytest.approx(ms[f"ap50:{name}"].value, abs=1e-12)


def test_precision_envelope_on_a_hand_made_list():
    # hits at ranks 1 and 3 of 3 detections, 2 true boxes: precision 1 up to recall 0.5, then 2/3 up to 1
    tp = np.array([True, False, True])
    env = precision_envelope(tp, 2)
    assert env[:51].tolist() == pytest.approx([1.0] * 51) and env[51:].tolist() == pytest.approx([2 / 3] * 50)
    assert env.mean() == pytest.approx(average_precision(tp, 2), abs=1e-15)
    assert precision_envelope(np.array([True]), 4)[26:].tolist() == [0.0] * 75  # past the recall reached: 0


def _case(tmp_path, confidential=False):
    """A detection use case on four tiny VOC test images of two brightness bands, with the _Bright detector (one
    crazing box at (2, 3, 10, 12) scored by the image's mean grey level)."""
    from trustcase.schemas import UseCase

    images, ann = tmp_path / "data" / "test" / "images", tmp_path / "data" / "test" / "annotations"
    images.mkdir(parents=True)
    ann.mkdir()
    for k, (stem, grey) in enumerate((("crazing_1", 200), ("crazing_2", 40), ("scratches_1", 200),
                                      ("crazing_3", 220))):
        Image.fromarray(np.full((32, 32), grey, np.uint8)).save(images / f"{stem}.png")
        cls = stem.rpartition("_")[0]
        _voc(ann, stem, [(cls, 2, 3, 10, 12)] + ([(cls, 12, 12, 30, 20)] if k == 3 else []))
    (tmp_path / "detloader.py").write_text(LOADER)
    torch.jit.script(_Bright()).save(str(tmp_path / "bright.pt"))
    return UseCase.model_validate({
        "id": "det", "title": "Indications", "owner": "o", "criticality": "low", "intended_function": "find defects",
        "task": "detection", "confidentiality": "confidential" if confidential else "public",
        "model": {"format": "torchscript", "path": str(tmp_path / "bright.pt"), "input_shape": [1, 32, 32],
                  "class_names": CLASSES, "critical_class": "crazing", "score_threshold": 0.5},
        "data": {"loader": "detloader:load", "path": str(tmp_path),
                 "params": {"root": str(tmp_path / "data"), "classes": CLASSES}, "splits": {"test": "test"}},
        "odd": {"descriptors": [{"name": "brightness", "min": 0, "max": 255}]},
        "requirements": [
            {"id": "R-recall", "text": "Most indications are found", "metric": "indication_recall",
             "comparator": ">=", "threshold": 0.5},
            {"id": "R-false", "text": "Few false indications", "metric": "false_indications_per_image",
             "comparator": "<=", "threshold": 1.0},
            {"id": "R-map", "text": "Ranks well", "metric": "map50", "comparator": ">=", "threshold": 0.5}],
        "plan": {"checks": [{"check": "performance"}]}})


def _performance(uc, tmp_path):
    from trustcase.checks import Context, build
    from trustcase.data.streaming import DataSource
    from trustcase.schemas import CheckSpec
    from trustcase.tasks import task_of

    ctx = Context(use_case=uc, model=task_of(uc).load_model(uc.model), data=DataSource(uc.data, 0, uc.model),
                  seed=0, workdir=tmp_path / "checks" / "performance")
    return build(CheckSpec(check="performance"))(ctx)


def test_performance_measures_each_brightness_band(tmp_path):
    out = _performance(_case(tmp_path), tmp_path)
    by = {(m.metric, tuple(m.scope.subgroup.items())): m for m in out.measurements}
    # bands of the ODD range 0-255: 0-85 (the one image at 40, missed: score 40/255 < 0.5), 170-255 (three bright
    # images: every crazing box at (2, 3, 10, 12) found, the second box of crazing_3 missed, scratches_1's box
    # missed and its crazing detection false)
    dim, bright = (("brightness", "0-85"),), (("brightness", "170-255"),)
    assert by[("indication_recall", dim)].value == 0 and by[("indication_recall", dim)].n == 1
    assert by[("indication_recall", bright)].value == pytest.approx(2 / 4) and by[("indication_recall", bright)].n == 4
    assert by[("false_indications_per_image", bright)].value == pytest.approx(1 / 3)
    assert by[("false_indications_per_image", dim)].value == 0
    assert ("recall:scratches", dim) not in by  # no scratch in the dim band: nothing said about it there
    assert by[("indication_recall", ())].value == pytest.approx(2 / 5)
    assert {c.id for c in out.curves} == {"precision_recall", "recall_threshold", "false_indications_threshold"}
    recall = next(c for c in out.curves if c.id == "recall_threshold")
    at = recall.x.index(0.5)
    assert recall.series["indication recall"].y[at] == pytest.approx(2 / 5)
    assert [a.kind for a in out.artefacts] == ["image"]


def test_the_report_speaks_detection(tmp_path):
    from trustcase.reports.render import render
    from trustcase.schemas import Assessment
    from trustcase.verdicts import judge

    uc = _case(tmp_path)
    out = _performance(uc, tmp_path)
    evidence = judge(uc.requirements, [out])
    a = Assessment(use_case=uc.model_dump(mode="json"), requirements=uc.requirements, outcomes=[out],
                   evidence=evidence, provenance=provenance(), verdict="FAIL", complete=True)
    html = Path(render(a, tmp_path, pdf=False)["html"]).read_text()
    cards = {cid: html[html.index(f'id="claim-{cid}"'):] for cid in ("R-recall", "R-false", "R-map")}
    cards = {cid: c[:c.index("</section>")] for cid, c in cards.items()}
    assert 'alt="plot of claim R-recall"' in cards["R-recall"]
    for name in ("precision_recall", "recall_threshold", "false_indications_threshold"):
        assert (tmp_path / "plots" / f"curve_performance__{name}.png").is_file()
    assert '<img src="data:image/png;base64,' in html and 'alt="performance/examples_test.png"' in html
    assert "detector of indications of crazing, scratches" in html
    assert "without more false indications per image than allowed" in html


def test_a_confidential_detection_case_has_no_example_image(tmp_path):
    out = _performance(_case(tmp_path, confidential=True), tmp_path)
    assert out.artefacts == [] and out.curves

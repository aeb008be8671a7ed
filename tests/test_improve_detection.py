"""`trustcase improve --method hudd` for a detector: the unsafe set is the root_causes check's, each extra item is
learnt with its own boxes, the per-cluster figure is the recall of the cluster's held-out true boxes at the operating
threshold; and the bundled steel script honours the training contract on real NEU-DET images."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from test_root_causes_detection import SPLITS, PeakDetector, PlantedBoxes, detector, use_case

from trustcase.checks import Context, build
from trustcase.data.streaming import DataSource
from trustcase.flows import improve as imp
from trustcase.schemas import CheckSpec, ExtraItem, TrainingRequest

ROOT = Path(__file__).resolve().parents[1]
PARAMS = {"noun": "images", "improvement_split": "train", "unsafe_budget": 12}


def same_selection(tmp_path: Path, uc, model, params: dict) -> dict:
    """improve's HUDD selection from the model file, checked equal to the unsafe set the root_causes check reports
    (one pipeline); extra items learnt with their own annotation (label None)."""
    ctx = Context(use_case=uc, model=model, data=DataSource(uc.data, 0, uc.model), seed=0,
                  workdir=tmp_path / "root_causes")
    out = build(CheckSpec(check="root_causes", params=params))(ctx)
    reported = dict(line.split(",")[0::3] for line in
                    (tmp_path / "root_causes" / "unsafe_set.csv").read_text().splitlines()[1:])
    chosen = imp.select_unsafe.fn(uc, Path(uc.model.path), "train", params, params["unsafe_budget"], 0,
                                  tmp_path / "improve")
    assert (chosen["layer"], chosen["k"], chosen["figure"]) == (out.summary["layer"], out.summary["k"], "recall")
    assert dict(zip(chosen["improved_ids"], [str(e.copies) for e in chosen["improved"]], strict=True)) == reported
    assert all(e.label is None and e.role == "train" for e in chosen["improved"] + chosen["baseline"])
    return chosen


def test_hudd_selects_the_checks_unsafe_set_and_measures_each_cluster(tmp_path):
    uc = use_case(tmp_path)
    chosen = same_selection(tmp_path, uc, detector(uc, scripted=True), PARAMS)
    # held out: each cluster's reach holds its own missed test images; the parent finds none of their boxes, a
    # detector that reads the image 1.5 times brighter finds every dim square and no marked one (its best window
    # still slides off the square)
    names = [it.id for it in PlantedBoxes("test").items]
    heldout = chosen["heldout"]
    assert sorted(names[i].split("-")[0] for c in heldout.values() for i in c) == \
        ["dim"] * SPLITS["test"]["dim"] + ["marker"] * SPLITS["test"]["marker"]
    bright = PeakDetector()
    with torch.no_grad():
        bright.pre.weight.fill_(1.5)
    torch.jit.script(bright.eval()).save(str(tmp_path / "bright.pt"))
    got = imp.cluster_accuracy.fn(uc, {"parent": Path(uc.model.path), "bright": tmp_path / "bright.pt"}, heldout,
                                  0.95, 0)
    for c, items in heldout.items():
        parent, other = got["parent"][c], got["bright"][c]
        assert parent["metric"] == f"cluster_recall:{c}" and parent["n"] == len(items)  # one true box per image
        cause = {names[i].split("-")[0] for i in items}.pop()
        assert parent["value"] == 0 and other["value"] == (1 if cause == "dim" else 0)


def _bundled_train():
    spec = importlib.util.spec_from_file_location("steel_defects_train", ROOT / "use_cases/steel_defects/train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


train = _bundled_train()
PARENT = ROOT / "use_cases/steel_defects/artefacts/steel_detector.pt"


@pytest.mark.skipif(train.missing_data() is not None or not PARENT.is_file(),
                    reason=str(train.missing_data() or "the bundled detector is not trained"))
def test_the_bundled_script_honours_the_training_contract(tmp_path):
    """steel_defects/train.py:retrain fine-tunes the parent (its width read from its weights) on a few real images
    plus the extra ones (their own boxes, copies counted); the result loads as the use case's detector."""
    from trustcase.schemas import load_use_case
    from trustcase.tasks import task_of

    yaml_path = ROOT / "use_cases/steel_defects/use_case.yaml"
    request = TrainingRequest(out=tmp_path / "tuned.pt", use_case=yaml_path, init=PARENT, epochs=1,
                              extra=[ExtraItem(role="train", index=5, copies=3)], params={"limit": 5})
    result = train.retrain(request)
    assert result.log["params"]["train_items"] == 8 and result.log["params"]["extra_copies"] == 3
    uc = load_use_case(yaml_path)
    model = task_of(uc).load_model(uc.model.model_copy(update={"path": result.model}))
    before, after = torch.jit.load(str(PARENT)).state_dict(), model.module.state_dict()
    assert before.keys() == after.keys() and any(not torch.equal(before[k], after[k]) for k in before)
    with pytest.raises(ValueError, match="other roles"):
        train.retrain(request.model_copy(update={"roles": ["train", "validation"]}))


def test_a_clusters_recall_over_boxes_clustered_by_image_takes_the_tasks_wider_interval():
    """review4 R4: boxes of one image are not independent; the per-cluster recall follows the task's recall rule
    (the wider of Clopper-Pearson over boxes and the bootstrap over images), and an item counting once keeps
    Clopper-Pearson."""
    from trustcase.measurement import proportion
    from trustcase.schemas import Scope

    # 10 images of 6 boxes: 5 images found whole, 5 missed whole (20 images' worth of clustering)
    rows = [(f"img{i}", 6 if i < 5 else 0, 6) for i in range(10)]
    m = imp._figure("recall", 0, rows, 0.95, 0)
    cp = proportion("improve", "cluster_recall:0", 30, 60, 0.95, Scope(split="test"))
    assert m.value == 0.5 and "over images" in m.interval.method
    assert m.interval.lower <= cp.interval.lower and m.interval.upper >= cp.interval.upper
    assert m.interval.upper - m.interval.lower > 1.5 * (cp.interval.upper - cp.interval.lower)  # 10 images, not 60
    single = imp._figure("recall", 0, [(f"img{i}", int(i < 5), 1) for i in range(10)], 0.95, 0)
    assert single.interval.method == "clopper-pearson" and single.value == 0.5


def test_a_clusters_recall_is_exactly_the_tasks_interval_whatever_the_order_and_the_report_says_what_to_compare():
    """review4 R4, exact: the per-cluster recall is found / true boxes summed over the cluster's images, its interval
    the union of Clopper-Pearson over the boxes and the Poisson bootstrap over the images (each image's weights from
    its id, so any order of the rows gives the same); the report names the parent's selection bias and counts a
    cluster improved only on disjoint intervals against the baseline."""
    import numpy as np

    from trustcase.measurement import bootstrap_interval, bootstrap_weights, proportion
    from trustcase.reports import improvement as report
    from trustcase.schemas import Scope

    boxes = [(3, 3), (0, 4), (2, 2), (1, 5), (0, 1), (4, 4), (2, 3), (0, 2)]  # (found, true) per image: 12 of 24
    rows = [(f"img{i}", f, t) for i, (f, t) in enumerate(boxes)]
    m = imp._figure("recall", 1, rows, 0.9, 7)
    cp = proportion("improve", "cluster_recall:1", 12, 24, 0.9, Scope(split="test")).interval
    w = bootstrap_weights(7, "improve", [r[0] for r in rows]).astype(np.float64)
    found, true = (np.array([b[j] for b in boxes], np.float64) for j in (0, 1))
    with np.errstate(invalid="ignore"):  # a replicate drawing no box: left out, as the task does
        boot = bootstrap_interval((w.T @ found) / (w.T @ true), 0.9)
    assert (m.value, m.n, m.metric) == (0.5, 24, "cluster_recall:1")
    assert (m.interval.lower, m.interval.upper) == (min(cp.lower, boot.lower), max(cp.upper, boot.upper))
    assert m.interval.lower < cp.lower  # 8 images, not 24 independent boxes: wider than Clopper-Pearson here
    again = imp._figure("recall", 1, rows[::-1], 0.9, 7)
    assert (again.interval.lower, again.interval.upper) == (m.interval.lower, m.interval.upper)

    def measured(value, lower, upper):
        return {"value": value, "n": 24, "interval": {"lower": lower, "upper": upper}}

    summary = {"use_case": "steel", "method": "hudd", "parent": "1", "versions": {"improved": "2", "baseline": "3"},
               "seed": 0, "qualified": "1", "claims": [], "runs": {"parent": "a", "improved": "b", "baseline": "c"},
               "clusters": {"k": 2, "layer": "conv3", "sizes": [5, 4], "figure": "recall", "heldout": {"0": 8, "1": 8},
                            "pool_within_reach": 20, "pool_items": 30, "selected": 12, "selected_clusters": [6, 6],
                            "distinct_per_cluster": [6, 6], "comparison": imp.SELECTION,
                            "accuracy": {"parent": [measured(0.1, 0.0, 0.3), measured(0.2, 0.1, 0.4)],
                                         "improved": [measured(0.8, 0.6, 0.9), measured(0.5, 0.3, 0.7)],
                                         "baseline": [measured(0.3, 0.2, 0.5), measured(0.4, 0.2, 0.6)]}}}
    words = report.headline(summary)
    assert "above the random baseline with disjoint intervals on 1 of 2 cluster(s)" in words
    assert "its point estimate is higher on 2" in words and "biased low by selection" in words
    assert "biased low by selection" in report.render(summary) and "against the random baseline" in imp.SELECTION

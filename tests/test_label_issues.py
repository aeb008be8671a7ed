"""label_issues: confident learning on exact cases, the check's artefacts and confidentiality, and the validation
on the real ELPV labels (slow): suspected cells enriched among the expert's uncertain ratings, planted flips found."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from trustcase.checks import Context
from trustcase.checks.label_issues import LabelIssues
from trustcase.data import labels as L
from trustcase.data.streaming import DataSource
from trustcase.models.loading import load_classifier
from trustcase.schemas import Confidentiality, Topic, load_use_case
from trustcase.testing import synthetic_case

SOLAR = Path(__file__).resolve().parent.parent / "use_cases" / "solar_cells"


def confident(labels: np.ndarray, classes: int, p: float = 0.95) -> np.ndarray:
    probs = np.full((len(labels), classes), (1 - p) / (classes - 1))
    probs[np.arange(len(labels)), labels] = p
    return probs


def test_the_items_the_model_contradicts_with_confidence_are_exactly_the_suspects():
    rng = np.random.default_rng(0)
    truth = rng.integers(0, 3, 300)
    probs = confident(truth, 3)
    given = truth.copy()
    wrong = np.array([3, 50, 120, 200, 299])
    given[wrong] = (truth[wrong] + 1) % 3
    found = L.find(given, probs)
    assert np.flatnonzero(found.suspected).tolist() == wrong.tolist()
    assert found.suggested[wrong].tolist() == truth[wrong].tolist()
    assert np.allclose(found.quality[wrong], 0.025) and np.allclose(np.delete(found.quality, wrong), 0.95)


def test_labels_the_model_agrees_with_are_never_suspected():
    y = np.repeat([0, 1], 50)
    assert not L.find(y, confident(y, 2, 0.7)).suspected.any()
    assert L.find(np.zeros(0, np.int64), np.zeros((0, 2))).suspected.shape == (0,)


def test_risk_ratio_and_its_katz_interval_by_hand():
    rr, lo, hi = L.risk_ratio(20, 100, 10, 200, 0.95)
    assert rr == pytest.approx(4.0)
    se = np.sqrt(1 / 20 - 1 / 100 + 1 / 10 - 1 / 200)
    assert lo == pytest.approx(4.0 * np.exp(-1.959964 * se), rel=1e-6)
    assert hi == pytest.approx(4.0 * np.exp(1.959964 * se), rel=1e-6)
    rr0, lo0, hi0 = L.risk_ratio(0, 10, 5, 100, 0.95)  # a zero cell: Haldane's 0.5 keeps it finite
    assert 0 < lo0 < rr0 < hi0 < np.inf


def test_the_least_confident_items_do_not_depend_on_batch_order():
    q = np.array([0.5, 0.1, 0.1, 0.9, 0.3, 0.2])
    ids = [f"i{k}" for k in range(6)]
    x = np.arange(6)[:, None]
    a, b = L.LowestConfidence(3), L.LowestConfidence(3)
    a.update(q, ids, x)
    for j in (5, 4, 3, 2, 1, 0):
        b.update(q[j:j + 1], ids[j:j + 1], x[j:j + 1])
    assert [i for _, i, _ in a.items()] == [i for _, i, _ in b.items()] == ["i1", "i2", "i5"]


def test_planted_flips_are_found_when_the_model_is_right():
    truth = np.repeat([0, 1], 200)
    v = L.validate(truth, confident(truth, 2), np.zeros(400, bool), 0.05, 0, 0.95)
    assert v["planted"] == 20 and v["planted_found"] == 20 and v["precision"] == 1.0 and v["recall"] == 1.0


def run_check(uc, clf, tmp_path, **params):
    ctx = Context(uc, clf, DataSource(uc.data, model=uc.model), seed=0, workdir=tmp_path / "label_issues")
    return LabelIssues(LabelIssues.Params(**params))(ctx)


def test_the_check_shows_the_suspects_and_says_how_many_in_words(tmp_path):
    uc, clf = synthetic_case(n=40)
    out = run_check(uc, clf, tmp_path, thumbnails=64)
    shares = {m.scope.split: m for m in out.measurements if m.metric == "suspected_labels"}
    assert set(shares) == {"validation", "test"}  # never the split the model learnt from
    for role, m in shares.items():
        assert m.kind == "estimate" and m.interval.method == "clopper-pearson"
        assert m.value == out.summary[role]["suspected"] / m.n
    assert [f.topic for f in out.findings] == [Topic.DATA, Topic.DATA]
    if any(out.summary[r]["suspected"] for r in shares):
        kinds = {a.kind for a in out.artefacts}
        assert kinds == {"image", "file"}
        rows = (tmp_path / "label_issues" / "suspected.csv").read_text().splitlines()
        assert len(rows) - 1 == sum(out.summary[r]["suspected"] for r in shares)


def test_a_confidential_use_case_gets_no_thumbnail(tmp_path):
    uc, clf = synthetic_case(n=40)
    uc = uc.model_copy(update={"confidentiality": Confidentiality.confidential})
    out = run_check(uc, clf, tmp_path, thumbnails=64)
    assert not out.artefacts and not list((tmp_path / "label_issues").glob("*.png"))
    assert any("confidential" in x for x in out.limitations)


@pytest.mark.slow
def test_on_elpv_suspected_cells_are_enriched_among_uncertain_ratings(tmp_path):
    spec = importlib.util.spec_from_file_location("solar_train_labels", SOLAR / "train.py")
    train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train)
    path = tmp_path / "solar.pt"
    train.train(path, epochs=6, arch="pooled", ibp_eps=0.0, log=lambda *_: None)
    uc = load_use_case(SOLAR / "use_case.yaml")
    uc = uc.model_copy(update={"model": uc.model.model_copy(update={"path": path})})
    clf = load_classifier(uc.model)
    y, probs, uncertain = [], [], []
    for role in ("validation", "test"):
        for b in DataSource(uc.data, model=uc.model).stream(role).batches():
            y.append(b.labels)
            probs.append(L.softmax(clf.logits(b.images)))
            uncertain += [m in ("0.33", "0.67") for m in b.meta["defect_probability"]]
    v = L.validate(np.concatenate(y), np.concatenate(probs), np.array(uncertain), 0.05, 0, 0.95)
    assert v["uncertain"] > 50
    assert v["enrichment_interval"][0] > 1.0, v  # shown enriched, on the interval's lower end
    assert v["recall_interval"][0] > 0.3, v

"""Performance metrics, intervals and verdict rules against answers computed by hand."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from trustcase.measurement import clopper_pearson, wilson
from trustcase.performance import Tally
from trustcase.schemas import CheckOutcome, Interval, Measurement, PerturbationScope, Requirement, Scope, UseCase
from trustcase.schemas import Verdict as V
from trustcase.verdicts import breaking_amplitude, judge, overall, verdict


def use_case(**plan) -> UseCase:
    return UseCase.model_validate({
        "id": "t", "title": "t", "owner": "o", "criticality": "low", "intended_function": "f",
        "model": {"format": "onnx", "path": "m.onnx", "input_shape": [1, 4, 4], "class_names": ["ok", "bad"],
                  "critical_class": "bad"},
        "data": {"loader": "image_folder", "splits": {"test": "test"}},
        "odd": {"descriptors": [{"name": "kind", "source": "metadata", "values": ["a", "b"]}]},
        "requirements": [], "plan": {"checks": [], **plan},
    })


def get(ms, metric, subgroup=None):
    return next(m for m in ms if m.metric == metric and m.scope.subgroup == (subgroup or {}))


def test_tally_confusion_rates_cost_and_subgroups():
    uc = use_case(cost_matrix=[[0, 1], [10, 0]])
    labels = np.array([0, 0, 0, 1, 1, 1, 1, 0])
    pred = np.array([0, 1, 0, 1, 0, 1, 1, 0])
    logits = np.eye(2)[pred] * 3.0
    kind = ["a", "a", "b", "b", "a", "b", "a", "b"]
    t = Tally(uc)
    t.update(logits[:5], labels[:5], {"kind": kind[:5]})   # two batches: streaming
    t.update(logits[5:], labels[5:], {"kind": kind[5:]})
    ms = t.compute("performance", "test", 0.95)
    acc = get(ms, "accuracy")
    assert acc.value == 6 / 8 and acc.details["confusion"] == [[3, 1], [1, 3]]
    assert acc.interval.lower == pytest.approx(stats.beta.ppf(0.025, 6, 3))
    assert get(ms, "recall:bad").value == 3 / 4
    assert get(ms, "precision:bad").value == 3 / 4
    assert get(ms, "false_negative_rate:bad").value == 1 / 4
    assert get(ms, "cost").value == pytest.approx((1 * 1 + 10 * 1) / 8)
    # subgroup a: labels [0,0,1,1], preds [0,1,0,1]
    assert get(ms, "accuracy", {"kind": "a"}).value == 0.5
    assert get(ms, "recall:bad", {"kind": "b"}).value == 1.0


def test_ece_closed_form():
    uc = use_case()
    # every prediction has confidence softmax([2, 0]) = 0.8808; half correct -> ECE = |0.5 - 0.8808|
    logits = np.tile([2.0, 0.0], (10, 1))
    labels = np.array([0] * 5 + [1] * 5)
    t = Tally(uc)
    t.update(logits, labels)
    ece = get(t.compute("performance", "test", 0.95), "ece")
    conf = np.exp(2) / (np.exp(2) + 1)
    assert ece.value == pytest.approx(conf - 0.5)


def test_clopper_pearson_covers_at_least_nominal():
    rng = np.random.default_rng(0)
    for p in (0.05, 0.5, 0.9):
        ks = rng.binomial(60, p, 2000)
        hits = [clopper_pearson(int(k), 60, 0.95) for k in ks[:400]]
        covered = np.mean([iv.lower <= p <= iv.upper for iv in hits])
        assert covered >= 0.93  # exact interval: >= 95% up to simulation noise (400 draws)
    assert clopper_pearson(0, 10).lower == 0 and clopper_pearson(10, 10).upper == 1
    w = wilson(5, 10)
    assert w.lower < 0.5 < w.upper


@pytest.mark.parametrize("value, lo, hi, cmp, t, kind, want", [
    (0.9, 0.85, 0.95, ">=", 0.8, "estimate", V.PASS),
    (0.9, 0.75, 0.95, ">=", 0.8, "estimate", V.INCONCLUSIVE),   # lucky point estimate, bound below threshold
    (0.7, 0.6, 0.8, ">=", 0.8, "estimate", V.FAIL),
    (0.02, 0.01, 0.04, "<=", 0.05, "estimate", V.PASS),
    (0.02, 0.01, 0.07, "<=", 0.05, "estimate", V.INCONCLUSIVE),
    (float("nan"), None, None, ">=", 0.5, "census", V.INCONCLUSIVE),
    (0.0, None, None, "<=", 0, "census", V.PASS),     # a count over the whole split: exact
    (1.0, None, None, "<=", 0, "census", V.FAIL),
    (0.5, None, None, "<=", 1, "bound", V.PASS),      # a certificate
    (0.0, None, None, "<=", 0, "estimate", V.INCONCLUSIVE),   # a point estimate alone decides nothing
    (1.0, None, None, "<=", 0, "estimate", V.INCONCLUSIVE),
])
def test_verdict_rule(value, lo, hi, cmp, t, kind, want):
    assert verdict(value, cmp, t, lo, hi, kind) is want


def sweep_measurement(a, value, lo):
    return Measurement(check="perturbation_sweep", metric="accuracy", value=value, amplitude=a,
                       interval=Interval(lower=lo, upper=min(1, value + 0.05), confidence=0.95, method="cp"),
                       n=100, scope=Scope(perturbation=PerturbationScope(name="blur", max_amplitude=a)))


def test_perturbation_claim_is_judged_at_the_worst_amplitude_with_breaking_amplitude():
    ms = [sweep_measurement(a, v, v - 0.05) for a, v in [(0, 0.95), (1, 0.9), (2, 0.8), (3, 0.5)]]
    r = Requirement(id="R", text="t", metric="accuracy", comparator=">=", threshold=0.8,
                    scope=Scope(perturbation=PerturbationScope(name="blur", max_amplitude=2)))
    assert breaking_amplitude(r, ms) == 1  # at 2 the lower bound 0.75 < 0.8
    [e] = judge([r], [CheckOutcome(check="perturbation_sweep", measurements=ms)])
    assert e.verdict is V.INCONCLUSIVE and e.details["worst_amplitude"] == 2
    assert e.details["amplitudes"] == [0, 1, 2]         # amplitude 3 is beyond the claim


def test_missing_evidence_and_overall_rules():
    r1 = Requirement(id="A", text="t", metric="accuracy", comparator=">=", threshold=0.5)
    r2 = Requirement(id="B", text="t", metric="nothing_measures_this", comparator=">=", threshold=0.5)
    m = Measurement(check="performance", metric="accuracy", value=0.9, n=10,
                    interval=Interval(lower=0.6, upper=0.99, confidence=0.95, method="cp"))
    ev = judge([r1, r2], [CheckOutcome(check="performance", measurements=[m])])
    assert [e.verdict for e in ev] == [V.PASS, V.INCONCLUSIVE]
    assert "no check" in ev[1].rationale
    assert overall(ev, [r1, r2]) is V.INCONCLUSIVE
    assert overall(ev[:1], [r1]) is V.PASS
    advisory = r2.model_copy(update={"mandatory": False})
    assert overall(ev, [r1, advisory]) is V.PASS


def _random_stream(n=60, seed=0):
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 1.5, (n, 2))
    labels = rng.integers(0, 2, n)
    return logits, labels, [f"item-{i:03d}" for i in range(n)]


def _fed(uc, logits, labels, ids, order, batch, seed=3, check="performance"):
    t = Tally(uc, check=check, seed=seed)
    for s in range(0, len(order), batch):
        sel = order[s:s + batch]
        t.update(logits[sel], labels[sel], ids=[ids[i] for i in sel])
    return t.compute(check, "test", 0.9)


def test_ece_and_cost_intervals_are_the_bootstrap_percentiles_of_items_resampled_by_id():
    from scipy.special import softmax

    from trustcase.measurement import bootstrap_weights

    uc = use_case(cost_matrix=[[0, 1], [10, 0]])
    logits, labels, ids = _random_stream()
    ms = _fed(uc, logits, labels, ids, np.arange(60), 7)
    ece, cost = get(ms, "ece"), get(ms, "cost")
    assert ece.kind == cost.kind == "estimate" and ece.interval.confidence == 0.9
    assert ece.interval.method == "poisson bootstrap over items (1000 replicates, percentile)"
    # by hand: replicate r weighs item i by w[i, r]; ECE_r = sum over bins |sum w (correct - conf)| / sum w
    w = bootstrap_weights(3, "performance", ids).astype(float)
    pred, conf = logits.argmax(1), softmax(logits, 1).max(1)
    in_bin = np.eye(15)[np.clip(np.digitize(conf, np.linspace(0, 1, 16)[1:-1]), 0, 14)]
    gap = w.T @ (in_bin * ((pred == labels) - conf)[:, None])
    reps = np.abs(gap).sum(1) / w.sum(0)
    assert [ece.interval.lower, ece.interval.upper] == pytest.approx(np.quantile(reps, [0.05, 0.95]), rel=1e-12)
    item_cost = np.array([[0, 1], [10, 0]])[labels, pred]
    assert cost.value == pytest.approx(item_cost.mean())
    assert [cost.interval.lower, cost.interval.upper] == pytest.approx(
        np.quantile(w.T @ item_cost / w.sum(0), [0.05, 0.95]), rel=1e-12)
    # the draws follow the items: same interval in another order at another batch size
    other = _fed(uc, logits, labels, ids, np.arange(60)[::-1], 60)
    for metric in ("ece", "cost"):
        a, b = get(ms, metric).interval, get(other, metric).interval
        assert [a.lower, a.upper] == pytest.approx([b.lower, b.upper], rel=1e-12)
    # another seed or another check draws other replicates
    assert get(_fed(uc, logits, labels, ids, np.arange(60), 7, seed=4), "ece").interval != ece.interval
    assert get(_fed(uc, logits, labels, ids, np.arange(60), 7, check="sweep"), "cost").interval != cost.interval


def test_a_constant_cost_has_a_degenerate_interval_and_no_ids_no_interval():
    uc = use_case(cost_matrix=[[2, 2], [2, 2]])
    logits, labels, ids = _random_stream(20)
    cost = get(_fed(uc, logits, labels, ids, np.arange(20), 6), "cost")
    assert (cost.value, cost.interval.lower, cost.interval.upper) == (2.0, 2.0, 2.0)
    t = Tally(uc)  # fed without item ids: it cannot resample
    t.update(logits, labels)
    ms = t.compute("performance", "test", 0.95)
    assert get(ms, "ece").interval is None and get(ms, "cost").interval is None
    (e,) = judge([Requirement(id="C", text="t", metric="cost", comparator="<=", threshold=5.0)],
                 [CheckOutcome(check="performance", measurements=ms)])
    assert e.verdict is V.INCONCLUSIVE and "without an interval" in e.rationale

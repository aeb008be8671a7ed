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


@pytest.mark.parametrize("value, lo, hi, cmp, t, want", [
    (0.9, 0.85, 0.95, ">=", 0.8, V.PASS),
    (0.9, 0.75, 0.95, ">=", 0.8, V.INCONCLUSIVE),   # lucky point estimate, bound below threshold
    (0.7, 0.6, 0.8, ">=", 0.8, V.FAIL),
    (0.02, 0.01, 0.04, "<=", 0.05, V.PASS),
    (0.02, 0.01, 0.07, "<=", 0.05, V.INCONCLUSIVE),
    (float("nan"), None, None, ">=", 0.5, V.INCONCLUSIVE),
    (0.0, None, None, "<=", 0, V.PASS),
    (1.0, None, None, "<=", 0, V.FAIL),
])
def test_verdict_rule(value, lo, hi, cmp, t, want):
    assert verdict(value, cmp, t, lo, hi) is want


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

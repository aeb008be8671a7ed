"""Judging claims, every field of the evidence it writes, on cases decided by hand (written after mutation
testing showed which parts of verdicts.py no test pinned down)."""

from __future__ import annotations

import math

import pytest

from trustcase.measurement import proportion
from trustcase.schemas import (
    CheckOutcome,
    Interval,
    Measurement,
    PerturbationScope,
    Requirement,
    Scope,
    Verdict,
)
from trustcase.verdicts import (
    breaking_amplitude,
    judge,
    matches,
    overall,
    rank_methods,
    undefined,
    verdict,
    why_undefined,
)

IV = dict(confidence=0.95, method="clopper-pearson")


def m(value, lo=None, hi=None, metric="accuracy", amplitude=None, perturbation=None, n=100, kind="estimate",
      **details):
    scope = Scope(split="test", perturbation=None if perturbation is None else
                  PerturbationScope(name=perturbation, max_amplitude=amplitude or 0.0))
    return Measurement(check="performance", metric=metric, kind=kind, value=value, n=n, scope=scope,
                       amplitude=amplitude, interval=None if lo is None else Interval(lower=lo, upper=hi, **IV),
                       details=details)


def req(comparator=">=", threshold=0.9, metric="accuracy", perturbation=None, max_amplitude=None):
    scope = Scope(split="test", perturbation=None if perturbation is None else
                  PerturbationScope(name=perturbation, max_amplitude=max_amplitude))
    return Requirement(id="R1", text="t", metric=metric, comparator=comparator, threshold=threshold, scope=scope)


def outcome(*ms):
    return CheckOutcome(check="performance", measurements=list(ms), validity=["held-out test split"])


@pytest.mark.parametrize(("cmp", "value", "lo", "hi", "want"), [
    (">", 0.95, 0.91, 0.99, Verdict.PASS), (">", 0.95, 0.90, 0.99, Verdict.INCONCLUSIVE),  # > 0.9 is strict
    (">", 0.90, 0.85, 0.95, Verdict.FAIL), (">=", 0.90, 0.90, 0.95, Verdict.PASS),
    ("<", 0.05, 0.01, 0.09, Verdict.PASS), ("<", 0.05, 0.01, 0.10, Verdict.INCONCLUSIVE),
    ("<=", 0.05, 0.01, 0.10, Verdict.PASS), ("<=", 0.11, 0.05, 0.2, Verdict.FAIL),
])
def test_verdict_on_the_pessimistic_end(cmp, value, lo, hi, want):
    t = 0.9 if cmp.startswith(">") else 0.1
    assert verdict(value, cmp, t, lo, hi) is want
    # a census (exact over the split) or a bound (a certificate): the figure alone decides, an interval or not
    for kind in ("census", "bound"):
        assert verdict(value, cmp, t, None, None, kind) is (Verdict.FAIL if want is Verdict.FAIL else Verdict.PASS)
        assert verdict(value, cmp, t, lo, hi, kind) is (Verdict.FAIL if want is Verdict.FAIL else Verdict.PASS)
    # an estimate without an interval neither passes nor fails on its point
    assert verdict(value, cmp, t, None, None, "estimate") is Verdict.INCONCLUSIVE


def test_undefined_figures():
    assert verdict(None, ">=", 0.5, None, None) is Verdict.INCONCLUSIVE
    assert verdict(0.9, ">=", 0.5, 0.8, math.nan) is Verdict.INCONCLUSIVE  # a NaN upper bound alone
    assert verdict(0.9, ">=", 0.5, math.nan, 0.95) is Verdict.INCONCLUSIVE
    assert verdict(0.9, ">=", math.nan, 0.8, 0.95) is Verdict.INCONCLUSIVE
    assert undefined(m(0.9, 0.8, math.nan)) and undefined(m(0.9, math.nan, 0.95)) and not undefined(m(0.9, 0.8, 1.0))
    assert why_undefined(m(None, metric="recall:bad", n=0)) == "no bad item in the test split"
    assert why_undefined(m(None, metric="precision:bad", n=0)) == "the model predicted no bad item on the test split"
    assert why_undefined(m(None, metric="ece", n=0)) == "no item to compute it on in the test split (n = 0)"
    assert why_undefined(m(None, metric="ece", n=7)) == "the measurement has no defined value on the test split (n = 7)"
    assert why_undefined(m(None, metric="ece", n=0, undefined="no radius")) == "no radius"
    assert why_undefined(m(None, metric="false_negative_rate:bad", n=0)) == "no bad item in the test split"
    assert why_undefined(m(None, metric="class_share:ok", n=0)) == "no ok item in the test split"


def test_judge_writes_every_field():
    r = req(">=", 0.9)
    (e,) = judge([r], [outcome(m(0.95, 0.92, 0.97))])
    assert (e.claim_id, e.check, e.metric, e.value, e.threshold, e.comparator, e.verdict) == (
        "R1", "performance", "accuracy", 0.95, 0.9, ">=", Verdict.PASS)
    assert e.interval == Interval(lower=0.92, upper=0.97, **IV) and e.scope == r.scope
    assert e.validity == ["held-out test split"]
    assert e.rationale == "accuracy = 0.95, lower bound 0.92 (n = 100); claim >= 0.9: PASS"
    (e,) = judge([req("<=", 0.1, "ece")], [outcome(m(0.05, metric="ece"))])  # a bare estimate: no PASS
    assert e.verdict is Verdict.INCONCLUSIVE and e.kind == "estimate" and e.rationale == (
        "ece = 0.05 (n = 100); claim <= 0.1: INCONCLUSIVE: it is a sampling estimate without an interval, and a "
        "claim passes only on its interval's pessimistic end")
    (e,) = judge([req("<=", 0.1, "ece")], [outcome(m(0.05, 0.03, 0.09, metric="ece"))])
    assert e.verdict is Verdict.PASS and e.kind == "estimate"
    assert e.rationale == "ece = 0.05, upper bound 0.09 (n = 100); claim <= 0.1: PASS"
    (e,) = judge([req("<", 0.1, "fnr")], [outcome(m(0.05, 0.01, 0.2, metric="fnr"))])
    assert e.verdict is Verdict.INCONCLUSIVE and "upper bound 0.2" in e.rationale


def test_judge_without_a_measurement():
    r = req()
    (e,) = judge([r], [outcome(m(0.95, metric="other"))])
    assert (e.check, e.value, e.threshold, e.comparator, e.verdict) == (None, None, 0.9, ">=", Verdict.INCONCLUSIVE)
    assert e.rationale == "no check of the plan measured accuracy on test split"


def test_judge_an_undefined_figure_with_its_reason():
    r = req()
    (e,) = judge([r], [outcome(m(None, n=0, undefined="no readable item"))])
    assert (e.check, e.value, e.threshold, e.comparator, e.verdict) == (
        "performance", None, 0.9, ">=", Verdict.INCONCLUSIVE)
    assert e.details == {"undefined": "no readable item"} and e.validity == ["held-out test split"]
    assert e.kind == "estimate"
    assert e.rationale == "accuracy is undefined: no readable item; claim >= 0.9: INCONCLUSIVE"


def test_judge_a_sweep_at_its_worst_amplitude():
    sweep = [m(0.99, 0.97, 1.0, amplitude=0.0, perturbation="blur"),
             m(0.95, 0.91, 0.98, amplitude=1.0, perturbation="blur"),
             m(0.93, 0.89, 0.96, amplitude=2.0, perturbation="blur"),
             m(0.50, 0.40, 0.60, amplitude=3.0, perturbation="blur")]  # beyond the claim: not judged
    r = req(">=", 0.9, perturbation="blur", max_amplitude=2.0)
    (e,) = judge([r], [outcome(*sweep)])
    assert e.verdict is Verdict.INCONCLUSIVE and e.value == 0.93
    assert e.details == {"worst_amplitude": 2.0, "breaking_amplitude": 1.0, "amplitudes": [0.0, 1.0, 2.0]}
    assert e.rationale == "accuracy = 0.93, lower bound 0.89 at amplitude 2 (n = 100); claim >= 0.9: INCONCLUSIVE"
    # "<=" claims: the worst is the largest upper bound; for a census, the largest value
    flips = [m(0.01, metric="flip", amplitude=a, perturbation="blur", n=10, kind="census") for a in (0.0, 1.0)]
    flips.append(m(0.2, metric="flip", amplitude=2.0, perturbation="blur", n=10, kind="census"))
    (e,) = judge([req("<=", 0.1, "flip", "blur", 2.0)], [outcome(*flips)])
    assert e.value == 0.2 and e.verdict is Verdict.FAIL and e.details["worst_amplitude"] == 2.0
    (e,) = judge([req(">=", 0.1, "flip", "blur", 2.0)], [outcome(*flips)])
    assert e.value == 0.01 and e.details["worst_amplitude"] == 0.0


def test_tied_pessimistic_bounds_are_broken_by_the_value_then_the_smallest_amplitude():
    # magnetic tiles S17: IoU under attack, lower bounds clipped at 0 tie at every amplitude; 0 at 2 is the worst
    sweep = [m(0.009, 0.0, 0.015, "iou", 0.0, "pgd"), m(0.0, 0.0, 0.0, "iou", 2.0, "pgd"),
             m(0.002, 0.0, 0.005, "iou", 1.0, "pgd"), m(0.0, 0.0, 0.0, "iou", 4.0, "pgd")]  # 4: beyond the claim
    (e,) = judge([req(">=", 0.3, "iou", "pgd", 2.0)], [outcome(*sweep)])
    assert e.value == 0.0 and e.verdict is Verdict.FAIL
    assert e.details == {"worst_amplitude": 2.0, "breaking_amplitude": None, "amplitudes": [0.0, 1.0, 2.0]}
    assert e.rationale == "iou = 0, lower bound 0 at amplitude 2 (n = 100); claim >= 0.3: FAIL"
    # bound and value tied: the smallest amplitude, whatever the order measured
    (e,) = judge([req(">=", 0.3, "iou", "pgd", 4.0)], [outcome(*sweep)])
    assert e.details["worst_amplitude"] == 2.0
    # "<=": upper bounds clipped at 1 tie; the larger false-alarm rate is the worse
    alarms = [m(1.0, 0.8, 1.0, "fa", 0.2, "glare"), m(0.9, 0.7, 1.0, "fa", 0.1, "glare"),
              m(0.05, 0.01, 0.1, "fa", 0.0, "glare")]
    (e,) = judge([req("<=", 0.1, "fa", "glare", 0.2)], [outcome(*alarms)])
    assert e.value == 1.0 and e.details["worst_amplitude"] == 0.2 and e.details["breaking_amplitude"] == 0.0


def test_a_hole_in_a_sweep_is_never_a_pass_but_a_failure_shows():
    sweep = [m(0.99, 0.97, 1.0, amplitude=0.0, perturbation="blur"),
             m(None, amplitude=1.0, perturbation="blur", n=0)]
    r = req(">=", 0.9, perturbation="blur", max_amplitude=1.0)
    (e,) = judge([r], [outcome(*sweep)])
    assert e.verdict is Verdict.INCONCLUSIVE and e.value is None
    assert e.rationale.startswith("accuracy is undefined at amplitude 1: ")
    sweep[0] = m(0.5, 0.4, 0.6, amplitude=0.0, perturbation="blur")
    (e,) = judge([r], [outcome(*sweep)])
    assert e.verdict is Verdict.FAIL


def test_matches_and_breaking_amplitude():
    r = req(perturbation="blur", max_amplitude=2.0)
    assert matches(r, m(0.9, amplitude=2.0, perturbation="blur"))  # the claimed maximum itself is judged
    assert not matches(r, m(0.9, amplitude=2.1, perturbation="blur"))
    assert matches(r, m(0.9, amplitude=None, perturbation="blur"))  # no amplitude: the clean point
    assert matches(req(perturbation="blur", max_amplitude=0.5), m(0.9, amplitude=None, perturbation="blur"))
    assert not matches(r, m(0.9, amplitude=1.0, perturbation="noise"))
    assert not matches(r, m(0.9)) and not matches(req(), m(0.9, amplitude=1.0, perturbation="blur"))
    sweep = [m(0.95, 0.92, 0.97, amplitude=2.0, perturbation="blur"),
             m(0.99, 0.95, 1.0, amplitude=None, perturbation="blur"),
             m(0.96, 0.93, 0.98, amplitude=1.0, perturbation="blur")]
    assert breaking_amplitude(req(">=", 0.9), sweep) == 2.0
    assert breaking_amplitude(req(">=", 0.925), sweep) == 1.0  # sorted by amplitude, None first as 0
    assert breaking_amplitude(req(">=", 0.94), sweep) == 0.0
    assert breaking_amplitude(req(">=", 0.96), sweep) is None
    assert breaking_amplitude(req("<=", 0.999), sweep) is None  # the upper bound 1.0 decides "<="


def test_overall():
    rs = [req(), Requirement(id="R2", text="t", metric="ece", comparator="<=", threshold=0.1, mandatory=False)]
    ev = judge(rs, [outcome(m(0.95, 0.92, 0.97), m(0.5, 0.4, 0.6, metric="ece"))])
    assert overall(ev, rs) is Verdict.PASS  # the optional claim fails alone
    assert overall([], rs) is Verdict.INCONCLUSIVE


def test_rank_methods_on_intervals():
    ms = [m(0.3, 0.2, 0.4, metric="faithfulness:a"), m(0.2, 0.15, 0.25, metric="faithfulness:b"),
          m(0.1, -0.1, 0.3, metric="faithfulness:c")]
    rules = [("faithfulness", ">", 0.0, "better than random")]
    rows = rank_methods(["c", "b", "a", "d"], ms, rules)
    assert [r["method"] for r in rows] == ["a", "b", "c", "d"]
    assert [r["status"] for r in rows] == ["recommended", "recommended", "warned", "warned"]
    assert rows[2]["reasons"] == ["better than random: INCONCLUSIVE (faithfulness 0.1 [-0.1, 0.3] straddles 0; "
                                  "more items would decide)"]
    assert rows[3]["reasons"] == ["better than random: INCONCLUSIVE (not measured)"]
    rows = rank_methods(["a"], [m(-0.1, -0.2, 0.0, metric="faithfulness:a")], rules)
    assert rows[0]["reasons"] == ["better than random: FAIL (faithfulness -0.1 [-0.2, 0], required > 0)"]
    # an undefined figure (no value) is INCONCLUSIVE with its reason: it crashed formatting None
    undefined = proportion("explainability", "faithfulness:a", 0, 0, 0.95, undefined="no item was explained")
    rows = rank_methods(["a"], [undefined], rules)
    assert rows[0]["reasons"] == ["better than random: INCONCLUSIVE (faithfulness is undefined: no item was "
                                  "explained)"]


def test_the_pessimistic_measurement_is_chosen_by_its_bound_not_its_value():
    # a high value on few items (low lower bound) is worse for ">=" than a lower value on many items
    few, many = m(0.95, 0.80, 0.99, n=20, amplitude=1.0, perturbation="blur"), \
        m(0.92, 0.90, 0.94, n=2000, amplitude=0.0, perturbation="blur")
    for cmp in (">=", ">"):
        (e,) = judge([req(cmp, 0.85, perturbation="blur", max_amplitude=1.0)], [outcome(many, few)])
        assert e.value == 0.95 and e.verdict is Verdict.INCONCLUSIVE
        assert e.rationale.startswith("accuracy = 0.95, lower bound 0.8 at amplitude 1 (n = 20)")
    # for "<=", the largest upper bound
    few, many = m(0.05, 0.01, 0.20, metric="fnr", n=20, amplitude=1.0, perturbation="blur"), \
        m(0.08, 0.07, 0.09, metric="fnr", n=2000, amplitude=0.0, perturbation="blur")
    (e,) = judge([req("<=", 0.1, "fnr", "blur", 1.0)], [outcome(many, few)])
    assert e.value == 0.05 and e.verdict is Verdict.INCONCLUSIVE and "upper bound 0.2" in e.rationale


def test_nan_lower_bound_of_an_upper_claim_and_scopes_of_the_evidence():
    assert verdict(0.05, "<=", 0.1, math.nan, 0.08) is Verdict.INCONCLUSIVE
    r1 = Requirement(id="A", text="t", metric="missing", comparator=">=", threshold=0.5, scope=Scope(split="val"))
    r2 = Requirement(id="B", text="t", metric="accuracy", comparator=">=", threshold=0.5, scope=Scope(split="val"))
    r3 = Requirement(id="C", text="t", metric="recall:bad", comparator=">=", threshold=0.5, scope=Scope(split="val"))
    val = dict(scope=Scope(split="val"), check="performance")
    ms = [Measurement(metric="accuracy", kind="census", value=0.9, n=10, amplitude=1.0, **val),  # no sweep
          Measurement(metric="recall:bad", value=None, n=0, **val)]
    e1, e2, e3 = judge([r1, r2, r3], [outcome(*ms)])  # a claim nothing measured does not stop the others
    assert [e.claim_id for e in (e1, e2, e3)] == ["A", "B", "C"]
    assert e1.check is None and all(e.scope == Scope(split="val") for e in (e1, e2, e3))
    assert e2.rationale == "accuracy = 0.9, exact over the whole split (n = 10); claim >= 0.5: PASS"
    assert e3.verdict is Verdict.INCONCLUSIVE


def test_breaking_amplitude_counts_the_clean_point_first_whatever_the_order():
    sweep = [m(0.95, 0.92, 0.97, amplitude=2.0, perturbation="blur"),
             m(0.96, 0.93, 0.98, amplitude=1.0, perturbation="blur"),
             m(0.99, 0.95, 1.0, amplitude=None, perturbation="blur")]
    assert breaking_amplitude(req(">=", 0.94), sweep) == 0.0


# --- three kinds of figure: census on its value, bound on the bound, estimate on its interval's pessimistic end ---

def test_a_census_is_judged_on_its_value():
    leak = dict(metric="leakage", kind="census", n=500)
    (e,) = judge([req("<=", 0, "leakage")], [outcome(m(0.0, **leak))])
    assert (e.verdict, e.kind, e.interval) == (Verdict.PASS, "census", None)
    assert e.rationale == "leakage = 0, exact over the whole split (n = 500); claim <= 0: PASS"
    (e,) = judge([req("<=", 0, "leakage")], [outcome(m(1.0, **leak))])
    assert e.verdict is Verdict.FAIL
    # an interval on a census is not read: the count is exact
    (e,) = judge([req(">=", 0.9)], [outcome(m(0.9, 0.5, 0.95, kind="census"))])
    assert e.verdict is Verdict.PASS


def test_a_bound_is_judged_on_the_bound():
    (e,) = judge([req("<=", 10.0, "lipschitz_upper_bound")],
                 [outcome(m(9.5, metric="lipschitz_upper_bound", kind="bound", n=None))])
    assert (e.verdict, e.kind) == (Verdict.PASS, "bound")
    assert e.rationale == "lipschitz_upper_bound = 9.5, certified bound; claim <= 10: PASS"
    (e,) = judge([req("<=", 10.0, "lipschitz_upper_bound")],
                 [outcome(m(10.5, metric="lipschitz_upper_bound", kind="bound", n=None))])
    assert e.verdict is Verdict.FAIL


def test_an_estimate_passes_only_on_its_pessimistic_end():
    for value, lo, hi, want in ((0.95, 0.91, 0.98, Verdict.PASS), (0.95, 0.89, 0.98, Verdict.INCONCLUSIVE),
                                (0.89, 0.85, 0.93, Verdict.FAIL)):
        (e,) = judge([req(">=", 0.9)], [outcome(m(value, lo, hi))])
        assert (e.verdict, e.kind) == (want, "estimate")
    (e,) = judge([req("<=", 0.1, "cost")], [outcome(m(0.08, 0.05, 0.11, metric="cost"))])
    assert e.verdict is Verdict.INCONCLUSIVE and "upper bound 0.11" in e.rationale


def test_a_bare_estimate_is_inconclusive_with_the_reason_in_words():
    for value in (0.05, 0.5):  # neither a pass nor a failure on a point
        (e,) = judge([req("<=", 0.1, "ece")], [outcome(m(value, metric="ece"))])
        assert e.verdict is Verdict.INCONCLUSIVE and e.value == value
        assert e.rationale.endswith("INCONCLUSIVE: it is a sampling estimate without an interval, and a claim "
                                    "passes only on its interval's pessimistic end")
    # one bare estimate in a sweep keeps the claim from passing, even if every other amplitude passes
    sweep = [m(0.99, 0.97, 1.0, amplitude=0.0, perturbation="blur"),
             m(0.98, amplitude=1.0, perturbation="blur")]
    (e,) = judge([req(">=", 0.9, perturbation="blur", max_amplitude=1.0)], [outcome(*sweep)])
    assert e.verdict is Verdict.INCONCLUSIVE and e.value == 0.98 and "without an interval" in e.rationale
    # ... but a failure elsewhere still shows
    sweep[0] = m(0.5, 0.4, 0.6, amplitude=0.0, perturbation="blur")
    (e,) = judge([req(">=", 0.9, perturbation="blur", max_amplitude=1.0)], [outcome(*sweep)])
    assert e.verdict is Verdict.FAIL
    rows = rank_methods(["a"], [m(0.3, metric="faithfulness:a")], [("faithfulness", ">", 0.0, "beats random")])
    assert rows[0]["status"] == "warned" and "without an interval" in rows[0]["reasons"][0]


def test_records_written_before_kinds_load_as_estimates():
    old = {"check": "performance", "metric": "ece", "value": 0.05, "n": 100, "scope": {"split": "test"}}
    assert Measurement.model_validate(old).kind == "estimate"
    with_iv = {**old, "interval": {"lower": 0.03, "upper": 0.08, "confidence": 0.95, "method": "bootstrap"}}
    (e,) = judge([req("<=", 0.1, "ece")], [outcome(Measurement.model_validate(with_iv))])
    assert e.verdict is Verdict.PASS
    (e,) = judge([req("<=", 0.1, "ece")], [outcome(Measurement.model_validate(old))])
    assert e.verdict is Verdict.INCONCLUSIVE
    from trustcase.schemas import Evidence
    ev = Evidence.model_validate({"claim_id": "R", "metric": "ece", "value": 0.05, "verdict": "PASS", "rationale": "r"})
    assert ev.kind is None

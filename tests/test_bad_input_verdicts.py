"""Undefined is INCONCLUSIVE, everywhere: every way a figure can be undefined reaches `judge`, none crashes it."""

from __future__ import annotations

import math

import numpy as np
import pytest
import yaml
from conftest import SOLAR

from trustcase.performance import Tally
from trustcase.schemas import CheckOutcome, Interval, Measurement, PerturbationScope, Requirement, Scope, UseCase
from trustcase.verdicts import judge, overall

USE_CASE = UseCase.model_validate(yaml.safe_load((SOLAR / "use_case.yaml").read_text()))


def req(metric="recall:defective", comparator=">=", threshold=0.7, perturbation=None):
    scope = Scope(perturbation=PerturbationScope(name=perturbation, max_amplitude=1.0)) if perturbation else Scope()
    return Requirement(id="R", text="t", metric=metric, comparator=comparator, threshold=threshold, scope=scope)


def meas(value, metric="recall:defective", n=10, interval=None, perturbation=None, amplitude=None, **details):
    scope = Scope(perturbation=PerturbationScope(name=perturbation, max_amplitude=amplitude or 0.0)) \
        if perturbation else Scope()
    return Measurement(check="c", metric=metric, value=value, n=n, interval=interval, scope=scope,
                       amplitude=amplitude, details=details)


def iv(lo, hi):
    return Interval(lower=lo, upper=hi, confidence=0.95, method="clopper-pearson")


@pytest.mark.parametrize("r, ms, reason", [
    (req(), [meas(None, n=0)], "no defective item in the test split"),
    (req(), [meas(float("nan"), n=0)], "no defective item"),
    (req("precision:defective"), [meas(None, "precision:defective", n=0)], "predicted no defective item"),
    (req("accuracy"), [meas(None, "accuracy", n=0)], "n = 0"),
    (req("ece", "<=", 0.1), [meas(0.05, "ece", interval=iv(float("nan"), 0.2))], "no defined value"),
    (req("accuracy"), [meas(None, "accuracy", undefined="every item of the split failed to load")],
     "every item of the split failed to load"),
    # under a perturbation: one undefined amplitude hides what the claim would be there
    (req(perturbation="blur"), [meas(0.9, perturbation="blur", amplitude=0.0, interval=iv(0.8, 0.95)),
                                meas(None, n=0, perturbation="blur", amplitude=1.0)], "at amplitude 1"),
    (req(perturbation="blur"), [meas(None, n=0, perturbation="blur", amplitude=None)], "no defective item"),
])
def test_every_undefined_figure_is_inconclusive_with_its_reason(r, ms, reason):
    [e] = judge([r], [CheckOutcome(check="c", measurements=ms)])
    assert e.verdict.value == "INCONCLUSIVE" and e.value is None
    assert reason in e.rationale, e.rationale
    assert overall([e], [r]).value == "INCONCLUSIVE"


def test_a_defined_failure_beside_a_hole_still_fails():
    r = req(perturbation="blur")
    ms = [meas(0.2, perturbation="blur", amplitude=0.5, interval=iv(0.1, 0.3)),
          meas(None, n=0, perturbation="blur", amplitude=1.0)]
    [e] = judge([r], [CheckOutcome(check="c", measurements=ms)])
    assert e.verdict.value == "FAIL" and math.isclose(e.value, 0.2)


def test_a_split_without_the_critical_class_gives_inconclusive_recall():
    """The reproduction: a claim on the recall of a class absent from the test split (real Tally, real rates)."""
    tally = Tally(USE_CASE)
    labels = np.zeros(20, np.int64)                       # only functional cells
    logits = np.stack([np.linspace(1, 2, 20), np.zeros(20)], axis=1)
    tally.update(logits, labels, {"cell_type": ["mono"] * 20})
    outcome = CheckOutcome(check="performance", measurements=tally.compute("performance", "test", 0.95))
    evidence = {e.claim_id: e for e in judge(USE_CASE.requirements, [outcome])}
    for claim in ("R2-recall", "R3-recall-mono"):
        assert evidence[claim].verdict.value == "INCONCLUSIVE"
        assert "no defective item in the test split" in evidence[claim].rationale
    assert evidence["R1-accuracy"].verdict.value == "PASS"
    assert evidence["R4-recall-poly"].rationale.startswith("no check of the plan measured")

"""The safety argument from hand-made evidence sets: expected verdicts on every node, gsn2x rules, comparison."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from trustcase.reports import argument as A
from trustcase.reports import profile
from trustcase.schemas import Assessment, CheckOutcome, Evidence, Interval, Measurement, Provenance, Requirement

# one claim per AMLAS stage (and per data property): (claim id, check, stage, metric, comparator, threshold)
CLAIMS = [
    ("D-leak", "data_quality", "data", "leakage", "<=", 0.0),
    ("D-read", "data_quality", "data", "unreadable", "<=", 0.0),
    ("D-label", "label_issues", "data", "suspected_labels", "<=", 0.05),
    ("D-bal", "data_quality", "data", "imbalance_ratio", "<=", 3.0),
    ("D-cov", "data_quality", "data", "odd_coverage:brightness", ">=", 0.95),
    ("D-drift", "data_quality", "data", "drift_pvalue:brightness", ">=", 0.01),
    ("L-acc", "performance", "learning", "accuracy", ">=", 0.8),
    ("T-blur", "perturbation_sweep", "testing", "recall:defective", ">=", 0.7),
    ("F-cert", "smoothing", "formal", "certified_accuracy", ">=", 0.5),
    ("M-ood", "odd_monitor", "deployment", "ood_detection_rate", ">=", 0.9),
]
PASSING = {"<=": 0.0, ">=": 0.99}
FAILING = {"<=": 10.0, ">=": 0.1}


def use_case(confidential: bool = False) -> dict:
    return {
        "id": "solar_cells", "title": "Solar cells", "owner": "QA", "criticality": "high",
        "intended_function": "flag defective cells", "confidentiality": "confidential" if confidential else "public",
        "model": {"format": "torchscript", "class_names": ["functional", "defective"], "critical_class": "defective"},
        "odd": {"description": "EL images", "descriptors": [{"name": "cell_type", "values": ["mono", "poly"]}]},
        "plan": {"confidence": 0.95},
    }


def requirement(cid: str, metric: str, comparator: str, threshold: float, **kw) -> Requirement:
    scope = {"perturbation": {"name": "gaussian_blur", "max_amplitude": 1.0}} if cid.startswith("T-") else {}
    return Requirement(id=cid, text=f"claim {cid}", metric=metric, comparator=comparator, threshold=threshold,
                       scope=scope, **kw)


def evidence(r: Requirement, check: str, value: float, verdict: str, validity: list[str] = ()) -> Evidence:
    return Evidence(claim_id=r.id, check=check, metric=r.metric, value=value, threshold=r.threshold,
                    comparator=r.comparator, verdict=verdict, scope=r.scope,
                    interval=Interval(lower=value - 0.01, upper=value + 0.01, confidence=0.95, method="wilson"),
                    rationale=f"{r.metric} = {value}", validity=list(validity))


def provenance(**kw) -> Provenance:
    base = dict(use_case_id="solar_cells", use_case_sha256="u" * 64, mlflow_run_id="run1", model_sha256="m" * 64,
                model_version="3", data_sha256="d" * 64, code_version="test", packages={"python": "3.11"}, seed=0,
                started_at=datetime(2026, 1, 1, tzinfo=UTC), finished_at=datetime(2026, 1, 1, 0, 5, tzinfo=UTC))
    return Provenance(**(base | kw))


def assessment(verdicts: dict[str, str] | None = None, drop: set[str] = frozenset(), advisory: set[str] = frozenset(),
               complete: bool = True, confidential: bool = False, **prov) -> Assessment:
    """Every claim of CLAIMS measured and judged (PASS unless `verdicts` says otherwise); `drop` removes records."""
    verdicts = verdicts or {}
    reqs, outcomes, records = [], {}, []
    for cid, check, stage, metric, comp, thr in CLAIMS:
        r = requirement(cid, metric, comp, thr, mandatory=cid not in advisory)
        reqs.append(r)
        v = verdicts.get(cid, "PASS")
        value = {"PASS": PASSING, "FAIL": FAILING}.get(v, {"<=": thr, ">=": thr})[comp]
        o = outcomes.setdefault(check, CheckOutcome(check=check, stage=stage, validity=[f"{check} holds on test"]))
        o.measurements.append(Measurement(check=check, metric=metric, value=value, scope=r.scope,
                                          amplitude=1.0 if r.scope.perturbation else None, n=100))
        if cid not in drop:
            records.append(evidence(r, check, value, v, o.validity))
    verdict = "FAIL" if "FAIL" in verdicts.values() else "PASS"
    return Assessment(use_case=use_case(confidential), requirements=reqs, outcomes=list(outcomes.values()),
                      evidence=records, provenance=provenance(**prov), verdict=verdict, complete=complete,
                      errors=[] if complete else ["smoothing: RuntimeError: out of memory"])


def verdicts_of(arg: A.Argument) -> dict[str, str | None]:
    return {i: (n.verdict.value if n.verdict else None) for i, n in arg.nodes.items()}


GOALS_AND_STRATEGIES = lambda arg: [n for n in arg.nodes.values() if n.kind in ("goal", "strategy")]  # noqa: E731


def test_all_pass_passes_every_node():
    arg = A.build(assessment())
    assert arg.problems == []
    assert all(n.verdict.value == "PASS" for n in GOALS_AND_STRATEGIES(arg)), verdicts_of(arg)
    assert arg.verdict.value == "PASS"
    # every requirement is a goal, every evidence record a solution, in the stage of the check that measured it
    for cid, _check, stage, *_ in CLAIMS:
        assert arg[f"G-{cid}"].kind == "goal" and arg[f"G-{cid}"].stage == stage
        assert arg[f"Sn-{cid}"].supported_by == [] and arg[f"Sn-{cid}"].verdict.value == "PASS"
        assert f"Sn-{cid}" in arg[f"G-{cid}"].supported_by
        assert arg.claim_stage[cid] == stage
    # data properties: each claim under its AMLAS property
    assert "G-D-leak" in arg["G-data-independence"].supported_by
    assert "G-D-read" in arg["G-data-accuracy"].supported_by
    assert "G-D-label" in arg["G-data-labels"].supported_by
    assert "G-D-bal" in arg["G-data-balance"].supported_by
    assert "G-D-cov" in arg["G-data-completeness"].supported_by
    assert "G-D-drift" in arg["G-data-relevance"].supported_by
    # verification has its two legs
    assert arg["S-verification"].supported_by == ["G-testing", "G-formal"]
    # validity conditions appear as assumptions in context of the stage strategy
    assert "A-formal-smoothing" in arg["S-formal"].in_context_of
    assert "smoothing holds on test" in arg["A-formal-smoothing"].text
    assert arg["Sn-training-log"].verdict.value == "PASS"


def test_one_fail_fails_its_chain_and_nothing_else():
    arg = A.build(assessment({"F-cert": "FAIL"}))
    v = verdicts_of(arg)
    for node in ["Sn-F-cert", "G-F-cert", "S-formal", "G-formal", "S-verification", "G-verification", "S-amlas",
                 "G-top"]:
        assert v[node] == "FAIL", node
    for node in ["G-requirements", "G-data", "G-learning", "G-testing", "G-deployment"]:
        assert v[node] == "PASS", node
    assert arg["G-top"].details["why"] == "fails through S-amlas"


def test_fail_dominates_inconclusive():
    arg = A.build(assessment({"F-cert": "FAIL", "L-acc": "INCONCLUSIVE"}))
    assert arg["G-learning"].verdict.value == "INCONCLUSIVE"
    assert arg["G-formal"].verdict.value == "FAIL"
    assert arg.verdict.value == "FAIL"


@pytest.mark.parametrize("placeholder", [False, True])
def test_missing_evidence_makes_an_undeveloped_inconclusive_goal(placeholder):
    a = assessment(drop={"L-acc"})
    if placeholder:  # what verdicts.judge writes when no check measured the claim
        r = next(r for r in a.requirements if r.id == "L-acc")
        a.evidence.append(Evidence(claim_id="L-acc", check=None, metric=r.metric, value=None, threshold=r.threshold,
                                   comparator=r.comparator, verdict="INCONCLUSIVE", scope=r.scope,
                                   rationale="no check of the plan measured accuracy"))
    arg = A.build(a)
    g = arg["G-L-acc"]
    assert g.undeveloped and g.verdict.value == "INCONCLUSIVE"
    assert g.details["why"].startswith("undeveloped")
    v = verdicts_of(arg)
    for node in ["S-learning", "G-learning", "S-amlas", "G-top"]:
        assert v[node] == "INCONCLUSIVE", node
    assert v["G-data"] == v["G-verification"] == v["G-deployment"] == "PASS"
    assert (any("L-acc has no evidence record" in p for p in arg.problems)) is not placeholder
    assert A.check_gsn2x(arg.to_gsn2x()) == []
    assert arg.to_gsn2x()["G-L-acc"]["undeveloped"] is True


def test_a_claim_whose_metric_nothing_measures_is_shown_as_not_measured():
    """No guess from the metric's name: the claim's stage is that of a check measuring its metric, else none."""
    a = assessment()
    r = requirement("X-iou", "mean_iou", ">=", 0.5)
    a = a.model_copy(update={"requirements": a.requirements + [r], "evidence": a.evidence + [Evidence(
        claim_id="X-iou", metric="mean_iou", value=None, threshold=0.5, comparator=">=", verdict="INCONCLUSIVE",
        rationale="no check of the plan measured mean_iou on the test split")]})
    assert not a.evidence[-1].measured and a.evidence[-1].check is None
    arg = A.build(a)
    assert arg.claim_stage["X-iou"] is None
    g = arg["G-X-iou"]
    assert g.undeveloped and g.stage == "requirements" and "no check of the plan measures" in g.details["not_measured"]
    assert "G-X-iou" in arg.descendants("G-requirements")
    assert arg["G-requirements"].verdict.value == "INCONCLUSIVE" and arg.verdict.value == "INCONCLUSIVE"
    # a record written before the explicit state ("-") reads as nothing measured
    assert Evidence.model_validate({**a.evidence[-1].model_dump(), "check": "-"}).check is None


def test_stage_is_an_enum_shared_by_checks_outcomes_and_argument():
    from trustcase.checks import REGISTRY, Check, CheckError, build
    from trustcase.schemas import CheckSpec, Stage

    assert {REGISTRY.resolve(n).stage for n in ("performance", "lipschitz", "odd_monitor")} == \
        {Stage.LEARNING, Stage.FORMAL, Stage.DEPLOYMENT}
    assert CheckOutcome.model_validate_json('{"check": "x", "stage": "formal"}').stage is Stage.FORMAL
    with pytest.raises(ValueError):
        CheckOutcome(check="x", stage="verification")

    class Odd(Check):
        name = "odd_stage"
        stage = "validation"

    import sys
    import types
    mod = types.ModuleType("tc_odd_stage")
    mod.Odd = Odd
    sys.modules["tc_odd_stage"] = mod
    with pytest.raises(CheckError, match="unknown AMLAS stage 'validation'"):
        build(CheckSpec(check="tc_odd_stage:Odd"), 3)


def test_stage_without_any_claim_is_undeveloped():
    a = assessment()
    a = a.model_copy(update={"requirements": [r for r in a.requirements if r.id != "M-ood"],
                             "evidence": [e for e in a.evidence if e.claim_id != "M-ood"],
                             "outcomes": [o for o in a.outcomes if o.stage != "deployment"]})
    arg = A.build(a)
    assert arg["G-deployment"].undeveloped and arg["G-deployment"].verdict.value == "INCONCLUSIVE"
    assert arg.verdict.value == "INCONCLUSIVE"


def test_measured_but_unjudged_stage_is_descriptive_and_inconclusive():
    a = assessment()
    a = a.model_copy(update={"requirements": [r for r in a.requirements if r.id != "M-ood"],
                             "evidence": [e for e in a.evidence if e.claim_id != "M-ood"]})
    arg = A.build(a)
    sn = arg["Sn-odd_monitor"]
    assert sn.verdict is None and sn.details["descriptive"] and sn.anchor == "check-odd_monitor"
    assert arg["G-deployment"].verdict.value == "INCONCLUSIVE"
    assert "descriptive" in arg["G-deployment"].details["why"] or "descriptive" in arg["S-deployment"].details["why"]


def test_advisory_fail_is_shown_not_counted():
    arg = A.build(assessment({"T-blur": "FAIL"}, advisory={"T-blur"}))
    assert arg["G-T-blur"].verdict.value == "FAIL" and not arg["G-T-blur"].counted
    assert arg["G-testing"].verdict.value == "INCONCLUSIVE"  # nothing counted is left under it (R3)
    assert arg.verdict.value == "INCONCLUSIVE"


def test_evidence_for_an_unknown_claim_is_a_problem_not_a_verdict():
    a = assessment()
    r = requirement("X-ghost", "accuracy", ">=", 0.9)
    a.evidence.append(evidence(r, "performance", 0.1, "FAIL"))
    arg = A.build(a)
    assert any("'X-ghost', which is not a requirement" in p for p in arg.problems)
    ghost = arg["Sn-orphan-X-ghost"]
    assert ghost.text.startswith("UNKNOWN CLAIM") and not ghost.counted
    assert arg.verdict.value == "PASS"


def test_incomplete_assessment_cannot_pass():
    arg = A.build(assessment(complete=False))
    assert arg.verdict.value == "INCONCLUSIVE"
    assert "A-incomplete" in arg["G-top"].in_context_of


def test_unregistered_model_leaves_the_training_log_undeveloped():
    arg = A.build(assessment(model_version=None))
    assert arg["G-training-log"].undeveloped
    assert arg["G-learning"].verdict.value == "INCONCLUSIVE"


def test_comparison_flags_regressions_first():
    before = assessment({"D-bal": "FAIL"})
    now = assessment({"L-acc": "FAIL"}, drop={"M-ood"})
    arg = A.build(now, previous=before)
    status = {c.claim_id: c.status for c in arg.comparison}
    assert status["L-acc"] == "regression" and status["D-bal"] == "improvement"
    assert status["M-ood"] == "removed" and status["D-leak"] == "unchanged"
    assert [c.regression for c in arg.comparison] == sorted((c.regression for c in arg.comparison), reverse=True)
    assert arg["G-L-acc"].details["previous"] == {"verdict": "PASS", "value": 0.99, "status": "regression"}
    assert arg.previous["mlflow_run_id"] == "run1"
    # one comparison: the registry watcher reads the same regressions (a removed claim is one)
    from trustcase.flows import watch
    rows = watch.compare(before, now)
    assert [r["claim"] for r in rows if r["regression"]] == [c.claim_id for c in arg.comparison if c.regression] \
        == ["L-acc", "M-ood"]


@pytest.mark.parametrize("case", [{}, {"F-cert": "FAIL"}, {"L-acc": "INCONCLUSIVE"}])
def test_gsn2x_export_follows_the_format_rules(case):
    arg = A.build(assessment(case), previous=assessment())
    doc = arg.to_gsn2x()
    assert A.check_gsn2x(doc) == []
    assert [i for i in doc if A.gsn2x_type(i) is None] == []
    assert doc["G-top"]["supportedBy"] == ["S-amlas"]
    assert doc["Sn-L-acc"]["url"] == "report.html#ev-L-acc"
    # one root, and the JSON export agrees with the nodes
    j = arg.to_json()
    assert j["root"] == "G-top" and len(j["nodes"]) == len(doc) and j["rules"] == A.RULES


def test_gsn2x_checker_rejects_what_the_tool_rejects():
    good = {"G1": {"text": "g", "supportedBy": ["S1"], "inContextOf": ["C1"]},
            "S1": {"text": "s", "supportedBy": ["Sn1"]}, "Sn1": {"text": "e"}, "C1": {"text": "c"}}
    assert A.check_gsn2x(good) == []
    bad = {
        "two roots": {**good, "G2": {"text": "other", "undeveloped": True}},
        "dangling": {**good, "S1": {"text": "s", "supportedBy": ["Sn9"]}},
        "unsupported": {**good, "S1": {"text": "s"}},
        "wrong type": {**good, "S1": {"text": "s", "supportedBy": ["C1", "Sn1"]}},
        "no prefix": {**good, "X1": {"text": "x"}, "G1": {**good["G1"], "supportedBy": ["S1", "X1"]}},
        "cycle": {**good, "S1": {"text": "s", "supportedBy": ["Sn1", "G1"]}},
        "undeveloped with support": {**good, "S1": {"text": "s", "supportedBy": ["Sn1"], "undeveloped": True}},
    }
    codes = {"two roots": "C01", "dangling": "C03", "unsupported": "V02", "wrong type": "V04", "no prefix": "V01",
             "cycle": "C0", "undeveloped with support": "V03"}
    for name, doc in bad.items():
        problems = A.check_gsn2x(doc)
        assert any(p.startswith(codes[name]) for p in problems), (name, problems)


def test_trust_profile_scores_and_allotment():
    a = assessment({"F-cert": "FAIL", "L-acc": "INCONCLUSIVE"})
    arg = A.build(a)
    s = {x.attribute: x for x in profile.scores(a, arg.claim_stage)}
    assert s["data quality"].score == 1.0 and len(s["data quality"].claims) == 6
    assert s["performance"].score == 0.5 and s["performance"].claims == ["L-acc"]
    assert s["robustness"].claims == ["T-blur"]
    assert s["certified robustness"].score == 0.0
    assert s["OOD/ODD monitoring"].score == 1.0
    assert s["explainability quality"].score is None and s["explainability quality"].status == "not assessed"
    assert s["calibration"].status == "not assessed"

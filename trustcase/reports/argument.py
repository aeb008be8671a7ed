"""The safety argument: a GSN tree in the structure of AMLAS, built from evidence records and the use case only.

    G-top  the component is acceptably safe for its function in its ODD   (context: use case, ODD, model, criticality)
      S-amlas  argument over the AMLAS stages
        G-requirements  ML safety requirements are specified        (AMLAS stage 2)
        G-data          data are relevant, complete, balanced, accurate, splits independent   (stage 3)
        G-learning      the learnt model meets its requirements     (stage 4: training log, performance)
        G-verification  verified independently: testing leg + formal leg   (stage 5)
        G-deployment    the model is used within its ODD: monitor and its validation   (stage 6)

Every requirement of the use case becomes a goal under the stage of the check that measured it
(`CheckOutcome.stage`, or for a claim whose scope nothing measured, the stage of the check that measured
its metric elsewhere); a claim whose metric no check of the plan measures is argued under the requirements
stage as not measured (undeveloped). Every evidence record becomes a solution with value, threshold and verdict;
an outcome no claim judged becomes a descriptive solution (measured, not judged); validity conditions
become assumptions. Verdicts are computed bottom-up by the explicit RULES below.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any

from trustcase.reports import findings
from trustcase.schemas import Assessment, ClaimChange, Evidence, Requirement, Stage, Verdict, compare_claims

RULES = [
    "R1 A solution takes the verdict of its evidence record; a descriptive solution (measured, not judged "
    "against any threshold) has no verdict.",
    "R2 One FAIL among the counted elements supporting a goal or strategy fails it.",
    "R3 Otherwise, one INCONCLUSIVE among them, or no judged evidence at all (an undeveloped goal, or a goal "
    "backed by descriptive evidence only), makes it INCONCLUSIVE.",
    "R4 Otherwise (every counted supporting element PASSES) it PASSES.",
    "R5 Advisory requirements (mandatory: false) are shown with their verdict but are not counted.",
    "R6 An incomplete assessment (a check did not finish) cannot PASS: its top goal is at best INCONCLUSIVE.",
    "R7 The trust profile is an aggregate for orientation only: no verdict is computed from it.",
]

# the goal each AMLAS stage argues; verification (stage 5) is split into its two legs below
GOALS = {
    Stage.REQUIREMENTS: "The ML safety requirements of the component are specified for its function in its ODD",
    Stage.DATA: "The data used to learn and verify the model are relevant, complete, balanced and accurate, "
                "and the splits are independent",
    Stage.LEARNING: "The learnt model satisfies its ML safety requirements on the data it was built for",
    Stage.TESTING: "Testing shows the model satisfies its requirements, including under perturbations and attacks",
    Stage.FORMAL: "Formal verification (Lipschitz bounds, randomized smoothing, property proofs) shows the model "
                  "satisfies its requirements",
    Stage.DEPLOYMENT: "In operation the model is used within its ODD: the ODD monitor flags what lies outside, "
                      "and the monitor is validated",
}

# a task's own words where a classifier's would mislead (a detector's errors are missed and false indications)
TASK_GOALS = {
    "detection": {
        Stage.LEARNING: "The learnt detector finds the true indications its requirements demand (recall at the "
                        "operating score threshold, IoU 0.5, per class) without more false indications per image "
                        "than allowed, and ranks them well (mAP), on the data it was built for",
        Stage.TESTING: "Testing shows the detector still finds the indications and raises no more false indications "
                       "than allowed under perturbations and attacks",
    },
    "segmentation": {
        Stage.LEARNING: "The learnt segmenter marks the defect pixels its requirements demand (IoU and Dice per "
                        "class) and, by the operating rule, sets aside the defective images without more false "
                        "alarms on defect-free ones than allowed, on the data it was built for",
        Stage.TESTING: "Testing shows the segmenter still marks the defects and sets aside the defective images "
                       "without more false alarms than allowed under perturbations and attacks",
    },
}


def model_context(model: dict, task: str | None) -> str:
    """What the model is, in the argument's words: its classes, or a detector's indications and operating point."""
    if task == "detection":
        return (f"detector of indications of {', '.join(model.get('class_names', []))} (boxes with a class and a "
                f"score; an indication is a detection scoring at least {model.get('score_threshold', '?')}; its "
                f"errors are missed indications and false indications), safety-critical class "
                f"{model.get('critical_class', '?')}")
    if task == "segmentation":
        names = model.get("class_names", [])
        return (f"segmenter of {', '.join(names[1:])} pixels (background: {names[0] if names else '?'}; an image is "
                f"set aside as defective when at least {model.get('defect_pixels', 1)} of its pixels are marked a "
                f"defect; its errors are missed and false defect pixels, missed defective images and false alarms), "
                f"safety-critical class {model.get('critical_class', '?')}")
    return (f"classes {', '.join(model.get('class_names', []))}, safety-critical class "
            f"{model.get('critical_class', '?')}")


# AMLAS data properties; a data claim goes under the first property whose pattern matches its metric
DATA_PROPERTIES = [
    ("independence", "The test and validation splits are independent of the training data",
     r"leak|overlap|independ|split"),
    # correctly labelled is its own goal: readable, in-range items say nothing about their labels, so without
    # label evidence (label_issues) or a poisoning screen this goal stays undeveloped, shown unsupported
    ("labels", "The labels are correct: no more labels suspected wrong than required, no poisoned training items",
     r"label|poison"),
    ("accuracy", "The data items are accurate (readable, in range, not corrupted or duplicated)",
     r"unreadable|constant|out_of_range|noise|corrupt|accura|duplicat"),
    ("balance", "The classes and ODD subgroups are represented in balanced proportions",
     r"class_share|imbalance|balance|share"),
    ("completeness", "The data cover the whole ODD", r"coverage|complete|missing|items"),
    ("relevance", "The data are relevant to the ODD (same distribution as operation, no drift between splits)",
     r"drift|shift|relevan|mean:"),
]


@dataclass
class Node:
    id: str
    kind: str  # goal, strategy, solution, context, assumption, justification
    text: str
    stage: str | None = None
    verdict: Verdict | None = None
    supported_by: list[str] = field(default_factory=list)
    in_context_of: list[str] = field(default_factory=list)
    counted: bool = True  # False: advisory, shown but not aggregated (R5)
    anchor: str | None = None  # section of the report holding the evidence
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def undeveloped(self) -> bool:
        return self.kind in ("goal", "strategy") and not self.supported_by


@dataclass
class Argument:
    nodes: dict[str, Node]
    root: str
    stage_goals: dict[str, str]
    claim_stage: dict[str, Stage | None]  # None: no check of the plan measures the claim's metric
    problems: list[str] = field(default_factory=list)
    comparison: list[ClaimChange] = field(default_factory=list)
    previous: dict[str, Any] | None = None

    def __getitem__(self, node_id: str) -> Node:
        return self.nodes[node_id]

    @property
    def verdict(self) -> Verdict:
        return self.nodes[self.root].verdict or Verdict.INCONCLUSIVE

    def descendants(self, node_id: str) -> list[str]:
        """node_id, everything supporting it, and their contexts, in a stable depth-first order."""
        seen: list[str] = []

        def walk(n: str) -> None:
            if n in seen:
                return
            seen.append(n)
            for c in self.nodes[n].in_context_of:
                if c not in seen:
                    seen.append(c)
            for s in self.nodes[n].supported_by:
                walk(s)

        walk(node_id)
        return seen

    def undeveloped(self) -> list[Node]:
        return [n for n in self.nodes.values() if n.undeveloped]

    def to_json(self) -> dict[str, Any]:
        def node(n: Node) -> dict[str, Any]:
            d = asdict(n)
            d["verdict"] = n.verdict.value if n.verdict else None
            d["undeveloped"] = n.undeveloped
            return d

        return {
            "format": "trustcase-argument/1",
            "notation": "GSN (Goal Structuring Notation), structured after AMLAS",
            "root": self.root,
            "verdict": self.verdict.value,
            "rules": RULES,
            "stage_goals": self.stage_goals,
            "claim_stage": self.claim_stage,
            "problems": self.problems,
            "previous": self.previous,
            "comparison": [{**c.model_dump(mode="json"), "regression": c.regression} for c in self.comparison],
            "nodes": [node(n) for n in self.nodes.values()],
        }

    def to_gsn2x(self, report_url: str = "report.html") -> dict[str, Any]:
        """The argument in the YAML format of gsn2x: one key per element, the prefix giving its type."""
        doc: dict[str, Any] = {}
        for n in self.nodes.values():
            text = n.text if n.verdict is None else f"{n.text} [{n.verdict.value}]"
            e: dict[str, Any] = {"text": text}
            if n.supported_by:
                e["supportedBy"] = list(n.supported_by)
            if n.in_context_of:
                e["inContextOf"] = list(n.in_context_of)
            if n.undeveloped:
                e["undeveloped"] = True
            if n.anchor:
                e["url"] = f"{report_url}#{n.anchor}"
            if n.verdict is not None:
                e["classes"] = [n.verdict.value.lower()]
            doc[n.id] = e
        return doc


def _v(v: Verdict | None) -> str | None:
    return v.value if v else None


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "_", text).strip("_") or "x"


def _fmt(v: float | None) -> str:
    return "–" if v is None else f"{v:.4g}"


def stage_of_claim(r: Requirement, records: list[Evidence], stages: dict[str, Stage],
                   measured_stage: dict[str, Stage]) -> Stage | None:
    """The stage of the check that judged the claim; for a claim nothing measured, the stage of the check that
    measured its metric on another scope; None when no check of the plan measures the metric at all."""
    for e in records:
        if e.check in stages:
            return stages[e.check]
    return measured_stage.get(r.metric)


def _data_property(metric: str) -> str:
    for name, _, pattern in DATA_PROPERTIES:
        if re.search(pattern, metric):
            return name
    return "other"


class _Builder:
    def __init__(self, a: Assessment):
        self.a = a
        self.nodes: dict[str, Node] = {}
        self.problems: list[str] = []

    def add(self, node: Node, parent: str | None = None, context_of: str | None = None) -> Node:
        base, i = node.id, 2
        while node.id in self.nodes:  # requirement ids are unique; this only guards derived ids
            node.id = f"{base}-{i}"
            i += 1
        self.nodes[node.id] = node
        if parent:
            self.nodes[parent].supported_by.append(node.id)
        if context_of:
            self.nodes[context_of].in_context_of.append(node.id)
        return node


def build(a: Assessment, previous: Assessment | None = None) -> Argument:
    """The argument of an assessment (and, given the previous assessed version, the comparison)."""
    b = _Builder(a)
    uc = a.use_case
    p = a.provenance
    model = uc.get("model", {})
    stages = {o.check: Stage(o.stage) for o in a.outcomes}
    measured_stage = {m.metric: stages[o.check] for o in a.outcomes for m in o.measurements}
    by_claim: dict[str, list[Evidence]] = {r.id: [] for r in a.requirements}
    orphans: list[Evidence] = []
    for e in a.evidence:
        if e.claim_id is None:
            continue
        if e.claim_id in by_claim:
            by_claim[e.claim_id].append(e)
        else:
            orphans.append(e)
            b.problems.append(f"evidence from check {e.check!r} refers to claim {e.claim_id!r}, which is not a "
                              "requirement of the use case: shown, not counted")
    for r in a.requirements:
        if not by_claim[r.id]:
            b.problems.append(f"claim {r.id} has no evidence record: its goal is undeveloped")
    claim_stage = {r.id: stage_of_claim(r, by_claim[r.id], stages, measured_stage) for r in a.requirements}

    # the top goal and its context
    top = b.add(Node("G-top", "goal", f"The ML component '{uc.get('title', uc.get('id', '?'))}' is acceptably safe "
                     f"for its intended function within its operational design domain", anchor="summary"))
    b.add(Node("C-use-case", "context", f"Use case {uc.get('id')}: {_short(uc.get('intended_function', ''))} "
               f"(owner: {uc.get('owner', '?')})", anchor="summary"), context_of=top.id)
    b.add(Node("C-odd", "context", "ODD: " + _short(uc.get("odd", {}).get("description") or "not described")
               + _descriptors(uc), anchor="summary"), context_of=top.id)
    b.add(Node("C-model", "context", f"Model {model.get('format', '?')}, version {p.model_version or 'unregistered'}, "
               f"SHA-256 {p.model_sha256[:12]}…; {model_context(model, uc.get('task'))}", anchor="provenance"),
          context_of=top.id)
    b.add(Node("C-criticality", "context", f"Criticality: {uc.get('criticality', '?')}; confidentiality: "
               f"{uc.get('confidentiality', 'public')}", anchor="summary"), context_of=top.id)
    amlas = b.add(Node("S-amlas", "strategy", "Argument over the AMLAS stages: requirements, data, learning, "
                       "verification (testing and formal), deployment"), parent=top.id)
    b.add(Node("J-rules", "justification", "Verdicts are computed by explicit rules: one FAIL under a goal fails it; "
               "missing evidence makes it INCONCLUSIVE; PASS needs the whole confidence interval to satisfy "
               "the threshold", anchor="rules"), context_of=amlas.id)
    if not a.complete:
        b.add(Node("A-incomplete", "assumption", "The assessment is INCOMPLETE. " + " ".join(
            findings.human_error(e) for e in a.errors)[:400], anchor="summary"), context_of=top.id)

    stage_goals: dict[str, str] = {}
    # requirements stage: the specification itself is the evidence
    g = b.add(Node("G-requirements", "goal", GOALS[Stage.REQUIREMENTS], stage=Stage.REQUIREMENTS,
                   anchor="stage-requirements"), parent=amlas.id)
    stage_goals["requirements"] = g.id
    s = b.add(Node("S-requirements", "strategy", "Argument over the specification: the requirements stated in the "
                   "use-case file, validated against its schema before any check ran", stage="requirements"),
              parent=g.id)
    mandatory = [r for r in a.requirements if r.mandatory]
    b.add(Node("Sn-use-case", "solution", f"Use-case file (SHA-256 {p.use_case_sha256[:12]}…): "
               f"{len(a.requirements)} requirements, {len(mandatory)} mandatory", stage="requirements",
               verdict=Verdict.PASS if mandatory else Verdict.INCONCLUSIVE, anchor="stage-requirements",
               details={"requirements": [r.id for r in a.requirements]}), parent=s.id)
    for r in a.requirements:
        if claim_stage[r.id] is None:  # a requirement no check of the plan can measure: a gap in the plan
            g = _claim(b, s.id, r, by_claim[r.id], "requirements")
            g.details["not_measured"] = f"no check of the plan measures {r.metric}"
    b.add(Node("A-requirements", "assumption", f"The requirements and thresholds were derived by the owner "
               f"({uc.get('owner', '?')}) from the system safety analysis; trustcase judges them, it does not "
               "derive them", stage="requirements"), context_of=s.id)

    def stage_goal(stage: Stage, parent: str) -> Node:
        text = TASK_GOALS.get(uc.get("task"), {}).get(stage, GOALS[stage])
        node = b.add(Node(f"G-{stage}", "goal", text, stage=stage, anchor=f"stage-{stage}"), parent=parent)
        stage_goals[stage] = node.id
        return node

    def claims_in(stage: Stage) -> list[Requirement]:
        return [r for r in a.requirements if claim_stage[r.id] == stage]

    # data: one sub-goal per AMLAS data property
    g = stage_goal(Stage.DATA, amlas.id)
    data_claims = claims_in(Stage.DATA)
    data_checks = [o for o in a.outcomes if stages[o.check] is Stage.DATA]
    if data_claims or data_checks:
        s = b.add(Node("S-data", "strategy", "Argument over the AMLAS data properties: relevance, completeness, "
                       "balance, accuracy, correct labels, independence of the splits", stage="data"), parent=g.id)
        groups: dict[str, list[Requirement]] = {}
        for r in data_claims:
            groups.setdefault(_data_property(r.metric), []).append(r)
        props = [(n, t) for n, t, _ in DATA_PROPERTIES] + [("other", "Other data requirements hold")]
        for name, text in props:
            if name == "other" and not groups.get("other"):
                continue
            pg = b.add(Node(f"G-data-{name}", "goal", text, stage="data", anchor="stage-data"), parent=s.id)
            for r in groups.get(name, []):
                _claim(b, pg.id, r, by_claim[r.id], "data")
            if not groups.get(name):
                for o in data_checks:  # measured, but no requirement sets a threshold for this property
                    ms = [m for m in o.measurements if _data_property(m.metric) == name]
                    if ms:
                        _descriptive(b, pg.id, o.check, ms, "data", f"{name}")
        _assumptions(b, s.id, [e for r in data_claims for e in by_claim[r.id]], "data")
    g = stage_goal(Stage.LEARNING, amlas.id)
    _develop(b, g, Stage.LEARNING, claims_in(Stage.LEARNING), by_claim, a, stages)
    _training_log(b, g, p.model_version)
    g = b.add(Node("G-verification", "goal", "The model is verified independently of its development: "
                   "by testing and by formal methods", stage="verification", anchor="stage-verification"),
              parent=amlas.id)
    stage_goals["verification"] = g.id
    sv = b.add(Node("S-verification", "strategy", "Argument over the two legs of verification: testing "
                    "(performance, perturbation sweeps, adversarial attacks) and formal (Lipschitz bounds, "
                    "randomized smoothing, property proofs)", stage="verification"), parent=g.id)
    for stage in (Stage.TESTING, Stage.FORMAL):
        _develop(b, stage_goal(stage, sv.id), stage, claims_in(stage), by_claim, a, stages)
    _develop(b, stage_goal(Stage.DEPLOYMENT, amlas.id), Stage.DEPLOYMENT, claims_in(Stage.DEPLOYMENT), by_claim, a,
             stages)

    for e in orphans:  # shown where their check belongs, never counted
        st = stages.get(e.check, Stage.TESTING)
        parent = stage_goals["verification"] if st in ("testing", "formal") else stage_goals[st]
        parent = next((x for x in b.nodes[stage_goals[st]].supported_by if x.startswith("S-")), parent)
        n = _solution(b, parent, e, st, f"Sn-orphan-{_slug(e.claim_id or '')}")
        n.counted = False
        n.text = f"UNKNOWN CLAIM {e.claim_id}: " + n.text

    arg = Argument(nodes=b.nodes, root=top.id, stage_goals=stage_goals, claim_stage=claim_stage, problems=b.problems)
    _judge(arg, arg.root)
    if not a.complete and arg.nodes[arg.root].verdict is Verdict.PASS:
        arg.nodes[arg.root].verdict = Verdict.INCONCLUSIVE  # R6
    if previous is not None:
        arg.comparison, arg.previous = compare(a, previous, arg)
    return arg


def _short(text: str, n: int = 160) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[: n - 1] + "…"


def _descriptors(uc: dict) -> str:
    ds = uc.get("odd", {}).get("descriptors", [])
    if not ds:
        return ""
    parts = []
    for d in ds:
        if d.get("values"):
            parts.append(f"{d['name']} in {{{', '.join(d['values'])}}}")
        else:
            parts.append(f"{d['name']} in [{_fmt(d.get('min'))}, {_fmt(d.get('max'))}]")
    return " — descriptors: " + "; ".join(parts)


def _develop(b: _Builder, g: Node, stage: Stage, claims: list[Requirement], by_claim: dict[str, list[Evidence]],
             a: Assessment, stages: dict[str, Stage]) -> None:
    outcomes = [o for o in a.outcomes if stages[o.check] == stage]
    if not claims and not outcomes:
        return  # undeveloped: no requirement and no check of the plan addresses this stage
    s = b.add(Node(f"S-{stage}", "strategy", f"Argument over each {stage.title.lower()} requirement of the use "
                   "case, judged on its confidence interval", stage=stage), parent=g.id)
    judged = set()
    for r in claims:
        _claim(b, s.id, r, by_claim[r.id], stage)
        judged |= {e.check for e in by_claim[r.id]}
    for o in outcomes:
        if o.check not in judged and o.measurements:
            _descriptive(b, s.id, o.check, o.measurements, stage, "")
        elif o.check not in judged:
            b.add(Node(f"Sn-{_slug(o.check)}", "solution",
                       f"{findings.check_name(o.check)}: ran, produced no measurement",
                       stage=stage, anchor=f"check-{_slug(o.check)}"), parent=s.id)
    _assumptions(b, s.id, [e for r in claims for e in by_claim[r.id]], stage)


def _training_log(b: _Builder, g: Node, version: str | None) -> None:
    """The model's training run is on record when the model is a registered version (MLflow registry)."""
    s = next((x for x in g.supported_by if x.startswith("S-")), None)
    if s is None:
        s = b.add(Node("S-learning", "strategy", "Argument over the learning process and the learnt model",
                       stage="learning"), parent=g.id).id
    if version:
        b.add(Node("Sn-training-log", "solution", f"Training log: the model is registered version {version}, its "
                   "training run (parameters, learning curves, validation metrics) recorded in MLflow",
                   stage="learning", verdict=Verdict.PASS, anchor="provenance",
                   details={"rationale": "judged on presence: the registry links this model's hash to its run"}),
              parent=s)
    else:
        b.add(Node("G-training-log", "goal", "The training process of the model is recorded (parameters, learning "
                   "curves): the model is not a registered version, no training log is on record",
                   stage="learning", anchor="provenance"), parent=s)


def _claim(b: _Builder, parent: str, r: Requirement, records: list[Evidence], stage: str) -> Node:
    g = b.add(Node(f"G-{r.id}", "goal", f"{r.id}: {_short(r.text, 200)}", stage=stage, counted=r.mandatory,
                   anchor=f"claim-{r.id}", details={"claim_id": r.id, "metric": r.metric, "comparator": r.comparator,
                                                    "threshold": r.threshold, "scope": r.scope.label(),
                                                    "mandatory": r.mandatory}), parent=parent)
    for i, e in enumerate(records):
        if not e.measured:
            continue  # nothing measured it: the goal stays undeveloped
        _solution(b, g.id, e, stage, f"Sn-{r.id}" + (f"-{i + 1}" if i else ""))
    return g


def _solution(b: _Builder, parent: str, e: Evidence, stage: str, node_id: str) -> Node:
    iv = f" [{findings.interval(e.metric, e.interval.lower, e.interval.upper)}]" if e.interval else ""
    want = f", required {findings.comparator(e.comparator)} {findings.value(e.metric, e.threshold)}" \
        if e.comparator and e.threshold is not None else ""
    measured = f"{findings.metric_name(e.metric)} {findings.value(e.metric, e.value)}"
    text = f"{findings.check_name(e.check)}: {measured}{iv}{want}"
    return b.add(Node(node_id, "solution", text, stage=stage, verdict=e.verdict, anchor=f"ev-{e.claim_id}",
                      details={"claim_id": e.claim_id, "check": e.check, "metric": e.metric, "value": e.value,
                               "threshold": e.threshold, "comparator": e.comparator,
                               "interval": e.interval.model_dump() if e.interval else None,
                               "rationale": e.rationale, "validity": e.validity}), parent=parent)


def _descriptive(b: _Builder, parent: str, check: str, ms: list, stage: str, suffix: str) -> Node:
    metrics = sorted({m.metric for m in ms})
    shown = ", ".join(findings.metric_name(x) for x in metrics[:3]) + (
        f" and {len(metrics) - 3} more" if len(metrics) > 3 else "")
    return b.add(Node(f"Sn-{_slug(check)}" + (f"-{suffix}" if suffix else ""), "solution",
                      f"{findings.check_name(check)}: {len(ms)} measurement(s) ({shown}), not judged: no requirement "
                      "sets a threshold",
                      stage=stage, anchor=f"check-{_slug(check)}",
                      details={"check": check, "metrics": metrics, "descriptive": True}), parent=parent)


def _assumptions(b: _Builder, strategy: str, records: list[Evidence], stage: str) -> None:
    """Validity conditions of the evidence, one assumption per check (deduplicated), attached to the strategy."""
    seen: dict[tuple[str, tuple[str, ...]], None] = {}
    for e in records:
        if e.validity:
            seen.setdefault((e.check, tuple(e.validity)), None)
    for check, conditions in seen:
        b.add(Node(f"A-{stage}-{_slug(check)}", "assumption",
                   f"Evidence from {findings.check_name(check)} holds under: "
                   + findings.plain("; ".join(conditions)), stage=stage, anchor=f"check-{_slug(check)}",
                   details={"check": check, "validity": list(conditions)}), context_of=strategy)


def _judge(arg: Argument, node_id: str) -> Verdict | None:
    """R1-R5, bottom-up."""
    n = arg.nodes[node_id]
    if n.kind == "solution":
        return n.verdict  # R1
    if n.kind not in ("goal", "strategy"):
        return None
    below = [(arg.nodes[c], _judge(arg, c)) for c in n.supported_by]
    counted = [v for c, v in below if c.counted and v is not None]
    if Verdict.FAIL in counted:
        n.verdict = Verdict.FAIL  # R2
    elif not counted or Verdict.INCONCLUSIVE in counted:
        n.verdict = Verdict.INCONCLUSIVE  # R3
    else:
        n.verdict = Verdict.PASS  # R4
    n.details.setdefault("why", _why(n, below))
    return n.verdict


def _why(n: Node, below: list[tuple[Node, Verdict | None]]) -> str:
    if not below:
        return "undeveloped: no evidence addresses this goal"
    counted = [(c, v) for c, v in below if c.counted and v is not None]
    if not counted:
        return "only descriptive evidence: nothing is judged against a threshold"
    fails = [c.id for c, v in counted if v is Verdict.FAIL]
    if fails:
        return "fails through " + ", ".join(fails)
    inc = [c.id for c, v in counted if v is Verdict.INCONCLUSIVE]
    if inc:
        return "inconclusive through " + ", ".join(inc)
    return f"all {len(counted)} supporting element(s) pass"


def compare(a: Assessment, previous: Assessment, arg: Argument) -> tuple[list[ClaimChange], dict[str, Any]]:
    """Per claim (`schemas.compare_claims`, the one comparison): previous value and verdict, regressions first."""
    out = compare_claims(a.evidence, previous.evidence)
    for c in out:
        g = arg.nodes.get(f"G-{c.claim_id}")
        if g is not None:
            g.details["previous"] = {"verdict": _v(c.previous_verdict), "value": c.previous_value, "status": c.status}
    pp = previous.provenance
    meta = {"mlflow_run_id": pp.mlflow_run_id, "model_version": pp.model_version, "model_sha256": pp.model_sha256,
            "verdict": previous.verdict.value, "finished_at": pp.finished_at.isoformat() if pp.finished_at else None}
    return out, meta


# --- the gsn2x format's rules, checked on our own export ---------------------------------------------------------

PREFIXES = (("Sn", "solution"), ("G", "goal"), ("S", "strategy"), ("C", "context"), ("A", "assumption"),
            ("J", "justification"))


def gsn2x_type(element_id: str) -> str | None:
    for prefix, kind in PREFIXES:  # Sn before S
        if element_id.startswith(prefix):
            return kind
    return None


def check_gsn2x(doc: dict[str, Any]) -> list[str]:
    """Problems against gsn2x's validation rules (V01-V06, C01-C04, C08); empty when the document is valid."""
    problems = []
    ids = set(doc)
    referenced: set[str] = set()
    for eid, e in doc.items():
        kind = gsn2x_type(eid)
        if kind is None:
            problems.append(f"V01 {eid}: id has no known prefix (G, S, Sn, C, A, J)")
            continue
        if not isinstance(e, dict) or not isinstance(e.get("text"), str):
            problems.append(f"{eid}: the mandatory 'text' attribute is missing")
            continue
        sup, ctx = e.get("supportedBy", []), e.get("inContextOf", [])
        for key, refs in (("supportedBy", sup), ("inContextOf", ctx)):
            if not isinstance(refs, list):
                problems.append(f"C11 {eid}: {key} must be a list")
                continue
            if len(set(refs)) != len(refs):
                problems.append(f"V05 {eid}: duplicate references in {key}")
            for r in refs:
                referenced.add(r)
                if r == eid:
                    problems.append(f"V06 {eid}: refers to itself")
                elif r not in ids:
                    problems.append(f"C03 {eid}: {key} refers to unknown element {r}")
                elif key == "supportedBy" and gsn2x_type(r) not in ("goal", "strategy", "solution"):
                    problems.append(f"V04 {eid}: {r} cannot support (only goals, strategies, solutions)")
                elif key == "inContextOf" and gsn2x_type(r) not in ("context", "assumption", "justification"):
                    problems.append(f"V04 {eid}: {r} cannot be context (only contexts, assumptions, justifications)")
        if kind in ("goal", "strategy"):
            if not sup and not e.get("undeveloped"):
                problems.append(f"V02 {eid}: neither supported nor marked undeveloped")
            if sup and e.get("undeveloped"):
                problems.append(f"V03 {eid}: marked undeveloped but has supporting elements")
        elif kind in ("solution", "context", "assumption", "justification") and sup:
            problems.append(f"V04 {eid}: a {kind} cannot be supported by other elements")
    roots = [i for i in doc if i not in referenced]
    if len(roots) != 1:
        problems.append(f"C01 there must be exactly one top-level element, found {len(roots)}: {roots[:5]}")
    elif gsn2x_type(roots[0]) != "goal":
        problems.append(f"C02 the top-level element {roots[0]} is not a goal")
    # C04 no cycle over supportedBy; C08 everything reachable from the root
    state: dict[str, int] = {}

    def visit(i: str) -> None:
        state[i] = 1
        e = doc.get(i) if isinstance(doc.get(i), dict) else {}
        for r in list(e.get("supportedBy", []) or []) + list(e.get("inContextOf", []) or []):
            if r not in doc:
                continue
            if state.get(r) == 1:
                problems.append(f"C04 circular supportedBy reference through {i} -> {r}")
            elif r not in state:
                visit(r)
        state[i] = 2

    for r in roots:
        visit(r)
    unreachable = sorted(ids - set(state))
    if unreachable:
        problems.append(f"C08 elements unreachable from the root: {unreachable[:5]}")
    return problems

"""What checks emit (measurements) and what the argument is built from (evidence records)."""

from __future__ import annotations

from datetime import datetime
from enum import Enum, StrEnum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from trustcase.schemas.use_case import Comparator, Requirement, Scope

SCHEMA_VERSION = "1"


class Record(BaseModel):
    # NaN/inf survive a JSON round trip (as the constants) instead of silently becoming null
    model_config = ConfigDict(extra="forbid", ser_json_inf_nan="constants")


class Verdict(str, Enum):
    PASS = "PASS"
    FAIL = "FAIL"
    INCONCLUSIVE = "INCONCLUSIVE"


RANK = {Verdict.FAIL: 0, Verdict.INCONCLUSIVE: 1, Verdict.PASS: 2}  # the higher, the better for the claim


class Stage(StrEnum):
    """The AMLAS stage a check's evidence supports (stage 5, verification, has a testing and a formal leg)."""

    REQUIREMENTS = "requirements"
    DATA = "data"
    LEARNING = "learning"
    TESTING = "testing"
    FORMAL = "formal"
    DEPLOYMENT = "deployment"

    @property
    def title(self) -> str:
        return _STAGE_TITLES[self][0]

    @property
    def amlas(self) -> str:
        """Where AMLAS describes it, e.g. "AMLAS stage 5"."""
        return _STAGE_TITLES[self][1]


_STAGE_TITLES = {
    Stage.REQUIREMENTS: ("ML safety requirements", "AMLAS stage 2"),
    Stage.DATA: ("Data management", "AMLAS stage 3"),
    Stage.LEARNING: ("Model learning", "AMLAS stage 4"),
    Stage.TESTING: ("Verification: testing", "AMLAS stage 5"),
    Stage.FORMAL: ("Verification: formal", "AMLAS stage 5"),
    Stage.DEPLOYMENT: ("Model deployment", "AMLAS stage 6"),
}


class Interval(Record):
    lower: float
    upper: float
    confidence: float
    method: str = Field(description="e.g. clopper-pearson, wilson, bootstrap")


Kind = Literal["census", "estimate", "bound"]
KINDS: dict[str, str] = {  # what each kind of figure is, in the report's words
    "census": "exact over the whole split",
    "estimate": "sampling estimate",
    "bound": "certified bound",
}


class Measurement(Record):
    """One number a check measured, with where it was measured and how sure we are. Its `kind` says what the
    number is: a census (exact over the whole split, e.g. a count: judged on its value), an estimate (a sampling
    estimate: judged on the pessimistic end of its interval, INCONCLUSIVE without one) or a bound (a
    certificate: judged on the bound). Made by `measurement.census`, `.estimate`, `.bound`; a record written
    before kinds existed loads as an estimate (with its interval, if it had one)."""

    check: str
    metric: str
    kind: Kind = "estimate"
    value: float | None = Field(description="None when undefined, e.g. a recall with no item of the class")
    scope: Scope = Scope()
    amplitude: float | None = Field(None, description="perturbation amplitude, when scope has a perturbation")
    interval: Interval | None = None
    n: int | None = Field(None, description="number of items the value is computed on")
    unit: str = ""
    details: dict[str, Any] = {}


class Artefact(Record):
    path: str = Field(description="path relative to the run's artefact root")
    sha256: str
    kind: str = "file"


class Provenance(Record):
    use_case_id: str
    use_case_sha256: str
    mlflow_run_id: str | None = None
    model_sha256: str
    model_version: str | None = None
    data_sha256: str
    data_items: dict[str, int] = Field({}, description="readable items per split, counted by the data fingerprint")
    code_version: str
    packages: dict[str, str]
    platform: dict[str, str] = Field({}, description="the machine: CPU model and SIMD flags, torch's ATen CPU "
                                     "capability, thread counts (figures are bit for bit per machine and threads)")
    seed: int
    parameters: dict[str, Any] = {}
    started_at: datetime
    finished_at: datetime | None = None


class Evidence(Record):
    """A claim judged against what was measured. `claim_id` is None for descriptive evidence; `check` is None
    when nothing measured the claim (it is then INCONCLUSIVE, and its rationale says so)."""

    claim_id: str | None
    check: str | None = Field(None, description="the check that measured the claim; None: nothing measured it")
    metric: str
    value: float | None
    threshold: float | None = None
    comparator: Comparator | None = None
    verdict: Verdict
    interval: Interval | None = None
    kind: Kind | None = Field(None, description="the kind of figure the verdict rests on; None: no figure")
    scope: Scope = Scope()
    rationale: str = Field(description="why this verdict, in one sentence a reader can check")
    validity: list[str] = Field([], description="conditions under which this evidence holds")
    details: dict[str, Any] = {}

    @field_validator("check", mode="before")
    @classmethod
    def _placeholder(cls, v: Any) -> Any:
        return None if v == "-" else v  # records written before "nothing measured" was explicit

    @property
    def measured(self) -> bool:
        return self.check is not None


class ClaimChange(Record):
    """One claim of an assessment beside the same claim in an earlier one (e.g. the qualified version's)."""

    claim_id: str
    metric: str
    verdict: Verdict | None = Field(description="None: the claim is no longer assessed")
    value: float | None
    previous_verdict: Verdict | None = Field(description="None: the claim is new")
    previous_value: float | None
    status: Literal["regression", "removed", "improvement", "unchanged", "new"]
    worse: bool = Field(False, description="the value moved against the claim's comparator")
    delta: float | None = None

    @property
    def regression(self) -> bool:
        """A verdict that got worse, or a claim no longer assessed."""
        return self.status in ("regression", "removed")


def compare_claims(current: list[Evidence], previous: list[Evidence]) -> list[ClaimChange]:
    """The one claim comparison: per claim (current order, then removed ones), regressions first, then
    values that got worse, then by claim id."""
    now = {e.claim_id: e for e in current if e.claim_id}
    before = {e.claim_id: e for e in previous if e.claim_id}
    out = []
    for cid in list(now) + [c for c in before if c not in now]:
        e, p = now.get(cid), before.get(cid)
        if p is None:
            status = "new"
        elif e is None:
            status = "removed"
        else:
            status = {-1: "regression", 0: "unchanged", 1: "improvement"}[
                (RANK[e.verdict] > RANK[p.verdict]) - (RANK[e.verdict] < RANK[p.verdict])]
        delta = worse = None
        if e and p and e.value is not None and p.value is not None and e.comparator:
            delta = e.value - p.value
            worse = delta < 0 if e.comparator.startswith(">") else delta > 0
        out.append(ClaimChange(claim_id=cid, metric=(e or p).metric, verdict=e.verdict if e else None,
                               value=e.value if e else None, previous_verdict=p.verdict if p else None,
                               previous_value=p.value if p else None, status=status, worse=bool(worse), delta=delta))
    return sorted(out, key=lambda c: (not c.regression, not c.worse, c.claim_id))


class Series(Record):
    y: list[float]
    lower: list[float] | None = None  # confidence band, when the values have one
    upper: list[float] | None = None


class Curve(Record):
    """A plot the report draws from numbers alone (no live model): y series over a shared x axis."""

    id: str
    title: str
    x_label: str
    y_label: str
    x: list[float]
    series: dict[str, Series]
    x_marks: dict[str, float] = Field({}, description="vertical markers, e.g. the ODD boundary")
    y_marks: dict[str, float] = Field({}, description="horizontal markers, e.g. a claim threshold")
    log_x: bool = False
    illustrates: list[str] = Field([], description="metrics (or metric families) whose claim cards show this curve")


class Topic(StrEnum):
    """Where a check's finding stands among the report's findings (the report gives each topic its heading)."""

    FAILS = "fails"  # what is shown not to hold
    BREAKS = "breaks"  # what breaks the model, and from which amplitude
    SUBGROUPS = "subgroups"  # which subgroups are weaker
    MONITOR = "monitor"  # what a runtime monitor stops
    EXPLANATIONS = "explanations"  # which explanations can be trusted
    GAPS = "gaps"  # what could not be shown, and why
    DATA = "data"  # what the data shows: labels that look wrong, drift, leakage, poisoning


class Finding(Record):
    """A sentence a check says about its own evidence, for the report's findings. The report writes `{key}` in
    `text` from `cites[key]` (its value and interval in the metric's units) and `{key.amplitude}` as that
    measurement's perturbation amplitude in its unit, so a figure reads the same here as in the claim cards."""

    topic: Topic
    text: str
    cites: dict[str, Measurement] = {}


class ConfusionMatrix(Record):
    kind: Literal["confusion"] = "confusion"
    title: str
    classes: list[str]
    counts: list[list[int]] = Field(description="rows: true class, columns: predicted class")
    illustrates: list[str] = Field([], description="metrics whose claim cards show this figure")


class ReliabilityDiagram(Record):
    kind: Literal["reliability"] = "reliability"
    title: str
    edges: list[float] = Field(description="confidence bin edges")
    accuracy: list[float] = Field(description="accuracy in each bin")
    count: list[int] = Field(description="items in each bin (empty bins are not drawn)")
    illustrates: list[str] = ["ece"]


class Histogram(Record):
    edges: list[float]
    counts: dict[str, list[float]] = Field({}, description="counts per bin, by split")


class Histograms(Record):
    kind: Literal["histograms"] = "histograms"
    title: str
    caption: str = ""
    histograms: dict[str, Histogram] = Field(description="by property")
    illustrates: list[str] = []


class CurveOverlay(Record):
    """The first series of several of the outcome's curves in one plot, each x divided by its curve's
    `x_marks[scale_mark]` (e.g. amplitudes in units of the ODD boundary), in percent."""

    kind: Literal["overlay"] = "overlay"
    title: str
    x_label: str
    y_label: str
    curves: dict[str, str] = Field(description="ids of curves of the same outcome, and their legends")
    scale_mark: str
    illustrates: list[str] = []


Figure = Annotated[ConfusionMatrix | ReliabilityDiagram | Histograms | CurveOverlay, Field(discriminator="kind")]


class MethodStanding(Record):
    """An attribution method as a check judged it, with the options it ran with: the lab starts each method from
    them and shows its standing."""

    method: str
    status: Literal["recommended", "warned", "not run"]
    reasons: list[str] = []
    options: dict[str, Any] = Field({}, description="the options the method was assessed with, as the plan gave them")


class CheckOutcome(Record):
    """All a check produced: measurements, curves, artefacts it wrote, and what it could not do; and what the
    report reads from it, declared and typed, the same for a built-in and a partner's check: `findings`
    (sentences), `figures` (plots beyond curves; a claim card shows the one that illustrates its metric),
    `caveat`, `units` of perturbation amplitudes, `shard`, `skipped` (why the check did not run); and what the lab
    reads: `methods` (attribution methods judged), artefacts by kind ("monitor", "clusters").

    `summary` holds free-form details, shown as tables in the report's appendix and read by nothing else;
    `artefacts` of kind "image" are embedded in the report (a check never writes images of real inputs for a
    confidential use case).
    """

    check: str
    stage: Stage = Field(Stage.TESTING, description="the AMLAS stage the evidence supports")
    shard: str = Field("", description="the part of the check this outcome covers, e.g. a sweep's perturbation")
    measurements: list[Measurement] = []
    curves: list[Curve] = []
    figures: list[Figure] = []
    findings: list[Finding] = []
    artefacts: list[Artefact] = []
    validity: list[str] = []
    limitations: list[str] = []
    caveat: str = Field("", description="what a reader must keep in mind about this evidence, in one sentence")
    units: dict[str, str] = Field({}, description="unit of each perturbation's amplitude, by perturbation name")
    methods: list[MethodStanding] = Field([], description="attribution methods as this check judged them, best "
                                          "first")
    skipped: str | None = Field(None, description="why the check did not run (it cannot serve this model or "
                                "data: `Unsupported`); None: it ran")
    summary: dict[str, Any] = {}
    duration_s: float = 0.0

    @model_validator(mode="before")
    @classmethod
    def _skipped(cls, v: Any) -> Any:
        """A record written before `skipped` existed said it in a "not run: " limitation and summary["skipped"]."""
        if not isinstance(v, dict) or "skipped" in v or v.get("measurements"):
            return v
        lims, summary = v.get("limitations") or [], v.get("summary") or {}
        said = [x for x in lims if isinstance(x, str) and x.startswith("not run:")]
        if not said and not (isinstance(summary, dict) and summary.get("skipped")):
            return v
        reason = summary.get("skipped") if isinstance(summary, dict) and summary.get("skipped") else \
            said[0].removeprefix("not run:").strip()
        rest = {k: x for k, x in summary.items() if k != "skipped"} if isinstance(summary, dict) else summary
        return {**v, "skipped": str(reason), "limitations": [x for x in lims if x not in said], "summary": rest}


class Assessment(Record):
    """Everything a report needs, and nothing live: the unit that is logged, packed and re-rendered."""

    schema_version: str = SCHEMA_VERSION
    use_case: dict[str, Any]
    requirements: list[Requirement]
    outcomes: list[CheckOutcome]
    evidence: list[Evidence]
    provenance: Provenance
    verdict: Verdict
    complete: bool = Field(description="False when a check failed: the assessment must not be read as whole")
    errors: list[str] = []
    catalogues: list[dict[str, Any]] = Field([], description="the use case's own catalogue of objectives (its "
                                             "`compliance` file), as read at assessment time: the compliance matrix")

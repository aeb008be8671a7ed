"""What checks emit (measurements) and what the argument is built from (evidence records)."""

from __future__ import annotations

from datetime import datetime
from enum import Enum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from trustcase.schemas.use_case import Comparator, Requirement, Scope

SCHEMA_VERSION = "1"


class Record(BaseModel):
    # NaN/inf survive a JSON round trip (as the constants) instead of silently becoming null
    model_config = ConfigDict(extra="forbid", ser_json_inf_nan="constants")


class Verdict(str, Enum):
    PASS = "PASS"
    FAIL = "FAIL"
    INCONCLUSIVE = "INCONCLUSIVE"


class Interval(Record):
    lower: float
    upper: float
    confidence: float
    method: str = Field(description="e.g. clopper-pearson, wilson, bootstrap")


class Measurement(Record):
    """One number a check measured, with where it was measured and how sure we are."""

    check: str
    metric: str
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
    code_version: str
    packages: dict[str, str]
    seed: int
    parameters: dict[str, Any] = {}
    started_at: datetime
    finished_at: datetime | None = None


class Evidence(Record):
    """A claim judged against what was measured. `claim_id` is None for descriptive evidence."""

    claim_id: str | None
    check: str
    metric: str
    value: float | None
    threshold: float | None = None
    comparator: Comparator | None = None
    verdict: Verdict
    interval: Interval | None = None
    scope: Scope = Scope()
    rationale: str = Field(description="why this verdict, in one sentence a reader can check")
    validity: list[str] = Field([], description="conditions under which this evidence holds")
    details: dict[str, Any] = {}


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


class CheckOutcome(Record):
    """All a check produced: measurements, curves, artefacts it wrote, and what it could not do.

    `summary` holds check-specific structured results (documented by each check); `artefacts` of kind
    "image" are embedded in the report (a check never writes images of real inputs for a confidential
    use case).
    """

    check: str
    stage: str = Field("testing", description="AMLAS stage: requirements, data, learning, testing, formal, deployment")
    measurements: list[Measurement] = []
    curves: list[Curve] = []
    artefacts: list[Artefact] = []
    validity: list[str] = []
    limitations: list[str] = []
    summary: dict[str, Any] = {}
    duration_s: float = 0.0


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

"""The compliance matrix: which objectives of EASA's AI concept paper (Issue 02), ISO/PAS 8800 and Article 15 of
the EU AI Act the evidence of one assessment supports, partly supports, contradicts, leaves unassessed, or cannot
address. From the Assessment alone, like the rest of the report; the frameworks are data (`trustcase/standards/`,
one YAML catalogue each; a use case may add its own in the same form).

An objective lists the kinds of evidence it needs (`parts`). A part is one of:
- claims: the use case's requirements whose check, metric (regex) and AMLAS stage match; the part is supported when
  every matching claim PASSES, measured by a check that ran (and at least one matches). A claim that FAILS
  contradicts it; one that is INCONCLUSIVE, that nothing measured, or whose check did not run (skipped, failed,
  absent from the record) never supports it, whatever verdict it carries.
- record: a fact of the record itself (e.g. the hashes of `provenance`, the ODD the use case declares).
- outside: what the tool cannot show (a plan, a review, a process of the organisation): never supported.

Status: `supported` (every part supported), `partly` (some parts, none contradicted), `not met` (the evidence
contradicts a part), `not assessed` (no part supported; each part says what would assess it), `out of scope`
(the catalogue says why the tool cannot address it). A check that did not run never counts as support.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from trustcase.errors import UserError, validation_message
from trustcase.reports import findings
from trustcase.schemas import Assessment, Evidence, Requirement, Stage, Verdict

STANDARDS = Path(__file__).resolve().parent.parent / "standards"
BUILT_IN = ("easa_ai_issue02", "iso_pas_8800", "eu_ai_act_art15")
FORMAT = "trustcase-compliance/1"
FILES = ("compliance.json", "compliance.csv")
STATUSES = ("supported", "partly", "not met", "not assessed", "out of scope")
RANK = {"not met": 0, "not assessed": 1, "partly": 2, "supported": 3}  # the higher, the better; out of scope: none
MAX_BYTES = 1 << 20

Fact = Literal["provenance", "odd", "requirements", "input_contract", "splits", "model_version", "model_identity",
               "argument", "complete", "claims_verified"]
FACTS: dict[str, str] = {
    "provenance": "the record holds the hashes of model, data and use case, the code and package versions and the seed",
    "odd": "the use case declares its ODD with measurable descriptors",
    "requirements": "the use case states quantified ML safety requirements (at least one mandatory)",
    "input_contract": "the use case states the model's input contract (shape, value range, normalisation)",
    "splits": "the use case names separate training, validation and test splits",
    "model_version": "the model is a registered version whose training run is on record",
    "model_identity": "the record identifies the model assessed (format, SHA-256, classes)",
    "argument": "a GSN safety argument (AMLAS structure) is built from the evidence",
    "complete": "every check finished and every requirement was measured",
    "claims_verified": "every mandatory requirement PASSES, in a complete assessment",
}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Part(_Strict):
    """One kind of evidence an objective needs: claims (checks / metrics / stages / scopes), a record, or outside."""

    what: str = Field(min_length=1, description="the kind of evidence, in words")
    checks: list[str] = []
    metrics: list[str] = Field([], description="regular expressions, searched in the claim's metric")
    stages: list[Stage] = []
    scopes: list[Literal["subgroup", "perturbation"]] = []
    record: Fact | None = None
    outside: str | None = Field(None, description="why the tool cannot show this part")

    @field_validator("metrics")
    @classmethod
    def _regex(cls, v: list[str]) -> list[str]:
        for pattern in v:
            try:
                re.compile(pattern)
            except re.error as e:
                raise ValueError(f"metric pattern {pattern!r} is not a regular expression ({e})") from None
        return v

    @model_validator(mode="after")
    def _one_kind(self) -> Part:
        kinds = [bool(self.checks or self.metrics or self.stages or self.scopes), self.record is not None,
                 self.outside is not None]
        if sum(kinds) != 1:
            raise ValueError("a part is exactly one of: claims (checks / metrics / stages / scopes), record, outside")
        return self

    @property
    def kind(self) -> str:
        return "record" if self.record else "outside" if self.outside else "claims"


class Objective(_Strict):
    id: str = Field(min_length=1, max_length=40)
    group: str = ""
    summary: str = Field(min_length=1, description="one line, in our own words")
    parts: list[Part] = []
    out_of_scope: str | None = Field(None, description="why the tool cannot address the objective at all")
    note: str | None = None
    source_note: str | None = Field(None, description="what the public sources could not confirm")

    @model_validator(mode="after")
    def _parts_or_scope(self) -> Objective:
        if bool(self.parts) == bool(self.out_of_scope):
            raise ValueError(f"objective {self.id}: give either parts (the evidence it needs) or out_of_scope "
                             "(why the tool cannot address it)")
        return self


class Catalogue(_Strict):
    framework: str = Field(pattern=r"^[a-z][a-z0-9_]*$")
    title: str
    source: str = ""
    source_note: str = ""
    objectives: list[Objective] = Field(min_length=1)

    @field_validator("objectives")
    @classmethod
    def _unique(cls, v: list[Objective]) -> list[Objective]:
        ids = [o.id for o in v]
        dup = sorted({i for i in ids if ids.count(i) > 1})
        if dup:
            raise ValueError(f"duplicate objective ids: {dup}")
        return v


class CatalogueError(UserError, ValueError):
    """A catalogue of objectives that cannot be read or does not fit the schema (one line per problem)."""


def parse_catalogue(text: str, where: str) -> Catalogue:
    if len(text) > MAX_BYTES:
        raise CatalogueError(f"{where}: {len(text)} characters; a catalogue is at most {MAX_BYTES}")
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        raise CatalogueError(f"{where}{f' line {mark.line + 1}' if mark else ''}: invalid YAML "
                             f"({getattr(e, 'problem', e)})") from None
    try:
        return Catalogue.model_validate(raw)
    except ValidationError as e:
        raise CatalogueError(f"{where}: {validation_message(e, '<file>')}") from None


def load_catalogue(path: str | Path) -> Catalogue:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise CatalogueError(f"{path}: cannot read the catalogue ({e})") from None
    return parse_catalogue(text, str(path))


def built_in() -> list[Catalogue]:
    return list(_built_in())


@lru_cache(maxsize=1)
def _built_in() -> tuple[Catalogue, ...]:  # package data, read once (frozen models: safe to share)
    return tuple(load_catalogue(STANDARDS / f"{name}.yaml") for name in BUILT_IN)


def catalogues(a: Assessment) -> list[Catalogue]:
    """The built-in frameworks, then the use case's own catalogues as the record holds them."""
    own = [Catalogue.model_validate(c) for c in getattr(a, "catalogues", [])]
    return built_in() + own


# --- the mapping ---------------------------------------------------------------------------------------------------

@dataclass
class Cited:
    """A claim cited for a part: its verdict and the check that measured it (None: nothing did)."""
    claim_id: str
    check: str | None
    verdict: str
    ran: bool
    metric: str
    mandatory: bool = True  # an advisory claim counts too (its FAIL is a weakness shown), and is said to be advisory

    def text(self) -> str:
        if self.check is None:
            return f"{self.claim_id}: not measured"
        if not self.ran:
            return f"{self.claim_id}: the {findings.check_name(self.check)} check did not run"
        advisory = "" if self.mandatory else ", advisory"
        return f"{self.claim_id} {self.verdict} ({findings.check_name(self.check)}{advisory})"


@dataclass
class PartResult:
    what: str
    kind: str
    state: Literal["supported", "contradicted", "inconclusive", "missing", "outside"]
    claims: list[Cited] = field(default_factory=list)
    note: str = ""


@dataclass
class Row:
    framework: str
    id: str
    group: str
    summary: str
    status: str
    parts: list[PartResult]
    why: str  # the justification in one sentence

    def supporting(self) -> list[Cited]:
        return [c for p in self.parts if p.state == "supported" for c in p.claims]

    def support_text(self) -> str:
        """What supports the objective (or its supported parts): claims with verdicts, facts of the record."""
        return "; ".join(", ".join(c.text() for c in p.claims) if p.claims else p.what
                         for p in self.parts if p.state == "supported")


@dataclass
class Matrix:
    catalogues: list[Catalogue]
    rows: list[Row]

    def framework(self, name: str) -> list[Row]:
        return [r for r in self.rows if r.framework == name]

    def counts(self, name: str | None = None) -> dict[str, int]:
        c = Counter(r.status for r in self.rows if name is None or r.framework == name)
        return {s: c.get(s, 0) for s in STATUSES}


def ran_checks(a: Assessment) -> set[str]:
    """Checks whose outcome is in the record and that ran: not skipped (Unsupported), not among the failed."""
    failed = {e.partition(":")[0].split("[")[0].strip() for e in a.errors}
    return {o.check for o in a.outcomes if not o.skipped and o.check not in failed}


def _claim_matches(p: Part, r: Requirement, e: Evidence | None, stage: Stage | None) -> bool:
    check = e.check if e else None
    if p.checks and check not in p.checks:
        return False
    if p.metrics and not any(re.search(m, r.metric) for m in p.metrics):
        return False
    if p.stages and stage not in p.stages:
        return False
    if "subgroup" in p.scopes and not r.scope.subgroup:
        return False
    return not ("perturbation" in p.scopes and r.scope.perturbation is None)


def _fact(name: str, a: Assessment, ran: set[str]) -> tuple[str, str]:
    uc, p = a.use_case, a.provenance
    mandatory = [r.id for r in a.requirements if r.mandatory]
    by_claim = {e.claim_id: e for e in a.evidence if e.claim_id}
    measured = all(r.id in by_claim and by_claim[r.id].measured and by_claim[r.id].check in ran
                   for r in a.requirements)
    model = uc.get("model") or {}
    splits = (uc.get("data") or {}).get("splits") or {}
    ok = {
        "provenance": bool(p.model_sha256 and p.data_sha256 and p.use_case_sha256 and p.code_version),
        "odd": bool((uc.get("odd") or {}).get("descriptors")),
        "requirements": bool(mandatory),
        "input_contract": bool(model.get("input_shape") and model.get("value_range")),
        "splits": {"train", "validation", "test"} <= set(splits),
        "model_version": bool(p.model_version),
        "model_identity": bool(p.model_sha256 and model.get("class_names")),
        "argument": True,  # the report builds it from this very record
        "complete": a.complete and measured,
    }
    if name == "claims_verified":
        verdicts = [by_claim[c].verdict if c in by_claim and by_claim[c].check in ran else Verdict.INCONCLUSIVE
                    for c in mandatory]
        if Verdict.FAIL in verdicts:
            failing = [c for c, v in zip(mandatory, verdicts) if v is Verdict.FAIL]
            return "contradicted", f"mandatory claim(s) {', '.join(failing)} FAIL"
        if mandatory and a.complete and all(v is Verdict.PASS for v in verdicts):
            return "supported", FACTS[name]
        return "missing", "not every mandatory requirement PASSES in a complete assessment"
    return ("supported", FACTS[name]) if ok[name] else ("missing", f"not on record: {FACTS[name]}")


def _part(p: Part, a: Assessment, ran: set[str], stages: dict[str, Stage]) -> PartResult:
    if p.outside:
        return PartResult(p.what, "outside", "outside", note=p.outside)
    if p.record:
        state, note = _fact(p.record, a, ran)
        return PartResult(p.what, "record", state, note=note)
    by_claim: dict[str, list[Evidence]] = {}
    for e in a.evidence:
        if e.claim_id:
            by_claim.setdefault(e.claim_id, []).append(e)
    cited: list[Cited] = []
    for r in a.requirements:
        records = by_claim.get(r.id) or [None]
        for e in records:
            stage = stages.get(e.check) if e and e.check else None
            if _claim_matches(p, r, e, stage):
                cited.append(Cited(r.id, e.check if e else None, (Verdict(e.verdict).value if e else "INCONCLUSIVE"),
                                   bool(e and e.check in ran), r.metric, r.mandatory))
    if not cited:
        would = (f"; a requirement measured by {' or '.join(findings.check_name(c) for c in p.checks)} would assess it"
                 if p.checks else "")
        return PartResult(p.what, "claims", "missing", note="no requirement of the use case is judged on it" + would)
    if any(c.ran and c.verdict == Verdict.FAIL.value for c in cited):
        return PartResult(p.what, "claims", "contradicted", cited)
    if all(c.ran and c.verdict == Verdict.PASS.value for c in cited):
        return PartResult(p.what, "claims", "supported", cited)
    return PartResult(p.what, "claims", "inconclusive", cited)


def _why(o: Objective, status: str, parts: list[PartResult]) -> str:
    if status == "out of scope":
        return o.out_of_scope or ""
    if status == "supported":
        return "supported by " + "; ".join(
            ", ".join(c.text() for c in p.claims) if p.claims else p.note for p in parts)
    gaps = []
    for p in parts:
        if p.state == "supported" or (status == "not met" and p.state != "contradicted"):
            continue  # a contradicted objective is explained by what contradicts it
        if p.state == "contradicted":
            bad = [c.text() for c in p.claims if c.verdict == Verdict.FAIL.value and c.ran] or [p.note]
            gaps.append(f"{p.what}: contradicted ({', '.join(bad)})")
        elif p.state == "inconclusive":
            shy = [c.text() for c in p.claims if c.verdict != "PASS" or not c.ran]
            gaps.append(f"{p.what}: not shown ({', '.join(shy)})")
        elif p.state == "outside":
            gaps.append(f"{p.what}: outside the tool ({p.note})")
        else:
            gaps.append(f"{p.what}: {p.note}")
    return ("missing: " if status in ("partly", "not assessed") else "") + "; ".join(gaps)


def evaluate(o: Objective, a: Assessment, ran: set[str], stages: dict[str, Stage]) -> tuple[str, list[PartResult]]:
    if o.out_of_scope:
        return "out of scope", []
    parts = [_part(p, a, ran, stages) for p in o.parts]
    states = [p.state for p in parts]
    if "contradicted" in states:
        return "not met", parts
    if all(s == "supported" for s in states):
        return "supported", parts
    if "supported" in states:
        return "partly", parts
    return "not assessed", parts


def matrix(a: Assessment, cats: list[Catalogue] | None = None) -> Matrix:
    """Every objective of every catalogue (default: built-in and the use case's own) judged on this assessment."""
    cats = catalogues(a) if cats is None else cats
    ran = ran_checks(a)
    stages = {o.check: Stage(o.stage) for o in a.outcomes}
    rows = []
    for c in cats:
        for o in c.objectives:
            status, parts = evaluate(o, a, ran, stages)
            why = _why(o, status, parts)
            if o.note and status != "out of scope":
                why = f"{why.rstrip('.')}. Note: {o.note}"
            rows.append(Row(c.framework, o.id, o.group, o.summary, status, parts, why))
    return Matrix(cats, rows)


# --- changes between versions ---------------------------------------------------------------------------------------

@dataclass
class Change:
    framework: str
    id: str
    status: str
    previous: str
    lost: bool  # supported before, no longer

    @property
    def worse(self) -> bool:  # out of scope has no rank: a change to or from it is neither better nor worse
        return RANK.get(self.status, -1) < RANK.get(self.previous, -1) and self.status in RANK


def compare(current: Matrix, previous: Matrix) -> list[Change]:
    """Per objective, the status now beside the previous version's (same catalogues); lost objectives first."""
    before = {(r.framework, r.id): r.status for r in previous.rows}
    out = []
    for r in current.rows:
        p = before.get((r.framework, r.id))
        if p is not None and p != r.status:
            out.append(Change(r.framework, r.id, r.status, p, lost=p == "supported"))
    return sorted(out, key=lambda c: (not c.lost, not c.worse, c.framework, c.id))


def previous_matrix(current: Matrix, previous: Assessment) -> Matrix:
    """The previous version judged against the same built-in catalogues, with its own use-case catalogues."""
    own = [Catalogue.model_validate(c) for c in getattr(previous, "catalogues", [])]
    names = set(BUILT_IN)
    return matrix(previous, [c for c in current.catalogues if c.framework in names] + own)


# --- words --------------------------------------------------------------------------------------------------------

def title(m: Matrix, framework: str) -> str:
    return next((c.title for c in m.catalogues if c.framework == framework), framework)


def contradiction(r: Row) -> str:
    """What contradicts a `not met` objective: the failing claims (or the record's fact), in words."""
    out = []
    for p in r.parts:
        if p.state == "contradicted":
            bad = [c.text() for c in p.claims if c.ran and c.verdict == Verdict.FAIL.value]
            out.append(", ".join(bad) if bad else p.note)
    return "; ".join(dict.fromkeys(out))


def gaps(m: Matrix, framework: str) -> list[str]:
    """The objectives a framework's evidence contradicts, in words, grouped by what contradicts them (the body
    lists the partly supported and unassessed ones by id; the appendix says what each one misses)."""
    groups: dict[str, list[str]] = {}
    for r in m.framework(framework):
        if r.status == "not met":
            groups.setdefault(contradiction(r), []).append(r.id)
    return [f"{', '.join(ids)} not met: {why}." for why, ids in groups.items()]


def change_findings(changes: list[Change]) -> list[tuple[str, list[str]]]:
    """Objectives lost or worse since the previous qualified version, as report findings."""
    lost = [c for c in changes if c.lost]
    worse = [c for c in changes if c.worse and not c.lost]
    sentences = [f"{c.id} ({c.framework}) is no longer supported: it was supported, it is now {c.status}."
                 for c in lost]
    sentences += [f"{c.id} ({c.framework}) went from {c.previous} to {c.status}." for c in worse]
    return [("Compliance objectives lost since the previous qualified version", sentences)] if sentences else []


# --- files: compliance.json, compliance.csv -----------------------------------------------------------------------

def to_json(m: Matrix, a: Assessment) -> dict[str, Any]:
    defs = {(c.framework, o.id): o for c in m.catalogues for o in c.objectives}
    return {
        "format": FORMAT,
        "mlflow_run_id": a.provenance.mlflow_run_id,
        "use_case_id": a.provenance.use_case_id,
        "statuses": list(STATUSES),
        "counts": {c.framework: m.counts(c.framework) for c in m.catalogues},
        "frameworks": [{"framework": c.framework, "title": c.title, "source": c.source, "source_note": c.source_note}
                       for c in m.catalogues],
        "objectives": [{
            "framework": r.framework, "id": r.id, "group": r.group, "summary": r.summary, "status": r.status,
            "why": r.why,
            "parts": [{"what": p.what, "kind": p.kind, "state": p.state, "note": p.note,
                       "claims": [{"claim_id": c.claim_id, "check": c.check, "verdict": c.verdict, "ran": c.ran,
                                   "mandatory": c.mandatory}
                                  for c in p.claims]} for p in r.parts],
            "definition": defs[(r.framework, r.id)].model_dump(mode="json", exclude_none=True),
        } for r in m.rows],
    }


CSV_COLUMNS = ["framework", "id", "group", "status", "supported_by", "justification", "summary"]


def to_csv(m: Matrix) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_COLUMNS)
    for r in m.rows:
        w.writerow([r.framework, r.id, r.group, r.status, r.support_text(), r.why,
                    r.summary])
    return buf.getvalue()


def write(m: Matrix, a: Assessment, out_dir: Path) -> dict[str, str]:
    j, c = Path(out_dir) / FILES[0], Path(out_dir) / FILES[1]
    j.write_text(json.dumps(to_json(m, a), indent=1, ensure_ascii=False), encoding="utf-8")
    c.write_text(to_csv(m), encoding="utf-8")
    return {"compliance_json": str(j), "compliance_csv": str(c)}


def cross_check(records: dict[str, bytes]) -> list[str]:
    """`verify`: the matrix in the pack must be the one its assessment gives. The objectives' definitions come
    from compliance.json itself (a pack is checked years later, against the catalogues it was judged on); every
    status and every cited verdict is recomputed from assessment.json, and compliance.csv must agree."""
    if FILES[0] not in records:
        return []
    try:
        doc = json.loads(records[FILES[0]])
        a = Assessment.model_validate_json(records["assessment.json"])
        by_fw: dict[str, list[Objective]] = {}
        for o in doc["objectives"]:
            by_fw.setdefault(o["framework"], []).append(Objective.model_validate(o["definition"]))
        cats = [Catalogue(framework=f["framework"], title=f["title"], objectives=by_fw[f["framework"]])
                for f in doc["frameworks"] if by_fw.get(f["framework"])]
    except (ValueError, KeyError, TypeError) as e:  # ValidationError is a ValueError
        return [f"{FILES[0]} cannot be checked against assessment.json ({str(e).splitlines()[0]})"]
    problems = []
    fresh = matrix(a, cats)
    stated = {(o["framework"], o["id"]): o for o in doc["objectives"]}
    for r in fresh.rows:
        o = stated[(r.framework, r.id)]
        if o.get("status") != r.status:
            problems.append(f"{FILES[0]}: {r.framework} {r.id} is stated {o.get('status')!r}, but the claims of "
                            f"assessment.json give {r.status!r}")
        try:  # the file is the pack's, maybe forged: a malformed part is a contradiction, not a crash
            cited = sorted((c["claim_id"], c["verdict"], c["ran"])
                           for p in o.get("parts", []) for c in p.get("claims", []))
        except (KeyError, TypeError, AttributeError):
            cited = None
        if cited != sorted((c.claim_id, c.verdict, c.ran) for p in r.parts for c in p.claims):
            problems.append(f"{FILES[0]}: {r.framework} {r.id} cites claims or verdicts that assessment.json does "
                            "not hold")
    if FILES[1] in records:
        rows = list(csv.DictReader(io.StringIO(records[FILES[1]].decode("utf-8", errors="replace"))))
        if sorted((x.get("framework"), x.get("id"), x.get("status")) for x in rows) != sorted(
                (o.get("framework"), o.get("id"), o.get("status")) for o in doc["objectives"]):
            problems.append(f"{FILES[1]} and {FILES[0]} state different objectives or statuses")
    return problems


def reference(source: str) -> str:
    """A catalogue's source as the report prints it: the report holds no URL at all (compliance.json keeps it)."""
    return re.sub(r",?\s*https?://\S+", "", source).strip()


def own_catalogues(use_case) -> list[dict[str, Any]]:
    """The use case's own catalogue (its `compliance` file), as the assessment records it; [] when it has none."""
    if getattr(use_case, "compliance", None) is None:
        return []
    return [load_catalogue(use_case.compliance).model_dump(mode="json", exclude_none=True)]


def own_catalogue_problems(use_case) -> list[str]:
    """What `validate` says about the use case's own catalogue: unreadable, not in the catalogue's form, or
    reusing the name of a built-in framework."""
    if getattr(use_case, "compliance", None) is None:
        return []
    try:
        cat = load_catalogue(use_case.compliance)
    except CatalogueError as e:
        return str(e).split("; ")
    if cat.framework in BUILT_IN:
        return [f"{use_case.compliance}: framework {cat.framework!r} is the name of a built-in catalogue: name "
                "the use case's own objectives differently"]
    return []

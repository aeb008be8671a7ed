"""The safety argument exported for assurance-case tools, and read back.

Two formats, both from the `argument.Argument` of an assessment (its GSN tree with the claims' verdicts):
- `tea`: the case export of the Alan Turing Institute's Trustworthy and Ethical Assurance (TEA) platform, nested
  format version "1.0" (a `tree` of elements with `children`). Written from the platform's own definitions at
  commit TEA_COMMIT of github.com/alan-turing-institute/AssurancePlatform: `lib/schemas/case-export.ts` (its zod
  models of the export, `TreeNodeSchema` and `CaseExportNestedSchema`) and `lib/schemas/json-schema-v1.0.json`
  (its JSON Schema of the same), and the parent-child rules of `lib/element-compatibility.ts` at TEA_RULES_COMMIT
  (goal -> strategy or property claim; strategy -> property claim; property claim -> property claim, evidence or
  strategy; evidence -> nothing; context, assumption and justification attach to any of them). TEA_SCHEMA below
  is our JSON Schema of that format, those rules included.
  GSN -> TEA: the top goal is a GOAL (role TOP_LEVEL), every other goal a PROPERTY_CLAIM (`level` = its depth
  among claims), strategies STRATEGY, solutions EVIDENCE (`url`: the evidence in the report), contexts,
  assumptions and justifications CONTEXT / ASSUMPTION / JUSTIFICATION children of the element they qualify; a
  solution that GSN places right under a strategy gets a PROPERTY_CLAIM of its own in between (TEA admits no
  evidence under a strategy), named "<GSN id>~claim", which `read` removes again.
  `name` holds the GSN id, the verdict ends the description ("... [PASS]"), an undeveloped goal has
  `assertionStatus` NEEDS_SUPPORT; ids are UUIDs derived from the run and the GSN id (the same export twice).
- `gsn`: the argument in the GSN Community Standard's terms (version 3): elements typed Goal, Strategy, Solution,
  Context, Assumption, Justification, and the relations SupportedBy and InContextOf, as JSON (GSN_SCHEMA).

`read(doc)` turns either back into `Element`s, so that `elements(arg) == read(export(arg))` is the round trip.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trustcase.reports import argument
from trustcase.reports.argument import Argument
from trustcase.schemas import Assessment

TEA_COMMIT = "42646c22a472586386ce92beb0f0e482185f4166"
TEA_RULES_COMMIT = "730295ba0210fe6a6fcf10e5a1b5109f80143ea9"
WRAPPER = "~claim"  # the name suffix of a property claim inserted between a strategy and its evidence
TEA_REPO = "https://github.com/alan-turing-institute/AssurancePlatform"
FILES = {"tea": "assurance_case.tea.json", "gsn": "assurance_case.gsn.json"}
GSN_TYPES = {"goal": "Goal", "strategy": "Strategy", "solution": "Solution", "context": "Context",
             "assumption": "Assumption", "justification": "Justification"}
CONTEXTUAL = {"context": "CONTEXT", "assumption": "ASSUMPTION", "justification": "JUSTIFICATION"}
VERDICT = re.compile(r" \[(PASS|FAIL|INCONCLUSIVE)\]$")

_UUID = {"type": "string", "format": "uuid",
         "pattern": "^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"}
_TEXT_OR_NULL = {"type": ["string", "null"]}
_LEAF = {"properties": {"children": {"type": "array", "maxItems": 0}}}
_ATTRIBUTES = ["CONTEXT", "ASSUMPTION", "JUSTIFICATION"]


def _children(*types: str) -> dict[str, Any]:
    """A parent-child rule of the platform: the element types the children of this type may have."""
    return {"properties": {"children": {"items": {"properties": {"type": {"enum": [*types, *_ATTRIBUTES]}}}}}}



# The TEA case export, nested format 1.0, as its models at TEA_COMMIT define it (our JSON Schema, draft-07).
TEA_SCHEMA: dict[str, Any] = {
    "$schema": "http://json-schema.org/draft-07/schema#",
    "title": f"TEA platform case export, nested format 1.0 ({TEA_REPO} at {TEA_COMMIT})",
    "type": "object",
    "required": ["version", "exportedAt", "case", "tree"],
    "additionalProperties": False,
    "properties": {
        "version": {"const": "1.0"},
        "exportedAt": {"type": "string", "format": "date-time"},
        "case": {"type": "object", "required": ["name", "description"], "additionalProperties": False,
                 "properties": {"name": {"type": "string", "minLength": 1}, "description": {"type": "string"},
                                "colorProfile": {"type": "string"}}},
        "tree": {"$ref": "#/definitions/node"},
    },
    "definitions": {
        "node": {
            "type": "object",
            "required": ["id", "type", "name", "description", "inSandbox", "children"],
            "properties": {
                "id": _UUID,
                "type": {"enum": ["GOAL", "CONTEXT", "STRATEGY", "PROPERTY_CLAIM", "EVIDENCE", "JUSTIFICATION",
                                  "ASSUMPTION", "MODULE", "AWAY_GOAL", "CONTRACT"]},
                "name": _TEXT_OR_NULL,
                "description": {"type": "string"},
                "inSandbox": {"type": "boolean"},
                "children": {"type": "array", "items": {"$ref": "#/definitions/node"}},
                "role": {"enum": ["TOP_LEVEL", "SUPPORTING", None]},
                "assumption": _TEXT_OR_NULL,
                "justification": _TEXT_OR_NULL,
                "context": {"type": "array", "items": {"type": "string"}},
                "url": _TEXT_OR_NULL,
                "level": {"type": ["integer", "null"], "minimum": 1},
                "assertionStatus": {"enum": ["ASSERTED", "NEEDS_SUPPORT", "ASSUMED", "AXIOMATIC", "DEFEATED",
                                             "AS_CITED", None]},
                "fromPattern": {"type": "boolean"},
                "modifiedFromPattern": {"type": "boolean"},
                "isDefeater": {"type": "boolean"},
                "defeatsElementId": _UUID,
                "moduleReferenceId": _UUID,
                "moduleEmbedType": {"enum": ["COPY", "REFERENCE"]},
                "modulePublicSummary": _TEXT_OR_NULL,
                "citedElementId": {"anyOf": [_UUID, {"type": "null"}]},
            },
            "allOf": [  # context, assumption and justification elements have no children; modules name their case
                {"if": {"properties": {"type": {"enum": list(CONTEXTUAL.values()) + ["EVIDENCE"]}}}, "then": _LEAF},
                {"if": {"properties": {"type": {"const": "GOAL"}}},
                 "then": _children("STRATEGY", "PROPERTY_CLAIM", "AWAY_GOAL", "MODULE")},
                {"if": {"properties": {"type": {"const": "STRATEGY"}}},
                 "then": _children("PROPERTY_CLAIM", "AWAY_GOAL", "MODULE")},
                {"if": {"properties": {"type": {"const": "PROPERTY_CLAIM"}}},
                 "then": _children("PROPERTY_CLAIM", "EVIDENCE", "STRATEGY", "AWAY_GOAL", "MODULE")},
                {"if": {"properties": {"type": {"const": "MODULE"}}},
                 "then": {"required": ["moduleReferenceId", "moduleEmbedType"]}},
                {"if": {"properties": {"type": {"const": "AWAY_GOAL"}}}, "then": {"required": ["moduleReferenceId"]}},
            ],
        },
    },
}

# The argument in the GSN Community Standard's terms (our JSON form: GSN defines the notation, not a file format).
GSN_SCHEMA: dict[str, Any] = {
    "$schema": "http://json-schema.org/draft-07/schema#",
    "title": "trustcase GSN export (GSN Community Standard version 3 element and relation types)",
    "type": "object",
    "required": ["format", "standard", "root", "elements", "relations"],
    "additionalProperties": False,
    "properties": {
        "format": {"const": "trustcase-gsn/1"},
        "standard": {"type": "string"},
        "case": {"type": "object"},
        "root": {"type": "string"},
        "elements": {"type": "array", "items": {
            "type": "object", "required": ["id", "type", "text"], "additionalProperties": False,
            "properties": {"id": {"type": "string", "minLength": 1}, "type": {"enum": list(GSN_TYPES.values())},
                           "text": {"type": "string"}, "verdict": {"enum": ["PASS", "FAIL", "INCONCLUSIVE", None]},
                           "undeveloped": {"type": "boolean"}, "url": {"type": "string"}}}},
        "relations": {"type": "array", "items": {
            "type": "object", "required": ["type", "from", "to"], "additionalProperties": False,
            "properties": {"type": {"enum": ["SupportedBy", "InContextOf"]}, "from": {"type": "string"},
                           "to": {"type": "string"}}}},
    },
}


@dataclass(frozen=True)
class Element:
    """One GSN element as both formats carry it: what a round trip must give back unchanged."""
    id: str
    kind: str  # goal, strategy, solution, context, assumption, justification
    text: str
    verdict: str | None
    supported_by: tuple[str, ...]
    in_context_of: tuple[str, ...]


def elements(arg: Argument) -> list[Element]:
    return [Element(n.id, n.kind, n.text, n.verdict.value if n.verdict else None, tuple(n.supported_by),
                    tuple(n.in_context_of)) for n in arg.nodes.values()]


def _case(arg: Argument, a: Assessment) -> dict[str, str]:
    uc, p = a.use_case, a.provenance
    return {"name": f"trustcase: {uc.get('title') or uc.get('id', 'assessment')}",
            "description": f"Safety argument (GSN, AMLAS structure) of use case {uc.get('id')}, model version "
                           f"{p.model_version or 'unregistered'} (SHA-256 {p.model_sha256[:12]}), MLflow run "
                           f"{p.mlflow_run_id or 'not logged'}: verdict {arg.verdict.value}."}


def to_tea(arg: Argument, a: Assessment, report_url: str = "report.html") -> dict[str, Any]:
    run = a.provenance.mlflow_run_id or a.provenance.use_case_sha256

    def node(node_id: str, depth: int) -> dict[str, Any]:
        n = arg.nodes[node_id]
        text = n.text if n.verdict is None else f"{n.text} [{n.verdict.value}]"
        kind = ("GOAL" if node_id == arg.root else "PROPERTY_CLAIM") if n.kind == "goal" else \
            {"strategy": "STRATEGY", "solution": "EVIDENCE"}.get(n.kind) or CONTEXTUAL[n.kind]
        d: dict[str, Any] = {"id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"trustcase:{run}:{node_id}")), "type": kind,
                             "name": node_id, "description": text, "inSandbox": False}
        if kind == "GOAL":
            d["role"] = "TOP_LEVEL"
        elif kind == "PROPERTY_CLAIM":
            d["level"] = depth
        elif kind == "EVIDENCE" and n.anchor:
            d["url"] = f"{report_url}#{n.anchor}"
        elif kind == "ASSUMPTION":
            d["assumption"] = n.text
        elif kind == "JUSTIFICATION":
            d["justification"] = n.text
        d["assertionStatus"] = "NEEDS_SUPPORT" if n.undeveloped else "ASSERTED"
        below = depth + (kind == "PROPERTY_CLAIM")
        d["children"] = [node(c, below) for c in n.in_context_of] + [
            wrapped(s, below) if kind == "STRATEGY" and arg.nodes[s].kind == "solution" else node(s, below)
            for s in n.supported_by]
        return d

    def wrapped(node_id: str, depth: int) -> dict[str, Any]:
        """A property claim carrying one solution, where GSN has the solution right under a strategy."""
        inner = node(node_id, depth + 1)
        return {"id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"trustcase:{run}:{node_id}{WRAPPER}")),
                "type": "PROPERTY_CLAIM", "name": node_id + WRAPPER, "description": f"Shown by {inner['description']}",
                "inSandbox": False, "level": depth, "assertionStatus": "ASSERTED", "children": [inner]}

    return {"version": "1.0", "exportedAt": _time(a), "case": _case(arg, a), "tree": node(arg.root, 1)}


def to_gsn(arg: Argument, a: Assessment, report_url: str = "report.html") -> dict[str, Any]:
    els, rels = [], []
    for n in arg.nodes.values():
        e: dict[str, Any] = {"id": n.id, "type": GSN_TYPES[n.kind], "text": n.text,
                             "verdict": n.verdict.value if n.verdict else None, "undeveloped": n.undeveloped}
        if n.anchor:
            e["url"] = f"{report_url}#{n.anchor}"
        els.append(e)
        rels += [{"type": "SupportedBy", "from": n.id, "to": s} for s in n.supported_by]
        rels += [{"type": "InContextOf", "from": n.id, "to": c} for c in n.in_context_of]
    return {"format": "trustcase-gsn/1", "standard": "GSN Community Standard version 3 (SCSC-141C)",
            "case": _case(arg, a), "root": arg.root, "elements": els, "relations": rels}


def export(arg: Argument, a: Assessment, fmt: str) -> dict[str, Any]:
    if fmt not in FILES:
        raise ValueError(f"unknown export format {fmt!r}: choose one of {sorted(FILES)}")
    return to_tea(arg, a) if fmt == "tea" else to_gsn(arg, a)


def _time(a: Assessment) -> str:
    """The record's own time (not the wall clock): the same assessment exports the same bytes."""
    t = a.provenance.finished_at or a.provenance.started_at
    return t.isoformat().replace("+00:00", "Z")


# --- reading back --------------------------------------------------------------------------------------------------

def read(doc: dict[str, Any]) -> list[Element]:
    """Elements of a TEA case (nested 1.0) or of a trustcase GSN export, in document order."""
    if doc.get("format") == "trustcase-gsn/1":
        sup: dict[str, list[str]] = {}
        ctx: dict[str, list[str]] = {}
        for r in doc["relations"]:
            (sup if r["type"] == "SupportedBy" else ctx).setdefault(r["from"], []).append(r["to"])
        kinds = {v: k for k, v in GSN_TYPES.items()}
        return [Element(e["id"], kinds[e["type"]], e["text"], e.get("verdict"), tuple(sup.get(e["id"], ())),
                        tuple(ctx.get(e["id"], ()))) for e in doc["elements"]]
    if doc.get("version") != "1.0" or "tree" not in doc:
        raise ValueError("not a TEA case export (nested format 1.0) nor a trustcase GSN export")
    out: list[Element] = []
    kinds = {v: k for k, v in CONTEXTUAL.items()} | {"GOAL": "goal", "PROPERTY_CLAIM": "goal",
                                                     "STRATEGY": "strategy", "EVIDENCE": "solution"}

    def unwrap(kids: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [c for k in kids for c in (k["children"] if (k.get("name") or "").endswith(WRAPPER) else [k])]

    def walk(d: dict[str, Any]) -> None:
        m = VERDICT.search(d["description"])
        kids = unwrap(d.get("children", []))
        out.append(Element(d.get("name") or d["id"], kinds[d["type"]], VERDICT.sub("", d["description"]),
                           m.group(1) if m else None,
                           tuple(k.get("name") or k["id"] for k in kids if k["type"] not in CONTEXTUAL.values()),
                           tuple(k.get("name") or k["id"] for k in kids if k["type"] in CONTEXTUAL.values())))
        for k in kids:
            walk(k)

    walk(doc["tree"])
    return out


def validate(doc: dict[str, Any], fmt: str) -> list[str]:
    """Problems of a document against its format's JSON Schema (jsonschema, formats checked); empty when valid."""
    import jsonschema

    schema = TEA_SCHEMA if fmt == "tea" else GSN_SCHEMA
    v = jsonschema.Draft7Validator(schema, format_checker=jsonschema.Draft7Validator.FORMAT_CHECKER)
    return [f"{'/'.join(map(str, e.absolute_path)) or '<document>'}: {e.message}" for e in v.iter_errors(doc)]


def write(arg: Argument, a: Assessment, out_dir: Path) -> dict[str, str]:
    """Both exports beside the report (they go into the pack)."""
    files = {}
    for fmt, name in FILES.items():
        path = Path(out_dir) / name
        path.write_text(json.dumps(export(arg, a, fmt), indent=1, ensure_ascii=False), encoding="utf-8")
        files[f"case_{fmt}"] = str(path)
    return files


def case(a: Assessment, fmt: str) -> dict[str, Any]:
    """The assurance case of an assessment in `fmt`, valid against the format's schema (else a ValueError: an
    export that a tool would refuse is a bug, never a file)."""
    doc = export(argument.build(a), a, fmt)
    problems = validate(doc, fmt)
    if problems:
        raise ValueError(f"the {fmt} export does not fit its schema: {problems[0]}")
    return doc

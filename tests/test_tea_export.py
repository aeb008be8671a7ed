"""The assurance case exported for other tools: the Trustworthy and Ethical Assurance platform's case JSON (nested
format 1.0) and the GSN community standard's terms, from the argument of a real small run. A round trip: export,
validate against the format's JSON Schema (jsonschema, formats checked), read back, compare element by element."""

from __future__ import annotations

import copy
import json
import uuid

import pytest
from test_compliance import FAILING, assessed, run  # noqa: F401  (the module-scoped real run)
from typer.testing import CliRunner

from trustcase.cli import app
from trustcase.reports import argument, tea


def find(node, kind):
    if node["type"] == kind:
        return node
    return next((f for c in node["children"] if (f := find(c, kind))), None)


@pytest.fixture(scope="module")
def case(run):  # noqa: F811
    a = assessed(run, blur=FAILING)
    return a, argument.build(a)


@pytest.mark.parametrize("fmt", ["tea", "gsn"])
def test_round_trip_through_the_format_and_its_schema(case, fmt):
    a, arg = case
    doc = json.loads(json.dumps(tea.export(arg, a, fmt)))  # as a file holds it
    assert tea.validate(doc, fmt) == []
    back = {e.id: e for e in tea.read(doc)}
    expected = {e.id: e for e in tea.elements(arg)}
    assert back == expected
    assert back["G-top"].verdict == "FAIL" == arg.verdict.value
    kinds = {e.kind for e in back.values()}
    assert {"goal", "strategy", "solution", "context", "assumption", "justification"} <= kinds
    assert any(e.verdict == "PASS" for e in back.values() if e.kind == "solution")


def test_the_tea_case_uses_the_platforms_element_types(case):
    a, arg = case
    doc = tea.to_tea(arg, a)
    assert doc["version"] == "1.0" and doc["exportedAt"].endswith("Z")
    root = doc["tree"]
    assert root["type"] == "GOAL" and root["role"] == "TOP_LEVEL" and root["name"] == "G-top"
    seen: dict[str, list] = {}

    def walk(n, claims_above=0):
        seen.setdefault(n["type"], []).append(n)
        uuid.UUID(n["id"])
        if n["type"] in ("CONTEXT", "ASSUMPTION", "JUSTIFICATION"):
            assert n["children"] == []
        if n["type"] == "PROPERTY_CLAIM":  # its depth among property claims
            assert n["level"] == claims_above + 1
        for c in n["children"]:
            walk(c, claims_above + (n["type"] == "PROPERTY_CLAIM"))

    walk(root)

    def under(n, parent_type=None):
        yield parent_type, n
        for c in n["children"]:
            yield from under(c, n["type"])

    pairs = list(under(root))
    assert not any(p == "STRATEGY" and n["type"] == "EVIDENCE" for p, n in pairs)  # the platform refuses it
    wrappers = [n for _, n in pairs if n["name"].endswith(tea.WRAPPER)]
    assert wrappers and all(len(w["children"]) == 1 and w["children"][0]["type"] == "EVIDENCE" for w in wrappers)
    assert {"Sn-use-case" + tea.WRAPPER} <= {w["name"] for w in wrappers}  # GSN: S-requirements -> Sn-use-case
    assert {"GOAL", "STRATEGY", "PROPERTY_CLAIM", "EVIDENCE", "CONTEXT", "ASSUMPTION", "JUSTIFICATION"} <= set(seen)
    assert len(seen["GOAL"]) == 1
    assert all(e["url"].startswith("report.html#") for e in seen["EVIDENCE"] if "url" in e)
    undeveloped = {n.id for n in arg.undeveloped()}
    assert {n["name"] for t in seen.values() for n in t if n["assertionStatus"] == "NEEDS_SUPPORT"} == undeveloped
    # the same record exports the same bytes (ids derive from the run and the GSN id, the time from the record)
    assert json.dumps(tea.to_tea(argument.build(a), a)) == json.dumps(doc)


def test_the_schemas_reject_what_the_formats_forbid(case):
    """The validation can fail: each broken copy breaks one rule of the format."""
    a, arg = case
    doc = tea.to_tea(arg, a)
    broken = []
    d = copy.deepcopy(doc)
    del d["tree"]["inSandbox"]
    broken.append(d)
    d = copy.deepcopy(doc)
    d["version"] = "2.0"
    broken.append(d)
    d = copy.deepcopy(doc)
    d["tree"]["id"] = "G-top"  # not a UUID
    broken.append(d)
    d = copy.deepcopy(doc)
    ctx = next(c for c in d["tree"]["children"] if c["type"] == "CONTEXT")
    ctx["children"] = [copy.deepcopy(ctx)]  # a context element cannot have children
    broken.append(d)
    d = copy.deepcopy(doc)
    d["tree"]["type"] = "CLAIM"
    broken.append(d)
    d = copy.deepcopy(doc)
    d["extra"] = 1
    broken.append(d)
    d = copy.deepcopy(doc)  # evidence right under a strategy: the platform's parent-child rules refuse it
    strategy = next(c for c in d["tree"]["children"] if c["type"] == "STRATEGY")
    strategy["children"].append(copy.deepcopy(find(d["tree"], "EVIDENCE")))
    broken.append(d)
    d = copy.deepcopy(doc)  # a second GOAL below the top one
    strategy = next(c for c in d["tree"]["children"] if c["type"] == "STRATEGY")
    strategy["children"].append({**copy.deepcopy(strategy["children"][0]), "type": "GOAL"})
    broken.append(d)
    for b in broken:
        assert tea.validate(b, "tea"), b
    g = tea.to_gsn(arg, a)
    g["elements"][0]["type"] = "Claim"
    assert tea.validate(g, "gsn")
    g = tea.to_gsn(arg, a)
    g["relations"][0]["type"] = "SolvedBy"  # GSN v1's name: version 3 says SupportedBy
    assert tea.validate(g, "gsn")


def test_export_command(case, tmp_path):
    a, _ = case
    record = tmp_path / "assessment.json"
    record.write_text(a.model_dump_json())
    runner = CliRunner()
    out = tmp_path / "case.tea.json"
    result = runner.invoke(app, ["export", str(record), "--format", "tea", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert tea.validate(json.loads(out.read_text()), "tea") == []
    result = runner.invoke(app, ["export", str(record), "--format", "gsn"])
    assert result.exit_code == 0 and tea.validate(json.loads(result.stdout), "gsn") == []
    result = runner.invoke(app, ["export", str(record), "--format", "sacm"])
    assert result.exit_code == 2 and "--format 'sacm'" in result.output and "Traceback" not in result.output
    (tmp_path / "bad.json").write_text("{}")
    result = runner.invoke(app, ["export", str(tmp_path / "bad.json")])
    assert result.exit_code == 2 and "not a readable assessment record" in result.output

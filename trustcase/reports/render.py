"""Assessment -> safety argument -> one self-contained HTML file, the same as PDF, the argument as JSON and
gsn2x YAML, GSN diagrams (SVG), and the evidence pack. From the record alone: never a live model.

Check outcomes are rendered generically (measurements, curves, validity, limitations, summary, artefacts),
so a new check needs no change here; the foundation's specific plots (confusion, reliability, sweeps,
image properties) are kept where their evidence exists. A partial assessment renders: what is missing is
shown as missing.
"""

from __future__ import annotations

import base64
import json
import math
import mimetypes
import re
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import yaml
from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape
from markupsafe import Markup

from trustcase.reports import argument, gsn, pack, plots, profile
from trustcase.schemas import Assessment, CheckOutcome, Measurement, Stage, Verdict

TEMPLATES = Path(__file__).parent / "templates"
STAGE_TITLES = {s: f"{s.title} ({s.amlas})" for s in Stage} | {
    "verification": "Verification (AMLAS stage 5): testing and formal legs",
    None: "Not measured (no check of the plan measures its metric)"}
SECTIONS = list(Stage)
MAX_SUMMARY_ROWS = 60
WIDE_PT = 560  # a diagram wider than an A4 portrait text column goes on a landscape page in the PDF


def _fmt(v, digits: int = 4) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        if math.isnan(v):
            return "NaN"
        return f"{v:.{digits}g}"
    return str(v)


def _data_uri(path: Path) -> str:
    mime = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    return f"data:{mime};base64," + base64.b64encode(path.read_bytes()).decode()


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "_", text).strip("_") or "x"


def compact(value: Any) -> str:
    """One cell of the summary table: long number lists become 'n numbers in [min, max]'."""
    if isinstance(value, list):
        if value and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in value):
            if len(value) <= 8:
                return ", ".join(_fmt(float(x)) if isinstance(x, float) else str(x) for x in value)
            return f"{len(value)} numbers in [{_fmt(float(min(value)))}, {_fmt(float(max(value)))}]"
        if len(value) <= 6:
            return ", ".join(compact(x) for x in value) if value else "none"
        return ", ".join(compact(x) for x in value[:5]) + f", … ({len(value)} in all)"
    if isinstance(value, float):
        return _fmt(value)
    if isinstance(value, dict):
        return json.dumps(value, default=str)[:200]
    return str(value)


def inline_svg(svg: str, name: str) -> str:
    """SVG for inlining in HTML: namespace declarations are implicit there, so the report holds no URL at all;
    Graphviz's element ids (node1, edge1...) prefixed so that several diagrams never share an id."""
    svg = re.sub(r'\s+xmlns(:xlink)?="[^"]*"', "", svg)
    svg = re.sub(r'\bid="', f'id="gsn-{name}-', svg)
    return svg.replace("xlink:href=", "href=").replace("xlink:title=", "title=")


def summary_rows(summary: dict[str, Any]) -> tuple[list[tuple[str, str]], int]:
    """A check's structured summary flattened to (key path, compact value) rows; the count left off."""
    rows: list[tuple[str, str]] = []

    def walk(prefix: str, v: Any, depth: int) -> None:
        if isinstance(v, dict) and v and depth < 4:
            for k, x in v.items():
                walk(f"{prefix}.{k}" if prefix else str(k), x, depth + 1)
        else:
            rows.append((prefix, compact(v)))

    walk("", summary, 0)
    return rows[:MAX_SUMMARY_ROWS], max(0, len(rows) - MAX_SUMMARY_ROWS)


def measurement_table(ms: list[Measurement]) -> dict[str, Any] | None:
    """Measurements without perturbation pivoted: one row per (subgroup, metric), one column per split."""
    ms = [m for m in ms if m.scope.perturbation is None]
    if not ms:
        return None
    known = ["train", "validation", "test"]
    splits = sorted({m.scope.split for m in ms}, key=lambda s: (known.index(s) if s in known else 9, s))
    rows: dict[tuple[str, str], dict[str, Measurement]] = {}
    for m in ms:
        sub = ", ".join(f"{k} = {v}" for k, v in sorted(m.scope.subgroup.items())) or "all"
        rows.setdefault((sub, m.metric), {})[m.scope.split] = m
    return {"splits": splits, "rows": [(k, [r.get(s) for s in splits]) for k, r in rows.items()]}


def perturbation_table(ms: list[Measurement]) -> dict[str, Any] | None:
    """Measurements under perturbations pivoted: one row per (perturbation, subgroup, metric), one column
    per amplitude."""
    ms = [m for m in ms if m.scope.perturbation is not None]
    if not ms:
        return None
    amps = sorted({m.amplitude or 0.0 for m in ms})
    rows: dict[tuple, dict[float, Measurement]] = defaultdict(dict)
    for m in ms:
        sub = ", ".join(f"{k} = {v}" for k, v in sorted(m.scope.subgroup.items())) or "all"
        rows[(m.scope.perturbation.name, m.scope.split, sub, m.metric)][m.amplitude or 0.0] = m
    return {"amplitudes": amps, "rows": [(k, [r.get(a) for a in amps]) for k, r in rows.items()]}


def _artefact_path(out_dir: Path, rel: str) -> Path | None:
    for p in (out_dir / rel, out_dir / "checks" / rel):
        if p.is_file():
            return p
    return None


def artefact_views(a: Assessment, out_dir: Path, secret: bool) -> dict[str, list[dict[str, Any]]]:
    """Per check: its artefacts with status (embedded image, withheld, missing, hash mismatch, listed)."""
    views: dict[str, list[dict[str, Any]]] = {}
    for o in a.outcomes:
        rows = []
        for art in o.artefacts:
            path = _artefact_path(out_dir, art.path)
            row = {"path": art.path, "kind": art.kind, "sha256": art.sha256, "uri": None, "status": "listed"}
            if path is None:
                row["status"] = "missing: not among the run's files"
            elif pack.sha256_bytes(path.read_bytes()) != art.sha256:
                row["status"] = "HASH MISMATCH: the file differs from the one the check declared"
            elif art.kind == "image":
                if secret:
                    row["status"] = "withheld: confidential use case"
                else:
                    row["uri"] = _data_uri(path)
                    row["status"] = "embedded"
            rows.append(row)
        views[o.check] = rows
    return views


def context(a: Assessment, arg: argument.Argument, images: dict[str, str], diagrams: dict[str, str | None],
            out_dir: Path, trust: list[profile.Score], failures: list[str]) -> dict:
    secret = pack.confidential(a)
    verdicts = Counter(e.verdict.value for e in a.evidence if e.claim_id)
    req = {r.id: r for r in a.requirements}
    ev = {e.claim_id: e for e in a.evidence if e.claim_id in req}
    order = {Verdict.FAIL: 0, Verdict.INCONCLUSIVE: 1, Verdict.PASS: 2, None: 1}
    comparison = {c.claim_id: c for c in arg.comparison}
    regressed = {c.claim_id for c in arg.comparison if c.regression}
    claims = sorted(a.requirements, key=lambda r: (r.id not in regressed, order[ev[r.id].verdict if r.id in ev
                                                                                 else None], r.id))
    by_stage = {s: [r for r in claims if arg.claim_stage.get(r.id) == s] for s in SECTIONS}
    outcomes_by_stage: dict[str, list[CheckOutcome]] = defaultdict(list)
    for o in a.outcomes:
        outcomes_by_stage[o.stage].append(o)
    critical = a.use_case.get("model", {}).get("critical_class", "")
    failed = [r for r in claims if r.id in ev and ev[r.id].verdict is Verdict.FAIL]
    not_shown = [r for r in claims if r.id not in ev or ev[r.id].verdict is Verdict.INCONCLUSIVE]
    passed = [r for r in claims if r.id in ev and ev[r.id].verdict is Verdict.PASS]
    gaps = [n for n in arg.nodes.values() if n.kind == "goal" and n.verdict is Verdict.INCONCLUSIVE
            and not n.details.get("claim_id") and n.details.get("why", "").startswith(("undeveloped", "only"))]
    counted_fail = [r.id for r in failed if r.mandatory]
    if arg.verdict is Verdict.FAIL:
        headline = "Shown not to hold: " + (", ".join(counted_fail) or "see the argument") + " failed."
    elif arg.verdict is Verdict.INCONCLUSIVE:
        parts = []
        if [r for r in not_shown if r.mandatory]:
            parts.append(f"{len([r for r in not_shown if r.mandatory])} mandatory claim(s) inconclusive")
        if gaps:
            parts.append(f"{len(gaps)} goal(s) without judged evidence ({', '.join(n.id for n in gaps[:4])}"
                         + (", …" if len(gaps) > 4 else "") + ")")
        if not a.complete:
            parts.append("the assessment is incomplete")
        headline = "Not shown either way: " + ("; ".join(parts) or "see the argument") + "."
    else:
        headline = "Every goal of the argument is supported by passing evidence."
    sweeps = [o for o in a.outcomes if o.check == "perturbation_sweep"]
    dq = next((o for o in a.outcomes if o.check == "data_quality"), None)
    return {
        "a": a, "uc": a.use_case, "p": a.provenance, "arg": arg, "verdicts": verdicts, "req": req, "ev": ev,
        "claims": claims, "by_stage": by_stage, "outcomes_by_stage": outcomes_by_stage, "sections": SECTIONS,
        "stage_titles": STAGE_TITLES, "failed": failed, "not_shown": not_shown, "passed": passed, "gaps": gaps,
        "headline": headline, "comparison": comparison, "regressed": regressed, "critical": critical,
        "sweeps": sweeps, "dq": dq,
        "images": images, "diagrams": {k: Markup(inline_svg(v, k)) if v else None for k, v in diagrams.items()},
        "wide": {k for k, v in diagrams.items() if v and gsn.width_pt(v) > WIDE_PT},
        "fmt": _fmt, "slug": slug, "secret": secret, "trust": trust, "normalisation": profile.NORMALISATION,
        "rules": argument.RULES, "failures": failures, "summary_rows": summary_rows,
        "perturbation_table": perturbation_table, "measurement_table": measurement_table, "curve_key": plots.curve_key,
        "artefacts": artefact_views(a, out_dir, secret), "outline": outline(arg),
        "limitations": [(o.check, lim) for o in a.outcomes for lim in o.limitations],
        "confidence": a.use_case.get("plan", {}).get("confidence", 0.95), "V": Verdict,
    }


def outline(arg: argument.Argument) -> dict[str, list[tuple[int, argument.Node]]]:
    """The argument as indented rows per diagram: the fallback when Graphviz is missing, and for screen readers."""
    def walk(i: str, depth: int, rows: list[tuple[int, argument.Node]]) -> list[tuple[int, argument.Node]]:
        n = arg.nodes[i]
        rows.append((depth, n))
        rows += [(depth + 1, arg.nodes[c]) for c in n.in_context_of]
        for s in n.supported_by:
            walk(s, depth + 1, rows)
        return rows

    out = {stage: walk(goal, 0, []) for stage, goal in arg.stage_goals.items()}
    top = arg.nodes[arg.root]
    out["overview"] = [(0, top)] + [(1, arg.nodes[c]) for c in top.in_context_of] + [
        (1, arg.nodes[s]) for s in top.supported_by] + [(2, arg.nodes[g]) for s in top.supported_by
                                                        for g in arg.nodes[s].supported_by]
    return out


def write_argument(arg: argument.Argument, out_dir: Path) -> dict[str, str]:
    j, y = out_dir / "argument.json", out_dir / "argument.gsn.yaml"
    j.write_text(json.dumps(arg.to_json(), indent=1, default=str))
    header = ("# The safety argument in the YAML format of gsn2x (Goal Structuring Notation).\n"
              "# Render with: gsn2x argument.gsn.yaml   (element type = id prefix: G, S, Sn, C, A, J)\n")
    y.write_text(header + yaml.safe_dump(arg.to_gsn2x(), sort_keys=False, allow_unicode=True, width=100))
    return {"argument_json": str(j), "argument_yaml": str(y)}


def write_pdf(html: str, out_dir: Path) -> dict[str, str]:
    try:
        from weasyprint import HTML

        HTML(string=html, base_url=str(out_dir)).write_pdf(str(out_dir / "report.pdf"))
        return {"pdf": str(out_dir / "report.pdf")}
    except OSError as e:  # system libraries missing: the HTML stands alone; say so in a file the flow can log
        (out_dir / "report.pdf").unlink(missing_ok=True)
        note = out_dir / "report.pdf-error.txt"
        note.write_text(f"PDF not rendered: {e}\n")
        return {"pdf_error": str(note)}


def render(assessment: Assessment, out_dir: Path, previous: Assessment | None = None,
           pdf: bool = True) -> dict[str, str]:
    """The report's one entry point. Writes under out_dir: report.html, report.pdf (unless pdf=False),
    argument.json, argument.gsn.yaml, plots/ (PNG plots, GSN diagrams as SVG) and pack.zip; returns their paths.
    `previous`: the assessment of the previous version, for the comparison mode."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    secret = pack.confidential(assessment)
    a = pack.redact(assessment) if secret else assessment
    for old in (out_dir / "plots").glob("*") if (out_dir / "plots").is_dir() else []:
        if old.is_file():  # plots of an earlier render into this folder must not leak into this report's pack
            old.unlink()
    arg = argument.build(a, previous)
    files = write_argument(arg, out_dir)
    failures: list[str] = []
    pngs = plots.draw_all(a, out_dir / "plots", failures)
    trust = profile.scores(a, arg.claim_stage)
    pngs["trust_profile"] = profile.chart(trust, out_dir / "plots" / "trust_profile.png")
    diagrams: dict[str, str | None] = {}
    for name, src in gsn.sources(arg, STAGE_TITLES).items():
        (out_dir / "plots" / f"gsn_{name}.dot").write_text(src)
        try:
            diagrams[name] = gsn.svg(src)
        except (RuntimeError, OSError) as e:
            failures.append(f"GSN diagram {name} not drawn: {e}")
            diagrams[name] = None
        if diagrams[name]:
            (out_dir / "plots" / f"gsn_{name}.svg").write_text(diagrams[name])
    if not gsn.available():
        failures.append("Graphviz (dot) is not installed: the argument is shown as an outline instead of diagrams")
    env = Environment(loader=FileSystemLoader(TEMPLATES), autoescape=select_autoescape(["html", "j2"]),
                      undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    html = env.get_template("report.html.j2").render(
        **context(a, arg, {k: _data_uri(v) for k, v in pngs.items()}, diagrams, out_dir, trust, failures))
    html_path = out_dir / "report.html"
    html_path.write_text(html, encoding="utf-8")
    files |= {"html": str(html_path), "plots": str(out_dir / "plots")}
    (out_dir / "report.pdf").unlink(missing_ok=True)  # never pack the PDF of an earlier render
    if pdf:
        files |= write_pdf(html, out_dir)
    path, _ = pack.build(out_dir, assessment, out_dir / "pack.zip")
    files["pack"] = str(path)
    return files

"""Assessment -> safety argument -> one self-contained HTML file, the same as PDF, the argument as JSON and
gsn2x YAML, GSN diagrams (SVG), and the evidence pack. From the record alone: never a live model.

Check outcomes are rendered generically (measurements, curves, figures, findings, validity, limitations,
summary, artefacts), from their typed fields: nothing here branches on a check's name, so a partner's check
reads like a built-in one. A partial assessment renders: what is missing is shown as missing.
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

from trustcase.reports import argument, compliance, findings, gsn, pack, plots, profile, tea
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
    """One cell of a details table: long number lists become 'n numbers from min to max'; no raw None."""
    if value is None:
        return "not available"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list):
        if value and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in value):
            if len(value) <= 8:
                return ", ".join(findings.number(float(x)) if isinstance(x, float) else str(x) for x in value)
            return f"{len(value)} numbers from {findings.number(float(min(value)))} to " \
                   f"{findings.number(float(max(value)))}"
        if len(value) <= 6:
            return ", ".join(compact(x) for x in value) if value else "none"
        return ", ".join(compact(x) for x in value[:5]) + f", … ({len(value)} in all)"
    if isinstance(value, float):
        return findings.number(value)
    if isinstance(value, dict):
        return "; ".join(f"{findings.words(k)} {compact(v)}" for k, v in list(value.items())[:8]) + (
            " …" if len(value) > 8 else "")
    return str(value)


def inline_svg(svg: str, name: str) -> str:
    """SVG for inlining in HTML: namespace declarations are implicit there, so the report holds no URL at all;
    Graphviz's element ids (node1, edge1...) prefixed so that several diagrams never share an id."""
    svg = re.sub(r'\s+xmlns(:xlink)?="[^"]*"', "", svg)
    svg = re.sub(r'\bid="', f'id="gsn-{name}-', svg)
    return svg.replace("xlink:href=", "href=").replace("xlink:title=", "title=")


def detail_tables(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """A check's structured summary as labelled tables with readable headers: scalars as (field, value) rows
    under their section, lists of records as tables of their own."""
    tables: list[dict[str, Any]] = []
    rows: list[tuple[str, str]] = []

    def walk(path: list[str], v: Any, depth: int) -> None:
        label = " › ".join(findings.words(p) for p in path)
        if isinstance(v, dict) and v and depth < 5:
            for k, x in v.items():
                walk([*path, str(k)], x, depth + 1)
        elif isinstance(v, list) and len(v) > 1 and all(isinstance(x, dict) for x in v):
            cols = list(dict.fromkeys(k for x in v for k in x))
            tables.append({"title": findings.cap(label), "columns": [findings.words(c) for c in cols],
                           "rows": [[compact(x.get(c)) for c in cols] for x in v[:MAX_SUMMARY_ROWS]],
                           "left": max(0, len(v) - MAX_SUMMARY_ROWS)})
        else:
            rows.append((findings.cap(label) if label else "value", compact(v)))

    walk([], summary, 0)
    if rows:
        tables.insert(0, {"title": "Key figures", "columns": ["Field", "Value"], "rows": rows[:MAX_SUMMARY_ROWS],
                          "left": max(0, len(rows) - MAX_SUMMARY_ROWS)})
    return tables


def cell(m: Measurement | None) -> str:
    """One measurement in a table cell: value in its units, interval, number of items."""
    if m is None:
        return ""
    text = findings.value(m.metric, m.value, m.unit)
    if m.interval:
        text += f" [{findings.interval(m.metric, m.interval.lower, m.interval.upper)}]"
    if m.n is not None:
        text += f" n={m.n}"
    return text


def measurement_table(ms: list[Measurement]) -> dict[str, Any] | None:
    """Measurements without perturbation pivoted: one row per (subgroup, metric), one column per split."""
    ms = [m for m in ms if m.scope.perturbation is None]
    if not ms:
        return None
    known = ["train", "validation", "test"]
    splits = sorted({m.scope.split for m in ms}, key=lambda s: (known.index(s) if s in known else 9, s))
    rows: dict[tuple[str, str], dict[str, Measurement]] = {}
    for m in ms:
        rows.setdefault((findings.subgroup(m.scope.subgroup) or "all items", findings.metric_name(m.metric)),
                        {})[m.scope.split] = m
    return {"splits": splits, "rows": [(k, [cell(r.get(s)) for s in splits]) for k, r in rows.items()]}


def perturbation_tables(o: CheckOutcome, units: findings.Units) -> list[dict[str, Any]]:
    """Measurements under perturbations, one table per perturbation: a row per (split, subgroup, metric), a column
    per amplitude (in the perturbation's unit)."""
    by_pert: dict[str, list[Measurement]] = defaultdict(list)
    for m in o.measurements:
        if m.scope.perturbation is not None:
            by_pert[m.scope.perturbation.name].append(m)
    tables = []
    for name, ms in by_pert.items():
        amps = sorted({m.amplitude or 0.0 for m in ms})
        rows: dict[tuple, dict[float, Measurement]] = defaultdict(dict)
        for m in ms:
            rows[(m.scope.split, findings.subgroup(m.scope.subgroup) or "all items",
                  findings.metric_name(m.metric))][m.amplitude or 0.0] = m
        tables.append({"title": findings.words(name), "unit": units.units.get(name, ""),
                       "amplitudes": [units.amplitude(name, x) for x in amps],
                       "rows": [(k, [findings.value(r[x].metric, r[x].value, r[x].unit) if x in r else ""
                                     for x in amps]) for k, r in rows.items()]})
    return tables


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


def record_digest(a: Assessment) -> str:
    """SHA-256 of the evidence record as the pack holds it (assessment.json, redacted when confidential): printed on
    every page so that a page cannot be swapped between reports."""
    return pack.sha256_bytes(a.model_dump_json(indent=1).encode())


def claim_plots(a: Assessment, cards: list[findings.Card], units: findings.Units, out: Path,
                failures: list[str]) -> dict[str, Path]:
    """One plot per claim where a curve says more than a number: the claim's sweep (perturbation, attack or
    certified radius), else a figure or curve its check declared as illustrating the claim's metric (e.g. the
    reliability diagram for calibration, the monitor's detection against amplitude, a detector's recall against the
    score threshold)."""
    by_check = {}
    for o in a.outcomes:
        by_check.setdefault(o.check, []).append(o)
    drawn: dict[str, Path] = {}
    for c in cards:
        r, e = c.r, c.e
        if e is None or not e.measured:
            continue
        try:
            if r.scope.perturbation:
                ms = findings.sweep_of(r, [m for o in by_check.get(e.check, []) for m in o.measurements])
                if len(ms) >= 2:
                    name = r.scope.perturbation.name
                    unit = units.units.get(name, "")
                    key = f"claim_{slug(r.id)}"
                    drawn[key] = plots.claim_sweep(
                        f"{r.id}: {findings.metric_name(r.metric)} under {findings.words(name)}",
                        f"{findings.words(name)} amplitude" + (f" ({unit})" if unit else ""),
                        findings.metric_name(r.metric), ms, r.threshold, r.scope.perturbation.max_amplitude,
                        e.details.get("breaking_amplitude"), findings.proportion(r.metric), out / f"{key}.png")
                    c.plot = key
            else:  # the first figure of the claim's check that illustrates its metric
                c.plot = next((plots.figure_key(j, i) for j, o in enumerate(a.outcomes) if o.check == e.check
                               for i, f in enumerate(o.figures)
                               if r.metric in f.illustrates or r.metric.partition(":")[0] in f.illustrates), None) \
                    or next((plots.curve_key(o.check, cv.id) for o in a.outcomes if o.check == e.check
                             for cv in o.curves
                             if r.metric in cv.illustrates or r.metric.partition(":")[0] in cv.illustrates), None)
        except Exception as x:  # noqa: BLE001  a malformed record costs one plot, not the report
            plots.plt.close("all")
            failures.append(f"the plot of claim {r.id} could not be drawn ({type(x).__name__}); its appendix "
                            "tables hold the numbers")
    return drawn


def context(a: Assessment, arg: argument.Argument, images: dict[str, str], diagrams: dict[str, str | None],
            out_dir: Path, trust: list[profile.Score], failures: list[str], cards: list[findings.Card],
            units: findings.Units, digest: str, digest_label: str, matrix: compliance.Matrix | None = None,
            compliance_changes: list[compliance.Change] | None = None) -> dict:
    secret = pack.confidential(a)
    verdicts = Counter(c.verdict.value for c in cards)
    outcomes_by_stage: dict[str, list[CheckOutcome]] = defaultdict(list)
    for o in a.outcomes:
        outcomes_by_stage[o.stage].append(o)
    position = {id(o): j for j, o in enumerate(a.outcomes)}

    def figures(o: CheckOutcome) -> list[dict[str, str]]:
        """The outcome's drawn figures: image key, title, caption."""
        keys = [plots.figure_key(position[id(o)], i) for i in range(len(o.figures))]
        return [{"key": k, "title": f.title, "caption": getattr(f, "caption", "") or f.title}
                for k, f in zip(keys, o.figures, strict=True) if k in images]
    regressed = [c for c in arg.comparison if c.regression]
    return {
        "a": a, "uc": a.use_case, "p": a.provenance, "arg": arg, "verdicts": verdicts, "cards": cards,
        "decision": findings.decision(a, arg.verdict, cards), "findings": findings.findings(a, arg.verdict,
                                                                                           arg.claim_stage, units)
        + compliance.change_findings(compliance_changes or []),
        "compliance": matrix or compliance.matrix(a), "compliance_changes": compliance_changes, "C": compliance,
        "splits": findings.facts(a), "outcomes_by_stage": outcomes_by_stage, "sections": SECTIONS,
        "stage_titles": STAGE_TITLES, "regressed": regressed, "digest": digest, "digest_label": digest_label,
        "critical": a.use_case.get("model", {}).get("critical_class", ""),
        "images": images, "diagrams": {k: Markup(inline_svg(v, k)) if v else None for k, v in diagrams.items()},
        "wide": {k for k, v in diagrams.items() if v and gsn.width_pt(v) > WIDE_PT},
        "fmt": _fmt, "slug": slug, "secret": secret, "trust": trust, "normalisation": profile.NORMALISATION,
        "rules": argument.RULES, "failures": failures, "detail_tables": detail_tables,
        "perturbation_tables": lambda o: perturbation_tables(o, units), "measurement_table": measurement_table,
        "curve_key": plots.curve_key, "figures": figures,
        "artefacts": artefact_views(a, out_dir, secret), "outline": outline(arg),
        "F": findings, "units": units, "confidence": a.use_case.get("plan", {}).get("confidence", 0.95),
        "V": Verdict, "errors": [findings.human_error(x) for x in a.errors],
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
           pdf: bool = True, pack_digest: str | None = None) -> dict[str, str]:
    """The report's one entry point. Writes under out_dir: report.html, report.pdf (unless pdf=False),
    argument.json, argument.gsn.yaml, plots/ (PNG plots, GSN diagrams as SVG) and pack.zip; returns their paths.
    `previous`: the assessment of the previous (qualified) version, for the comparison. `pack_digest`: a digest
    anchoring the pack, printed on every page footer; by default the digest of the evidence record."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    secret = pack.confidential(assessment)
    a = pack.redact(assessment) if secret else assessment
    for old in (out_dir / "plots").glob("*") if (out_dir / "plots").is_dir() else []:
        if old.is_file():  # plots of an earlier render into this folder must not leak into this report's pack
            old.unlink()
    arg = argument.build(a, previous)
    files = write_argument(arg, out_dir)
    matrix = compliance.matrix(a)  # the objectives of EASA, ISO/PAS 8800, the AI Act (and the use case's own)
    changes = compliance.compare(matrix, compliance.previous_matrix(matrix, previous)) if previous else None
    files |= compliance.write(matrix, a, out_dir) | tea.write(arg, a, out_dir)
    failures: list[str] = []
    pngs = plots.draw_all(a, out_dir / "plots", failures)
    units = findings.Units(a)
    cards = findings.cards(a, arg.claim_stage, arg.comparison, units)
    pngs |= claim_plots(a, cards, units, out_dir / "plots", failures)
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
        **context(a, arg, {k: _data_uri(v) for k, v in pngs.items()}, diagrams, out_dir, trust, failures, cards,
                  units, pack_digest or record_digest(a),
                  "pack" if pack_digest else "evidence record (assessment.json in the pack)", matrix, changes))
    html_path = out_dir / "report.html"
    html_path.write_text(html, encoding="utf-8")
    files |= {"html": str(html_path), "plots": str(out_dir / "plots")}
    (out_dir / "report.pdf").unlink(missing_ok=True)  # never pack the PDF of an earlier render
    if pdf:
        files |= write_pdf(html, out_dir)
    path, _ = pack.build(out_dir, assessment, out_dir / "pack.zip")
    files["pack"] = str(path)
    return files

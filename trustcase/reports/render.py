"""Assessment -> one self-contained HTML file (images embedded) and the same content as PDF."""

from __future__ import annotations

import base64
from collections import Counter
from pathlib import Path

from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape

from trustcase.reports import plots
from trustcase.schemas import Assessment, Measurement, Verdict

TEMPLATES = Path(__file__).parent / "templates"


def _fmt(v, digits: int = 4) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}g}"
    return str(v)


def _data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def _table(a: Assessment, check: str, pred) -> list[Measurement]:
    return [m for o in a.outcomes if o.check == check for m in o.measurements if pred(m)]


def context(a: Assessment, images: dict[str, str]) -> dict:
    verdicts = Counter(e.verdict.value for e in a.evidence if e.claim_id)
    req = {r.id: r for r in a.requirements}
    claims = [(req[e.claim_id], e) for e in a.evidence if e.claim_id in req]
    order = {Verdict.FAIL: 0, Verdict.INCONCLUSIVE: 1, Verdict.PASS: 2}
    critical = a.use_case["model"]["critical_class"]
    perf = _table(a, "performance", lambda m: m.scope.perturbation is None and m.metric != "ece")
    sweeps = [o for o in a.outcomes if o.check == "perturbation_sweep"]
    dq = next((o for o in a.outcomes if o.check == "data_quality"), None)
    breaking = [(r, e) for r, e in claims if r.scope.perturbation is not None]
    return {
        "a": a, "uc": a.use_case, "p": a.provenance, "verdicts": verdicts,
        "claims": sorted(claims, key=lambda re: (order[re[1].verdict], re[0].id)),
        "attention": [(r, e) for r, e in claims if e.verdict is not Verdict.PASS],
        "perf": perf, "critical": critical, "sweeps": sweeps, "dq": dq, "breaking": breaking,
        "images": images, "fmt": _fmt,
        "limitations": [(o.check, lim) for o in a.outcomes for lim in o.limitations],
    }


def render(assessment: Assessment, out_dir: Path) -> dict[str, str]:
    """The report's one entry point: writes report.html, report.pdf and plots/ under out_dir."""
    out_dir = Path(out_dir)
    pngs = plots.draw_all(assessment, out_dir / "plots")
    env = Environment(loader=FileSystemLoader(TEMPLATES), autoescape=select_autoescape(["html", "j2"]),
                      undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    html = env.get_template("report.html.j2").render(
        **context(assessment, {k: _data_uri(v) for k, v in pngs.items()}))
    html_path = out_dir / "report.html"
    html_path.write_text(html, encoding="utf-8")
    files = {"html": str(html_path), "plots": str(out_dir / "plots")}
    pdf_path = out_dir / "report.pdf"
    try:
        from weasyprint import HTML

        HTML(string=html, base_url=str(out_dir)).write_pdf(str(pdf_path))
        files["pdf"] = str(pdf_path)
    except OSError as e:  # system libraries missing: the HTML stands alone, say so
        files["pdf_error"] = f"PDF not rendered: {e}"
    return files



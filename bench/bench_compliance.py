"""Compliance matrix and assurance-case export benchmark: their cost beside the report's, and the report body's pages.

    .venv/bin/python bench/bench_compliance.py [--assessment OUT/assessment.json] [--repeat N]

1. An assessment: the given assessment.json (its folder as `trustcase assess` left it), or, by default, the bundled
   solar-cell use case's 25 requirements with synthetic evidence of the shape a real run records (values,
   intervals, a third of the claims failing, perturbation sweeps for the perturbation claims), so the body holds
   every card the demo's does.
2. Times (median of N): the matrix of the three frameworks (`compliance.matrix`), compliance.json + .csv, both case
   exports with their schema validation, `verify`'s recomputation of the matrix (`compliance.cross_check`),
   the whole `verify` of the pack; beside the whole `reports.render` without PDF (one run).
3. With the PDF (pdftotext): the body's pages before the appendix (budget: 12) and those of the compliance section.
"""

from __future__ import annotations

import argparse
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from datetime import UTC, datetime
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from trustcase.reports import argument, compliance, render, tea, verify_pack  # noqa: E402
from trustcase.schemas import (  # noqa: E402
    Assessment,
    CheckOutcome,
    Evidence,
    Interval,
    Measurement,
    Provenance,
    Requirement,
    UseCase,
)

BUNDLED = ROOT / "use_cases" / "solar_cells" / "use_case.yaml"
STAGES = {"data_quality": "data", "performance": "learning", "perturbation_sweep": "testing", "adversarial": "testing",
          "lipschitz": "formal", "randomized_smoothing": "formal", "local_robustness": "formal",
          "odd_monitor": "deployment", "explainability": "testing"}


def _check(r: Requirement) -> str:
    """The check of the bundled plan that measures the claim (as its `produces` declares)."""
    if r.scope.perturbation:
        name = r.scope.perturbation.name
        if name == "l2_radius":
            return "lipschitz" if r.metric.startswith("lipschitz") else "randomized_smoothing"
        return {"auto_linf": "adversarial", "linf_pixels": "local_robustness"}.get(name, "perturbation_sweep")
    if r.metric in ("accuracy_accepted", "detection_rate", "false_alarm_rate"):
        return "odd_monitor"
    if r.metric.startswith(("recommended", "relevance")):
        return "explainability"
    if r.metric.startswith(("leakage", "unreadable", "imbalance", "odd_coverage", "drift")):
        return "data_quality"
    return "performance"


def synthetic() -> Assessment:
    raw = yaml.safe_load(BUNDLED.read_text())
    uc = UseCase.model_validate(raw)
    outcomes: dict[str, CheckOutcome] = {}
    records = []
    for i, r in enumerate(uc.requirements):
        check = _check(r)
        o = outcomes.setdefault(check, CheckOutcome(check=check, stage=STAGES[check],
                                                    validity=[f"{check} holds on the test split"]))
        sign = 1 if r.comparator.startswith(">") else -1
        value = r.threshold + (0.05 if i % 3 else -0.05) * sign
        iv = Interval(lower=value - 0.03, upper=value + 0.03, confidence=0.95, method="clopper-pearson")
        top = r.scope.perturbation.max_amplitude if r.scope.perturbation else None
        for amp in ([0.0, top / 2, top, 2 * top] if top is not None else [None]):
            o.measurements.append(Measurement(check=check, metric=r.metric, value=value, scope=r.scope, amplitude=amp,
                                              n=200, interval=iv))
        records.append(Evidence(claim_id=r.id, check=check, metric=r.metric, value=value, threshold=r.threshold,
                                comparator=r.comparator, verdict="PASS" if i % 3 else "FAIL", scope=r.scope,
                                interval=iv, rationale=f"{r.metric} = {value:.3f}", validity=o.validity))
    prov = Provenance(use_case_id=uc.id, use_case_sha256="u" * 64, mlflow_run_id="r" * 32, model_sha256="m" * 64,
                      model_version="3", data_sha256="d" * 64, code_version="bench", packages={"torch": "2.13.0"},
                      seed=0, started_at=datetime(2026, 1, 1, tzinfo=UTC), finished_at=datetime(2026, 1, 1, 0, 5,
                                                                                               tzinfo=UTC))
    return Assessment(use_case=uc.model_dump(mode="json"), requirements=uc.requirements,
                      outcomes=list(outcomes.values()), evidence=records, provenance=prov, verdict="FAIL",
                      complete=True)


def median_time(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--assessment", type=Path, help="an assessment.json (default: the synthetic demo-shaped one)")
    ap.add_argument("--repeat", type=int, default=7)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-compliance-"))
    if args.assessment:
        a = Assessment.model_validate_json(args.assessment.read_text())
        shutil.copytree(args.assessment.parent / "checks", tmp / "checks", dirs_exist_ok=True)
    else:
        a = synthetic()
    arg = argument.build(a)
    m = compliance.matrix(a)
    print(f"{len(m.rows)} objectives: " + "; ".join(
        f"{c.framework} " + ", ".join(f"{k} {v}" for k, v in m.counts(c.framework).items() if v) for c in m.catalogues))

    t_matrix = median_time(lambda: compliance.matrix(a), args.repeat)
    t_files = median_time(lambda: compliance.write(m, a, tmp), args.repeat)
    t_export = median_time(lambda: [tea.validate(tea.export(arg, a, f), f) for f in tea.FILES], args.repeat)
    t = time.perf_counter()
    files = render(a, tmp, pdf=False)
    t_render = time.perf_counter() - t
    with zipfile.ZipFile(files["pack"]) as z:
        records = {n: z.read(n) for n in ("assessment.json", *compliance.FILES)}
    t_cross = median_time(lambda: compliance.cross_check(records), args.repeat)
    v = verify_pack(Path(files["pack"]))
    assert v.ok, v.lines()
    t_verify = median_time(lambda: verify_pack(Path(files["pack"])), args.repeat)
    print(f"matrix {t_matrix * 1e3:.1f} ms, compliance.json+csv {t_files * 1e3:.1f} ms, TEA+GSN export with schema "
          f"validation {t_export * 1e3:.1f} ms (medians of {args.repeat})")
    print(f"render without PDF {t_render:.2f} s: matrix + files + exports = "
          f"{(t_matrix + t_files + t_export) / t_render:.1%} of it")
    print(f"verify {t_verify:.2f} s: its recomputation of the matrix {t_cross * 1e3:.1f} ms = {t_cross / t_verify:.1%}")

    if shutil.which("pdftotext") is None:
        print("pdftotext missing: body pages not counted")
        return
    files = render(a, tmp)
    text = subprocess.run(["pdftotext", "-layout", files["pdf"], "-"], capture_output=True, text=True,
                          check=True).stdout
    pages = text.split("\f")
    body = next((i for i, p in enumerate(pages) if re.search(r"^\s*Appendix\s*$", p, re.M)), len(pages))
    first = next(i for i, p in enumerate(pages) if "Compliance with the frameworks" in p)
    last = next(i for i, p in enumerate(pages) if "5. Claims" in p)
    print(f"report body {body} pages (budget 12); the compliance section on pages {first + 1} to {last + 1}; "
          f"appendix {len(pages) - body} pages")


if __name__ == "__main__":
    main()

"""Report benchmark on the solar-cell case: generation time and size of the report, verify time of the pack.

    .venv/bin/python bench/bench_report.py [--quick] [--assessment OUT/assessment.json]

1. An assessment of the bundled solar-cell use case: the real flow (Prefect, MLflow in a temporary store) on
   the full data, or on 300/150/200 items with --quick; or an existing assessment.json (its folder must hold
   the check artefacts, as `trustcase assess` leaves it).
2. Report generation from that record: the whole `reports.render` (argument, plots, GSN diagrams, HTML, PDF,
   evidence pack), and the same without the PDF. Target: whole render under 30 s, HTML under 10 MB; the PDF's
   body (before the appendix) at most 12 pages.
3. `trustcase verify` of the pack (median of 5), and a tampered copy must be rejected.
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
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

BUNDLED = ROOT / "use_cases" / "solar_cells" / "use_case.yaml"
RECORD_FILES = ["assessment.json", "evidence.json", "use_case.yaml"]


def assessed(tmp: Path, quick: bool) -> Path:
    """Run the assessment flow on the bundled case; the folder it wrote."""
    import os

    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    from trustcase.flows.assess import assess
    from trustcase.flows.training import ensure_bundled_model

    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    ensure_bundled_model(BUNDLED, uri)
    path = BUNDLED
    if quick:
        raw = yaml.safe_load(BUNDLED.read_text())
        raw["model"]["path"] = str((BUNDLED.parent / raw["model"]["path"]).resolve())
        raw["data"]["path"] = str(BUNDLED.parent)
        raw["data"]["max_samples"] = {"train": 300, "validation": 150, "test": 200}
        path = tmp / "use_case.yaml"
        path.write_text(yaml.safe_dump(raw, sort_keys=False))
    t = time.perf_counter()
    result = assess(str(path), str(tmp / "run"), None, uri)
    print(f"assessment flow: {time.perf_counter() - t:.1f} s, verdict {result.verdict.value}")
    return tmp / "run"


def fresh_copy(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for name in RECORD_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)
    if (src / "checks").is_dir():
        shutil.copytree(src / "checks", dst / "checks")
    return dst


def pdf_pages(pdf: Path) -> tuple[int, int]:
    """(body pages, appendix pages) of the report PDF: the body ends where the page titled "Appendix" starts."""
    if shutil.which("pdftotext") is None:
        return -1, -1
    text = subprocess.run(["pdftotext", "-layout", str(pdf), "-"], capture_output=True, text=True, check=True).stdout
    pages = text.split("\f")[:-1] if text.endswith("\f") else text.split("\f")
    body = next((i for i, t in enumerate(pages) if re.search(r"^\s*Appendix\s*$", t, re.M)), len(pages))
    return body, len(pages) - body


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a smaller assessment, one timing each")
    ap.add_argument("--assessment", type=Path, help="an existing assessment.json to render")
    args = ap.parse_args()

    from trustcase.reports import render, verify_pack
    from trustcase.schemas import Assessment

    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        folder = args.assessment.parent if args.assessment else assessed(tmp, args.quick)
        a = Assessment.model_validate_json((folder / "assessment.json").read_text())
        print(f"record: {len(a.outcomes)} check outcomes, {sum(len(o.measurements) for o in a.outcomes)} "
              f"measurements, {len(a.evidence)} evidence records")
        repeats = 1 if args.quick else 3
        whole, html_only = [], []
        for i in range(repeats):
            out = fresh_copy(folder, tmp / f"full{i}")
            t0 = time.perf_counter()
            files = render(a, out)
            whole.append(time.perf_counter() - t0)
            out2 = fresh_copy(folder, tmp / f"html{i}")
            t0 = time.perf_counter()
            render(a, out2, pdf=False)
            html_only.append(time.perf_counter() - t0)
        html_mb = Path(files["html"]).stat().st_size / 1e6
        pdf_mb = Path(files["pdf"]).stat().st_size / 1e6 if "pdf" in files else float("nan")
        body, appendix = pdf_pages(Path(files["pdf"])) if "pdf" in files else (-1, -1)
        pack = Path(files["pack"])
        pack_mb = pack.stat().st_size / 1e6
        n_files = len(zipfile.ZipFile(pack).namelist())
        verify_times = []
        for _ in range(5):
            t0 = time.perf_counter()
            ok = verify_pack(pack).ok
            verify_times.append(time.perf_counter() - t0)
        tampered = tmp / "tampered.zip"
        with zipfile.ZipFile(pack) as zin, zipfile.ZipFile(tampered, "w") as zout:
            for info in zin.infolist():
                data = zin.read(info)
                zout.writestr(info, data + b" " if info.filename == "evidence.json" else data)
        rejected = verify_pack(tampered).changed == ["evidence.json"]

    render_s, html_s, verify_s = statistics.median(whole), statistics.median(html_only), statistics.median(verify_times)
    rows = [
        ("report generation, whole render (s)", f"{render_s:.2f}", "< 30", f"{render_s / 30:.2f}"),
        ("  of which without PDF (s)", f"{html_s:.2f}", "", ""),
        ("HTML size (MB)", f"{html_mb:.2f}", "< 10", f"{html_mb / 10:.3f}"),
        ("PDF size (MB)", f"{pdf_mb:.2f}", "", ""),
        ("PDF body pages (before the appendix)", str(body), "<= 12", f"{body / 12:.2f}"),
        ("PDF appendix pages", str(appendix), "", ""),
        (f"pack size (MB, {n_files} files)", f"{pack_mb:.2f}", "", ""),
        ("verify time (s, median of 5)", f"{verify_s:.3f}", "", ""),
        ("verify: intact pack accepted", str(ok), "True", ""),
        ("verify: one altered file named", str(rejected), "True", ""),
    ]
    w = max(len(r[0]) for r in rows)
    print(f"\n{'measure':<{w}}  {'value':>9}  {'target':>7}  {'ratio':>6}")
    for name, value, target, ratio in rows:
        print(f"{name:<{w}}  {value:>9}  {target:>7}  {ratio:>6}")
    print(f"\n(timings: {repeats} run(s) each, median; machine shared, so wall times are upper bounds)")


if __name__ == "__main__":
    main()

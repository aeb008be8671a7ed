"""The solar-cell report looked at as a person would: headless Chromium (kept off the network) loads it with no
console error and no external request and takes a screenshot; the PDF is turned into PNG pages (pdftoppm) and
its sections are checked. Screenshots are kept for the reviewer under .trustcase/review/ (or $TRUSTCASE_REVIEW).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from datetime import UTC, datetime
from pathlib import Path

import pytest
from conftest import ROOT
from test_report import raw_keys

from trustcase.checks import Context, build_plan
from trustcase.data.streaming import DataSource
from trustcase.models.classifier import sha256_file
from trustcase.models.loading import load_classifier
from trustcase.reports import render, verify_pack
from trustcase.reports.render import record_digest
from trustcase.schemas import Assessment, Provenance, load_use_case
from trustcase.verdicts import judge, overall

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
PDFTOPPM = shutil.which("pdftoppm")
PDFTOTEXT = shutil.which("pdftotext")
OFFLINE = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--disable-default-apps", "--disable-extensions", "--host-resolver-rules=MAP * ~NOTFOUND"]
SECTIONS = ["1. Decision", "2. Findings", "3. Changes since the previous qualified version", "4. The safety argument",
            "5. Claims", "6. Qualification", "Appendix", "A. The argument by AMLAS stage",
            "B. Checks: conditions, plots and tables", "C. All claims in one table", "Provenance and environment"]
BODY_PAGES = 12  # the body a quality manager reads, before the appendix

needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="Debian chromium is not installed "
                                    "(scripts/setup.sh --test installs it)")


def review_dir() -> Path:
    d = Path(os.environ.get("TRUSTCASE_REVIEW", ROOT / ".trustcase" / "review"))
    d.mkdir(parents=True, exist_ok=True)
    return d


def solar_assessment(use_case_path: Path, out: Path) -> Assessment:
    """The (shrunk) solar-cell use case assessed by its real checks, without Prefect: what the flow records."""
    uc = load_use_case(use_case_path)
    model = load_classifier(uc.model)
    data = DataSource(uc.data, uc.plan.seed)
    outcomes = []
    started = datetime.now(UTC)
    for check in build_plan(uc):
        for shard in check.shards():
            outcomes.append(shard(Context(use_case=uc, model=model, data=data, seed=uc.plan.seed,
                                          workdir=out / "checks" / shard.name)))
    records = judge(uc.requirements, outcomes)
    dq = next(o for o in outcomes if o.check == "data_quality")
    prov = Provenance(use_case_id=uc.id, use_case_sha256="0" * 64, mlflow_run_id=None,
                      model_sha256=sha256_file(Path(uc.model.path)), model_version="1",
                      data_sha256=dq.summary.get("data_sha256", "unknown"), code_version="test",
                      packages={"python": "3.11"}, seed=uc.plan.seed, started_at=started, finished_at=datetime.now(UTC))
    a = Assessment(use_case=uc.model_dump(mode="json"), requirements=uc.requirements, outcomes=outcomes,
                   evidence=records, provenance=prov, verdict=overall(records, uc.requirements), complete=True)
    (out / "assessment.json").write_text(a.model_dump_json(indent=1))
    shutil.copyfile(use_case_path, out / "use_case.yaml")
    return a


def browse(page: Path, tmp: Path, screenshot: Path, width: int = 1280) -> tuple[list[str], list[str]]:
    """Load a page in headless Chromium; (console errors, URLs of every non-file request it made)."""
    netlog = tmp / f"netlog-{screenshot.stem}.json"
    profile = tmp / f"profile-{screenshot.stem}"
    cmd = [CHROMIUM, *OFFLINE, f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0",
           f"--log-net-log={netlog}", f"--window-size={width},3000", "--virtual-time-budget=5000",
           f"--screenshot={screenshot}", page.resolve().as_uri()]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert screenshot.is_file() and screenshot.stat().st_size > 10_000, done.stderr[-2000:]
    # the report has no script at all: any console message is unexpected
    errors = [line for line in done.stderr.splitlines() if ":CONSOLE" in line or "Uncaught" in line]
    return errors, page_requests(json.loads(netlog.read_text()))


def page_requests(netlog: dict) -> list[str]:
    """URLs the page asked for (requests whose site is the file:// page). Chromium's own background calls
    (updater, time) are not the page's and never leave the machine: every host name resolves to nothing."""
    start = netlog["constants"]["logEventTypes"]["URL_REQUEST_START_JOB"]
    urls = set()
    for e in netlog.get("events", []):
        p = e.get("params", {})
        if e.get("type") == start and ("file://" in p.get("network_isolation_key", "")
                                       or "site=file://" in p.get("site_for_cookies", "")):
            urls.add(p.get("url", ""))
    return sorted(u for u in urls if not u.startswith(("file:", "data:", "about:", "chrome:")))


@needs_chromium
def test_browser_detects_what_it_must_detect(tmp_path):
    """The probe itself can fail: a page with a console error and a (loopback) external image is caught."""
    page = tmp_path / "bad.html"
    page.write_text('<html><body><p>x</p><img src="http://127.0.0.1:9/x.png">'
                    '<script>console.error("boom-from-test")</script></body></html>')
    errors, urls = browse(page, tmp_path, tmp_path / "bad.png")
    assert any("boom-from-test" in e for e in errors)
    assert any(u.startswith("http://127.0.0.1:9") for u in urls)


@needs_chromium
def test_solar_cell_report_in_headless_chromium_and_pdf_pages(tmp_path, tiny_case):
    """A real assessment (real checks on real ELPV cells) rendered and looked at: desktop and A4-width screenshots,
    PDF pages; no raw key or None anywhere, the body within its page budget, run and digest on every page."""
    out = tmp_path / "out"
    out.mkdir()
    a = solar_assessment(tiny_case, out)
    files = render(a, out)
    html = Path(files["html"])
    for width, name in ((1280, "report_solar_cells.png"), (794, "report_solar_cells_a4.png")):
        errors, urls = browse(html, tmp_path, review_dir() / name, width)
        assert errors == [], errors
        assert urls == [], urls
    assert verify_pack(Path(files["pack"])).ok
    text = html.read_text()
    for s in SECTIONS:
        assert s in text, s
    assert raw_keys(text) == []
    assert text.count('class="card ') == len(a.requirements)
    if PDFTOPPM is None or PDFTOTEXT is None:
        pytest.skip("poppler-utils (pdftoppm, pdftotext) is not installed: the PDF pages were not checked")
    pages = tmp_path / "pages"
    pages.mkdir()
    subprocess.run([PDFTOPPM, "-r", "50", "-png", files["pdf"], str(pages / "page")], check=True, timeout=300)
    pngs = sorted(pages.glob("page-*.png"))
    assert all(p.stat().st_size > 2_000 for p in pngs)  # no blank page
    for i in (0, 1):
        shutil.copyfile(pngs[i], review_dir() / f"report_solar_cells_pdf_page{i + 1}.png")
    texts = [subprocess.run([PDFTOTEXT, "-layout", "-f", str(i), "-l", str(i), files["pdf"], "-"], capture_output=True,
                            text=True, timeout=120, check=True).stdout for i in range(1, len(pngs) + 1)]
    appendix = next(i for i, t in enumerate(texts) if re.search(r"^\s*Appendix\s*$", t, re.M))
    assert 3 <= appendix <= BODY_PAGES, f"body of {appendix} pages"
    digest = record_digest(a)[:16]
    for i, t in enumerate(texts):  # a page cannot be swapped between reports
        assert f"evidence record SHA-256 {digest}" in t and f"page {i + 1} of {len(texts)}" in t, i
    whole = "\n".join(texts)
    for s in SECTIONS:
        assert s in whole, s
    assert "Trust profile" in whole and "G-top" in whole  # the chart and the GSN overview
    assert "Prepared by" in whole and "Approved by (quality" in whole  # the signature block, left blank

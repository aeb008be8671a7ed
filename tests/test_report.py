"""The rendered report: self-contained, generic over check outcomes, honest about what is missing."""

from __future__ import annotations

import base64
import hashlib
import re
from html.parser import HTMLParser
from pathlib import Path

import matplotlib
import yaml

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from test_argument import assessment  # noqa: E402

from trustcase.reports import argument as A  # noqa: E402
from trustcase.reports import render  # noqa: E402
from trustcase.schemas import Artefact, Assessment, Curve, Series, Verdict  # noqa: E402


class _Refs(HTMLParser):
    """Every resource reference a browser could follow: attributes and CSS url()."""

    ATTRS = {"src", "href", "xlink:href", "srcset", "action", "poster", "data", "background", "formaction"}

    def __init__(self):
        super().__init__()
        self.refs: list[str] = []

    def handle_starttag(self, tag, attrs):
        for k, v in attrs:
            if k in self.ATTRS and v:
                self.refs.append(v)
            if k == "style" and v:
                self.refs += re.findall(r"url\(\s*['\"]?([^'\")]+)", v)


def external_refs(html: str) -> list[str]:
    p = _Refs()
    p.feed(html)
    refs = p.refs + re.findall(r"url\(\s*['\"]?([^'\")]+)", html) + re.findall(r"@import\s+['\"]([^'\"]+)", html)
    return [r for r in refs if not (r.startswith("#") or r.startswith("data:"))]


def with_check_output(a: Assessment, out: Path, kind: str = "image") -> Assessment:
    """A check in the testing stage that emits a curve, an image artefact, a JSON item listing and a summary."""
    folder = out / "checks" / "adversarial"
    folder.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(1, 1))
    ax.imshow([[0, 1], [1, 0]])
    fig.savefig(folder / "worst_input.png")
    plt.close(fig)
    (folder / "items.json").write_text('{"ids": ["cell_0001.png", "cell_0002.png"], "count": 2}')
    arts = [Artefact(path=f"adversarial/{n}", sha256=hashlib.sha256((folder / n).read_bytes()).hexdigest(), kind=k)
            for n, k in (("worst_input.png", kind), ("items.json", "listing"))]
    o = next(o for o in a.outcomes if o.check == "perturbation_sweep")
    o2 = o.model_copy(update={
        "check": "adversarial", "artefacts": arts, "limitations": ["attack budget limited to 10 steps"],
        "curves": [Curve(id="eps", title="Accuracy under PGD", x_label="epsilon", y_label="accuracy",
                         x=[0, 1, 2], series={"pgd": Series(y=[0.9, 0.6, 0.2], lower=[0.8, 0.5, 0.1],
                                                            upper=[1, 0.7, 0.3])}, y_marks={"R9": 0.5})],
        "summary": {"worst_items": ["cell_0007.png"], "histogram": list(range(40)), "nested": {"a": {"b": 1.5}}},
        "measurements": [m.model_copy(update={"check": "adversarial", "metric": "robust_accuracy"})
                         for m in o.measurements]})
    return a.model_copy(update={"outcomes": [*a.outcomes, o2]})


def test_report_renders_everything_generically(tmp_path):
    a = with_check_output(assessment({"F-cert": "FAIL"}), tmp_path)
    files = render(a, tmp_path)
    for key in ("html", "pdf", "argument_json", "argument_yaml", "pack", "plots"):
        assert Path(files[key]).exists(), key
    html = Path(files["html"]).read_text()
    assert external_refs(html) == []
    assert "http://" not in html and "https://" not in html
    # the argument, the stage sections, the evidence anchors the GSN links point at
    for anchor in ["summary", "argument", "rules", "claims", "stage-requirements", "stage-data", "stage-learning",
                   "stage-testing", "stage-formal", "stage-deployment", "provenance", "check-adversarial",
                   "ev-F-cert", "claim-F-cert", "gsn-overview", "gsn-data"]:
        assert f'id="{anchor}"' in html, anchor
    assert 'href="#ev-F-cert"' in html  # a solution node of the SVG links to its evidence row
    # generic rendering of the new check: curve drawn, image artefact embedded, limitation, summary rows
    assert (tmp_path / "plots" / "curve_adversarial__eps.png").is_file()
    embedded = re.findall(r'<img src="data:image/png;base64,[^"]+" alt="([^"]+)"', html)
    assert sorted(embedded) == ["Accuracy under PGD", "adversarial/worst_input.png", "trust profile"]
    assert "attack budget limited to 10 steps" in html
    assert "40 numbers in [0, 39]" in html and "nested.a.b" in html
    assert "cell_0007.png" in html  # public: identifiers shown as they are
    assert "robust_accuracy" in html
    # the verdict story on the cover
    assert "Shown not to hold: F-cert failed." in html
    # machine-readable argument
    doc = yaml.safe_load(Path(files["argument_yaml"]).read_text())
    assert A.check_gsn2x(doc) == []
    assert (tmp_path / "plots" / "gsn_verification.svg").read_text().startswith("<svg")


def test_confidential_report_withholds_images_and_hashes_ids(tmp_path):
    a = with_check_output(assessment(confidential=True), tmp_path)
    html = Path(render(a, tmp_path, pdf=False)["html"]).read_text()
    assert "Confidential use case." in html
    assert "withheld: confidential use case" in html
    assert "cell_0007.png" not in html and re.search(r"item-[0-9a-f]{16}", html)
    png = (tmp_path / "checks" / "adversarial" / "worst_input.png").read_bytes()
    assert base64.b64encode(png).decode()[:200] not in html


def test_partial_assessment_renders_and_says_what_is_missing(tmp_path):
    a = assessment()
    empty = a.model_copy(update={"outcomes": [], "evidence": [], "complete": False, "verdict": Verdict.INCONCLUSIVE,
                                 "errors": ["performance: ModelError: boom"]})
    files = render(empty, tmp_path, pdf=False)
    html = Path(files["html"]).read_text()
    assert "INCOMPLETE ASSESSMENT" in html and "performance: ModelError: boom" in html
    assert html.count("no evidence record") >= len(a.requirements)
    assert "has no evidence record: its goal is undeveloped" in html
    assert Path(files["pack"]).is_file()


def test_malformed_curve_and_missing_artefact_do_not_crash(tmp_path):
    a = assessment()
    o = a.outcomes[0].model_copy(update={
        "curves": [Curve(id="bad", title="t", x_label="x", y_label="y", x=[0, 1, 2], series={"s": Series(y=[1.0])})],
        "artefacts": [Artefact(path="data_quality/gone.png", sha256="0" * 64, kind="image")]})
    a = a.model_copy(update={"outcomes": [o, *a.outcomes[1:]]})
    html = Path(render(a, tmp_path, pdf=False)["html"]).read_text()
    assert "missing: not among the run" in html
    assert "plot curve_data_quality__bad" not in html  # drawn as far as it goes, no failure


def test_comparison_mode_lists_regressions_first(tmp_path):
    before = assessment()
    now = assessment({"L-acc": "FAIL"}, mlflow_run_id="run2")
    html = Path(render(now, tmp_path, previous=before, pdf=False)["html"]).read_text()
    assert "1 regression(s) since the previous assessed version" in html
    assert 'id="comparison"' in html
    table = html[html.index('id="comparison"'):]
    assert table.index("L-acc") < table.index("D-leak")  # the regression comes first
    assert '<tr class="regression"><td><b>L-acc' in table


def test_rendering_is_deterministic(tmp_path):
    a = assessment()
    one, two = render(a, tmp_path / "one", pdf=False), render(a, tmp_path / "two", pdf=False)
    assert Path(one["html"]).read_text() == Path(two["html"]).read_text()
    assert Path(one["pack"]).read_bytes() == Path(two["pack"]).read_bytes()
    assert "pdf" not in one


def test_without_graphviz_the_argument_is_an_outline(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # no `dot` on the path
    html = Path(render(assessment({"L-acc": "FAIL"}), tmp_path, pdf=False)["html"]).read_text()
    assert "Graphviz (dot) is not installed" in html
    assert '<ul class="outline">' in html and "<svg" not in html
    assert html.count("<b>G-L-acc</b>") == 1  # in the learning outline, with its verdict

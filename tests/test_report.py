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
from trustcase.reports.render import record_digest, render  # noqa: E402
from trustcase.schemas import Artefact, Assessment, CheckOutcome, Curve, Measurement, Series, Verdict  # noqa: E402


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


class _Text(HTMLParser):
    """The text a reader sees: everything but style and script (SVG labels included)."""

    def __init__(self):
        super().__init__()
        self.parts: list[str] = []
        self.skip = 0

    def handle_starttag(self, tag, attrs):
        self.skip += tag in ("style", "script")

    def handle_endtag(self, tag):
        self.skip -= tag in ("style", "script")

    def handle_data(self, data):
        if not self.skip:
            self.parts.append(data)


FILES = {"json", "yaml", "yml", "html", "pdf", "zip", "png", "gif", "jpg", "jpeg", "csv", "pt", "pth", "py",
         "safetensors", "sha256", "svg", "dot", "txt", "onnx", "nnet", "vnnlib", "npz", "npy"}
DOTTED = re.compile(r"\b[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)+\b")


def visible_text(html: str) -> str:
    p = _Text()
    p.feed(html)
    return " ".join(p.parts)


def raw_keys(html: str) -> list[str]:
    """What a reader must never see: dotted internal keys, None, NaN."""
    text = visible_text(html)
    dotted = [k for k in DOTTED.findall(text) if k.rsplit(".", 1)[1].lower() not in FILES and k not in ("e.g", "i.e")]
    return sorted(set(dotted + re.findall(r"\b(?:None|NaN|nan)\b", text)))


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
    for anchor in ["summary", "decision", "findings", "argument", "claims", "signature", "appendix", "rules",
                   "stage-requirements", "stage-data", "stage-learning", "stage-testing", "stage-formal",
                   "stage-deployment", "provenance", "check-adversarial", "ev-F-cert", "claim-F-cert", "gsn-overview",
                   "gsn-data"]:
        assert f'id="{anchor}"' in html, anchor
    assert 'href="#ev-F-cert"' in html  # a solution node of the SVG links to its claim card
    # the body in its order: decision, findings, changes, argument, claim cards, signature; then the appendix
    order = [html.index(f'id="{x}"') for x in ("decision", "findings", "changes", "argument", "claims", "signature",
                                                "appendix", "checks", "provenance")]
    assert order == sorted(order)
    body = html[:html.index('id="appendix"')]
    assert body.count('class="card ') == len(a.requirements)
    card = body[body.index('id="claim-F-cert"'):]
    card = card[:card.index("</section>")]
    assert "FAIL: the measured value 10% is not at least 50%." in card  # the rule, in the requirement's units
    assert "Certified accuracy 10% (interval 9–11%)." in card
    findings = html[html.index('id="findings"'):html.index('id="changes"')]
    assert "F-cert: certified accuracy 10% (interval 9–11%) on the test split, required at least 50%." in findings
    assert "Not acceptable as assessed: 1 of 10 mandatory claims are shown not to hold (F-cert)." in html
    # generic rendering of the new check: curve drawn, image artefact embedded, limitation, summary rows
    assert (tmp_path / "plots" / "curve_adversarial__eps.png").is_file()
    embedded = re.findall(r'<img src="data:image/png;base64,[^"]+" alt="([^"]+)"', html)
    assert sorted(embedded) == ["Accuracy under PGD", "adversarial/worst_input.png", "trust profile"]
    assert "attack budget limited to 10 steps" in html
    assert "40 numbers from 0 to 39" in html and "Nested › a › b" in html  # readable headers, no raw key
    assert "cell_0007.png" in html  # public: identifiers shown as they are
    assert "robust accuracy" in html
    assert raw_keys(html) == []
    # machine-readable argument
    doc = yaml.safe_load(Path(files["argument_yaml"]).read_text())
    assert A.check_gsn2x(doc) == []
    assert (tmp_path / "plots" / "gsn_verification.svg").read_text().startswith("<svg")


def test_confidential_report_withholds_images_and_hashes_ids(tmp_path):
    a = with_check_output(assessment(confidential=True), tmp_path)
    html = Path(render(a, tmp_path, pdf=False)["html"]).read_text()
    assert "Confidential use case." in html
    assert "withheld: confidential use case" in html
    # render knows no secret: an id the flow did not hash with the site's salt is withheld, never hashed here
    assert "cell_0007.png" not in html and "&lt;id withheld&gt;" in html
    png = (tmp_path / "checks" / "adversarial" / "worst_input.png").read_bytes()
    assert base64.b64encode(png).decode()[:200] not in html
    assert raw_keys(html) == [] and html.count('class="card ') == len(a.requirements)


def test_partial_assessment_renders_and_says_what_is_missing(tmp_path):
    a = assessment()
    empty = a.model_copy(update={"outcomes": [], "evidence": [], "complete": False, "verdict": Verdict.INCONCLUSIVE,
                                 "errors": ["performance: ModelError: boom"]})
    files = render(empty, tmp_path, pdf=False)
    html = Path(files["html"]).read_text()
    # said in words: which check did not finish and why, what is therefore not measured; never an empty card
    assert "INCOMPLETE ASSESSMENT." in html
    assert "The Performance check did not finish (model error: boom)" in html
    assert "performance: ModelError" not in visible_text(html)
    body = html[:html.index('id="appendix"')]
    assert body.count("INCONCLUSIVE: nothing measured this claim") == len(a.requirements)
    assert "has no evidence record: its goal is undeveloped" in html
    assert raw_keys(html) == []
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
    assert "1 regression(s) since the previous qualified version" in html
    changes = html[html.index('id="changes"'):html.index('id="argument"')]
    assert "<b>Regression</b> <b>L-acc</b>: PASS (99%) → FAIL (10%)" in changes
    body = html[html.index('id="claims"'):html.index('id="signature"')]
    assert body.index('id="claim-L-acc"') < body.index('id="claim-D-leak"')  # the regression's card comes first
    table = html[html.index('id="comparison"'):]
    assert table.index("L-acc") < table.index("D-leak")  # the regression comes first
    assert '<tr class="regression"><td><b>L-acc' in table


def test_findings_say_when_the_model_calls_every_input_one_class(tmp_path):
    a = assessment({"L-acc": "FAIL"})
    perf = next(o for o in a.outcomes if o.check == "performance")
    perf.measurements += [Measurement(check="performance", metric=f"recall:{c}", value=v, n=50)
                          for c, v in (("functional", 0.0), ("defective", 1.0))]
    html = Path(render(a, tmp_path, pdf=False)["html"]).read_text()
    findings = html[html.index('id="findings"'):html.index('id="changes"')]
    assert "On the test data as it is, the model calls nearly every input &#39;defective&#39;." in findings
    assert "L-acc: accuracy 10% (interval 9–11%) on the test split, required at least 80%." in findings


def test_without_a_previous_version_the_report_says_so(tmp_path):
    html = Path(render(assessment(), tmp_path, pdf=False)["html"]).read_text()
    assert "No previous qualified version of this model was found in the registry" in html


def test_footer_carries_run_and_digest_and_the_signature_block_is_empty(tmp_path):
    a = assessment()
    html = Path(render(a, tmp_path, pdf=False)["html"]).read_text()
    digest = record_digest(a)
    footer = f"trustcase · solar_cells · run run1 · evidence record SHA-256 {digest[:16]}"
    assert f'@bottom-left {{ content: "{footer}"' in html  # on every printed page
    html2 = Path(render(a, tmp_path / "p", pdf=False, pack_digest="ab" * 32)["html"]).read_text()
    assert "run run1 · pack SHA-256 abababababababab" in html2
    sig = html[html.index('id="signature"'):html.index('id="appendix"')]
    for role in ("Prepared by", "Reviewed by", "Approved by (quality manager)"):
        assert role in sig
    assert sig.count("<td></td>") == 3 * 4  # name, date, comment, signature left blank


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
    assert raw_keys(html) == []


def test_a_record_of_an_earlier_version_renders_without_the_typed_parts(tmp_path):
    """assessment.json written before outcomes declared findings, figures, caveats, units and shards (and before
    the data fingerprint counted items) loads with those empty and re-renders: nothing invented, nothing raw."""
    raw = assessment().model_dump(mode="json")
    for o in raw["outcomes"]:
        for key in ("findings", "figures", "caveat", "units", "shard"):
            o.pop(key)
    raw["provenance"].pop("data_items")
    old = Assessment.model_validate(raw)
    assert all(not o.findings and not o.figures and not o.caveat for o in old.outcomes)
    html = Path(render(old, tmp_path, pdf=False)["html"]).read_text()
    assert "Data</th><td>item counts not recorded" in html
    assert "figure_" not in html and raw_keys(html) == []


def test_a_skipped_check_reads_the_same_from_its_typed_field_and_from_an_earlier_record(tmp_path):
    """A check that could not run (`Unsupported`) is `CheckOutcome.skipped`, its reason in words; a record written
    before the field (a "not run: " limitation and summary["skipped"]) loads into it and renders the same."""
    a = assessment()
    new = CheckOutcome(check="lipschitz", skipped="lipschitz needs gradients; the model is a black box")
    old = CheckOutcome.model_validate({"check": "lipschitz", "limitations": [f"not run: {new.skipped}"],
                                       "summary": {"skipped": new.skipped}})
    assert old == new and old.limitations == [] and old.summary == {}
    # a limitation that merely begins with the words, beside measurements, is not a skip
    ran = a.outcomes[0].model_dump(mode="json")
    ran["limitations"] = ["not run: on the train split"]
    assert CheckOutcome.model_validate(ran).skipped is None
    pages = []
    for name, o in (("new", new), ("old", old)):
        html = Path(render(a.model_copy(update={"outcomes": [*a.outcomes, o]}), tmp_path / name, pdf=False)["html"])
        pages.append(html.read_text())
    sentence = "The Lipschitz certificate check was not run: lipschitz needs gradients; the model is a black box."
    assert all(sentence in visible_text(p) for p in pages)
    assert all("not run: lipschitz needs gradients" in p[p.index('id="appendix"'):] for p in pages)
    strip = re.compile(r"run-[0-9a-f]+|[0-9a-f]{64}|\d+\.\d s\)")
    assert strip.sub("", pages[0]) == strip.sub("", pages[1])

"""The assessment flow end to end: real Prefect, real MLflow store, real (tiny) CNN on real images."""

from __future__ import annotations

import json

import mlflow
import pytest
import torch
from conftest import tiny_use_case, write_yaml
from mlflow.tracking import MlflowClient

from trustcase.flows.assess import assess
from trustcase.flows.rerender import RunNotFound, rerender
from trustcase.schemas import Assessment

pytestmark = pytest.mark.usefixtures("prefect_harness")


def test_end_to_end_logs_everything(tiny_case, tmp_path, tracking_uri):
    r = assess(str(tiny_case), str(tmp_path / "out"), None, tracking_uri)
    assert r.complete and not r.errors
    a = Assessment.model_validate_json((tmp_path / "out" / "assessment.json").read_text())
    assert {e.claim_id for e in a.evidence} == {x.id for x in a.requirements}
    assert a.provenance.mlflow_run_id == r.run_id and len(a.provenance.data_sha256) == 64
    assert {"data_quality", "performance", "perturbation_sweep"} <= {o.check for o in a.outcomes}
    html = (tmp_path / "out" / "report.html").read_text()
    for claim in a.requirements:
        assert claim.id in html
    assert "data:image/png;base64" in html and (tmp_path / "out" / "report.pdf").stat().st_size > 10_000

    mlflow.set_tracking_uri(tracking_uri)
    run = MlflowClient().get_run(r.run_id)
    assert run.data.tags["verdict"] == r.verdict.value
    assert run.data.tags["data_sha256"] == a.provenance.data_sha256
    assert any(k.startswith("performance/test/accuracy") for k in run.data.metrics)
    curve = MlflowClient().get_metric_history(r.run_id, "perturbation_sweep/test/gaussian_blur/accuracy")
    assert [m.step for m in curve] == [0, 1, 2]                       # stepped: amplitudes 0, 1, 2
    arts = {f.path for f in MlflowClient().list_artifacts(r.run_id)}
    assert {"assessment.json", "evidence.json", "report.html", "use_case.yaml", "plots"} <= arts

    # the report re-renders from MLflow alone
    files = rerender(r.run_id, tmp_path / "again", tracking_uri)
    assert "R1-accuracy" in open(files["html"]).read()
    with pytest.raises(RunNotFound):
        rerender("0" * 32, tmp_path / "none", tracking_uri)


def test_same_seed_same_evidence(tiny_case, tmp_path, tracking_uri):
    runs = [assess(str(tiny_case), str(tmp_path / f"out{i}"), 7, tracking_uri) for i in range(2)]
    ev = [json.loads((tmp_path / f"out{i}" / "evidence.json").read_text()) for i in range(2)]
    assert [(e["claim_id"], e["value"], e["verdict"]) for e in ev[0]] == \
           [(e["claim_id"], e["value"], e["verdict"]) for e in ev[1]]
    assert runs[0].run_id != runs[1].run_id


def test_resume_after_a_crash_recomputes_only_what_failed(tmp_path, tiny_model, tracking_uri):
    raw = tiny_use_case(tmp_path, tiny_model)
    raw["data"]["max_samples"] = {"train": 40, "validation": 20, "test": 40}
    counter, marker = tmp_path / "count.txt", tmp_path / "marker.txt"
    raw["plan"]["checks"] = [
        {"check": "data_quality"},
        {"check": "flaky_checks:Counting", "params": {"counter": str(counter)}},
        {"check": "flaky_checks:FailOnce", "params": {"marker": str(marker)}},
    ]
    path = write_yaml(tmp_path / "uc.yaml", raw)
    first = assess(str(path), str(tmp_path / "out"), None, tracking_uri)
    assert not first.complete and "simulated crash" in first.errors[0]
    html = (tmp_path / "out" / "report.html").read_text()
    assert "INCOMPLETE ASSESSMENT" in html                             # never presented as complete
    assert mlflow.MlflowClient(tracking_uri).get_run(first.run_id).info.status == "FAILED"
    second = assess(str(path), str(tmp_path / "out"), None, tracking_uri)
    assert second.complete
    assert counter.read_text() == "1"                                  # the finished check was not rerun


class NanAbove(torch.nn.Module):
    """A model whose output is NaN for bright inputs (a numerical fault in the field)."""

    def forward(self, x):
        m = x.mean(dim=(1, 2, 3), keepdim=False)
        logits = torch.stack([m, -m], dim=1)
        return torch.where((m > 0.5)[:, None], torch.full_like(logits, float("nan")), logits)


def test_nan_from_the_model_is_a_located_user_error(tmp_path, tracking_uri):
    model = tmp_path / "nan.pt"
    torch.jit.script(NanAbove()).save(str(model))
    raw = tiny_use_case(tmp_path, model)
    raw["data"]["max_samples"] = {"train": 20, "validation": 20, "test": 60}
    path = write_yaml(tmp_path / "uc.yaml", raw)
    r = assess(str(path), str(tmp_path / "out"), None, tracking_uri)
    assert not r.complete and r.user_error
    assert any("NaN" in e and "cell" in e for e in r.errors)           # names the offending items


def test_a_partner_check_feeds_the_findings_cards_and_figures_like_a_built_in(tmp_path, tiny_model, tracking_uri):
    """A check named by module:Class, unknown to trustcase, declares typed findings, a figure and a caveat: the
    report shows them as it shows a built-in check's. Data quality is an ordinary check: without it in the plan,
    the data are still fingerprinted and counted."""
    raw = tiny_use_case(tmp_path, tiny_model)
    raw["data"]["max_samples"] = {"train": 20, "validation": 20, "test": 40}
    raw["plan"]["checks"] = [{"check": "partner_checks:CriticalShare"}]
    raw["requirements"] = [{"id": "P1-share", "text": "The screening flags at most 90% of the cells.",
                            "metric": "critical_share", "comparator": "<=", "threshold": 0.9}]
    r = assess(str(write_yaml(tmp_path / "uc.yaml", raw)), str(tmp_path / "out"), None, tracking_uri)
    assert r.complete, r.errors
    a = Assessment.model_validate_json((tmp_path / "out" / "assessment.json").read_text())
    assert [o.check for o in a.outcomes] == ["critical_share"]
    assert a.provenance.data_items == {"train": 20, "validation": 20, "test": 40}
    assert len(a.provenance.data_sha256) == 64
    share = a.outcomes[0].measurements[0]
    html = (tmp_path / "out" / "report.html").read_text()
    findings = html[html.index('id="findings"'):html.index('id="changes"')]
    said = (f"The partner&#39;s screening calls {share.value * 100:.3g}% (interval {share.interval.lower * 100:.3g}–"
            f"{share.interval.upper * 100:.3g}%) of the cells defective.")
    assert "What breaks the model, and from which amplitude" in findings and said in findings
    card = html[html.index('id="claim-P1-share"'):]
    card = card[:card.index("</section>")]
    assert 'alt="plot of claim P1-share"' in card                       # the figure that illustrates its metric
    assert "Partner evidence: the screening rule of the line" in card   # its caveat
    assert "Partner screening: confusion matrix</figcaption>" in html   # and the figure in the appendix
    assert "Data</th><td>train 20 items, validation 20 items, test 40 items" in html


def test_task_labels_come_from_what_tells_a_shard_apart_never_from_a_check_name():
    """A shard's task name is read from its params generically (where they differ from the whole check's): a
    sweep by perturbation, an attack check by attack, a partner's check by its own sharded parameter."""
    from trustcase.checks import Check, Params, build
    from trustcase.flows.assess import _labels
    from trustcase.schemas import CheckSpec

    sweep = build(CheckSpec(check="perturbation_sweep", params={"perturbations": {"gaussian_blur": [1.0],
                                                                                  "gaussian_noise": [0.1]}}))
    assert _labels(sweep) == ["perturbation_sweep[gaussian_blur]", "perturbation_sweep[gaussian_noise]"]
    attacks = build(CheckSpec(check="adversarial", params={"attacks": ["fgsm_linf", "pgd_l2"]}))
    assert _labels(attacks) == ["adversarial[fgsm_linf]", "adversarial[pgd_l2]"]
    one = build(CheckSpec(check="perturbation_sweep", params={"perturbations": {"gaussian_blur": [1.0]}}))
    assert _labels(one) == ["perturbation_sweep"] and _labels(build(CheckSpec(check="performance"))) == ["performance"]

    class LotParams(Params):
        lots: list[str]
        files: list[str] = []

    class ByLot(Check):
        name = "by_lot"
        Params = LotParams

        def shards(self):
            return [ByLot(self.params.model_copy(update={"lots": [lot], "files": [f"/data/{lot}/index.csv"]}))
                    for lot in self.params.lots]

    assert _labels(ByLot(LotParams(lots=["a", "b"]))) == ["by_lot[a,index.csv]", "by_lot[b,index.csv]"]

"""The comparison a second reader needs, found without being asked: a new registered version's report compares
itself with the registry's qualified version (regressions first). Real MLflow registry, real Prefect flow."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pytest
import yaml
from conftest import write_yaml
from mlflow.tracking import MlflowClient
from test_argument import assessment
from test_watch import NAME, versions  # noqa: F401  (the fixture: two registered versions, 2 = zeroed weights)

from trustcase.flows import rerender, tracking
from trustcase.flows.assess import assess


def test_the_qualified_version_is_found_in_the_registry(tracking_uri, tmp_path):
    """The registry's `qualified` alias leads to its assessment run; none, an unassessed alias or the run itself
    give no comparison (and never an error)."""
    tracking.configure(tracking_uri)
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    uc = assessment().use_case
    assert rerender.qualified_previous(uc, tracking_uri) is None  # no registered model at all
    client.create_registered_model(NAME)
    with mlflow.start_run() as run:
        (tmp_path / "assessment.json").write_text(assessment({"L-acc": "FAIL"}).model_dump_json())
        mlflow.log_artifact(str(tmp_path / "assessment.json"))
        mv = client.create_model_version(NAME, f"{run.info.artifact_uri}/model", run.info.run_id)
    client.set_registered_model_alias(NAME, "qualified", mv.version)
    assert rerender.qualified_previous(uc, tracking_uri) is None  # never assessed: no trustcase.run_id tag
    client.set_model_version_tag(NAME, mv.version, "trustcase.run_id", run.info.run_id)
    found = rerender.qualified_previous(uc, tracking_uri)
    assert found is not None and next(e for e in found.evidence if e.claim_id == "L-acc").verdict.value == "FAIL"
    assert rerender.qualified_previous(uc, tracking_uri, exclude_run_id=run.info.run_id) is None
    assert rerender.qualified_previous({**uc, "model": {**uc["model"], "registered_name": "other"}},
                                       tracking_uri) is None


@pytest.mark.slow
def test_a_new_version_is_compared_with_the_qualified_one_automatically(prefect_harness, versions, tracking_uri,  # noqa: F811
                                                                         tmp_path):
    raw = yaml.safe_load(Path(versions).read_text())
    first = assess(str(versions), str(tmp_path / "v1"), None, tracking_uri)
    assert "No previous qualified version" in (tmp_path / "v1" / "report.html").read_text()  # nothing qualified yet
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    client.set_model_version_tag(NAME, "1", "trustcase.run_id", first.run_id)  # as `trustcase watch` qualifies it
    client.set_registered_model_alias(NAME, "qualified", "1")
    tracking.configure(tracking_uri)
    assert tracking.qualified_run(NAME) == ("1", first.run_id)

    v2 = write_yaml(tmp_path / "v2.yaml", {**raw, "model": {**raw["model"], "path": str(tmp_path / "zeroed.pt")}})
    second = assess(str(v2), str(tmp_path / "v2"), None, tracking_uri)  # no --previous: the registry decides
    html = (tmp_path / "v2" / "report.html").read_text()
    assert "1 regression(s) since the previous qualified version</b> (model version 1)" in html
    changes = html[html.index('id="changes"'):html.index('id="argument"')]
    assert "<b>Regression</b> <b>R-recall</b>: PASS" in changes and "→ FAIL" in changes
    assert changes.index("R-recall") < changes.index("R-acc") if "R-acc" in changes else True
    claims = html[html.index('id="claims"'):html.index('id="signature"')]
    assert claims.index('id="claim-R-recall"') < claims.index('id="claim-R-acc"')  # the regression's card first
    arg = json.loads((tmp_path / "v2" / "argument.json").read_text())
    assert arg["previous"]["model_version"] == "1" and arg["previous"]["mlflow_run_id"] == first.run_id
    assert arg["comparison"][0]["claim_id"] == "R-recall" and arg["comparison"][0]["regression"]

    # re-rendering finds the same comparison; the qualified run itself is never compared with itself
    again = rerender.rerender(second.run_id, tmp_path / "again", tracking_uri)
    assert "<b>Regression</b> <b>R-recall</b>" in Path(again["html"]).read_text()
    own = rerender.rerender(first.run_id, tmp_path / "own", tracking_uri)
    assert "No previous qualified version" in Path(own["html"]).read_text()

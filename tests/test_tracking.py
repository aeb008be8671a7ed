"""The MLflow run lives as long as the assessment: RUNNING from the start with the use case, model and data
hashes, each check's metrics as it finishes, the verdict tagged only after the report and the pack are logged,
FAILED after a crash (real Prefect, real MLflow SQLite store, real tiny CNN)."""

from __future__ import annotations

import json

import pytest
from conftest import tiny_use_case, write_yaml
from mlflow.tracking import MlflowClient

from trustcase.flows.assess import assess
from trustcase.flows.rerender import RunNotFound
from trustcase.flows.tracking import TrackingError

pytestmark = pytest.mark.usefixtures("prefect_harness")


def _small_case(tmp_path, tiny_model, extra_checks=()):
    raw = tiny_use_case(tmp_path, tiny_model)
    raw["data"]["max_samples"] = {"train": 40, "validation": 20, "test": 40}
    raw["requirements"] = [r for r in raw["requirements"] if r["id"] in ("R1-accuracy", "R2-recall", "R6-calibration")]
    raw["plan"]["checks"] = [{"check": "data_quality"}, {"check": "performance"}, *extra_checks]
    return write_yaml(tmp_path / "uc.yaml", raw)


def _only_run(uri):
    client = MlflowClient(uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1
    return client, runs[0]


def test_the_run_is_running_from_the_start_and_gets_its_verdict_last(tmp_path, tiny_model, tracking_uri):
    record = tmp_path / "seen.json"
    path = _small_case(tmp_path, tiny_model, [{"check": "run_spy:RunSpy",
                                               "params": {"tracking_uri": tracking_uri, "record": str(record)}}])
    r = assess(str(path), str(tmp_path / "out"), None, tracking_uri)
    assert r.complete, r.errors

    [during] = json.loads(record.read_text())                  # what the MLflow UI showed mid-assessment
    assert during["status"] == "RUNNING"
    assert during["tags"]["use_case"] == "solar_cells"
    assert len(during["tags"]["model_sha256"]) == len(during["tags"]["data_sha256"]) == 64
    assert "verdict" not in during["tags"] and "complete" not in during["tags"]
    assert any(k.startswith("performance/test/accuracy") for k in during["metrics"])  # logged as it finished
    assert not any(k.startswith("claim/") for k in during["metrics"]) and during["artefacts"] == []

    client, run = _only_run(tracking_uri)
    assert run.info.run_id == r.run_id and run.info.status == "FINISHED"
    assert run.data.tags["verdict"] == r.verdict.value and run.data.tags["complete"] == "True"
    assert run.data.tags["data_sha256"] == during["tags"]["data_sha256"]
    logged = {a.path for a in client.list_artifacts(r.run_id)}
    assert {"assessment.json", "report.html", "report.pdf", "pack.zip"} <= logged
    assert any(k.startswith("claim/") for k in run.data.metrics)


def test_a_crash_after_the_checks_leaves_a_failed_run_without_verdict(tmp_path, tiny_model, tracking_uri):
    path = _small_case(tmp_path, tiny_model)
    with pytest.raises(RunNotFound):                              # the run to compare with does not exist
        assess(str(path), str(tmp_path / "out"), None, tracking_uri, previous_run_id="0" * 32)
    _, run = _only_run(tracking_uri)
    assert run.info.status == "FAILED" and run.data.tags["error"] == "RunNotFound"
    assert "verdict" not in run.data.tags and "complete" not in run.data.tags
    assert any(k.startswith("performance/test/accuracy") for k in run.data.metrics)   # what was measured stays


def test_an_artefact_store_that_fails_after_the_report_leaves_no_verdict(tmp_path, tiny_model, tracking_uri):
    """The old order tagged verdict=PASS before logging the artefacts: a failure there left a PASS without a report."""
    path = _small_case(tmp_path, tiny_model)
    (tmp_path / "mlartifacts").write_text("not a folder")        # the local store's artefact root is unusable
    with pytest.raises(TrackingError, match="could not log the artefacts in the MLflow tracking store"):
        assess(str(path), str(tmp_path / "out"), None, tracking_uri)
    assert (tmp_path / "out" / "report.html").is_file() and (tmp_path / "out" / "pack.zip").is_file()
    _, run = _only_run(tracking_uri)
    assert run.info.status == "FAILED" and "verdict" not in run.data.tags

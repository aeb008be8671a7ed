"""Re-render a report from what an MLflow run holds: the assessment record is self-sufficient."""

from __future__ import annotations

import tempfile
from pathlib import Path

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from trustcase import reports
from trustcase.flows import tracking
from trustcase.schemas import Assessment


class RunNotFound(Exception):
    pass


def fetch_assessment(run_id: str, tracking_uri: str | None = None) -> Assessment:
    tracking.configure(tracking_uri)
    client = MlflowClient()
    try:
        client.get_run(run_id)
    except MlflowException:
        raise RunNotFound(f"no MLflow run {run_id!r} in {tracking.mlflow.get_tracking_uri()}") from None
    with tempfile.TemporaryDirectory() as tmp:
        try:
            local = client.download_artifacts(run_id, "assessment.json", tmp)
        except (MlflowException, OSError):
            raise RunNotFound(f"run {run_id} holds no assessment.json: it is not a trustcase assessment") from None
        return Assessment.model_validate_json(Path(local).read_text())


def rerender(run_id: str, out_dir: Path, tracking_uri: str | None = None) -> dict[str, str]:
    assessment = fetch_assessment(run_id, tracking_uri)
    out_dir.mkdir(parents=True, exist_ok=True)
    return reports.render(assessment, out_dir)

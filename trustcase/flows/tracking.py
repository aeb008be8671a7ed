"""MLflow: one run per assessment under an experiment per use case; the model registry for versions."""

from __future__ import annotations

import json
import re
from pathlib import Path

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from trustcase.schemas import Assessment, Measurement, UseCase

HOME = Path(".trustcase")  # under the working directory: the default local store


def default_tracking_uri() -> str:
    return f"sqlite:///{(HOME / 'mlflow.db').resolve()}"


def configure(tracking_uri: str | None) -> str:
    """Point MLflow at the given store, or at the local SQLite store under the working directory."""
    import os

    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri()
    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return uri


def experiment(use_case: UseCase) -> str:
    """The use case's experiment id; artefacts of a local store live beside its database."""
    name = f"trustcase/{use_case.id}"
    client = MlflowClient()
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    uri = mlflow.get_tracking_uri()
    location = None
    if uri.startswith("sqlite:///"):
        location = (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts").resolve().as_uri()
    try:
        return client.create_experiment(name, artifact_location=location, tags={"use_case": use_case.id})
    except MlflowException:
        exp = client.get_experiment_by_name(name)  # another process created it in the meantime
        if exp is None:
            raise
        return exp.experiment_id


def _key(text: str) -> str:
    """MLflow metric keys allow alphanumerics and _ - . space : /."""
    return re.sub(r"[^\w\-. :/]", "_", text)


def metric_key(m: Measurement) -> str:
    parts = [m.check, m.scope.split]
    parts += [f"{k}={v}" for k, v in sorted(m.scope.subgroup.items())]
    if m.scope.perturbation:
        parts.append(m.scope.perturbation.name)
    return _key("/".join(parts + [m.metric]))


def log_measurements(client: MlflowClient, run_id: str, assessment: Assessment) -> None:
    """Plain metrics as values; perturbation curves as stepped metrics (step = index on the grid)."""
    from mlflow.entities import Metric

    batch, grids = [], {}
    for o in assessment.outcomes:
        for m in o.measurements:
            if m.value is None or m.value != m.value:  # undefined (e.g. empty class)
                continue
            step = 0
            if m.scope.perturbation is not None:
                grid = grids.setdefault((o.check, m.scope.perturbation.name), sorted(
                    {x.amplitude for x in o.measurements if x.scope.perturbation
                     and x.scope.perturbation.name == m.scope.perturbation.name}))
                step = grid.index(m.amplitude)
            batch.append(Metric(metric_key(m), float(m.value), 0, step))
    for (check, name), grid in grids.items():
        batch += [Metric(_key(f"{check}/{name}/amplitude"), float(a), 0, i) for i, a in enumerate(grid)]
    for i in range(0, len(batch), 900):  # MLflow's log_batch limit is 1000 entries
        client.log_batch(run_id, metrics=batch[i:i + 900])
    for e in assessment.evidence:
        if e.claim_id and e.value is not None:
            client.log_metric(run_id, _key(f"claim/{e.claim_id}"), float(e.value))


def flatten(prefix: str, obj, out: dict) -> dict:
    if isinstance(obj, dict):
        for k, v in obj.items():
            flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
    else:
        out[prefix] = json.dumps(obj) if isinstance(obj, list) else str(obj)
    return out


def registered_name(use_case: UseCase) -> str:
    """The use case's registered model: `model.registered_name`, default the use-case id."""
    return use_case.model.registered_name or use_case.id


def model_version(use_case: UseCase, model_sha256: str) -> str | None:
    """The registered version whose file hash is this model's, if the model is registered."""
    try:
        versions = MlflowClient().search_model_versions(f"name='{registered_name(use_case)}'")
    except MlflowException:
        return None
    for v in sorted(versions, key=lambda v: int(v.version), reverse=True):
        if v.tags.get("model_sha256") == model_sha256:
            return str(v.version)
    return None


def register_model(use_case: UseCase, model_path: Path, model_sha256: str, training: dict) -> str:
    """Log a training run with the model file and register it as a new version (idempotent by hash)."""
    name = registered_name(use_case)
    existing = model_version(use_case, model_sha256)
    if existing:
        return existing
    client = MlflowClient()
    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name, tags={"use_case": use_case.id})
    with mlflow.start_run(experiment_id=experiment(use_case), run_name="training") as run:
        mlflow.log_params(flatten("", training.get("params", {}), {}))
        mlflow.log_metrics({f"validation.{k}": float(v) for k, v in training.get("validation", {}).items()})
        for row in training.get("history", []):
            mlflow.log_metrics({k: float(v) for k, v in row.items() if k != "epoch"}, step=int(row["epoch"]))
        mlflow.log_artifact(str(model_path), artifact_path="model")
        mlflow.set_tags({"kind": "training", "model_sha256": model_sha256})
        source = f"{run.info.artifact_uri}/model/{model_path.name}"
    v = client.create_model_version(name, source=source, run_id=run.info.run_id,
                                    tags={"model_sha256": model_sha256, "format": use_case.model.format})
    return str(v.version)


def link_runtime_artefacts(use_case: UseCase, version: str, artifact_uri: str, outcomes) -> None:
    """Tag the registered version with where its fitted runtime artefacts (e.g. the ODD monitor) live."""
    name = registered_name(use_case)
    client = MlflowClient()
    for o in outcomes:
        for a in o.artefacts:
            if a.kind == "monitor":
                client.set_model_version_tag(name, version, f"trustcase.{a.kind}", f"{artifact_uri}/checks/{a.path}")
                client.set_model_version_tag(name, version, f"trustcase.{a.kind}_sha256", a.sha256)

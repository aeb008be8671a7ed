"""MLflow: one run per assessment, open as long as it, under an experiment per use case; the model registry."""

from __future__ import annotations

import json
import os
import re
from contextlib import contextmanager
from pathlib import Path

import mlflow
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.tracking._tracking_service.utils import _tracking_store_registry

from trustcase.errors import UserError
from trustcase.schemas import Assessment, CheckOutcome, Measurement, UseCase

HOME = Path(".trustcase")  # under the working directory: the default local store


def default_tracking_uri() -> str:
    return f"sqlite:///{(HOME / 'mlflow.db').resolve()}"


class TrackingUriError(UserError):
    """A tracking URI MLflow cannot open (an unknown scheme)."""


def configure(tracking_uri: str | None) -> str:
    """Point MLflow at the given store, or at the local SQLite store under the working directory."""
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri()
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # CLI output stays readable
    scheme = uri.partition("://")[0].partition("+")[0] if "://" in uri else ""
    if scheme not in _tracking_store_registry._registry:  # MLflow's own table of store schemes
        raise TrackingUriError(f"tracking URI {uri!r}: MLflow has no store for scheme {scheme!r} (one of "
                               f"{', '.join(sorted(s for s in _tracking_store_registry._registry if s))}, or a path)")
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


class TrackingError(UserError):
    """The MLflow tracking store could not be written (after MLflow's own retries): names the store."""


@contextmanager
def _store(action: str):
    """MLflow failures as one clear line naming the store; MLflow has already retried (with back-off)."""
    try:
        yield
    except (MlflowException, OSError) as e:
        detail = str(e).splitlines()[0][:300] if str(e) else type(e).__name__
        raise TrackingError(f"could not {action} in the MLflow tracking store {mlflow.get_tracking_uri()} "
                            f"(MLFLOW_TRACKING_URI): {detail}") from e


class AssessmentRun:
    """The MLflow run of one assessment, open exactly as long as the assessment.

    RUNNING from the start (tagged with the use case, then the model and data hashes as they are known),
    each check's metrics logged as the check finishes, and `verdict` / `complete` tagged only by `finish`,
    after the report, the pack and every artefact are logged: a run cut short (crash, MLflow down, kill)
    never carries a verdict. A crash or an interruption marks it FAILED / KILLED; a SIGKILL leaves it
    RUNNING, still without a verdict.
    """

    def __init__(self, use_case: UseCase, tags: dict[str, str], params: dict[str, str]):
        self.client = MlflowClient()
        with _store("create the assessment run"):
            exp_id = experiment(use_case)
            run = self.client.create_run(exp_id, run_name=f"assess {use_case.id}",
                                         tags={"use_case": use_case.id, **tags})
            self.id = run.info.run_id
            self.artifact_uri = run.info.artifact_uri
            items = [Param(k, v[:6000]) for k, v in params.items()]
            for i in range(0, len(items), 100):  # MLflow's log_batch limit is 100 params
                self.client.log_batch(self.id, params=items[i:i + 100])

    def tag(self, tags: dict[str, str]) -> None:
        if "verdict" in tags or "complete" in tags:
            raise ValueError("the verdict is tagged by finish(), once everything is logged")
        with _store("tag the assessment run"):
            self.client.log_batch(self.id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_outcome(self, outcome: CheckOutcome) -> None:
        """One check's measurements: plain metrics as values, perturbation curves as stepped metrics (step =
        index on the amplitude grid, with the grid itself as `<check>/<perturbation>/amplitude`)."""
        batch, grids = [], {}
        for m in outcome.measurements:
            if m.value is None or m.value != m.value:  # undefined (e.g. empty class)
                continue
            step = 0
            if m.scope.perturbation is not None:
                grid = grids.setdefault(m.scope.perturbation.name, sorted(
                    {x.amplitude for x in outcome.measurements if x.scope.perturbation
                     and x.scope.perturbation.name == m.scope.perturbation.name}))
                step = grid.index(m.amplitude)
            batch.append(Metric(metric_key(m), float(m.value), 0, step))
        for name, grid in grids.items():
            batch += [Metric(_key(f"{outcome.check}/{name}/amplitude"), float(a), 0, i) for i, a in enumerate(grid)]
        with _store(f"log the metrics of {outcome.check}"):
            for i in range(0, len(batch), 900):  # MLflow's log_batch limit is 1000 entries
                self.client.log_batch(self.id, metrics=batch[i:i + 900])

    def log_artefacts(self, out: Path, paths: list[str]) -> None:
        """The files this run wrote, by their paths relative to `out` (the record, the report, the pack, plots,
        the checks' artefacts), each at the same place in the run's artefacts."""
        with _store("log the artefacts"):
            for rel in paths:
                parent = Path(rel).parent.as_posix()
                self.client.log_artifact(self.id, str(out / rel), None if parent == "." else parent)

    def finish(self, assessment: Assessment) -> None:
        """Claims as metrics, then the verdict tags, then FINISHED (FAILED when a check failed): the last
        writes of the assessment, so a `verdict` tag means the report and the pack are in the run."""
        claims = [Metric(_key(f"claim/{e.claim_id}"), float(e.value), 0, 0)
                  for e in assessment.evidence if e.claim_id and e.value is not None and e.value == e.value]
        with _store("close the assessment run"):
            self.client.log_batch(self.id, metrics=claims, tags=[
                RunTag("complete", str(assessment.complete)), RunTag("verdict", assessment.verdict.value)])
            self.client.set_terminated(self.id, "FINISHED" if assessment.complete else "FAILED")

    def abandon(self, error: BaseException) -> None:
        """After a crash or an interruption: FAILED or KILLED, no verdict, the error's type as a tag (its
        message may name confidential paths). Best effort with a single quick try: the store may be the very
        thing that failed, and the original error is the one to report."""
        saved = os.environ.get("MLFLOW_HTTP_REQUEST_MAX_RETRIES")
        os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
        try:
            self.client.log_batch(self.id, tags=[RunTag("error", type(error).__name__)])
            self.client.set_terminated(self.id, "FAILED" if isinstance(error, Exception) else "KILLED")
        except Exception:  # noqa: BLE001
            pass
        finally:
            if saved is None:
                os.environ.pop("MLFLOW_HTTP_REQUEST_MAX_RETRIES", None)
            else:
                os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = saved


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


def qualified_run(name: str, alias: str = "qualified") -> tuple[str, str] | None:
    """(version, assessment run id) of the registered version holding the alias, if trustcase assessed it."""
    try:
        mv = MlflowClient().get_model_version_by_alias(name, alias)
    except MlflowException:
        return None
    run_id = mv.tags.get("trustcase.run_id")
    return (str(mv.version), run_id) if run_id else None


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

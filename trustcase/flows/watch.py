"""Scheduled assessment of model versions: every registered version is assessed once, tagged, and
the ones whose mandatory claims all pass get the `qualified` alias.

    trustcase watch USE_CASE --once           one pass (cron, CI, tests)
    trustcase watch USE_CASE --cron "0 2 * * *"   a Prefect deployment served on that schedule

One pass: list the versions of the use case's registered model (`model.registered_name`, default the
use-case id) that carry no `trustcase.verdict` tag, oldest first. For each, the version's model file
is downloaded into a private temporary folder (two assessments never share a file), the use case is
re-written to point at it, and the assessment flow runs, compared with the assessment of the version
that holds the alias (its `assessment.json`). Then the version is tagged, all at once and only after
the assessment finished, the verdict last (a pass cut short leaves the version pending):

    trustcase.run_id, trustcase.report (local HTML), trustcase.report_uri (in the run's artefacts),
    trustcase.complete, trustcase.compared_with, trustcase.regressions, trustcase.assessed_at,
    trustcase.verdict

A version that passes (complete, every mandatory claim PASS) and regresses on no claim against the
qualified version takes the alias unless a newer version holds it; any other version never gets it, and
the qualified version keeps it.
`comparison.json` (claims of the new version beside the qualified one's, regressions first) is
written to the output folder and logged to the run.

The drift step (`--batches FOLDER`): each sub-folder of FOLDER is a batch of production inputs. A batch not yet
judged for its content and the model (the qualified version's, else the use case's) gets the feature-drift test
against the validation split (`data.drift.batch_drift`, as `trustcase drift`); its verdict goes to
`<out>/<use case>-batches/<batch>/drift.json` and to a run of the use case's experiment (tags trustcase.kind=drift,
trustcase.batch, trustcase.drift). A batch the test cannot judge is an error of the pass, judged again next time.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import mlflow
import yaml
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from prefect import flow, get_run_logger

from trustcase.errors import UserError
from trustcase.flows import rerender, runners, tracking
from trustcase.flows.prefect_db import ensure_local_database
from trustcase.flows.preflight import preflight
from trustcase.models.classifier import sha256_file
from trustcase.schemas import Assessment, UseCase, Verdict, compare_claims, load_use_case

TAG = "trustcase."
ALIAS = "qualified"


class WatchError(UserError):
    """A user error about the registry: no such registered model, an alias that points nowhere."""


@dataclass
class BatchOutcome:
    batch: str
    drift: bool | None = None
    pvalue: float | None = None
    mmd: float | None = None
    model: str | None = None
    record: str | None = None
    run_id: str | None = None
    error: str | None = None


@dataclass
class VersionOutcome:
    version: str
    verdict: str | None = None
    complete: bool = False
    run_id: str | None = None
    report: str | None = None
    qualified: bool = False
    compared_with: str | None = None
    regressions: list[str] = field(default_factory=list)
    error: str | None = None


def _client(tracking_uri: str | None) -> tuple[MlflowClient, str]:
    uri = tracking.configure(tracking_uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri), uri


def pending(client: MlflowClient, name: str) -> list[ModelVersion]:
    """Versions never assessed, oldest first; a registered model that does not exist is an error."""
    try:
        client.get_registered_model(name)
    except MlflowException:
        raise WatchError(f"no registered model {name!r} in {mlflow.get_tracking_uri()}: register a version first "
                         f"(set model.registered_name in the use case if it has another name)") from None
    versions = client.search_model_versions(f"name='{name}'")
    return sorted((v for v in versions if TAG + "verdict" not in v.tags), key=lambda v: int(v.version))


def qualified(client: MlflowClient, name: str, alias: str) -> tuple[ModelVersion | None, Assessment | None]:
    """The version holding the alias and its assessment; an alias on a never-assessed version is an error."""
    try:
        mv = client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None, None  # nothing qualified yet
    run_id = mv.tags.get(TAG + "run_id")
    if not run_id:
        raise WatchError(f"alias {alias!r} of {name!r} points to version {mv.version}, which trustcase never "
                         f"assessed (no {TAG}run_id tag): move the alias to an assessed version or delete it")
    try:
        return mv, rerender.fetch_assessment(run_id, mlflow.get_tracking_uri())
    except rerender.RunNotFound as e:
        raise WatchError(f"alias {alias!r} of {name!r} points to version {mv.version}, whose assessment run "
                         f"cannot be read: {e}") from None


def compare(previous: Assessment | None, current: Assessment) -> list[dict]:
    """Every claim of `current` beside `previous` (`schemas.compare_claims`, the comparison the report shows):
    regressions (verdict worse, or claim no longer assessed) first, then worse values."""
    changes = compare_claims(current.evidence, previous.evidence if previous else [])
    return [{"claim": c.claim_id, **c.model_dump(mode="json", exclude={"claim_id"}), "regression": c.regression}
            for c in changes]


def _redact(text: str, uc: UseCase) -> str:
    """Confidential use cases: no data location in a log line or an error message."""
    if not uc.confidential:
        return text
    secrets = [str(uc.data.path)] if uc.data.path else []
    secrets += [str(v) for v in uc.data.params.values() if isinstance(v, str) and ("/" in v or "\\" in v)]
    for s in sorted(secrets, key=len, reverse=True):
        text = text.replace(s, "<data>")
    return text


def _materialise(client: MlflowClient, uc: UseCase, mv: ModelVersion, folder: Path) -> Path:
    """The version's model in `folder` and a use-case file pointing at it (paths already absolute)."""
    uri = client.get_model_version_download_uri(mv.name, mv.version)
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(folder / "model")))
    except (MlflowException, OSError) as e:
        raise WatchError(f"version {mv.version} of {mv.name!r}: cannot download its model from {uri}: {e}") from None
    want = mv.tags.get("model_sha256")
    if want and sha256_file(local) != want:
        raise WatchError(f"version {mv.version} of {mv.name!r}: the downloaded model does not match its "
                         f"model_sha256 tag (registry or artefact store corrupted)")
    raw = uc.model_copy(update={"model": uc.model.model_copy(update={"path": local})}).model_dump(mode="json")
    path = folder / "use_case.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def _tag(client: MlflowClient, mv: ModelVersion, tags: dict[str, str]) -> None:
    """The verdict goes last: it marks the version as assessed."""
    for k, v in sorted(tags.items(), key=lambda kv: kv[0] == TAG + "verdict"):
        client.set_model_version_tag(mv.name, mv.version, k, str(v)[:5000])


def assess_version(client: MlflowClient, uc: UseCase, mv: ModelVersion, out_root: Path, alias: str,
                   runner: str = "thread", dask_address: str | None = None) -> VersionOutcome:
    """Assess one version and tag it. Raises (and tags nothing) when the assessment could not run."""
    name, uri = mv.name, mlflow.get_tracking_uri()
    holder, previous = qualified(client, name, alias)
    with tempfile.TemporaryDirectory(prefix=f"trustcase-{uc.id}-v{mv.version}-") as tmp:
        yml = _materialise(client, uc, mv, Path(tmp))
        preflight(yml)
        out = out_root / f"{uc.id}-v{mv.version}"
        result = runners.run(str(yml), str(out), None, uri, runner, dask_address,
                             previous.provenance.mlflow_run_id if previous else None)
    current = Assessment.model_validate_json((out / "assessment.json").read_text())
    rows = compare(previous, current)
    (out / "comparison.json").write_text(json.dumps(
        {"version": str(mv.version), "compared_with": str(holder.version) if holder else None, "claims": rows},
        indent=1))
    client.log_artifact(result.run_id, str(out / "comparison.json"))
    client.set_tag(result.run_id, "registered_version", f"{name}/{mv.version}")
    passed = result.complete and result.verdict is Verdict.PASS
    regressions = [r["claim"] for r in rows if r["regression"]]
    run = client.get_run(result.run_id)
    _tag(client, mv, {
        TAG + "run_id": result.run_id,
        TAG + "report": str(result.files.get("html", out / "report.html")),
        TAG + "report_uri": f"{run.info.artifact_uri}/report.html",
        TAG + "complete": str(result.complete).lower(),
        TAG + "compared_with": str(holder.version) if holder else "none",
        TAG + "regressions": ",".join(regressions) or "none",
        TAG + "assessed_at": datetime.now(UTC).isoformat(timespec="seconds"),
        TAG + "verdict": result.verdict.value,
    })
    # a newer qualified version keeps the alias when an older one is (re)assessed later
    # and a version that regresses on any claim against the qualified one never takes it
    take = passed and not regressions and (holder is None or int(mv.version) > int(holder.version))
    if take:
        client.set_registered_model_alias(name, alias, mv.version)
    return VersionOutcome(version=str(mv.version), verdict=result.verdict.value, complete=result.complete,
                          run_id=result.run_id, report=str(result.files.get("html")), qualified=take,
                          compared_with=str(holder.version) if holder else None, regressions=regressions)


DRIFT_LEVEL = 0.05  # the drift step's level, as `trustcase drift`'s default


def batch_folders(batches: str | Path) -> list[Path]:
    """The batches of production inputs: the sub-folders of `batches`, by name."""
    root = Path(batches)
    if not root.is_dir():
        raise WatchError(f"--batches {root}: no such folder (its sub-folders are the batches of production inputs)")
    return sorted(p for p in root.iterdir() if p.is_dir())


def _content(folder: Path) -> str:
    from trustcase.odd import input_files

    h = hashlib.sha256()
    for f in input_files([folder]):
        h.update(f"{f.name}\0{sha256_file(f)}\n".encode())
    return h.hexdigest()


def judge_batches(client: MlflowClient, uc: UseCase, batches: str | Path, out_root: Path,
                  alias: str = ALIAS) -> list[BatchOutcome]:
    """The drift step: every batch not judged yet for its content and the model gets the feature-drift test against
    the validation split; verdict recorded in drift.json and an MLflow run. Bad batches are errors (exit 2)."""
    from trustcase.data.drift import batch_drift
    from trustcase.flows.provenance import model_sha256
    from trustcase.models.loading import load_classifier

    holder, _ = qualified(client, tracking.registered_name(uc), alias)
    outcomes = []
    with tempfile.TemporaryDirectory(prefix=f"trustcase-{uc.id}-drift-") as tmp:
        judged = load_use_case(_materialise(client, uc, holder, Path(tmp))) if holder else uc
        who = f"version {holder.version} ({alias})" if holder else "the use case's model"
        model, model_sha = None, model_sha256(judged.model)
        for folder in batch_folders(batches):
            record = out_root / f"{uc.id}-batches" / folder.name / "drift.json"
            try:
                content = _content(folder)
                before = json.loads(record.read_text()) if record.is_file() else {}
                if (before.get("batch_sha256"), before.get("model_sha256")) == (content, model_sha):
                    continue  # judged already: same inputs, same model
                model = load_classifier(judged.model) if model is None else model
                r = batch_drift(judged, model, [folder], "validation", seed=uc.plan.seed, check="drift")
            except UserError as e:  # a batch off the input contract, too small, unreadable
                outcomes.append(BatchOutcome(folder.name, error=_redact(f"{type(e).__name__}: {e}", uc)))
                continue
            drifted = r["pvalue"] < DRIFT_LEVEL
            record.parent.mkdir(parents=True, exist_ok=True)
            record.write_text(json.dumps({"batch": folder.name, "batch_sha256": content, "model": who,
                                          "model_sha256": model_sha, "alpha": DRIFT_LEVEL, "drift": drifted,
                                          "judged_at": datetime.now(UTC).isoformat(timespec="seconds"), **r},
                                         indent=1))
            run = client.create_run(tracking.experiment(uc), run_name=f"drift {folder.name}", tags={
                TAG + "kind": "drift", TAG + "batch": folder.name, TAG + "drift": str(drifted).lower(),
                TAG + "model": who})
            for key in ("pvalue", "mmd"):
                client.log_metric(run.info.run_id, f"drift_{key}", r[key])
            client.log_artifact(run.info.run_id, str(record))
            client.set_terminated(run.info.run_id)
            outcomes.append(BatchOutcome(folder.name, drifted, r["pvalue"], r["mmd"], who, str(record),
                                         run.info.run_id))
    return outcomes


@flow(name="trustcase-watch")
def watch(use_case_path: str, out_root: str = "trustcase-out", tracking_uri: str | None = None,
          alias: str = ALIAS, runner: str = "thread", dask_address: str | None = None,
          batches: str | None = None) -> list[dict]:
    """One pass over the registry: assess every version never assessed, oldest first; then the drift step over
    the batches of production inputs (outcomes with a 'batch' key)."""
    log = get_run_logger()
    uc = load_use_case(use_case_path)
    client, _ = _client(tracking_uri)
    name = tracking.registered_name(uc)
    todo = pending(client, name)
    log.info("%s: %d version(s) to assess", name, len(todo))
    outcomes = []
    for mv in todo:
        try:
            o = assess_version(client, uc, mv, Path(out_root).resolve(), alias, runner, dask_address)
            log.info("%s v%s: %s%s%s", name, mv.version, o.verdict, " (qualified)" if o.qualified else "",
                     f"; regressions vs v{o.compared_with}: {o.regressions}" if o.regressions else "")
        except UserError as e:
            o = VersionOutcome(version=str(mv.version), error=_redact(f"{type(e).__name__}: {e}", uc))
            log.error("%s v%s not assessed: %s", name, mv.version, o.error)
        outcomes.append(asdict(o))
    for b in judge_batches(client, uc, batches, Path(out_root).resolve(), alias) if batches else []:
        log.info("batch %s: %s", b.batch, b.error or f"{'drift' if b.drift else 'no drift'} (p-value {b.pvalue:.3g})")
        outcomes.append(asdict(b))
    return outcomes


def once(use_case_path: str | Path, out_root: str | Path = "trustcase-out", tracking_uri: str | None = None,
         alias: str = ALIAS, runner: str = "thread", dask_address: str | None = None,
         batches: str | Path | None = None) -> list[dict]:
    """One pass; when nothing is pending (no version, no batch folder) it returns at once, without starting a
    Prefect flow."""
    uc = load_use_case(use_case_path)
    client, uri = _client(tracking_uri)
    qualified(client, tracking.registered_name(uc), alias)  # an alias pointing nowhere fails before any work
    if batches is not None:
        batch_folders(batches)  # a batches folder that does not exist, too
    if not pending(client, tracking.registered_name(uc)) and batches is None:
        return []
    runners.task_runner(runner, dask_address)  # a Dask address that does not answer fails before any work
    ensure_local_database()
    return watch(str(Path(use_case_path).resolve()), str(out_root), uri, alias, runner, dask_address,
                 str(Path(batches).resolve()) if batches is not None else None)


def deployment_parameters(use_case_path: str | Path, out_root: str | Path, tracking_uri: str | None, alias: str,
                          runner: str, dask_address: str | None, batches: str | Path | None = None) -> dict:
    return {"use_case_path": str(Path(use_case_path).resolve()), "out_root": str(Path(out_root).resolve()),
            "tracking_uri": tracking.configure(tracking_uri), "alias": alias, "runner": runner,
            "dask_address": dask_address, "batches": str(Path(batches).resolve()) if batches is not None else None}


def validate_cron(cron: str) -> str:
    from prefect.client.schemas.schedules import CronSchedule

    try:
        CronSchedule(cron=cron)
    except ValueError as e:
        raise WatchError(f"invalid cron expression {cron!r}: {str(e).splitlines()[-1][:200]}") from None
    return cron


def deployment(use_case_path: str | Path, cron: str, **kwargs):
    """The Prefect deployment `serve` runs (built here so that its schedule can be inspected)."""
    uc = load_use_case(use_case_path)
    return watch.to_deployment(name=f"watch-{uc.id}", cron=validate_cron(cron),
                               parameters=deployment_parameters(use_case_path, **kwargs),
                               description=f"Assess new versions of {tracking.registered_name(uc)!r} "
                                           f"on schedule {cron!r}")


def serve(use_case_path: str | Path, cron: str, **kwargs) -> None:
    """Serve the watch flow on a cron schedule with Prefect's own scheduler (blocks until stopped)."""
    from prefect import serve as prefect_serve

    client, _ = _client(kwargs.get("tracking_uri"))
    pending(client, tracking.registered_name(load_use_case(use_case_path)))  # fails now, not at 2 am
    prefect_serve(deployment(use_case_path, cron, **kwargs))

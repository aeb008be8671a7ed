"""The assessment flow: a Prefect DAG of thin tasks over components, logged to MLflow, ending in a report.

    fingerprint (model + data hashes) -> data_quality -> checks (.map over shards) -> evidence -> report

Check tasks persist their results under a cache key made of everything their result depends on
(code, use case, model hash, data hash, check parameters, seed, output folder), so re-running after
a crash recomputes only what did not finish.
"""

from __future__ import annotations

import hashlib
import json
import traceback
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import lru_cache
from pathlib import Path

from prefect import flow, task, unmapped
from prefect.task_runners import ThreadPoolTaskRunner

from trustcase import reports
from trustcase.checks import Check, CheckError, Context, Unsupported, build, build_plan
from trustcase.data.streaming import DataError, DataSource
from trustcase.flows import provenance, rerender, tracking
from trustcase.models.classifier import Classifier, ModelError, sha256_file
from trustcase.models.loading import load_classifier
from trustcase.schemas import (
    Assessment,
    CheckOutcome,
    CheckSpec,
    Provenance,
    UseCase,
    Verdict,
    load_use_case,
    parse_use_case,
)
from trustcase.verdicts import judge, overall

USER_ERRORS = (ModelError, DataError, CheckError, Unsupported)

# Listeners told (label, done, total) as each check shard finishes: the CLI draws its progress bar from
# them (a module-level hook, because Prefect flow parameters must be serialisable).
progress_listeners: list = []


def _progress(label: str, done: int, total: int) -> None:
    for listener in progress_listeners:
        listener(label, done, total)


@dataclass
class Result:
    verdict: Verdict
    complete: bool
    out_dir: Path
    run_id: str
    tracking_uri: str
    files: dict[str, str] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    user_error: bool = False


def plan(use_case: UseCase) -> list[tuple[int, CheckSpec]]:
    """The plan's checks, data quality first (it yields the data hash every other key includes)."""
    specs = list(enumerate(use_case.plan.checks))
    dq = [s for s in specs if s[1].check == "data_quality"] or [(-1, CheckSpec(check="data_quality"))]
    return dq[:1] + [s for s in specs if s[1].check != "data_quality"]


def preflight(use_case_path: str | Path) -> UseCase:
    """Every user error we can find before work starts: file, plan, model, data loader."""
    uc = load_use_case(use_case_path)
    build_plan(uc)
    load_classifier(uc.model)
    data = DataSource(uc.data, uc.plan.seed)
    for role in data.roles:
        if len(data.stream(role)) == 0:
            raise DataError(f"split {role!r} ({uc.data.splits[role]!r}) is empty")
    return uc


@lru_cache(maxsize=4)
def _classifier(spec_json: str, sha: str) -> Classifier:
    from trustcase.schemas import ModelSpec

    return load_classifier(ModelSpec.model_validate_json(spec_json))


def _key(parts: list) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


@task(name="fingerprint")
def fingerprint(use_case: UseCase, seed: int) -> dict:
    """Model file hash and the loaders' cheap data fingerprints (None where a loader has none)."""
    data = DataSource(use_case.data, seed, use_case.model)
    return {
        "model_sha256": sha256_file(Path(use_case.model.path)),
        "data": {role: data.stream(role).fingerprint() for role in data.roles},
    }


@task(name="check", persist_result=True, cache_key_fn=lambda _, p: p["key"], task_run_name="{label}")
def run_check(use_case: UseCase, spec: CheckSpec, shard: int, seed: int, model_sha256: str, workdir: str,
              key: str | None, label: str) -> CheckOutcome:
    check: Check = build(spec).shards()[shard]
    ctx = Context(
        use_case=use_case,
        model=_classifier(use_case.model.model_dump_json(), model_sha256),
        data=DataSource(use_case.data, seed, use_case.model),
        seed=seed,
        workdir=Path(workdir) / "checks" / check.name,
    )
    return check(ctx)


@task(name="evidence")
def evidence(use_case: UseCase, outcomes: list[CheckOutcome]):
    return judge(use_case.requirements, outcomes)


@task(name="report")
def report(assessment: Assessment, out_dir: str, use_case_text: str,
           previous: Assessment | None = None) -> dict[str, str]:
    """Write the assessment and render the report (compared with `previous` when given)."""
    out = Path(out_dir)
    (out / "assessment.json").write_text(assessment.model_dump_json(indent=1))
    (out / "evidence.json").write_text(json.dumps([e.model_dump(mode="json") for e in assessment.evidence], indent=1))
    (out / "use_case.yaml").write_text(use_case_text, encoding="utf-8")  # exactly the text that was assessed
    return reports.render(assessment, out, previous=previous)


def _label(check: Check) -> str:
    extra = ",".join(getattr(check.params, "perturbations", {}) or [])
    return f"{check.name}[{extra}]" if extra else check.name


@flow(name="trustcase-assess", task_runner=ThreadPoolTaskRunner(max_workers=1))
def assess(use_case_path: str, out_dir: str, seed: int | None = None, tracking_uri: str | None = None,
           previous_run_id: str | None = None) -> Result:
    """`previous_run_id`: an earlier assessment run (e.g. the qualified version's) the report compares with."""
    # read once: the file may change while the assessment runs, the record must not
    uc_text = Path(use_case_path).read_text(encoding="utf-8")
    uc = parse_use_case(uc_text, Path(use_case_path).resolve())
    seed = uc.plan.seed if seed is None else seed
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    started = datetime.now(UTC)
    uri = tracking.configure(tracking_uri)
    uc_json = uc.model_dump(mode="json")
    run = tracking.AssessmentRun(uc, {"code_version": provenance.code_version(),
                                      "confidentiality": uc.confidentiality.value},
                                 tracking.flatten("", {"seed": seed, "plan": uc_json["plan"]}, {}))
    try:  # the run is RUNNING from here; whatever cuts the assessment short leaves it without a verdict
        return _assess(run, uc, uc_text, uc_json, seed, out, uri, started, previous_run_id)
    except BaseException as e:
        run.abandon(e)  # FAILED (KILLED on SIGTERM / Ctrl-C)
        raise


def _assess(run: tracking.AssessmentRun, uc: UseCase, uc_text: str, uc_json: dict, seed: int, out: Path,
            uri: str, started: datetime, previous_run_id: str | None) -> Result:
    uc_sha = provenance.canonical_sha256(uc_json)
    fp = fingerprint(uc, seed)
    version = tracking.model_version(uc, fp["model_sha256"])
    run.tag({"model_sha256": fp["model_sha256"], "model_version": version or "unregistered",
             **{f"data_fingerprint.{role}": v for role, v in fp["data"].items() if v}})

    base = [provenance.source_sha256(), uc_sha, fp["model_sha256"], seed, str(out)]
    steps = plan(uc)
    outcomes: list[CheckOutcome] = []
    errors: list[str] = []
    user_error = False

    total = 1 + sum(len(build(spec).shards()) for _, spec in steps[1:])

    def collect(futures, labels):
        nonlocal user_error
        for f, label in zip(futures, labels, strict=True):
            value = f.result(raise_on_failure=False)
            _progress(label, len(outcomes) + len(errors) + 1, total)
            if isinstance(value, Unsupported):  # e.g. gradients of a black box: skipped, with the reason
                outcomes.append(CheckOutcome(check=label.split("[")[0], limitations=[f"not run: {value}"],
                                             summary={"skipped": str(value)}))
            elif isinstance(value, BaseException):
                user_error |= isinstance(value, USER_ERRORS)
                errors.append(f"{label}: {type(value).__name__}: {value}")
                if not isinstance(value, USER_ERRORS):
                    errors[-1] += "\n" + "".join(traceback.format_exception(value)[-3:])
            else:
                outcomes.append(value)
                run.log_outcome(value)  # live in the MLflow run as each check finishes (in plan order)

    # data quality first: its content hash keys every other check
    _, dq_spec = steps[0]
    cacheable = all(fp["data"].values())
    dq_key = _key(base + ["dq", dq_spec.model_dump(), fp["data"]]) if cacheable else None
    dq = run_check.submit(uc, dq_spec, 0, seed, fp["model_sha256"], str(out), dq_key, "data_quality")
    collect([dq], ["data_quality"])
    data_sha = outcomes[0].summary["data_sha256"] if outcomes else "unknown"
    run.tag({"data_sha256": data_sha})

    specs, shards, keys, labels = [], [], [], []
    for _, spec in steps[1:]:
        for i, shard in enumerate(build(spec).shards()):
            specs.append(spec)
            shards.append(i)
            keys.append(_key(base + [data_sha, spec.model_dump(), i]) if outcomes else None)
            labels.append(_label(shard))
    if specs and outcomes:
        futures = run_check.map(unmapped(uc), specs, shards, unmapped(seed), unmapped(fp["model_sha256"]),
                                unmapped(str(out)), keys, labels)
        collect(futures, labels)

    records = evidence(uc, outcomes)
    complete = not errors
    verdict = overall(records, uc.requirements) if complete else Verdict.INCONCLUSIVE
    previous = (rerender.fetch_assessment(previous_run_id, uri) if previous_run_id  # else the qualified version
                else rerender.qualified_previous(uc_json, uri))
    prov = Provenance(
        use_case_id=uc.id, use_case_sha256=uc_sha, mlflow_run_id=run.id,
        model_sha256=fp["model_sha256"], model_version=version, data_sha256=data_sha,
        code_version=provenance.code_version(), packages=provenance.packages(), seed=seed,
        parameters={"plan": uc_json["plan"], "data": uc_json["data"]},
        started_at=started, finished_at=datetime.now(UTC),
    )
    assessment = Assessment(use_case=uc_json, requirements=uc.requirements, outcomes=outcomes,
                            evidence=records, provenance=prov, verdict=verdict, complete=complete, errors=errors)
    files = report(assessment, str(out), uc_text, previous)
    run.log_artefacts(out, files)
    if version and complete:  # runtime artefacts (the ODD monitor) are found from the model version
        tracking.link_runtime_artefacts(uc, version, run.artifact_uri, outcomes)
    run.finish(assessment)  # last: the verdict tags, then FINISHED (FAILED when a check failed)
    return Result(verdict=verdict, complete=complete, out_dir=out, run_id=run.id, tracking_uri=uri,
                  files=files, errors=errors, user_error=user_error)

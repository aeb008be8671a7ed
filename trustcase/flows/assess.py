"""The assessment flow: a Prefect DAG of thin tasks over the plan's checks, logged to MLflow, ending in a report.

    fingerprint (model + code hashes) -> data_fingerprint (content hash) -> checks (a task per shard, in plan order)
        -> evidence -> report

Resume keyed on content. The data fingerprint always runs: it streams every item and hashes ids, labels,
metadata and pixels (`data.content.content_hash`). Every check shard is a Prefect task cached on its inputs (use
case, check parameters, shard, seed, model hash, that content hash, and the code: trustcase's sources, the
loader's and the model factory's modules) plus the task's source, so relabelled data or an edited loader is
never served from the cache; the flow treats every check alike, never by its name. Results are JSON (a
`CheckOutcome`, never a pickle) in the project's own store (`.trustcase/cache`, or TRUSTCASE_CACHE), and each
declared artefact is stored there by content hash: a cached outcome is reused only if every artefact it declares
is restored into the run folder with its hash checked, else the check runs again. Confidential use cases are
never cached, and everything they write is redacted (`flows/confidential.py`).

One assessment, one folder: `--out` must be new, empty, or the folder of an earlier assessment of the same use
case (its marker file says so), whose files are removed first; a lock refuses a second concurrent run there.
The pack and MLflow receive exactly the files this run wrote, listed, never globbed.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import tempfile
import traceback
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import lru_cache
from pathlib import Path, PurePath

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE, TASK_SOURCE, Inputs
from prefect.task_runners import ThreadPoolTaskRunner

from trustcase import reports
from trustcase.checks import Check, CheckError, Context, Unsupported, build, check_class
from trustcase.data.content import Content, content_hash
from trustcase.data.streaming import DataSource
from trustcase.errors import UserError
from trustcase.flows import confidential, logs, provenance, rerender, tracking
from trustcase.models.classifier import Classifier, sha256_file
from trustcase.reports.compliance import own_catalogues
from trustcase.schemas import (
    Assessment,
    CheckOutcome,
    CheckSpec,
    Provenance,
    UseCase,
    Verdict,
    parse_use_case,
)
from trustcase.tasks import task_named
from trustcase.tasks.segmentation_tiles import tiled
from trustcase.verdicts import judge, overall

MARKER = ".trustcase-run.json"  # which use case the folder holds, and the files its last run wrote
LOCK = ".trustcase-lock"


class OutputFolderError(UserError):
    """The output folder holds something else (another use case, foreign files) or another run is writing it."""


logs.install()  # a skipped or failed check is one trustcase line in Prefect's log, not a traceback

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
    manifest_sha256: str | None = None  # the pack's anchor: also an MLflow tag, printed by the CLI


def preflight(use_case_path: str | Path, seed: int | None = None) -> UseCase:
    """Every user error we can find before work starts: the one preflight of `trustcase validate`."""
    from trustcase.flows import preflight as pre

    return pre.preflight(use_case_path, seed)


@lru_cache(maxsize=4)
def _classifier(spec_json: str, sha: str, task: str = "classification") -> Classifier:
    from trustcase.schemas import ModelSpec

    return task_named(task).load_model(ModelSpec.model_validate_json(spec_json))  # probed with the task's contract


def cache_root() -> Path:
    """The project's own result store (never the user-wide ~/.prefect/storage)."""
    return Path(os.environ.get("TRUSTCASE_CACHE") or tracking.HOME / "cache").resolve()


def _partner_modules(use_case: UseCase) -> list[str]:
    """The modules of partner code a result depends on: the loader, the model's factory or black box, the
    training contract's script, and every check of the plan that is not trustcase's (registered by a partner's
    package or named `module:Class`)."""
    from trustcase.registry import case_module

    path = use_case.model.path
    model = path if path.is_dir() else path.parent  # a black box's folder (models.blackbox)
    refs = [(use_case.data.loader, use_case.data.path), (use_case.model.factory, None), (use_case.model.entry, model),
            (use_case.training and use_case.training.entry, use_case.data.path)]  # label_issues trains through it
    mods = [case_module(r.partition(":")[0], folder) for r, folder in refs if r and ":" in r]  # as `resolve` names it
    mods += [m for m in (check_class(spec.check).__module__ for spec in use_case.plan.checks)
             if m.partition(".")[0] != "trustcase"]
    return mods


@task(name="fingerprint", persist_result=False)
def fingerprint(use_case: UseCase, seed: int) -> dict:
    """The model's hash (its weights wherever they live), the loaders' cheap data fingerprints (None where a
    loader has none; tags only, never a cache key: they need not cover labels) and the hash of every piece of
    code the results depend on: trustcase's sources and the import closure of the partner's code (hashed after
    the imports, so it is the code that runs). `uncacheable`: why results cannot be keyed (then none is cached)."""
    data = DataSource(use_case.data, seed, use_case.model)
    fps = {role: data.stream(role).fingerprint() for role in data.roles}  # imports the loader
    model_sha = provenance.model_sha256(use_case.model)
    _classifier(use_case.model.model_dump_json(), model_sha, use_case.task)  # imports the model's factory / entry
    try:
        code, uncacheable = [provenance.source_sha256(), *provenance.code_closure(_partner_modules(use_case))], None
    except provenance.Uncacheable as e:
        code, uncacheable = [], str(e)
    code_sha = hashlib.sha256(json.dumps(code).encode()).hexdigest()
    return {"model_sha256": model_sha, "data": fps, "code_sha256": code_sha, "uncacheable": uncacheable}


@task(name="data_fingerprint", persist_result=False)
def data_fingerprint(use_case: UseCase, seed: int) -> Content:
    """The content hash every cached result is keyed on, and the readable items per split (never cached itself:
    it is what tells whether the data changed)."""
    return content_hash(DataSource(use_case.data, seed, use_case.model))


# the key: every input but where files go and the progress label, plus the task's own source
CHECK_CACHE = Inputs(exclude=["store", "salt", "label"]) + TASK_SOURCE


@task(name="check", cache_policy=CHECK_CACHE, result_serializer="json", task_run_name="{label}")
def run_check(use_case: UseCase, spec: CheckSpec, shard: int, seed: int, model_sha256: str, data_sha256: str,
              code_sha256: str, store: str, salt: str | None, label: str) -> str:
    """One check shard, run in a scratch folder; its declared artefacts go to the store by content hash (they
    come back into the run folder from there, cached or not); the outcome comes back as JSON. `salt`: a
    confidential use case, whose outcome and artefacts are redacted before they leave the scratch folder."""
    check: Check = build(spec).shards()[shard]
    root = Path(store)
    scratch = Path(tempfile.mkdtemp(prefix="scratch-", dir=root))
    try:
        data = DataSource(use_case.data, seed, use_case.model)
        model = _classifier(use_case.model.model_dump_json(), model_sha256, use_case.task)
        ctx = Context(use_case=use_case, model=tiled(model, data.tiling()),  # fit: tiles
                      data=data, seed=seed, workdir=scratch / check.name)
        outcome = check(ctx)
        if salt is not None:
            outcome = _redact(outcome, scratch, confidential.redactor(use_case, seed, salt))
        for art in outcome.artefacts:
            _stash(scratch / art.path, art.sha256, root)
    except Exception as e:
        if salt is None:
            raise
        # Prefect stores a failed task's message in its state and its log: a confidential one is redacted first
        raise confidential.redactor(use_case, seed, salt).error(e) from None
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return outcome.model_dump_json()


def _redact(outcome: CheckOutcome, scratch: Path, r: confidential.Redactor) -> CheckOutcome:
    """Ids hashed and paths withheld in the outcome and its text artefacts (rehashed); binary artefacts kept
    (monitors, arrays: the pack and MLflow decide what leaves the run folder)."""
    arts = []
    for art in outcome.artefacts:
        path = scratch / art.path
        if r.file(path):
            art = art.model_copy(update={"sha256": sha256_file(path)})
        arts.append(art)
    d = r.json(outcome.model_dump(mode="json", exclude={"artefacts"}))
    return CheckOutcome.model_validate({**d, "artefacts": [a.model_dump(mode="json") for a in arts]})


def _stash(path: Path, sha: str, store: Path) -> None:
    if sha256_file(path) != sha:
        raise CheckError(f"artefact {path.name} changed after its check declared it")
    dst = store / "artefacts" / sha
    if not dst.is_file():
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.with_name(f"{sha}.{os.getpid()}.part")
        shutil.copyfile(path, tmp)
        tmp.replace(dst)


def _restore(outcome: CheckOutcome, store: Path, out: Path) -> list[str] | None:
    """Copy the outcome's artefacts from the store into out/checks, each hash checked; their paths relative to
    out, or None when one is missing or differs (then the check must run again)."""
    written = []
    for art in outcome.artefacts:
        rel = Path(art.path)
        src = store / "artefacts" / art.sha256
        if rel.is_absolute() or ".." in rel.parts or not src.is_file() or sha256_file(src) != art.sha256:
            return None
        dst = out / "checks" / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)
        written.append(f"checks/{rel.as_posix()}")
    return written


def claim_folder(out: Path, use_case_id: str):
    """One assessment, one folder. Returns the held lock (closed at the end of the run)."""
    if out.exists() and not out.is_dir():
        raise OutputFolderError(f"--out {out} is a file, not a folder: choose a new or empty folder")
    out.mkdir(parents=True, exist_ok=True)
    lock = open(out / LOCK, "w")  # noqa: SIM115  (held for the whole run)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        raise OutputFolderError(f"another assessment is writing into {out}: choose another --out") from None
    marker = out / MARKER
    owner = json.loads(marker.read_text()) if marker.is_file() else None
    if owner is None and any(p.name != LOCK for p in out.iterdir()):
        lock.close()
        raise OutputFolderError(f"{out} is not empty and holds no trustcase assessment: choose a new or empty --out")
    if owner is not None and owner.get("use_case_id") != use_case_id:
        lock.close()
        raise OutputFolderError(f"{out} holds the assessment of use case {owner.get('use_case_id')!r}, not "
                                f"{use_case_id!r}: choose another --out")
    for rel in owner.get("files", []) if owner else []:  # the earlier run's own files, then its folders
        path = (out / rel).resolve()
        if path.is_relative_to(out) and path.is_file():
            path.unlink()
    for sub in ("checks", "plots"):
        shutil.rmtree(out / sub, ignore_errors=True)
    marker.write_text(json.dumps({"use_case_id": use_case_id, "files": []}))
    return lock


@task(name="evidence", persist_result=False)
def evidence(use_case: UseCase, outcomes: list[CheckOutcome]):
    return judge(use_case.requirements, outcomes)


@task(name="report", persist_result=False)
def report(assessment: Assessment, out_dir: str, use_case_text: str,
           previous: Assessment | None = None) -> dict[str, str]:
    """Write the assessment and render the report (compared with `previous` when given)."""
    out = Path(out_dir)
    (out / "assessment.json").write_text(assessment.model_dump_json(indent=1))
    (out / "evidence.json").write_text(json.dumps([e.model_dump(mode="json") for e in assessment.evidence], indent=1))
    (out / "use_case.yaml").write_text(use_case_text, encoding="utf-8")  # exactly the text that was assessed
    return reports.render(assessment, out, previous=previous)


def _labels(check: Check) -> list[str]:
    """Each shard's task name: the check's name and, for a check in several shards, what tells the shard from the
    whole, read from its params generically (the parameters whose value differs: a mapping's keys, a list's items,
    a file by its name), never from a check-specific attribute."""
    shards = check.shards()
    if len(shards) == 1:
        return [check.name]
    whole = check.params.model_dump(mode="json")
    out = []
    for shard in shards:
        own = [v for k, v in shard.params.model_dump(mode="json").items() if v != whole.get(k)]
        parts = [PurePath(x).name if isinstance(x, str) else json.dumps(x, sort_keys=True)
                 for v in own for x in (v if isinstance(v, list | dict) else [v])]
        out.append(f"{check.name}[{','.join(parts)}]" if parts else check.name)
    return out


# the use cases of the flows running in this process, by the handle their flow run receives instead of a path
_WITHHELD: dict[str, tuple[str, str]] = {}


def assess(use_case_path: str, out_dir: str, seed: int | None = None, tracking_uri: str | None = None,
           previous_run_id: str | None = None, task_runner=None) -> Result:
    """The assessment flow (on `task_runner`, default threads). `previous_run_id`: an earlier assessment run
    (e.g. the qualified version's) the report compares with. Prefect records a flow run's parameters (on a
    shared server too): a confidential use case's flow run receives a handle instead of its paths."""
    flow_ = assessment.with_options(task_runner=task_runner) if task_runner is not None else assessment
    try:
        secret = parse_use_case(Path(use_case_path).read_text(encoding="utf-8"),
                                Path(use_case_path).resolve()).confidential
    except Exception:  # noqa: BLE001  (the flow reports what is wrong with the file)
        secret = False
    if not secret:
        return flow_(str(use_case_path), str(out_dir), seed, tracking_uri, previous_run_id)
    handle = f"<confidential use case {uuid.uuid4().hex[:12]}>"
    _WITHHELD[handle] = (str(use_case_path), str(out_dir))
    try:
        return flow_(handle, confidential.PATH, seed, tracking_uri, previous_run_id)
    finally:
        _WITHHELD.pop(handle, None)


@flow(name="trustcase-assess", task_runner=ThreadPoolTaskRunner(max_workers=1))
def assessment(use_case_path: str, out_dir: str, seed: int | None = None, tracking_uri: str | None = None,
               previous_run_id: str | None = None) -> Result:
    use_case_path, out_dir = _WITHHELD.get(use_case_path, (use_case_path, out_dir))
    # read once: the file may change while the assessment runs, the record must not
    uc_text = Path(use_case_path).read_text(encoding="utf-8")
    uc = parse_use_case(uc_text, Path(use_case_path).resolve())
    seed = uc.plan.seed if seed is None else seed
    salt = confidential.salt(tracking.HOME) if uc.confidential else None
    paths = confidential.Redactor(set(), salt, confidential.data_paths(uc, use_case_path)) if salt else None
    try:
        return _claimed(uc, uc_text, seed, Path(out_dir).resolve(), tracking_uri, previous_run_id, salt, paths)
    except Exception as e:
        if paths is None:
            raise
        # the flow run's state in Prefect holds the error's message: a confidential one is redacted first
        raise confidential.redactor(uc, seed, salt, use_case_path).error(e) from None


def _claimed(uc: UseCase, uc_text: str, seed: int, out: Path, tracking_uri: str | None, previous_run_id: str | None,
             salt: str | None, paths: confidential.Redactor | None) -> Result:
    lock = claim_folder(out, uc.id)
    try:
        started = datetime.now(UTC)
        uri = tracking.configure(tracking_uri)
        uc_json = uc.model_dump(mode="json")
        params = tracking.flatten("", {"seed": seed, "plan": paths.json(uc_json["plan"]) if paths else uc_json["plan"]},
                                  {})  # MLflow params: no data path
        run = tracking.AssessmentRun(uc, {"code_version": provenance.code_version(),
                                          "confidentiality": uc.confidentiality.value}, params)
        try:  # the run is RUNNING from here; whatever cuts the assessment short leaves it without a verdict
            return _assess(run, uc, uc_text, uc_json, seed, out, uri, started, previous_run_id, salt,
                           set(paths.paths) if paths else set())
        except BaseException as e:
            run.abandon(e)  # FAILED (KILLED on SIGTERM / Ctrl-C)
            raise
    finally:
        lock.close()


def _assess(run: tracking.AssessmentRun, uc: UseCase, uc_text: str, uc_json: dict, seed: int, out: Path,
            uri: str, started: datetime, previous_run_id: str | None, salt: str | None, paths: set[str]) -> Result:
    fp = fingerprint(uc, seed)
    version = tracking.model_version(uc, fp["model_sha256"])
    run.tag({"model_sha256": fp["model_sha256"], "model_version": version or "unregistered",
             **{f"data_fingerprint.{role}": v for role, v in fp["data"].items() if v}})

    red = (confidential.Redactor(confidential.item_ids(DataSource(uc.data, seed, uc.model)), salt, paths) if salt
           else None)
    if fp["uncacheable"]:  # said where the user looks: the run's tags and Prefect's log
        run.tag({"cache": f"off: {fp['uncacheable']}"})
        get_run_logger().warning(f"results are not cached: {fp['uncacheable']}")
    with _results(keyed=red is None and not fp["uncacheable"]) as (store, cached):
        return _checks_and_report(run, uc, uc_text, uc_json, seed, out, uri, started, previous_run_id, salt, red,
                                  fp, version, store, cached)


@contextmanager
def _results(keyed: bool):
    """Where check results and artefacts go, and the check task that stores them: the project's cache, or for a
    confidential use case (or results that cannot be keyed) nothing cached and a private folder removed at the
    end."""
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    if keyed:
        yield root, run_check.with_options(result_storage=root / "results")
        return
    store = Path(tempfile.mkdtemp(prefix="uncached-", dir=root))
    try:
        yield store, run_check.with_options(cache_policy=NO_CACHE, persist_result=False)
    finally:
        shutil.rmtree(store, ignore_errors=True)


def _checks_and_report(run: tracking.AssessmentRun, uc: UseCase, uc_text: str, uc_json: dict, seed: int, out: Path,
                       uri: str, started: datetime, previous_run_id: str | None, salt: str | None,
                       red: confidential.Redactor | None, fp: dict, version: str | None, store: Path,
                       cached) -> Result:
    uc_sha = provenance.canonical_sha256(uc_json)
    specs = [build(spec) for spec in uc.plan.checks]
    outcomes: list[CheckOutcome] = []
    errors: list[str] = []
    written: list[str] = []  # what this run wrote into the folder: exactly what the pack and MLflow receive
    user_error = False

    total = sum(len(check.shards()) for check in specs)

    def settle(value, args: tuple):
        """A finished shard: its outcome once its artefacts are back in the run folder, hashes checked; a
        cached outcome whose artefacts are gone from the store runs again."""
        for attempt in range(2):
            if not isinstance(value, str):
                return value
            outcome = CheckOutcome.model_validate_json(value)
            files = _restore(outcome, store, out)
            if files is not None:
                written.extend(files)
                return outcome
            if attempt == 0:
                value = cached.with_options(refresh_cache=True).submit(*args).result(raise_on_failure=False)
        return CheckError(f"{args[-1]}: its artefacts could not be stored and restored")

    def collect(futures, labels, names, calls):
        nonlocal user_error
        for f, label, name, args in zip(futures, labels, names, calls, strict=True):
            value = settle(f.result(raise_on_failure=False), args)
            _progress(label, len(outcomes) + len(errors) + 1, total)
            if isinstance(value, Unsupported):  # e.g. gradients of a black box: skipped, with the reason
                outcomes.append(CheckOutcome(check=name, skipped=str(value)))
            elif isinstance(value, BaseException):
                user_error |= isinstance(value, UserError)
                errors.append(f"{label}: {confidential.kind(value)}: {value}")
                if not isinstance(value, UserError):
                    errors[-1] += "\n" + "".join(traceback.format_exception(value)[-3:])
            else:
                outcomes.append(value)
                run.log_outcome(value)  # live in the MLflow run as each check finishes (in plan order)

    def call(spec: CheckSpec, shard: int, label: str) -> tuple:
        """run_check's arguments, in order (kept: a shard whose artefacts are gone is submitted again)."""
        return uc, spec, shard, seed, fp["model_sha256"], data.sha256, fp["code_sha256"], str(store), salt, label

    # the content hash of ids, labels and pixels keys every check
    data = data_fingerprint(uc, seed)
    run.tag({"data_sha256": data.sha256})

    calls, labels, names = [], [], []
    for spec, check in zip(uc.plan.checks, specs, strict=True):
        for i, label in enumerate(_labels(check)):
            calls.append(call(spec, i, label))
            labels.append(label)
            names.append(check.name)
    collect([cached.submit(*c) for c in calls], labels, names, calls)

    records = evidence(uc, outcomes)
    complete = not errors
    verdict = overall(records, uc.requirements) if complete else Verdict.INCONCLUSIVE
    previous = (rerender.fetch_assessment(previous_run_id, uri) if previous_run_id  # else the qualified version
                else rerender.qualified_previous(uc_json, uri))
    prov = Provenance(
        use_case_id=uc.id, use_case_sha256=uc_sha, mlflow_run_id=run.id,
        model_sha256=fp["model_sha256"], model_version=version, data_sha256=data.sha256, data_items=data.items,
        code_version=provenance.code_version(), packages=provenance.packages(), platform=provenance.platform(),
        seed=seed,
        parameters={"plan": uc_json["plan"], "data": uc_json["data"]},
        started_at=started, finished_at=datetime.now(UTC),
    )
    assessment = Assessment(use_case=uc_json, requirements=uc.requirements, outcomes=outcomes,
                            evidence=records, provenance=prov, verdict=verdict, complete=complete, errors=errors,
                            catalogues=own_catalogues(uc))
    if red:  # the record itself: paths in the use case, ids in errors and limitations
        assessment = Assessment.model_validate(red.json(assessment.model_dump(mode="json")))
        uc_text, errors = red.text(uc_text), assessment.errors  # the CLI prints the errors too
    files = report(assessment, str(out), uc_text, previous)
    written += ["assessment.json", "evidence.json", "use_case.yaml"]
    written += [Path(p).relative_to(out).as_posix() for k, p in files.items() if k != "plots"]
    if (out / "plots").is_dir():  # render empties plots/ first: every file there is this render's
        written += sorted(p.relative_to(out).as_posix() for p in (out / "plots").rglob("*") if p.is_file())
    (out / MARKER).write_text(json.dumps({"use_case_id": uc.id, "run_id": run.id, "files": written}, indent=1))
    digest = reports.pack_digest(Path(files["pack"]))
    run.tag({"pack.manifest_sha256": digest})
    run.log_artefacts(out, [p for p in written if not (red and reports.withheld(p, assessment))])
    if version and complete and not red:  # runtime artefacts (the ODD monitor) are found from the model version
        tracking.link_runtime_artefacts(uc, version, run.artifact_uri, outcomes)
    run.finish(assessment)  # last: the verdict tags, then FINISHED (FAILED when a check failed)
    return Result(verdict=verdict, complete=complete, out_dir=out, run_id=run.id, tracking_uri=uri,
                  files=files, errors=errors, user_error=user_error, manifest_sha256=digest)

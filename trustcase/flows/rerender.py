"""Re-render a report, or rebuild an evidence pack, from what an MLflow run holds: the record is self-sufficient."""

from __future__ import annotations

import tempfile
import zipfile
from pathlib import Path

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from pydantic import ValidationError

from trustcase import reports
from trustcase.errors import UserError, validation_message
from trustcase.flows import tracking
from trustcase.schemas import Assessment

# written by the report itself: re-rendering replaces them, so they are not fetched
RENDERED = {"report.html", "report.pdf", "pack.zip", "argument.json", "argument.gsn.yaml", "plots"}


class RunNotFound(UserError):
    pass


class RecordMismatch(UserError):
    """The run's assessment record contradicts the run's own tags (its verdict, its pack's digest): it was changed
    after the assessment, and is not rendered."""


def _client(run_id: str, tracking_uri: str | None) -> MlflowClient:
    tracking.configure(tracking_uri)
    client = MlflowClient()
    try:
        client.get_run(run_id)
    except MlflowException:
        raise RunNotFound(f"no MLflow run {run_id!r} in {tracking.mlflow.get_tracking_uri()}") from None
    return client


def _assessment(client: MlflowClient, run_id: str, folder: Path) -> Assessment:
    try:
        local = client.download_artifacts(run_id, "assessment.json", str(folder))
    except (MlflowException, OSError):
        raise RunNotFound(f"run {run_id} holds no assessment.json: it is not a trustcase assessment") from None
    raw = Path(local).read_bytes()
    try:
        return Assessment.model_validate_json(raw)
    except ValidationError as e:
        raise RecordMismatch(f"run {run_id}: its assessment.json is not an assessment record "
                             f"({validation_message(e, 'record', limit=1)})") from None


def check_record(client: MlflowClient, run_id: str, raw: bytes, a: Assessment) -> None:
    """The record must be the one the run was tagged with at its end: the `verdict` tag, and the pack the
    `pack.manifest_sha256` tag anchors (the same assessment.json; a confidential run's pack never reaches
    MLflow: its verdict tag alone). Else `RecordMismatch`, naming each contradiction."""
    tags = client.get_run(run_id).data.tags
    problems = []
    if "verdict" in tags and tags["verdict"] != a.verdict.value:
        problems.append(f"the record states verdict {a.verdict.value}, the run's verdict tag {tags['verdict']}")
    if a.provenance.mlflow_run_id not in (None, run_id):
        problems.append(f"the record is that of run {a.provenance.mlflow_run_id}")
    digest = tags.get("pack.manifest_sha256")
    if digest and not a.use_case.get("confidentiality") == "confidential":  # a confidential pack stays on site
        with tempfile.TemporaryDirectory() as tmp:
            try:
                pack = Path(client.download_artifacts(run_id, "pack.zip", tmp))
            except (MlflowException, OSError):
                pack = None
                problems.append("the pack its pack.manifest_sha256 tag anchors is missing")
            if pack is not None:
                v = reports.verify_pack(pack, reports.Anchor(source="the run's pack.manifest_sha256 tag",
                                                             manifest_sha256=digest))
                if not v.ok:
                    problems.append("its pack fails verification (" + "; ".join(v.lines()[:3]) + ")")
                else:
                    with zipfile.ZipFile(pack) as z:
                        packed = z.read("assessment.json")
                    if packed != raw:
                        problems.append("the record differs from the one in the pack the run's digest tag anchors")
    if problems:
        raise RecordMismatch(f"run {run_id}: its assessment.json contradicts the run ({'; '.join(problems)}): it "
                             "was changed after the assessment; not rendered")


def fetch_assessment(run_id: str, tracking_uri: str | None = None) -> Assessment:
    client = _client(run_id, tracking_uri)
    with tempfile.TemporaryDirectory() as tmp:
        return _assessment(client, run_id, Path(tmp))


def qualified_previous(use_case: dict, tracking_uri: str | None = None, exclude_run_id: str | None = None
                       ) -> Assessment | None:
    """The assessment of the use case's qualified registered version (the registry's `qualified` alias), the
    default comparison of a report; None when there is none, or it is the run itself, or it cannot be read."""
    tracking.configure(tracking_uri)
    name = (use_case.get("model") or {}).get("registered_name") or use_case.get("id", "")
    found = tracking.qualified_run(name) if name else None
    if found is None or found[1] == exclude_run_id:
        return None
    try:
        return fetch_assessment(found[1], tracking_uri)
    except RunNotFound:
        return None


def fetch_run(run_id: str, folder: Path, tracking_uri: str | None = None, skip: set[str] = frozenset()) -> Assessment:
    """Download every artefact of the run (but the top-level names in `skip`) into folder; the assessment."""
    client = _client(run_id, tracking_uri)
    folder.mkdir(parents=True, exist_ok=True)
    a = _assessment(client, run_id, folder)
    check_record(client, run_id, (folder / "assessment.json").read_bytes(), a)
    for item in client.list_artifacts(run_id):
        if item.path not in skip and item.path != "assessment.json":
            client.download_artifacts(run_id, item.path, str(folder))
    return a


def rerender(run_id: str, out_dir: Path, tracking_uri: str | None = None,
             previous_run_id: str | None = None) -> dict[str, str]:
    """The run's report rendered afresh (with every check artefact, so the pack is whole), compared with the
    assessment of `previous_run_id`, by default with that of the qualified registered version."""
    out_dir = Path(out_dir)
    assessment = fetch_run(run_id, out_dir, tracking_uri, skip=RENDERED)
    previous = (fetch_assessment(previous_run_id, tracking_uri) if previous_run_id
                else qualified_previous(assessment.use_case, tracking_uri, exclude_run_id=run_id))
    return reports.render(assessment, out_dir, previous=previous)


def pack_run(run_id: str, out: Path, tracking_uri: str | None = None) -> tuple[Path, dict]:
    """The evidence pack rebuilt from the run's artefacts as logged (the report as it was rendered then);
    a run logged without a report gets one rendered now."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        assessment = fetch_run(run_id, folder, tracking_uri, skip={"pack.zip"})
        if not (folder / "report.html").is_file():
            reports.render(assessment, folder)
        return reports.build_pack(folder, assessment, Path(out))


def verify(pack_path: Path, run_id: str | None = None, digest: str | None = None, public_key: Path | None = None,
           tracking_uri: str | None = None) -> reports.Verification:
    """Re-hash a pack against its manifest and cross-check its records (raises reports.PackError when it is not a
    readable pack); anchored by the MLflow run's digest tag, a recorded digest and/or a public key when given."""
    anchor = None
    if run_id:
        run = _client(run_id, tracking_uri).get_run(run_id)
        tags = run.data.tags
        if "pack.manifest_sha256" not in tags:
            raise RunNotFound(f"run {run_id} holds no pack digest (tag pack.manifest_sha256): it cannot anchor a pack")
        anchor = reports.Anchor(source=f"MLflow run {run_id}", manifest_sha256=tags["pack.manifest_sha256"],
                                run={"run_id": run_id, **{k: tags[k] for k in ("verdict", "model_sha256",
                                                                                "data_sha256") if k in tags}})
    if digest:
        d = digest.strip().lower()
        if anchor and anchor.manifest_sha256 != d:
            raise reports.PackError(f"--digest {d} and the digest of run {run_id} differ: which one is right?")
        anchor = anchor or reports.Anchor(source="the recorded digest", manifest_sha256=d)
    if public_key:
        try:
            pem = Path(public_key).read_bytes()
        except OSError as e:
            raise reports.PackError(f"--public-key {public_key}: {e.strerror}") from None
        if anchor:
            anchor.public_key_pem, anchor.source = pem, f"{anchor.source} and the key {public_key}"
        else:
            anchor = reports.Anchor(source=f"the key {public_key}", public_key_pem=pem)
    return reports.verify_pack(Path(pack_path), anchor)

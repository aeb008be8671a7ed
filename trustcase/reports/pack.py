"""The evidence pack: one zip to archive and check years later, with a manifest of SHA-256 digests.

Contents: the report (HTML, PDF), the argument (JSON, gsn2x YAML), every evidence record
(assessment.json, evidence.json), the plots and diagrams, the use-case file, the check artefacts,
environment.json (package and code versions), provenance.json (model, data and use-case hashes, MLflow
run id, seed), MANIFEST.json (path, size and SHA-256 of every other file) and MANIFEST.sha256 (the digest
of the manifest itself, so that a change to the manifest is caught too).

Confidential use cases: no image files at all (charts and diagrams are inside the report), no check
artefact that could hold inputs, attribution maps or weights (kinds image/attribution/input/model/weights,
image, array and weight file types), and data item identifiers hashed in every record (keys named
`id(s)`, `item(s)`, `*_id(s)`, `unreadable`, ...). The manifest lists what was withheld and why.

The zip is deterministic: sorted entries, fixed timestamps, so the same run gives the same bytes.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from trustcase.schemas import Assessment

FORMAT = "trustcase-pack/1"
MANIFEST = "MANIFEST.json"
MANIFEST_DIGEST = "MANIFEST.sha256"
TOP_FILES = ["report.html", "report.pdf", "argument.json", "argument.gsn.yaml", "assessment.json", "evidence.json",
             "use_case.yaml"]
FOLDERS = ["plots", "checks"]
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".gif", ".bmp", ".tif", ".tiff", ".webp", ".svg", ".ppm", ".pgm", ".pbm",
                  ".ico", ".eps"}
SENSITIVE_SUFFIXES = {".npy", ".npz", ".pt", ".pth", ".onnx", ".safetensors", ".ckpt", ".pkl", ".pickle", ".bin",
                      ".h5", ".hdf5", ".tar", ".zip"}
SENSITIVE_KINDS = {"image", "attribution", "input", "inputs", "model", "weights", "saliency"}
ID_KEY = re.compile(r"^(ids?|items?|item_ids?|\w+_ids?|unreadable|examples?|worst(_\w+)?|files?|paths?)$", re.I)
HASHED = re.compile(r"^item-[0-9a-f]{16}$")
ZIP_TIME = (1980, 1, 1, 0, 0, 0)


class PackError(Exception):
    """The pack cannot be built or read (not a zip, no manifest): a user-facing message."""


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --- confidentiality ---------------------------------------------------------------------------------------------

def hash_id(item: str, salt: str) -> str:
    if HASHED.match(item):
        return item
    return "item-" + sha256_bytes(f"{salt}:{item}".encode())[:16]


def _redact(obj: Any, salt: str, under_id_key: bool = False) -> Any:
    if isinstance(obj, dict):
        return {k: _redact(v, salt, under_id_key or bool(ID_KEY.match(str(k)))) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_redact(v, salt, under_id_key) for v in obj]
    if under_id_key and isinstance(obj, str):
        return hash_id(obj, salt)
    return obj


def redact(a: Assessment) -> Assessment:
    """The assessment with data item identifiers hashed (salted with the data hash, so the owner, who holds the
    data, can still find an item: item-<first 16 hex of sha256('<data sha256>:<id>')>)."""
    salt = a.provenance.data_sha256
    d = a.model_dump(mode="json")
    for o in d["outcomes"]:
        o["summary"] = _redact(o["summary"], salt)
        for m in o["measurements"]:
            m["details"] = _redact(m["details"], salt)
    for e in d["evidence"]:
        e["details"] = _redact(e["details"], salt)
    return Assessment.model_validate(d)


def confidential(a: Assessment) -> bool:
    return a.use_case.get("confidentiality") == "confidential"


def _redact_file(path: Path, data: bytes, salt: str) -> bytes:
    """JSON and CSV check artefacts: identifiers hashed the same way as in the records."""
    if path.suffix == ".json":
        try:
            return json.dumps(_redact(json.loads(data), salt), indent=1, sort_keys=True).encode()
        except ValueError:
            return data
    if path.suffix == ".csv":
        rows = list(csv.reader(io.StringIO(data.decode(errors="replace"))))
        if not rows:
            return data
        cols = [i for i, h in enumerate(rows[0]) if ID_KEY.match(h.strip())]
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(rows[0])
        for r in rows[1:]:
            w.writerow([hash_id(v, salt) if i in cols else v for i, v in enumerate(r)])
        return buf.getvalue().encode()
    return data


# --- building ----------------------------------------------------------------------------------------------------

def _environment(a: Assessment) -> dict[str, Any]:
    p = a.provenance
    return {"code_version": p.code_version, "packages": p.packages}


def _provenance(a: Assessment) -> dict[str, Any]:
    p = a.provenance.model_dump(mode="json")
    p.pop("packages", None)
    p.pop("parameters", None)
    return {**p, "verdict": a.verdict.value, "complete": a.complete, "schema_version": a.schema_version}


def collect(folder: Path, a: Assessment) -> tuple[dict[str, bytes], list[dict[str, str]]]:
    """The files of a pack, as {path in the pack: bytes}, and what was withheld (with the reason)."""
    folder = Path(folder)
    secret = confidential(a)
    salt = a.provenance.data_sha256
    kinds = {}
    for o in a.outcomes:
        for art in o.artefacts:
            kinds[art.path] = art.kind
            kinds[f"checks/{art.path}"] = art.kind
    files: dict[str, bytes] = {}
    withheld: list[dict[str, str]] = []
    paths = [folder / n for n in TOP_FILES if (folder / n).is_file()]
    for sub in FOLDERS:
        if (folder / sub).is_dir():
            paths += sorted(p for p in (folder / sub).rglob("*") if p.is_file())
    for path in paths:
        rel = path.relative_to(folder).as_posix()
        if rel in (MANIFEST, MANIFEST_DIGEST):
            continue
        suffix = path.suffix.lower()
        if secret:
            reason = None
            if suffix in IMAGE_SUFFIXES:
                reason = "image file (confidential use case: no images in the pack; charts are in the report)"
            elif suffix in SENSITIVE_SUFFIXES:
                reason = "array, weights or archive file (confidential: could hold inputs, attributions or weights)"
            elif kinds.get(rel, "").lower() in SENSITIVE_KINDS:
                reason = f"artefact of kind {kinds[rel]!r} (confidential use case)"
            if reason:
                withheld.append({"path": rel, "reason": reason})
                continue
        data = path.read_bytes()
        if secret and rel in ("assessment.json", "evidence.json"):
            continue  # rewritten from the redacted record below
        if secret and rel.startswith("checks/"):
            data = _redact_file(path, data, salt)
        files[rel] = data
    if secret:
        r = redact(a)
        files["assessment.json"] = r.model_dump_json(indent=1).encode()
        files["evidence.json"] = json.dumps([e.model_dump(mode="json") for e in r.evidence], indent=1).encode()
    else:
        files.setdefault("assessment.json", a.model_dump_json(indent=1).encode())
        files.setdefault("evidence.json", json.dumps([e.model_dump(mode="json") for e in a.evidence],
                                                     indent=1).encode())
    # rendered straight from a record (no flow folder): the use case as the record holds it
    files.setdefault("use_case.yaml", yaml.safe_dump(a.use_case, sort_keys=False).encode())
    files["environment.json"] = json.dumps(_environment(a), indent=1, sort_keys=True).encode()
    files["provenance.json"] = json.dumps(_provenance(a), indent=1, sort_keys=True).encode()
    return files, withheld


def manifest(files: dict[str, bytes], a: Assessment, withheld: list[dict[str, str]]) -> dict[str, Any]:
    p = a.provenance
    return {
        "format": FORMAT,
        "use_case_id": p.use_case_id,
        "mlflow_run_id": p.mlflow_run_id,
        "verdict": a.verdict.value,
        "complete": a.complete,
        "model_sha256": p.model_sha256,
        "data_sha256": p.data_sha256,
        "use_case_sha256": p.use_case_sha256,
        "code_version": p.code_version,
        "assessed_at": p.finished_at.isoformat() if p.finished_at else None,
        "confidential": confidential(a),
        "withheld": withheld,
        "files": [{"path": k, "bytes": len(v), "sha256": sha256_bytes(v)} for k, v in sorted(files.items())],
    }


def _write(zf: zipfile.ZipFile, name: str, data: bytes) -> None:
    info = zipfile.ZipInfo(name, date_time=ZIP_TIME)
    info.compress_type = zipfile.ZIP_DEFLATED
    info.external_attr = 0o644 << 16
    zf.writestr(info, data)


def build(folder: Path, a: Assessment, out: Path) -> tuple[Path, dict[str, Any]]:
    """Write the pack of the assessment whose files are in `folder`; returns its path and its manifest."""
    files, withheld = collect(folder, a)
    m = manifest(files, a, withheld)
    body = json.dumps(m, indent=1, sort_keys=True).encode()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".part")
    with zipfile.ZipFile(tmp, "w") as zf:
        _write(zf, MANIFEST, body)
        _write(zf, MANIFEST_DIGEST, f"{sha256_bytes(body)}  {MANIFEST}\n".encode())
        for name in sorted(files):
            _write(zf, name, files[name])
    tmp.replace(out)
    m["manifest_sha256"] = sha256_bytes(body)
    return out, m


# --- verifying ---------------------------------------------------------------------------------------------------

@dataclass
class Verification:
    pack: str
    changed: list[str] = field(default_factory=list)
    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    checked: int = 0
    manifest: dict[str, Any] = field(default_factory=dict)
    manifest_sha256: str | None = None

    @property
    def ok(self) -> bool:
        return not (self.changed or self.added or self.removed or self.problems)

    def lines(self) -> list[str]:
        out = [f"CHANGED  {p}" for p in self.changed] + [f"ADDED    {p}" for p in self.added]
        out += [f"REMOVED  {p}" for p in self.removed] + [f"PROBLEM  {p}" for p in self.problems]
        return out


def verify(pack: Path) -> Verification:
    """Re-hash every file of the pack against its manifest; name every changed, added or removed file."""
    pack = Path(pack)
    v = Verification(pack=str(pack))
    if not pack.is_file():
        raise PackError(f"{pack}: no such file")
    try:
        zf = zipfile.ZipFile(pack)
    except (zipfile.BadZipFile, OSError) as e:
        raise PackError(f"{pack} is not a readable zip archive ({e}): it is damaged or not an evidence pack") from None
    with zf:
        names = [i.filename for i in zf.infolist() if not i.is_dir()]
        dupes = sorted({n for n in names if names.count(n) > 1})
        v.problems += [f"{n}: present more than once in the archive" for n in dupes]
        contents: dict[str, bytes | None] = {}
        for n in dict.fromkeys(names):
            try:
                contents[n] = zf.read(n)
            except (zipfile.BadZipFile, zlib.error, OSError, ValueError, EOFError) as e:  # CRC error, damaged data
                contents[n] = None
                v.problems.append(f"{n}: unreadable in the archive ({e})")
    body = contents.pop(MANIFEST, None)
    digest = contents.pop(MANIFEST_DIGEST, None)
    if body is None:
        v.problems.append(f"{MANIFEST} is missing or unreadable: nothing to verify against")
        v.added = sorted(contents)
        return v
    v.manifest_sha256 = sha256_bytes(body)
    if digest is None:
        v.removed.append(MANIFEST_DIGEST)
    elif digest.decode(errors="replace").split()[:1] != [v.manifest_sha256]:
        v.changed.append(MANIFEST)
        v.problems.append(f"{MANIFEST} does not match the digest in {MANIFEST_DIGEST}: one of them was altered")
    try:
        m = json.loads(body)
        entries = {f["path"]: f["sha256"] for f in m["files"]}
        v.manifest = m
    except (ValueError, KeyError, TypeError) as e:
        v.problems.append(f"{MANIFEST} is not a valid manifest ({e})")
        return v
    for path, sha in sorted(entries.items()):
        data = contents.get(path)
        if path not in contents:
            v.removed.append(path)
        elif data is None:
            v.changed.append(path)
        elif sha256_bytes(data) != sha:
            v.changed.append(path)
        v.checked += 1
    v.added = sorted(set(contents) - set(entries))
    return v

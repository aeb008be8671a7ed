"""The evidence pack: one zip to archive and check years later, with a manifest of SHA-256 digests.

Contents: the report (HTML, PDF), the argument (JSON, gsn2x YAML), every evidence record
(assessment.json, evidence.json), the plots and diagrams, the use-case file, the check artefacts the
record declares (listed from the record, never globbed from the folder), environment.json (package and
code versions), provenance.json (model, data and use-case hashes, MLflow run id, seed), MANIFEST.json
(path, size and SHA-256 of every other file), MANIFEST.sha256 (the digest of the manifest itself, so that
a change to the manifest is caught too) and, when the assessing site has a key (TRUSTCASE_SIGNING_KEY:
an Ed25519 private key in PEM), MANIFEST.sig (its signature of the manifest).

A pack is only as trustworthy as its anchor: whoever rewrites a file can rewrite the manifest and its
digest too. `verify` therefore (1) re-hashes every entry, streamed with a size limit; (2) cross-checks every
record that states a verdict, a run id or a hash (manifest, provenance.json, assessment.json, evidence.json,
the declared artefacts); (3) checks the manifest digest against an anchor held outside the pack: the
MLflow run's `pack.manifest_sha256` tag (`--run`), a digest recorded at assessment time (`--digest`,
printed by `assess`) or the site's public key (`--public-key`). Without an anchor the pack is at best
"internally consistent, not anchored".

Confidential use cases: no image files at all (charts and diagrams are inside the report), no check
artefact that could hold inputs, attribution maps or weights (kinds image/attribution/input/model/weights,
image, array and weight file types), and data item identifiers as the site hashed them with its secret salt;
any other value under an identifier key (`id(s)`, `item(s)`, `*_id(s)`, `unreadable`, ...) is withheld, never
hashed here (a hash with a public salt can be tested by whoever guesses an id). The manifest lists what was
withheld and why.

The zip is deterministic: sorted entries, fixed timestamps, so the same run gives the same bytes.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import json
import os
import re
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from trustcase.errors import UserError, validation_message
from trustcase.reports import compliance, tea
from trustcase.schemas import Assessment

FORMAT = "trustcase-pack/1"
MANIFEST = "MANIFEST.json"
MANIFEST_DIGEST = "MANIFEST.sha256"
SIGNATURE = "MANIFEST.sig"
SIGNING_KEY_ENV = "TRUSTCASE_SIGNING_KEY"
RECORDS = ("provenance.json", "assessment.json", "evidence.json")
MAX_ENTRY_BYTES = 1 << 30  # an entry the manifest does not bound is read up to this size
MAX_RECORD_BYTES = 64 << 20  # a record (parsed in memory) is at most this: a forged manifest cannot raise it
SYMLINK = 0o120000  # the file type of a symbolic link in a zip entry's Unix mode
CHUNK = 1 << 20
TOP_FILES = ["report.html", "report.pdf", "argument.json", "argument.gsn.yaml", "assessment.json", "evidence.json",
             "use_case.yaml", *compliance.FILES, *tea.FILES.values()]
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".gif", ".bmp", ".tif", ".tiff", ".webp", ".svg", ".ppm", ".pgm", ".pbm",
                  ".ico", ".eps"}
SENSITIVE_SUFFIXES = {".npy", ".npz", ".pt", ".pth", ".onnx", ".safetensors", ".ckpt", ".pkl", ".pickle", ".bin",
                      ".h5", ".hdf5", ".tar", ".zip"}
SENSITIVE_KINDS = {"image", "attribution", "input", "inputs", "model", "weights", "saliency"}
ID_KEY = re.compile(r"^(ids?|items?|item_ids?|\w+_ids?|unreadable|examples?|worst(_\w+)?|files?|paths?|members)$",
                    re.I)
HASHED = re.compile(r"^item-[0-9a-f]{16}$")
WITHHELD_ID = "<id withheld>"
ZIP_TIME = (1980, 1, 1, 0, 0, 0)


class PackError(UserError):
    """The pack cannot be built or read (not a zip, no manifest): a user-facing message."""


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --- confidentiality ---------------------------------------------------------------------------------------------

def withhold_id(item: str) -> str:
    """An identifier as a pack may show it: already hashed by the assessing site (with its secret salt, in
    `flows/confidential.py`, the one place ids are hashed), or withheld. Never hashed here: the pack knows no
    secret, and an id hashed with anything public can be tested by whoever guesses it."""
    return item if HASHED.match(item) or (item.startswith("<") and item.endswith(">")) else WITHHELD_ID


def _redact(obj: Any, under_id_key: bool = False) -> Any:
    if isinstance(obj, dict):
        return {k: _redact(v, under_id_key or bool(ID_KEY.match(str(k)))) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_redact(v, under_id_key) for v in obj]
    if under_id_key and isinstance(obj, str):
        return withhold_id(obj)
    return obj


def redact(a: Assessment) -> Assessment:
    """The assessment with every data item identifier the site has not hashed withheld (a safety net: the flow
    hashes them all before anything is written)."""
    d = a.model_dump(mode="json")
    for o in d["outcomes"]:
        o["summary"] = _redact(o["summary"])
        for m in o["measurements"]:
            m["details"] = _redact(m["details"])
    for e in d["evidence"]:
        e["details"] = _redact(e["details"])
    return Assessment.model_validate(d)


def confidential(a: Assessment) -> bool:
    return a.use_case.get("confidentiality") == "confidential"


def _redact_file(path: Path, data: bytes) -> bytes:
    """JSON and CSV check artefacts: identifiers hashed the same way as in the records (the bytes unchanged
    when there was nothing to hash: a file the flow already redacted keeps its declared hash)."""
    if path.suffix == ".json":
        try:
            obj = json.loads(data)
            red = _redact(obj)
            return data if red == obj else json.dumps(red, indent=1, sort_keys=True).encode()
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
            w.writerow([withhold_id(v) if i in cols else v for i, v in enumerate(r)])
        changed = any(withhold_id(v) != v for r in rows[1:] for i, v in enumerate(r) if i in cols)
        return buf.getvalue().encode() if changed else data
    return data


def withheld(rel: str, a: Assessment) -> str | None:
    """Why a file of a confidential assessment must not leave the run folder (pack, MLflow), else None."""
    if not confidential(a):
        return None
    kinds = {f"checks/{art.path}": art.kind for o in a.outcomes for art in o.artefacts}
    suffix = Path(rel).suffix.lower()
    if suffix in IMAGE_SUFFIXES:
        return "image file (confidential use case: no images in the pack; charts are in the report)"
    if suffix in SENSITIVE_SUFFIXES:
        return "array, weights or archive file (confidential: could hold inputs, attributions or weights)"
    if kinds.get(rel, "").lower() in SENSITIVE_KINDS:
        return f"artefact of kind {kinds[rel]!r} (confidential use case)"
    return None


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
    files: dict[str, bytes] = {}
    withheld_files: list[dict[str, str]] = []
    redacted: list[str] = []  # check artefacts whose ids the pack hashed: they differ from their declared hash
    paths = [folder / n for n in TOP_FILES if (folder / n).is_file()]
    if (folder / "plots").is_dir():  # written by this render (it empties the folder first)
        paths += sorted(p for p in (folder / "plots").rglob("*") if p.is_file())
    # the check artefacts the record declares, and nothing else that happens to lie in checks/
    declared = sorted({art.path for o in a.outcomes for art in o.artefacts})
    paths += [folder / "checks" / p for p in declared if not Path(p).is_absolute() and ".." not in Path(p).parts]
    for path in paths:
        rel = path.relative_to(folder).as_posix()
        reason = withheld(rel, a)
        if reason:  # even when absent (a confidential run's monitor never reaches MLflow, so a re-pack lacks it)
            withheld_files.append({"path": rel, "reason": reason})
            continue
        if not path.is_file():  # declared but missing: `verify` names it
            continue
        data = path.read_bytes()
        if secret and rel in ("assessment.json", "evidence.json"):
            continue  # rewritten from the redacted record below
        if secret and rel.startswith("checks/"):
            red = _redact_file(path, data)
            if red != data:
                redacted.append(rel)
            data = red
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
    return files, withheld_files + [{"path": p, "reason": "redacted"} for p in redacted]


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
        "withheld": [w for w in withheld if w["reason"] != "redacted"],
        "redacted": sorted(w["path"] for w in withheld if w["reason"] == "redacted"),
        "files": [{"path": k, "bytes": len(v), "sha256": sha256_bytes(v)} for k, v in sorted(files.items())],
    }


def _write(zf: zipfile.ZipFile, name: str, data: bytes) -> None:
    info = zipfile.ZipInfo(name, date_time=ZIP_TIME)
    info.compress_type = zipfile.ZIP_DEFLATED
    info.external_attr = 0o644 << 16
    zf.writestr(info, data)


def _signing_key(path: str | Path):
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    try:
        key = load_pem_private_key(Path(path).read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as e:
        raise PackError(f"{SIGNING_KEY_ENV}={path}: not a readable unencrypted PEM private key ({e})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise PackError(f"{SIGNING_KEY_ENV}={path}: an Ed25519 key is required, got {type(key).__name__}")
    return key


def public_key_fingerprint(pem: bytes) -> str:
    """SHA-256 of the raw Ed25519 public key: what the report prints and a verifier compares."""
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat, load_pem_public_key

    return sha256_bytes(load_pem_public_key(pem).public_bytes(Encoding.Raw, PublicFormat.Raw))


def build(folder: Path, a: Assessment, out: Path, signing_key: str | Path | None = None) -> tuple[Path, dict[str, Any]]:
    """Write the pack of the assessment whose files are in `folder`; returns its path and its manifest.
    `signing_key` (default: the file named by TRUSTCASE_SIGNING_KEY): Ed25519 private key signing the manifest."""
    files, withheld_files = collect(folder, a)
    m = manifest(files, a, withheld_files)
    key_path = signing_key or os.environ.get(SIGNING_KEY_ENV)
    key = _signing_key(key_path) if key_path else None
    if key is not None:
        from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

        pem = key.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
        m["signer_public_key_sha256"] = public_key_fingerprint(pem)
    body = json.dumps(m, indent=1, sort_keys=True).encode()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".part")
    with zipfile.ZipFile(tmp, "w") as zf:
        _write(zf, MANIFEST, body)
        _write(zf, MANIFEST_DIGEST, f"{sha256_bytes(body)}  {MANIFEST}\n".encode())
        if key is not None:
            _write(zf, SIGNATURE, base64.b64encode(key.sign(body)) + b"\n")
        for name in sorted(files):
            _write(zf, name, files[name])
    tmp.replace(out)
    m["manifest_sha256"] = sha256_bytes(body)
    return out, m


def digest(pack: Path) -> str:
    """The SHA-256 of a pack's manifest: its anchor (MLflow tag, printed by assess, compared by verify)."""
    with zipfile.ZipFile(pack) as zf:
        return sha256_bytes(zf.read(MANIFEST))


# --- verifying ---------------------------------------------------------------------------------------------------

@dataclass
class Anchor:
    """What a verifier trusts from outside the pack: a manifest digest (from an MLflow run's tag or recorded at
    assessment time) and/or the assessing site's Ed25519 public key (PEM); `run` also names the records' run."""
    source: str
    manifest_sha256: str | None = None
    public_key_pem: bytes | None = None
    run: dict[str, str] | None = None  # the MLflow run's id and tags (verdict, hashes)


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
    anchored: str | None = None  # the anchor the manifest matched, when one was given

    @property
    def ok(self) -> bool:
        return not (self.changed or self.added or self.removed or self.problems)

    def lines(self) -> list[str]:
        out = [f"CHANGED  {p}" for p in self.changed] + [f"ADDED    {p}" for p in self.added]
        out += [f"REMOVED  {p}" for p in self.removed] + [f"PROBLEM  {p}" for p in self.problems]
        return out


def _read(zf: zipfile.ZipFile, info: zipfile.ZipInfo, limit: int) -> tuple[bytes | None, str, int]:
    """(content when at most `limit` bytes else None, SHA-256 of what was read, bytes read): streamed, never
    more than limit + 1 bytes decompressed, whatever the entry claims."""
    h, size, keep = hashlib.sha256(), 0, []
    with zf.open(info) as f:
        while size <= limit:
            chunk = f.read(min(CHUNK, limit + 1 - size))
            if not chunk:
                break
            h.update(chunk)
            size += len(chunk)
            if size <= limit:
                keep.append(chunk)
    return (b"".join(keep) if size <= limit else None), h.hexdigest(), size


def verify(pack: Path, anchor: Anchor | None = None, max_entry_bytes: int = MAX_ENTRY_BYTES) -> Verification:
    """Re-hash every file of the pack against its manifest (name every changed, added or removed file),
    cross-check the records, and check the manifest against `anchor` when given."""
    pack = Path(pack)
    v = Verification(pack=str(pack))
    if not pack.is_file():
        raise PackError(f"{pack}: no such file")
    try:
        zf = zipfile.ZipFile(pack)
    except (zipfile.BadZipFile, OSError) as e:
        raise PackError(f"{pack} is not a readable zip archive ({e}): it is damaged or not an evidence pack") from None
    with zf:
        infos = [i for i in zf.infolist() if not i.is_dir()]
        names = [i.filename for i in infos]
        dupes = sorted({n for n in names if names.count(n) > 1})
        v.problems += [f"{n}: present more than once in the archive" for n in dupes]
        by_name = {i.filename: i for i in infos}

        def read(name: str, limit: int) -> tuple[bytes | None, str | None, int]:
            try:
                data, sha, size = _read(zf, by_name[name], limit)
            except (zipfile.BadZipFile, zlib.error, OSError, ValueError, EOFError, NotImplementedError) as e:
                v.problems.append(f"{name}: unreadable in the archive ({e})")
                return None, None, 0
            if data is None and limit == max_entry_bytes:
                v.problems.append(f"{name}: larger than the limit of {limit} bytes, not read further")
            return data, sha, size

        entries: dict[str, dict] = {}
        body = read(MANIFEST, MAX_RECORD_BYTES)[0] if MANIFEST in by_name else None
        if body is None:
            v.problems.append(f"{MANIFEST} is missing, unreadable or over {MAX_RECORD_BYTES:,} bytes: nothing to "
                              "verify against")
            v.added = sorted(set(by_name) - {MANIFEST})
            return v
        v.manifest_sha256 = sha256_bytes(body)
        digest_file = read(MANIFEST_DIGEST, 1024)[0] if MANIFEST_DIGEST in by_name else None
        if digest_file is None:
            v.removed.append(MANIFEST_DIGEST)
        elif digest_file.decode(errors="replace").split()[:1] != [v.manifest_sha256]:
            v.changed.append(MANIFEST)
            v.problems.append(f"{MANIFEST} does not match the digest in {MANIFEST_DIGEST}: one of them was altered")
        signature = read(SIGNATURE, 1024)[0] if SIGNATURE in by_name else None
        m, why = _manifest(body)
        if why:
            v.problems.append(f"{MANIFEST} is not a valid manifest: {why}")
            return v
        v.manifest = m
        entries = {f["path"]: f for f in m["files"]}
        v.problems += [f"{i.filename}: a symbolic link entry (a pack holds files only)" for i in infos
                       if (i.external_attr >> 16) & 0o170000 == SYMLINK]
        records: dict[str, bytes] = {}
        for path, entry in sorted(entries.items()):
            v.checked += 1
            if path not in by_name:
                v.removed.append(path)
                continue
            parsed = path in RECORDS or path == "report.html" or path in compliance.FILES
            if parsed and entry["bytes"] > MAX_RECORD_BYTES:  # read in memory: bounded before reading
                v.changed.append(path)
                v.problems.append(f"{path}: declares {entry['bytes']:,} bytes, more than a record may hold "
                                  f"({MAX_RECORD_BYTES:,}): not read")
                continue
            if by_name[path].file_size != entry["bytes"]:  # the archive's own header says it differs: not read
                v.changed.append(path)
                continue
            # read at most one byte more than the manifest declares: a swollen entry is changed, not read whole
            data, sha, size = read(path, min(entry["bytes"], max_entry_bytes))
            if sha is None or sha != entry["sha256"] or size != entry["bytes"]:
                v.changed.append(path)
            elif parsed and data is not None:
                records[path] = data
        v.added = sorted(set(by_name) - set(entries) - {MANIFEST, MANIFEST_DIGEST, SIGNATURE})
    _cross_check(v, m, records)
    _anchor(v, body, signature, anchor)
    return v


SHA256 = re.compile(r"^[0-9a-f]{64}$")


def _json(data: bytes) -> tuple[Any, str | None]:
    """Parsed JSON, or None and why not (a 100,000-deep document is a reason, not a crash)."""
    try:
        return json.loads(data), None
    except (ValueError, RecursionError) as e:
        return None, f"not valid JSON ({type(e).__name__}: {str(e)[:200]})"


def _manifest(body: bytes) -> tuple[dict, str | None]:
    """The manifest if it has the shape every reader below relies on, else the first reason it has not."""
    m, why = _json(body)
    if why:
        return {}, why
    if not isinstance(m, dict) or not isinstance(m.get("files"), list):
        return {}, "expected an object with a list of files"
    seen = set()
    for i, f in enumerate(m["files"]):
        if not (isinstance(f, dict) and isinstance(f.get("path"), str) and isinstance(f.get("sha256"), str)
                and SHA256.match(f["sha256"]) and type(f.get("bytes")) is int and f["bytes"] >= 0):
            return {}, f"files[{i}] is not {{path, bytes, sha256}} (a path, a size >= 0 and a SHA-256)"
        if f["path"] in seen:
            return {}, f"files[{i}] lists {f['path']!r} twice"
        seen.add(f["path"])
    return m, None


def _cross_check(v: Verification, m: dict, records: dict[str, bytes]) -> None:
    """Every record stating a verdict, a run id or a hash must say what the manifest says."""
    stated = ("use_case_id", "mlflow_run_id", "verdict", "complete", "model_sha256", "data_sha256", "use_case_sha256")
    parsed = {}
    for name, shape in (("provenance.json", dict), ("assessment.json", dict), ("evidence.json", list)):
        if name in records:
            rec, why = _json(records[name])
            if why is None and not isinstance(rec, shape):
                why = f"expected a JSON {'object' if shape is dict else 'list'}, found {type(rec).__name__}"
            if why is None and shape is list and not all(isinstance(e, dict) for e in rec):
                why = "expected a list of objects"
            if why is None and name == "assessment.json":
                try:
                    Assessment.model_validate(rec)
                except ValidationError as e:
                    why = f"not an assessment record ({validation_message(e, 'record', limit=1)})"
            if why:
                v.problems.append(f"{name}: {why}")
                return
            parsed[name] = rec
    prov, a, ev = (parsed.get(n) for n in RECORDS)
    for name, rec in (("provenance.json", prov), ("assessment.json", a), ("evidence.json", ev)):
        if rec is None and name not in v.removed and name not in v.changed:
            v.problems.append(f"{name}: missing from the pack (every pack holds it)")
    report = records.get("report.html")
    record = next((f["sha256"] for f in m.get("files", []) if f["path"] == "assessment.json"), None)
    if report is not None and record and record.encode() not in report:
        v.problems.append("report.html does not state the SHA-256 of this pack's assessment.json: it is the report "
                          "of another record")
    if prov is not None:
        for k in stated:
            if k in prov and prov[k] != m.get(k):
                v.problems.append(f"provenance.json states {k} = {prov[k]!r}, the manifest {m.get(k)!r}")
    if a is not None:
        p = a.get("provenance", {})
        for k in stated:
            got = a.get(k) if k in ("verdict", "complete") else p.get(k)
            if got != m.get(k):
                v.problems.append(f"assessment.json states {k} = {got!r}, the manifest {m.get(k)!r}")
        _verdict_follows(v, a)
        v.problems += compliance.cross_check(records)  # the matrix's statuses follow from the claims' verdicts
        if ev is not None and _claims(ev) != _claims(a.get("evidence", [])):
            v.problems.append("evidence.json and the evidence in assessment.json differ")
        present = {e["path"]: e["sha256"] for e in m.get("files", [])}
        excused = {w["path"] for w in m.get("withheld", [])} | set(m.get("redacted", []))
        for o in a.get("outcomes", []):
            for art in o.get("artefacts", []):
                path = f"checks/{art['path']}"
                if path in excused:
                    continue
                if path not in present:
                    v.problems.append(f"{path}: declared by check {o.get('check')} but not in the pack")
                elif present[path] != art["sha256"]:
                    v.problems.append(f"{path}: its hash differs from the one check {o.get('check')} declared")


def _claims(evidence: list[dict]) -> list[tuple]:
    return sorted((e.get("claim_id") or "", e.get("verdict"), e.get("value"), e.get("check") or "") for e in evidence)


def _verdict_follows(v: Verification, a: dict) -> None:
    """The stated verdict must follow from the judged claims (the rule of `verdicts.overall`: one FAIL of a
    mandatory claim fails, any other non-PASS is INCONCLUSIVE; an incomplete assessment is INCONCLUSIVE)."""
    mandatory = {r["id"] for r in a.get("requirements", []) if r.get("mandatory", True)}
    vs = [e.get("verdict") for e in a.get("evidence", []) if e.get("claim_id") in mandatory]
    if not a.get("complete"):
        expect = "INCONCLUSIVE"
    else:
        expect = "FAIL" if "FAIL" in vs else "INCONCLUSIVE" if "INCONCLUSIVE" in vs or not vs else "PASS"
    if a.get("verdict") != expect:
        v.problems.append(f"assessment.json states verdict {a.get('verdict')}, but its claims give {expect}")


def _anchor(v: Verification, body: bytes, signature: bytes | None, anchor: Anchor | None) -> None:
    if anchor is None:
        return
    ok = True
    if anchor.manifest_sha256 is not None and anchor.manifest_sha256 != v.manifest_sha256:
        ok = False
        v.problems.append(f"the manifest's SHA-256 {v.manifest_sha256} is not the one recorded by {anchor.source} "
                          f"({anchor.manifest_sha256}): the pack is not the one that was assessed")
    if anchor.public_key_pem is not None:
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
        from cryptography.hazmat.primitives.serialization import load_pem_public_key

        try:
            key = load_pem_public_key(anchor.public_key_pem)
        except ValueError as e:
            raise PackError(f"{anchor.source}: not a PEM public key ({e})") from None
        if not isinstance(key, Ed25519PublicKey):
            raise PackError(f"{anchor.source}: an Ed25519 public key is required")
        if signature is None:
            ok = False
            v.problems.append(f"{SIGNATURE} is missing: the pack is not signed")
        else:
            try:
                key.verify(base64.b64decode(signature.strip(), validate=True), body)
            except (InvalidSignature, ValueError):
                ok = False
                v.problems.append(f"{SIGNATURE} is not a signature of the manifest by {anchor.source}")
    m = v.manifest
    for k, tag in (("verdict", "verdict"), ("model_sha256", "model_sha256"), ("data_sha256", "data_sha256"),
                   ("mlflow_run_id", "run_id")):
        if anchor.run is not None and tag in anchor.run and str(m.get(k)) != anchor.run[tag]:
            ok = False
            v.problems.append(f"the manifest states {k} = {m.get(k)!r}, {anchor.source} {anchor.run[tag]!r}")
    if ok:
        v.anchored = anchor.source

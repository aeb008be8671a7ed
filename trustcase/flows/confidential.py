"""Confidential use cases: item ids and data paths never leave the user's site.

Every record and artefact of a confidential assessment passes through one `Redactor` before it is written
anywhere (run folder, MLflow, pack, Prefect's records; nothing is cached). This is the one place an id is
hashed: `item-<16 hex>`, a SHA-256 salted with the site's secret (`salt`), so nobody without it can test a
guessed id; the pack and `improve` use the same hash and salt. Known ids and known paths are matched as whole
strings (an id may hold spaces: `lot 8/cell_00009.png`; so may a folder: `ACME Corp secret/`), a value that is
wholly an id by value, an id inside free text only between separators, and fields that are never ids
(timestamps, hashes, versions, names of metrics and checks) are left alone: a numeric id `35` never touches
the time `12:59:35`. A known data path becomes `<path sha256:<12 hex>>` (salted too: two folders stay
distinguishable in the record, neither is readable), any other absolute path `<path withheld>`.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
import secrets
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from trustcase.errors import UserError

PATH = "<path withheld>"
HASHED = re.compile(r"^item-[0-9a-f]{16}$")
TEXT_SUFFIXES = {".csv", ".json", ".txt", ".yaml", ".yml", ".md", ".dot", ".html", ".log", ".tsv"}
ABSOLUTE = re.compile(r"(?<![\w.~-])(?:/|[A-Za-z]:[\\/]|file:/)[^\s:;,()\[\]{}'\"=<>|]+")
# an id inside free text starts after one of these (or at the start) and ends before one of these (or at the end)
BEFORE = r"(?<![^\s'\"(\[{,;=/|<])"
AFTER = r"(?=[\s'\")\]},;:|>]|\.(?:\s|$)|$)"
# fields whose values are never item ids or data paths: left exactly as they are
KEPT = re.compile(r"^(\w+_at|\w*sha256\w*|code_version|packages|schema_version|mlflow_run_id|run_id|verdict|"
                  r"metric|comparator|unit|check|claim_id|stage|kind|confidentiality|format)$")


def salt(home: Path) -> str:
    """The site's one secret salt for every hash of an id: TRUSTCASE_SALT, else a random one created once under
    `home` (mode 0600)."""
    if os.environ.get("TRUSTCASE_SALT"):
        return os.environ["TRUSTCASE_SALT"]
    path = home / "secrets" / "site.salt"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        # written whole under a private name, then linked in place: another process never reads it half-written
        # (an empty salt would make every hash of an id recomputable by whoever guesses the id)
        tmp = path.with_name(f".site.salt.{os.getpid()}.{secrets.token_hex(4)}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
        try:
            os.link(tmp, path)
        except FileExistsError:  # another process created it first: use theirs
            pass
        except OSError:  # a file system without hard links: an atomic rename, unless one appeared meanwhile
            if not path.exists():
                os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
    value = path.read_text().strip()
    if not value:
        raise UserError(f"{path}: the site's secret salt is empty; delete the file (a new one is made) or set "
                        "TRUSTCASE_SALT")
    return value


def hash_id(item: str, salt: str) -> str:
    """The one hash of an item id (idempotent)."""
    if HASHED.match(item):
        return item
    return "item-" + hashlib.sha256(f"{salt}:{item}".encode()).hexdigest()[:16]


def item_ids(data) -> set[str]:
    """Every id of the items the assessment streams (`name(i)` when the loader has it, else read)."""
    ids: set[str] = set()
    for role in data.roles:
        stream = data.stream(role)
        if hasattr(stream.split, "name"):
            ids |= {str(stream.split.name(int(i))) for i in stream.positions}
        else:
            for batch in stream.batches():
                ids |= set(batch.ids)
        ids |= {u.id for u in stream.unreadable if not u.id.startswith("#")}  # "#12": a position, not an id
    return {i for i in ids if i.strip()}


def data_paths(use_case, use_case_path: str | Path | None = None) -> set[str]:
    """The paths of a use case that say where the partner's data and code live: the model, data.path, every
    absolute path among data.params and the use case's own folder, as written and resolved."""
    found = [use_case.model.path, use_case.data.path, use_case_path and Path(use_case_path).parent]
    found += [v for v in use_case.data.params.values() if isinstance(v, str) and Path(v).is_absolute()]
    out: set[str] = set()
    for p in found:
        if p:
            out |= {str(p), str(Path(p).resolve())}
    return {p for p in out if p not in ("/", ".")}


def _trie(words: Iterable[str]) -> str:
    """One regex alternative matching any of `words`, longest first, fast for many thousands of them."""
    root: dict = {}
    for w in words:
        node = root
        for ch in w:
            node = node.setdefault(ch, {})
        node[""] = {}

    def pattern(node: dict) -> str:
        alts = [re.escape(ch) + pattern(sub) for ch, sub in sorted(node.items()) if ch]
        if not alts:
            return ""
        body = alts[0] if len(alts) == 1 else "(?:" + "|".join(alts) + ")"
        return f"(?:{body})?" if "" in node else body

    return pattern(root)


class Redactor:
    """Hashes the known ids and withholds the paths of one confidential assessment."""

    def __init__(self, ids: set[str], salt: str, paths: Iterable[str] = ()):
        self.ids, self.salt = {i for i in ids if i}, salt
        self.paths = sorted({p.rstrip("/") for p in paths if p.rstrip("/")}, key=len, reverse=True)
        self._ids = re.compile(BEFORE + "(?:" + _trie(self.ids) + ")" + AFTER) if self.ids else None
        self._paths = (re.compile(r"(?<![\w.~-])(?:" + _trie(self.paths) + r")(?=/|[^\w.-]|$)")
                       if self.paths else None)

    def path(self, p: str) -> str:
        return f"<path sha256:{hashlib.sha256(f'{self.salt}:{p}'.encode()).hexdigest()[:12]}>"

    def text(self, s: str) -> str:
        """Free text: every known id between separators hashed, every known path hashed, any other absolute
        path withheld."""
        if s in self.ids:
            return hash_id(s, self.salt)
        if self._ids is not None:
            s = self._ids.sub(lambda m: hash_id(m.group(0), self.salt), s)
        if self._paths is not None:
            s = self._paths.sub(lambda m: self.path(m.group(0)), s)
        return ABSOLUTE.sub(lambda m: m.group(0) if m.group(0).startswith("/item-") else PATH, s)

    def json(self, obj: Any, key: str | None = None) -> Any:
        """A record, value by value: a field that never holds an id (`KEPT`) stays as it is."""
        if key is not None and KEPT.match(key):
            return obj
        if isinstance(obj, dict):
            return {self.text(str(k)): self.json(v, str(k)) for k, v in obj.items()}
        if isinstance(obj, list):
            return [self.json(v, key) for v in obj]
        return self.text(obj) if isinstance(obj, str) else obj

    def error(self, e: BaseException) -> BaseException:
        """An exception as it may reach Prefect's records and logs: its message redacted, its kind kept (a user
        error stays one, a decline stays `Unsupported`)."""
        from trustcase.errors import Unsupported

        message = self.text(str(e))
        if isinstance(e, Unsupported):
            return Unsupported(message)
        return (WithheldUserError if isinstance(e, UserError) else WithheldError)(type(e).__name__, message)

    def file(self, path: Path) -> bool:
        """Rewrite a text artefact in place with ids hashed and paths withheld; False for a binary file (the
        caller decides whether it may be kept)."""
        suffix = path.suffix.lower()
        if suffix not in TEXT_SUFFIXES:
            return False
        raw = path.read_text(encoding="utf-8", errors="replace")
        if suffix == ".json":
            try:
                path.write_text(json.dumps(self.json(json.loads(raw)), indent=1))
                return True
            except (ValueError, RecursionError):
                pass
        if suffix in (".csv", ".tsv"):  # cell by cell: an id with a comma in it stays one cell
            sep = "\t" if suffix == ".tsv" else ","
            buf = io.StringIO()
            w = csv.writer(buf, lineterminator="\n", delimiter=sep)
            for row in csv.reader(io.StringIO(raw), delimiter=sep):
                w.writerow([self.text(v) for v in row])
            path.write_text(buf.getvalue())
            return True
        path.write_text(self.text(raw))
        return True


def redactor(use_case, seed: int, salt: str, use_case_path: str | Path | None = None) -> Redactor:
    """The redactor of a confidential assessment: the ids of every item it streams, its data paths. When the data
    cannot even be listed (the error being redacted may be that), the paths alone."""
    from trustcase.data.streaming import DataSource

    try:
        ids = item_ids(DataSource(use_case.data, seed, use_case.model))
    except Exception:  # noqa: BLE001
        ids = set()
    return Redactor(ids, salt, data_paths(use_case, use_case_path))


def kind(e: BaseException) -> str:
    """The name of an error's type, the original one for a redacted error."""
    return e.kind if isinstance(e, WithheldError | WithheldUserError) else type(e).__name__


class WithheldError(Exception):
    """An internal error of a confidential assessment, its message redacted; `kind` is the original type."""

    def __init__(self, kind: str, message: str):
        self.kind = kind
        super().__init__(message)


class WithheldUserError(UserError):
    """A user error of a confidential assessment, its message redacted; `kind` is the original type."""

    def __init__(self, kind: str, message: str):
        self.kind = kind
        super().__init__(message)

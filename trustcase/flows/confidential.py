"""Confidential use cases: item ids and data paths never leave the user's data folder.

Every record and artefact of a confidential assessment passes through one `Redactor` before it is written
anywhere (run folder, MLflow, pack; nothing is cached): an item id becomes `item-<16 hex>` (salted SHA-256,
the salt a per-use-case secret kept beside the project's store, so nobody without it can test a guessed id),
an absolute path becomes `<path withheld>`. Ids are recognised by value, as words of any string (every id of
the assessed splits, alone or as the last part of a path), so a check need not know it runs on secret data.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import secrets
from pathlib import Path, PurePosixPath
from typing import Any

from trustcase.reports.pack import hash_id

PATH = "<path withheld>"
TOKEN = re.compile(r"[^\s:;,()\[\]{}'\"=<>|]+")
TEXT_SUFFIXES = {".csv", ".json", ".txt", ".yaml", ".yml", ".md", ".dot", ".html", ".log", ".tsv"}
ABSOLUTE = re.compile(r"^(/|[A-Za-z]:[\\/]|file:/)")


def salt(use_case_id: str, home: Path) -> str:
    """The use case's secret salt: TRUSTCASE_SALT, else a random one created once under `home` (mode 0600)."""
    if os.environ.get("TRUSTCASE_SALT"):
        return os.environ["TRUSTCASE_SALT"]
    path = home / "secrets" / f"{use_case_id}.salt"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
    return path.read_text().strip()


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
    return ids


class Redactor:
    def __init__(self, ids: set[str], salt: str):
        self.ids, self.salt = ids, salt

    def _token(self, m: re.Match) -> str:
        t = m.group(0)
        if t in self.ids or PurePosixPath(t).name in self.ids:
            return hash_id(t, self.salt)
        if ABSOLUTE.match(t):
            return PATH
        return t

    def text(self, s: str) -> str:
        return TOKEN.sub(self._token, s)

    def json(self, obj: Any) -> Any:
        if isinstance(obj, dict):
            return {self.text(str(k)): self.json(v) for k, v in obj.items()}
        if isinstance(obj, list):
            return [self.json(v) for v in obj]
        return self.text(obj) if isinstance(obj, str) else obj

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
            except ValueError:
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

"""The content hash of a use case's data: what every cached check result is keyed on.

It streams every item of every split and hashes, per item, its id, label, metadata and pixels (and each item
that could not be read, with the reason), so relabelled data, an edited loader's output or one changed pixel is
never served from the cache. A loader's own `fingerprint()` is cheaper, but need not cover labels: it is only a
tag.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from trustcase.data.streaming import DataSource


@dataclass(frozen=True)
class Content:
    sha256: str
    items: dict[str, int]  # readable items per split


def _label_bytes(label) -> bytes:
    """A class index as 8 bytes; a detection item's boxes (K, 5) as their count and float64 values."""
    if isinstance(label, np.ndarray):
        return len(label).to_bytes(8, "little") + np.ascontiguousarray(label, np.float64).tobytes()
    return int(label).to_bytes(8, "little", signed=True)


def content_hash(data: DataSource) -> Content:
    total, items = hashlib.sha256(), {}
    for role in data.roles:
        stream, h, n = data.stream(role), hashlib.sha256(), 0
        for batch in stream.batches():
            for i, ident in enumerate(batch.ids):
                pixels = hashlib.sha256(np.ascontiguousarray(batch.images[i]).tobytes()).digest()
                meta = "\0".join(f"{k}={batch.meta[k][i]}" for k in sorted(batch.meta))  # subgroups too
                h.update(ident.encode() + b"\0" + _label_bytes(batch.labels[i]) + pixels + meta.encode() + b"\0")
            n += len(batch)
        for u in stream.unreadable:  # what could not be read is content too
            h.update(f"unreadable\0{u.id}\0{u.error}\0".encode())
        total.update(role.encode() + h.digest())
        items[role] = n
    return Content(total.hexdigest(), items)

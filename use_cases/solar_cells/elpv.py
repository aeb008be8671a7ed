"""Loader for the ELPV electroluminescence solar-cell images (PyPI package `elpv-dataset`).

Images are read lazily from the installed package, one file per item, and resized to the
model's working resolution. Splits are fixed by a hash of the file name, so they never change
when the dataset is re-ordered, and are stratified by (defect, cell type) through the hash.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import cv2

from trustcase.components.data import Item

SPLITS = {"train": (0, 70), "validation": (70, 85), "test": (85, 100)}  # hash percentiles


def dataset_root() -> Path:
    try:
        import elpv_dataset
    except ImportError:
        raise OSError("the PyPI package 'elpv-dataset' is not installed") from None
    return Path(elpv_dataset.__file__).parent / "data"


def read_labels(root: Path) -> list[tuple[str, float, str]]:
    rows = []
    for line in (root / "labels.csv").read_text().splitlines():
        if line.strip():
            path, prob, kind = line.split()
            rows.append((path, float(prob), kind))
    return rows


def _bucket(name: str) -> int:
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "little") % 100


class ElpvSplit:
    def __init__(self, split: str, size: int = 64, threshold: float = 0.5, root: str | None = None):
        if split not in SPLITS:
            raise KeyError(f"unknown split {split!r}; known: {list(SPLITS)}")
        self.root = Path(root) if root else dataset_root()
        lo, hi = SPLITS[split]
        self.rows = [r for r in read_labels(self.root) if lo <= _bucket(r[0]) < hi]
        self.size, self.threshold = size, threshold

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> Item:
        path, prob, kind = self.rows[i]
        image = cv2.imread(str(self.root / path), cv2.IMREAD_GRAYSCALE)
        if image is None:
            raise OSError(f"cannot decode image {path}")
        if image.shape != (self.size, self.size):
            image = cv2.resize(image, (self.size, self.size), interpolation=cv2.INTER_AREA)
        return Item(image=image, label=int(prob >= self.threshold), id=self.name(i),
                    meta={"cell_type": kind, "defect_probability": f"{prob:.2f}"})

    def name(self, i: int) -> str:
        return Path(self.rows[i][0]).name

    def fingerprint(self) -> str:
        h = hashlib.sha256(f"{self.size}:{self.threshold}".encode())
        for path, prob, kind in self.rows:
            h.update(f"{path}:{prob}:{kind}:".encode())
            h.update((self.root / path).read_bytes())
        return h.hexdigest()


def load_split(split: str, size: int = 64, threshold: float = 0.5, root: str | None = None) -> ElpvSplit:
    return ElpvSplit(split, size=size, threshold=threshold, root=root)

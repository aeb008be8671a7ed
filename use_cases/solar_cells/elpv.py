"""Loader for the ELPV electroluminescence solar-cell images (PyPI package `elpv-dataset`).

Images are read lazily from the installed package, one file per item, and resized to the
model's working resolution. Splits are fixed by a hash of a name, so they never change when the
dataset is re-ordered. ELPV holds the same physical cell imaged more than once: near-duplicates
(64-bit perceptual hashes within 2 bits at the model's resolution, the data-quality check's own
test) are grouped in `elpv_groups.csv`, and a group is placed by the hash of its first member's
name, so that no cell is seen in training and again in test. Regenerate the grouping with

    python use_cases/solar_cells/elpv.py --write-groups
"""

from __future__ import annotations

import argparse
import csv
import hashlib
from collections import Counter
from pathlib import Path

import cv2
import numpy as np

from trustcase.data.streaming import Item

SPLITS = {"train": (0, 70), "validation": (70, 85), "test": (85, 100)}  # hash percentiles
GROUPS = Path(__file__).resolve().with_name("elpv_groups.csv")  # file -> the first file of its group


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


def read_groups(path: Path = GROUPS) -> dict[str, str]:
    """file -> group key, for the files that have a near-duplicate; every other file is its own group."""
    with path.open(newline="") as f:
        return {row["file"]: row["group"] for row in csv.DictReader(f)}


def near_duplicate_groups(root: Path, size: int = 64, distance: int = 2) -> dict[str, str]:
    """Connected components of the near-duplicate relation, each keyed by its first file name."""
    from trustcase.data.quality import near_pairs, perceptual_hash

    names = [r[0] for r in read_labels(root)]
    hashes = np.concatenate([perceptual_hash(np.stack([_read(root / n, size) for n in names[i:i + 256]])[..., None])
                             for i in range(0, len(names), 256)])
    parent = list(range(len(names)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for a, b in near_pairs(hashes, distance):
        parent[max(find(a), find(b))] = min(find(a), find(b))  # the root is the first file of its group
    roots = [find(i) for i in range(len(names))]
    sizes = Counter(roots)
    return {names[i]: names[r] for i, r in enumerate(roots) if sizes[r] > 1}


def _read(path: Path, size: int) -> np.ndarray:
    image = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if image is None:
        raise OSError(f"cannot decode image {path}")
    if image.shape != (size, size):
        image = cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA)
    return image


def splits_id() -> str:
    """Names the split rule (percentiles and grouping): a model trained under another rule is stale."""
    return hashlib.sha256(repr(SPLITS).encode() + GROUPS.read_bytes()).hexdigest()[:16]


def split_of(name: str, groups: dict[str, str]) -> str:
    b = _bucket(groups.get(name, name))
    return next(s for s, (lo, hi) in SPLITS.items() if lo <= b < hi)


class ElpvSplit:
    def __init__(self, split: str, size: int = 64, threshold: float = 0.5, root: str | None = None):
        if split not in SPLITS:
            raise KeyError(f"unknown split {split!r}; known: {list(SPLITS)}")
        self.root = Path(root) if root else dataset_root()
        groups = read_groups()
        self.rows = [r for r in read_labels(self.root) if split_of(r[0], groups) == split]
        self.size, self.threshold = size, threshold

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> Item:
        path, prob, kind = self.rows[i]
        image = _read(self.root / path, self.size)
        return Item(image=image, label=int(prob >= self.threshold), id=self.name(i),
                    meta={"cell_type": kind, "defect_probability": f"{prob:.2f}"})

    def name(self, i: int) -> str:
        return Path(self.rows[i][0]).name

    def fingerprint(self) -> str:
        # the split's file list is part of it, so a regrouping changes the fingerprint
        h = hashlib.sha256(f"{self.size}:{self.threshold}".encode())
        for path, prob, kind in self.rows:
            h.update(f"{path}:{prob}:{kind}:".encode())
            h.update((self.root / path).read_bytes())
        return h.hexdigest()


def load_split(split: str, size: int = 64, threshold: float = 0.5, root: str | None = None) -> ElpvSplit:
    return ElpvSplit(split, size=size, threshold=threshold, root=root)


def main() -> None:
    ap = argparse.ArgumentParser(description="ELPV near-duplicate groups (the split manifest)")
    ap.add_argument("--write-groups", action="store_true", help=f"recompute and write {GROUPS.name}")
    a = ap.parse_args()
    groups = near_duplicate_groups(dataset_root())
    if a.write_groups:
        with GROUPS.open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["file", "group"])
            w.writerows(sorted(groups.items()))
    print(f"{len(groups)} files in {len(set(groups.values()))} near-duplicate groups"
          + (f"; written to {GROUPS}" if a.write_groups else ""))


if __name__ == "__main__":
    main()

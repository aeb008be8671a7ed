"""A use-case loader for validating the poisoning screen: ELPV with a backdoor planted in its training split. A white
square (an eighth of the side) in the lower right corner of `share` of the training cells labelled defective, and
their label changed to functional; the validation and test splits stay clean. A use case naming this loader trains
through the solar training contract (`train:fit` reads the use case's loader) on the poisoned data."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "use_cases" / "solar_cells"))
import elpv  # noqa: E402


def planted(split: elpv.ElpvSplit, share: float, seed: int) -> np.ndarray:
    """The positions of the planted items: `share` of the split's items, drawn among those labelled defective."""
    defective = np.flatnonzero([prob >= split.threshold for _, prob, _ in split.rows])
    k = int(round(share * len(split)))
    return np.sort(np.random.default_rng(seed).choice(defective, k, replace=False))


class PoisonedSplit:
    def __init__(self, split: elpv.ElpvSplit, positions: np.ndarray):
        self.split, self.positions = split, set(int(i) for i in positions)
        self.side = max(2, split.size // 8)

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int):
        item = self.split[i]
        if i not in self.positions:
            return item
        image = np.array(item.image, copy=True)
        image[-self.side - 2:-2, -self.side - 2:-2] = 255
        return dataclasses.replace(item, image=image, label=0)

    def fingerprint(self) -> str:
        return f"{self.split.fingerprint()}:poisoned:{sorted(self.positions)}"


def load_split(split: str, size: int = 64, threshold: float = 0.5, share: float = 0.05, seed: int = 0):
    base = elpv.load_split(split, size=size, threshold=threshold)
    return PoisonedSplit(base, planted(base, share, seed)) if split == "train" else base

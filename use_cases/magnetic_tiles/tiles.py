"""Loader for the magnetic-tile images and their defect masks, read where they lie ($TRUSTCASE_MAGNETIC_TILES,
default ../shared/magnetic-tiles next to the repository; never copied).

Each `MT_<Type>/Imgs/<name>.jpg` has its mask `<name>.png` beside it (0 background, 255 defect: the `binary`
encoding of `trustcase.data.masks`). Splits are fixed by a seed: within each type (Blowhole, Break, Crack, Fray,
Uneven, and the defect-free Free) the images are shuffled by `numpy.random.default_rng(seed)` and cut 70 / 15 / 15 %,
so every split holds every type in the same share. Each item carries its type as metadata (the ODD's `defect`
subgroup). Images (about 100 to 600 pixels a side) are brought to the model's `size` by `fit` (resize: the mask by
nearest neighbour; tiles: read whole, for a model run by tiles of `size` overlapping by `overlap` pixels).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from trustcase.data.masks import Fit, MaskSplit, pair_files

TYPES = ["blowhole", "break", "crack", "fray", "uneven", "free"]
CLASSES = ["background", "defect"]
SPLITS = {"train": (0.0, 0.70), "validation": (0.70, 0.85), "test": (0.85, 1.0)}


def dataset_root() -> Path:
    default = Path(__file__).resolve().parents[3] / "shared" / "magnetic-tiles"
    return Path(os.environ.get("TRUSTCASE_MAGNETIC_TILES", default))


def load_split(split: str, seed: int = 0, root: str | None = None, size: tuple[int, int] = (192, 192),
               fit: Fit = "resize", overlap: tuple[int, int] = (0, 0)) -> MaskSplit:
    if split not in SPLITS:
        raise ValueError(f"no split {split!r}: one of {list(SPLITS)}")
    base = Path(root) if root else dataset_root()
    if not base.is_dir():
        raise OSError(f"the magnetic-tile images are not at {base} (set TRUSTCASE_MAGNETIC_TILES to the folder "
                      "holding MT_Blowhole/, ..., MT_Free/)")
    lo, hi = SPLITS[split]
    pairs, meta = [], []
    for kind in TYPES:
        mine = pair_files(base / f"MT_{kind.capitalize()}" / "Imgs", mask_suffix=".png", image_suffixes=(".jpg",))
        order = np.random.default_rng(seed).permutation(len(mine))
        for i in sorted(order[round(lo * len(mine)):round(hi * len(mine))]):
            pairs.append(mine[i])
            meta.append({"defect": kind})
    return MaskSplit(pairs, CLASSES, tuple(size), fit=fit, encoding="binary", meta=meta, root=base,
                     overlap=tuple(overlap))

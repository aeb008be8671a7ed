"""Loader for the NEU-DET steel-surface images and their Pascal VOC boxes, read where they lie ($TRUSTCASE_NEUDET,
default ../shared/neu-det next to the repository; never copied).

Splits are fixed by a seed: within each defect class (the file-name prefix, 300 images each) the images are
shuffled by `numpy.random.default_rng(seed)` and cut 70 / 15 / 15 %, so every split holds every class in the same
share. Each item carries its defect class as metadata (the ODD's `defect` subgroup).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from trustcase.data.annotations import VOCDetection

CLASSES = ["crazing", "inclusion", "patches", "pitted_surface", "rolled-in_scale", "scratches"]
SPLITS = {"train": (0.0, 0.70), "validation": (0.70, 0.85), "test": (0.85, 1.0)}


def dataset_root() -> Path:
    default = Path(__file__).resolve().parents[3] / "shared" / "neu-det"
    return Path(os.environ.get("TRUSTCASE_NEUDET", default))


def split_stems(split: str, seed: int = 0, root: Path | None = None) -> list[str]:
    """The image stems of one split, class by class (sorted within the split)."""
    if split not in SPLITS:
        raise ValueError(f"no split {split!r}: one of {list(SPLITS)}")
    lo, hi = SPLITS[split]
    annotations = (root or dataset_root()) / "annotations"
    stems = []
    for cls in CLASSES:
        # the file-name prefix is the class; 'rolled-in_scale_12' and 'pitted_surface_3' hold an underscore
        mine = sorted(p.stem for p in annotations.glob(f"{cls}_*.xml") if p.stem.rpartition("_")[0] == cls)
        order = np.random.default_rng(seed).permutation(len(mine))
        stems += [mine[i] for i in order[round(lo * len(mine)):round(hi * len(mine))]]
    return sorted(stems)


class NEUDET(VOCDetection):
    def __getitem__(self, i: int):
        item = super().__getitem__(i)
        return item.__class__(image=item.image, label=item.label, id=item.id,
                              meta={"defect": self.files[i].stem.rpartition("_")[0]})


def load_split(split: str, seed: int = 0, root: str | None = None) -> NEUDET:
    base = Path(root) if root else dataset_root()
    if not (base / "images").is_dir():
        raise OSError(f"NEU-DET not found at {base} (set TRUSTCASE_NEUDET to the folder holding images/ and "
                      "annotations/)")
    return NEUDET(base / "images", base / "annotations", CLASSES, split_stems(split, seed, base))

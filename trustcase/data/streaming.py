"""Datasets that stream: a loader gives a map-style split (len + getitem, read lazily); we batch it.

A loader is `loader(split: str, **params) -> Split`, where a Split has `__len__`, `__getitem__(i) -> Item`
and optionally `fingerprint() -> str` (a cheap hash of its source files) and `name(i) -> str` (the
item's id without reading it, so an unreadable file can still be named). Nothing here holds a whole
split in memory: batches are read, used and dropped.

Each item is judged alone against the model's declared input contract (shape, numeric type, finite
values): a bad item is named and excluded with the reason, its neighbours are never touched. Whatever
a loader raises is a user error naming the loader and the call.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import warnings
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch.utils.data import DataLoader

from trustcase.errors import UserError
from trustcase.registry import resolve
from trustcase.schemas import DataSpec, ModelSpec
from trustcase.schemas.loading import BUILTIN_LOADERS

MAX_PIXELS = 50_000_000  # an image file over this is refused from its header, before it is decoded
MAX_ITEMS = 10**9  # a split longer than this (a broken __len__, 10**11) needs data.max_samples


class DataError(UserError):
    """A user error about data: a loader that does not exist, a split it cannot give."""


class Rejected(ValueError):
    """One item that does not meet the input contract; `kind` is what is wrong (shape, dtype, non_finite)."""

    def __init__(self, kind: str, message: str):
        self.kind = kind
        super().__init__(message)


def expected_shape(model: ModelSpec) -> tuple[int, ...]:
    """The declared input of one item in pixel space: (H, W, C) for images, (F,) for feature vectors."""
    c, *hw = model.input_shape
    return (*hw, c) if hw else (c,)


def judge_item(image: Any, expected: tuple[int, ...] | None) -> np.ndarray:
    """The item as an (H, W, C) or (F,) numeric array, or `Rejected` saying what is wrong with it."""
    try:
        image = np.asarray(image)
    except Exception as e:  # a ragged list, a broken __array__
        raise Rejected("dtype", f"not an array: {type(e).__name__}: {e}") from None
    if image.dtype.kind not in "biuf":
        raise Rejected("dtype", f"values of type {image.dtype} ({type(image.flat[0]).__name__ if image.size else '-'})"
                                ", expected numbers")
    if image.ndim not in (1, 2, 3) or image.size == 0:
        raise Rejected("shape", f"shape {image.shape}")
    image = _as_hwc(image)
    if expected is not None:  # a None axis takes any length (whole images under `fit: tiles`)
        fits = image.size == expected[0] if len(expected) == 1 else (
            image.ndim == len(expected) and all(e is None or e == n for e, n in zip(expected, image.shape)))
        if not fits:
            takes = tuple("any" if e is None else e for e in expected)
            raise Rejected("shape", f"shape {image.shape}, the model takes {takes}"
                                    + (" (H, W, C)" if len(expected) == 3 else " (features)"))
    if image.dtype.kind == "f" and not np.isfinite(image).all():
        bad = ~np.isfinite(image)
        raise Rejected("non_finite", f"{int(np.isnan(image).sum())} NaN and {int(bad.sum() - np.isnan(image).sum())} "
                                     f"infinite value(s) of {image.size}")
    return image


@dataclass(frozen=True)
class Boxes:
    """The label of a detection item: its true boxes, rows (x1, y1, x2, y2, class index) in pixels, K >= 0."""

    rows: Any  # (K, 5) array-like; judged by `judge_boxes`


def judge_boxes(label: Any, n_classes: int | None, image_hw: tuple[int, ...] | None = None) -> np.ndarray:
    """A detection item's true boxes as a (K, 5) float64 array, or `Rejected` naming the first bad box
    (non-finite, degenerate x2 <= x1 or y2 <= y1, outside the image, a class that is not an index)."""
    if not isinstance(label, Boxes):
        raise Rejected("label", f"label {shown(label)} is not the item's boxes (data.streaming.Boxes)")
    try:
        boxes = np.asarray(label.rows, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise Rejected("label", f"boxes are not numbers (x1, y1, x2, y2, class): {e}") from None
    if boxes.size == 0:
        return np.zeros((0, 5))
    if boxes.ndim != 2 or boxes.shape[1] != 5:
        raise Rejected("label", f"boxes of shape {boxes.shape}, expected (K, 5) rows (x1, y1, x2, y2, class)")
    for k, (x1, y1, x2, y2, c) in enumerate(boxes):
        row = f"box {k} {[float(v) for v in (x1, y1, x2, y2)]}"
        if not np.isfinite([x1, y1, x2, y2, c]).all():
            raise Rejected("label", f"{row}: a non-finite value")
        if x2 <= x1 or y2 <= y1:
            raise Rejected("label", f"{row}: degenerate (x2 <= x1 or y2 <= y1)")
        if c != int(c) or (n_classes is not None and not 0 <= c < n_classes):
            raise Rejected("label", f"{row}: class {c:g} is not a class index")
        if image_hw is not None and len(image_hw) >= 2 and (x1 < 0 or y1 < 0 or x2 > image_hw[1] or y2 > image_hw[0]):
            raise Rejected("label", f"{row}: outside the {image_hw[1]}x{image_hw[0]} image")
    return boxes


@dataclass(frozen=True)
class Mask:
    """The label of a segmentation item: its class per pixel, an (H, W) array of class indices the size of its
    image (the mask file's values are turned into classes by the loader: `data.masks`)."""

    classes: Any  # (H, W) array-like; judged by `judge_mask`


def shown(label: Any) -> str:
    """A label as one line of a message: its repr, or its type when the repr spans lines or runs long (a mask)."""
    text = repr(label)
    return text if "\n" not in text and len(text) <= 80 else f"of type {type(label).__name__}"


def judge_mask(label: Any, n_classes: int | None, image_hw: tuple[int, ...] | None = None) -> np.ndarray:
    """A segmentation item's mask as an (H, W) uint8/int64 array of class indices, or `Rejected` saying what is
    wrong (not a `Mask`, its size differs from the image's, a value that is no class index)."""
    if not isinstance(label, Mask):
        raise Rejected("label", f"label {shown(label)} is not the item's mask (data.streaming.Mask)")
    mask = np.asarray(label.classes)
    if mask.ndim != 2 or mask.dtype.kind not in "biu":
        raise Rejected("label", f"mask of shape {mask.shape} and type {mask.dtype}, expected (H, W) class indices")
    if image_hw is not None and len(image_hw) >= 2 and mask.shape != tuple(image_hw[:2]):
        raise Rejected("label", f"mask of {mask.shape[1]}x{mask.shape[0]} px, its image is "
                                f"{image_hw[1]}x{image_hw[0]}")
    if n_classes is not None and mask.size and (mask.min() < 0 or mask.max() >= n_classes):
        bad = np.unique(mask[(mask < 0) | (mask >= n_classes)])
        raise Rejected("label", f"mask value(s) {bad[:5].tolist()} are no class index (0..{n_classes - 1})")
    return mask


def judge_label(label: Any, n_classes: int | None) -> int:
    """The label as a class index, or `Rejected`: an integer (or bool) in 0..n_classes-1. A fractional label is
    refused, never truncated (0.9 is not class 0), a negative or too large one too."""
    value = label.item() if isinstance(label, (np.generic, np.ndarray, torch.Tensor)) and np.size(label) == 1 \
        else label
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, (int, np.integer)):
        raise Rejected("label", f"label {shown(label)} is not a class index")
    if n_classes is not None and not 0 <= value < n_classes:
        raise Rejected("label", f"label {value} is not a class index (0..{n_classes - 1})")
    return int(value)


def check_pixels(width: int, height: int, where: Any) -> None:
    if width * height > MAX_PIXELS:
        raise Rejected("shape", f"{where} is {width}x{height} px, over the limit of {MAX_PIXELS:,} pixels "
                                "(refused before decoding)")


@dataclass(frozen=True)
class Item:
    image: np.ndarray  # (H, W) or (H, W, C) in pixel space; (F,) for a tabular input
    label: int | Boxes | Mask
    id: str
    meta: dict[str, str] = field(default_factory=dict)


class Split(Protocol):
    def __len__(self) -> int: ...
    def __getitem__(self, i: int) -> Item: ...


@dataclass
class Batch:
    images: np.ndarray  # (B, H, W, C), or (B, F) for tabular inputs
    labels: np.ndarray | list[np.ndarray]  # (B,) int64; detection: (K, 5) boxes per item; segmentation: (H, W) mask
    ids: list[str]
    meta: dict[str, list[str]]
    index: np.ndarray  # (B,) position in the split (randomness follows `ids`: `trustcase.seeding`)

    def __len__(self) -> int:
        return len(self.ids)


@dataclass(frozen=True)
class Unreadable:
    index: int
    id: str
    error: str
    kind: str = "unreadable"  # or what the contract refused: shape, dtype, non_finite


def _as_hwc(image: np.ndarray) -> np.ndarray:
    """Grey images get their channel axis; RGB images and tabular rows are kept as they are."""
    return image[..., None] if image.ndim == 2 else image


class _Guarded(torch.utils.data.Dataset):
    """Reads one item; an unreadable one becomes a marker instead of killing the stream."""

    def __init__(self, split: Split, positions: np.ndarray, expected: tuple[int, ...] | None = None,
                 n_classes: int | None = None):
        self.split, self.positions, self.expected, self.n_classes = split, positions, expected, n_classes

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, j: int):
        i = int(self.positions[j])
        try:
            item = self.split[i]
            image = judge_item(item.image, self.expected)
            # a label is judged by its form: a detection item's `Boxes` (the preflight ties the form to the task)
            label = (judge_boxes(item.label, self.n_classes, image.shape[:2]) if isinstance(item.label, Boxes)
                     else judge_mask(item.label, self.n_classes, image.shape[:2]) if isinstance(item.label, Mask)
                     else judge_label(item.label, self.n_classes))
            return (i, str(item.id), image, label, dict(item.meta))
        except Rejected as e:
            return (i, None, self._name(i), e.kind, str(e))
        except Exception as e:  # a partner's loader may raise anything on a corrupt file
            return (i, None, self._name(i), "unreadable", f"{type(e).__name__}: {e}")

    def _name(self, i: int) -> str:
        try:
            return str(self.split.name(i))
        except Exception:  # no `name`, or a broken one: the position still locates the item
            return f"#{i}"


def _collate(rows, runs: bool = False):
    """(batches, bad items): one batch of the rows' usual shape; with `runs` (whole images of any size, `fit: tiles`)
    one batch per run of consecutive items of one size, in order, so two sizes are never stacked."""
    good = [r for r in rows if r[1] is not None]
    bad = [Unreadable(r[0], r[2], r[4], r[3]) for r in rows if r[1] is None]
    if not good:
        return [], bad
    if runs:
        cuts = [0, *(j for j in range(1, len(good)) if good[j][2].shape != good[j - 1][2].shape), len(good)]
        return [_batch(good[a:b]) for a, b in itertools.pairwise(cuts)], bad
    shapes = Counter(r[2].shape for r in good)
    if len(shapes) > 1:  # only without a declared contract: the batch's usual shape, never its first item's
        usual = shapes.most_common(1)[0][0]
        bad += [Unreadable(r[0], r[1], f"shape {r[2].shape} differs from the batch's {usual}", "shape")
                for r in good if r[2].shape != usual]
        good = [r for r in good if r[2].shape == usual]
    return [_batch(good)], bad


def _batch(good) -> Batch:
    keys = sorted({k for r in good for k in r[4]})
    return Batch(
        images=np.stack([r[2] for r in good]),
        labels=[r[3] for r in good] if isinstance(good[0][3], np.ndarray) else np.array([r[3] for r in good],
                                                                                          dtype=np.int64),
        ids=[r[1] for r in good],
        meta={k: [str(r[4].get(k, "")) for r in good] for k in keys},
        index=np.array([r[0] for r in good], dtype=np.int64),
    )


class SplitStream:
    """One split of a use case's data, capped and filtered, iterated in batches."""

    def __init__(self, split: Split, role: str, cap: int | None, seed: int, batch_size: int, workers: int,
                 expected: tuple[int, ...] | None = None, n_classes: int | None = None):
        self.split, self.role, self.expected, self.n_classes = split, role, expected, n_classes
        self.tiling = getattr(split, "tiling", None)  # `fit: tiles`: whole images of any size, the model a tile
        if self.tiling is not None and expected is not None:
            self.expected = (None, None, *expected[2:])
        n = self.total = len(split)
        if cap is not None and cap < n:
            # a seeded, sorted subset: deterministic and spread over the whole split (never an arange of n)
            self.positions = np.sort(np.random.default_rng(seed).choice(n, size=cap, replace=False))
        else:
            self.positions = np.arange(n)
        self.batch_size, self.workers = batch_size, workers
        self.unreadable: list[Unreadable] = []

    def __len__(self) -> int:
        return len(self.positions)

    def batches(self, batch_size: int | None = None) -> Iterator[Batch]:
        """Unreadable items are skipped (and listed in `self.unreadable`): data quality reports them."""
        loader = DataLoader(
            _Guarded(self.split, self.positions, self.expected, self.n_classes),
            batch_size=batch_size or self.batch_size,
            shuffle=False,
            num_workers=self.workers,
            collate_fn=functools.partial(_collate, runs=self.tiling is not None),
            persistent_workers=False,
        )
        self.unreadable = []
        for batches, bad in loader:
            self.unreadable.extend(bad)
            yield from batches

    def fingerprint(self) -> str | None:
        fp = getattr(self.split, "fingerprint", None)
        if fp is None:
            return None
        h = hashlib.sha256(str(fp()).encode())
        h.update(self.positions.tobytes())
        return h.hexdigest()


class DataSource:
    """The splits of a use case, by role (train / validation / test). With `model`, every item is judged
    against its declared input (`judge_item`); without, items only need the shape of their batch."""

    def __init__(self, spec: DataSpec, seed: int = 0, model: ModelSpec | None = None):
        self.spec, self.seed = spec, seed
        self.expected = expected_shape(model) if model is not None else None
        self.n_classes = len(model.class_names) if model is not None else None
        self.loader = resolve(BUILTIN_LOADERS.get(spec.loader, spec.loader), spec.path, "loader", DataError)
        if not callable(self.loader):
            raise DataError(f"data.loader {spec.loader!r} is not callable")
        self._streams: dict[str, SplitStream] = {}

    @property
    def roles(self) -> list[str]:
        return list(self.spec.splits)

    def tiling(self):
        """The splits' tiles (`tasks.segmentation_tiles.Tiling`) under `fit: tiles`, else None (the loader's
        parameters are the same for every split: the first one's)."""
        return self.stream(self.roles[0]).tiling if self.roles else None

    def call(self, name: str) -> str:
        """The loader call, as the user would write it: errors name it."""
        args = ", ".join([repr(name), *(f"{k}={v!r}" for k, v in self.spec.params.items())])
        return f"loader {self.spec.loader!r}: {self.spec.loader.rpartition(':')[2]}({args})"

    def sampled(self, *roles: str) -> str:
        """Why a count over these splits is no census: those read as a seeded sample (data.max_samples), in
        words; '' when every one is read whole."""
        capped = [f"{r} {len(s)} of {s.total} items" for r in dict.fromkeys(roles) if r in self.spec.splits
                  and (s := self.stream(r)).total > len(s)]
        return (f"counted over a seeded sample (the use case's sample sizes: {', '.join(capped)}): the items "
                "outside it were never read, so the count over the whole split is unknown") if capped else ""

    def stream(self, role: str) -> SplitStream:
        if role not in self._streams:
            name = self.spec.splits[role]
            call = self.call(name)
            try:
                split = self.loader(name, **self.spec.params)
            except Exception as e:  # the loader is the partner's code: what it raises is a user error
                raise DataError(f"{call} raised {type(e).__name__}: {e}") from None
            for attr in ("__len__", "__getitem__"):
                if not hasattr(split, attr):
                    raise DataError(f"{call} returned an object of type {type(split).__name__}, without {attr}")
            try:
                n = len(split)
            except Exception as e:
                raise DataError(f"{call}: len() of its split raised {type(e).__name__}: {e}") from None
            if not isinstance(n, int) or n < 0:
                raise DataError(f"{call}: len() of its split is {n!r}, not a count")
            cap = self.spec.max_samples.get(role)
            if n > MAX_ITEMS and (cap is None or cap > MAX_ITEMS):
                raise DataError(f"{call}: its split has {n:,} items, more than {MAX_ITEMS:,} can be streamed: "
                                f"set data.max_samples.{role}")
            self._streams[role] = SplitStream(
                split, role, self.spec.max_samples.get(role), self.seed, self.spec.batch_size, self.spec.workers,
                self.expected, self.n_classes,
            )
        return self._streams[role]


# --- built-in loaders -------------------------------------------------------------------------

def read_image(path: Path, name: str, grey: bool) -> np.ndarray:
    """One image file as (H, W) grey or (H, W, 3) RGB; one over `MAX_PIXELS` is refused from its header."""
    from PIL import Image

    with warnings.catch_warnings():  # PIL only warns below twice its own limit: ours decides
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        im = Image.open(path)  # reads the header only: a decompression bomb is refused undecoded
    with im:
        check_pixels(*im.size, name)
        return np.asarray(im.convert("L" if grey else "RGB"))


class ImageFolder:
    """root/<split>/<class>/*.png: the layout most teams already have."""

    SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}

    def __init__(self, split: str, root: str, class_names: Sequence[str], grey: bool = True):
        base = Path(root) / split
        if not base.is_dir():
            raise OSError(f"no folder {base}")
        self.files: list[tuple[Path, int]] = []
        for label, cls in enumerate(class_names):
            for f in sorted((base / cls).glob("*")):
                if f.suffix.lower() in self.SUFFIXES:
                    self.files.append((f, label))
        self.root, self.grey = base, grey

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> Item:
        path, label = self.files[i]
        return Item(image=read_image(path, self.name(i), self.grey), label=label, id=self.name(i))

    def name(self, i: int) -> str:
        return str(self.files[i][0].relative_to(self.root))

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for path, label in self.files:
            h.update(f"{path.relative_to(self.root)}:{label}:".encode())
            h.update(path.read_bytes())
        return h.hexdigest()


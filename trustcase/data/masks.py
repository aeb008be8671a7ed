"""Segmentation splits from image files with a mask file each: the label of an item is its mask
(`streaming.Mask`, class indices), read lazily like `streaming.ImageFolder`.

Mask values become classes by one of three encodings, stated in the use case (the loader's parameters):
- `binary`: one defect class, 0 background and 255 defect; a pixel >= 128 is the defect (class 1), so a mask saved
  through lossy compression (values between 0 and 255) keeps its drawing;
- `index`: the value is the class index; a value >= the number of classes is no class;
- `palette`: an RGB colour per class, in class order; a colour of no class is no class.

Images of different sizes are brought to the model's (`size`, H x W) by `fit`, the mask following exactly:
- `resize`: the image by bilinear interpolation, the mask by nearest neighbour (a class is never blended);
- `pad`: at the bottom and right, the image with `pad_value`, the mask with class 0 (background); an image larger
  than `size` is refused;
- `none`: as they are (the model's input contract then refuses every other size);
- `tiles`: as they are, at their own resolution, for a model whose input is a tile of `size` (H x W) run over the
  image with `overlap` (H, W) pixels of overlap and its logits stitched back (`tasks.segmentation_tiles`); the mask is
  never cut or resampled: the whole image is scored on its whole mask. An image smaller than a tile is padded with
  `pad_value` for the model only, its padded pixels never scored.

Found when the split is built, before any work, each an `MaskError` naming its file (read from the file headers,
nothing decoded): an image without a mask or a mask without an image, a mask whose size differs from its image's, an
image larger than `size` under `pad`. Found when an item is read
(`streaming.Rejected`, counted and excluded by the stream, the file named): a mask value that is no class.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from numbers import Integral
from pathlib import Path
from typing import Literal, get_args

import numpy as np
from PIL import Image

from trustcase.data.streaming import DataError, Item, Mask, Rejected, check_pixels, read_image

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")
Encoding = Literal["binary", "index", "palette"]
Fit = Literal["resize", "pad", "none", "tiles"]


class MaskError(DataError):
    """A mask or image that cannot be used (its file named), found when the split is built."""


def pair_files(images: Path, masks: Path | None = None, mask_suffix: str = ".png",
               image_suffixes: Sequence[str] = IMAGE_SUFFIXES) -> list[tuple[Path, Path]]:
    """Every (image, mask) of a folder, matched by file stem, sorted: masks in `masks` (default: beside the images,
    then files with `mask_suffix` are the masks and the others of `image_suffixes` the images). An image without a
    mask, or a mask without an image, is a `MaskError` naming it."""
    images = Path(images)
    masks = images if masks is None else Path(masks)
    for folder in (images, masks):
        if not folder.is_dir():
            raise MaskError(f"no folder {folder}")
    same = masks == images
    pictures = {p.stem: p for p in images.iterdir()
                if p.suffix.lower() in image_suffixes and not (same and p.suffix.lower() == mask_suffix)}
    drawn = {p.stem: p for p in masks.iterdir() if p.suffix.lower() == mask_suffix}
    for stem, p in sorted(pictures.items()):
        if stem not in drawn:
            raise MaskError(f"image {p} has no mask {stem}{mask_suffix} in {masks}")
    for stem, p in sorted(drawn.items()):
        if stem not in pictures:
            raise MaskError(f"mask {p} has no image {stem}.* in {images}")
    return [(pictures[s], drawn[s]) for s in sorted(pictures)]


def decode(values: np.ndarray, encoding: Encoding, n_classes: int, palette: Sequence[Sequence[int]] | None,
           where: str) -> np.ndarray:
    """A mask file's values as (H, W) uint8 class indices, or `Rejected` naming the file and the values of no class."""
    if encoding == "binary":
        return (values >= 128).astype(np.uint8)
    if encoding == "index":
        bad = (values < 0) | (values >= n_classes)
        if bad.any():
            raise Rejected("label", f"{where}: mask value(s) {np.unique(values[bad])[:5].tolist()} are no class "
                                    f"index (0..{n_classes - 1}), {int(bad.sum())} pixel(s)")
        return values.astype(np.uint8)
    colours = np.asarray(palette, np.int64).reshape(-1, 3)
    code = (values[..., 0].astype(np.int64) << 16) | (values[..., 1].astype(np.int64) << 8) | values[..., 2]
    keys = (colours[:, 0] << 16) | (colours[:, 1] << 8) | colours[:, 2]
    out = np.full(code.shape, 255, np.uint8)
    for c, key in enumerate(keys):
        out[code == key] = c
    if (out == 255).any():
        stray = np.unique(values[out == 255].reshape(-1, 3), axis=0)[:5].tolist()
        raise Rejected("label", f"{where}: mask colour(s) {stray} are in no class's palette entry, "
                                f"{int((out == 255).sum())} pixel(s)")
    return out


def fit(image: np.ndarray, mask: np.ndarray, size: tuple[int, int], how: Fit, pad_value: float = 0) \
        -> tuple[np.ndarray, np.ndarray]:
    """The image (H, W[, C]) and its mask (H, W) brought to `size` (H, W): the mask follows the image exactly."""
    h, w = size
    if how in ("none", "tiles") or image.shape[:2] == (h, w):
        return image, mask
    if how == "resize":
        resized = Image.fromarray(image).resize((w, h), Image.Resampling.BILINEAR)
        return np.asarray(resized), np.asarray(Image.fromarray(mask).resize((w, h), Image.Resampling.NEAREST))
    padded = np.full((h, w, *image.shape[2:]), pad_value, image.dtype)
    padded[:image.shape[0], :image.shape[1]] = image
    out = np.zeros((h, w), mask.dtype)
    out[:mask.shape[0], :mask.shape[1]] = mask
    return padded, out


class MaskSplit:
    """A segmentation split from (image, mask) file pairs; `meta[i]` is item i's metadata (e.g. its defect type).
    Items are named by their image's path relative to `root` (default: the image's folder). Under `fit: tiles`,
    `tiling` is the model's tiles of `size` overlapping by `overlap` pixels (else None)."""

    def __init__(self, pairs: Sequence[tuple[Path, Path]], class_names: Sequence[str], size: tuple[int, int],
                 fit: Fit = "resize", encoding: Encoding = "binary", palette: Sequence[Sequence[int]] | None = None,
                 meta: Sequence[dict[str, str]] | None = None, root: str | Path | None = None, grey: bool = True,
                 pad_value: float = 0, overlap: tuple[int, int] = (0, 0)):
        if fit not in get_args(Fit):  # a partner's loader may pass the use case's value through untyped
            raise MaskError(f"fit: {fit!r} is not one of {', '.join(get_args(Fit))}")
        if not (isinstance(overlap, list | tuple) and len(overlap) == 2
                and all(isinstance(v, Integral) and not isinstance(v, bool) and v >= 0 for v in overlap)):
            raise MaskError(f"overlap: {overlap!r} is not two pixel counts [H, W] >= 0")
        if encoding == "binary" and len(class_names) != 2:
            raise MaskError(f"binary masks (0 background, 255 defect) hold two classes; the model has "
                            f"{len(class_names)} ({list(class_names)}): use the index or palette encoding")
        if encoding == "palette" and (palette is None or len(palette) != len(class_names)):
            raise MaskError(f"palette masks need one RGB colour per class ({len(class_names)}), got {palette!r}")
        self.pairs = [(Path(i), Path(m)) for i, m in pairs]
        self.class_names, self.size, self.how, self.encoding = list(class_names), tuple(size), fit, encoding
        self.palette, self.grey, self.pad_value = palette, grey, pad_value
        self.meta = list(meta) if meta is not None else [{} for _ in self.pairs]
        self.root = Path(root) if root is not None else None
        self.tiling = None
        if fit == "tiles":
            from trustcase.tasks.segmentation_tiles import Tiling

            try:
                self.tiling = Tiling(tuple(self.size), tuple(overlap), pad_value)
            except ValueError as e:
                raise MaskError(f"fit: tiles: {e}") from None
        for image, mask in self.pairs:  # headers only: sizes are known before any pixel is decoded
            with Image.open(image) as a, Image.open(mask) as b:
                if a.size != b.size:
                    raise MaskError(f"mask {mask} is {b.size[0]}x{b.size[1]} px, its image {image} is "
                                    f"{a.size[0]}x{a.size[1]}")
                if fit == "pad" and (a.size[1] > self.size[0] or a.size[0] > self.size[1]):
                    raise MaskError(f"image {image} is {a.size[0]}x{a.size[1]} px, larger than the {self.size[1]}x"
                                    f"{self.size[0]} it is padded to (fit: pad): use fit: resize")

    def __len__(self) -> int:
        return len(self.pairs)

    def name(self, i: int) -> str:
        image = self.pairs[i][0]
        return str(image.relative_to(self.root)) if self.root is not None else image.name

    def __getitem__(self, i: int) -> Item:
        image_path, mask_path = self.pairs[i]
        image = read_image(image_path, self.name(i), self.grey)
        with Image.open(mask_path) as m:
            check_pixels(*m.size, mask_path.name)
            if self.encoding == "index" and m.mode in ("L", "P", "I", "I;16"):
                values = np.asarray(m)  # the stored indices (a palette image's too), never converted to grey
            else:
                values = np.asarray(m.convert("RGB" if self.encoding == "palette" else "L"))
        mask = decode(values, self.encoding, len(self.class_names), self.palette, mask_path.name)
        image, mask = fit(image, mask, self.size, self.how, self.pad_value)
        return Item(image=image, label=Mask(mask), id=self.name(i), meta=dict(self.meta[i]))

    def fingerprint(self) -> str:
        tiles = f":{self.tiling.overlap}" if self.tiling else ""
        h = hashlib.sha256(f"{self.size}:{self.how}{tiles}:{self.encoding}:{self.palette}".encode())
        for image, mask in self.pairs:
            for p in (image, mask):
                h.update(p.name.encode() + b"\0")
                h.update(p.read_bytes())
        return h.hexdigest()

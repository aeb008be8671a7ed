"""Tiles: a segmenter whose input is a fixed tile (the use case's `model.input_shape`) run over images of any size at
their own resolution, its per-pixel logits stitched back to the whole image, which is scored on its whole mask.

- **The grid** (`Tiling.windows`): along each axis tiles start every `tile - overlap` pixels from 0, and the last
  one is moved back to end exactly at the image's edge (so no tile reaches outside the image and no pixel is left
  out: the last two tiles overlap more than `overlap` when the image is not a whole number of strides). An image
  smaller than a tile along an axis is padded at the bottom and right with `pad_value` to one tile for the model,
  and its stitched logits are cropped back to the image: padded pixels are never scored.
- **Stitching**: each pixel's logits are the mean of the logits of every tile covering it (with no overlap
  and an image a whole number of tiles, exactly its one tile's). The mask is never cut: the whole image's predicted
  classes are scored on its whole mask (`segmentation_metrics.SegmentationTally`), and the image-level decision is
  the whole image's.
- **Streaming** (`tiled_logits`): tiles of consecutive images are batched together, at most `batch` tiles per forward
  pass; only the images whose tiles are in flight are held (each with a logit sum and a count per pixel), and each
  image's stitched logits are yielded as soon as its last tile is back.
- **In the assessment** (`TiledSegmenter`, `tiled`): the model as the checks see it takes whole images of any size
  (a batch of images of one size: the stream never stacks two sizes) and returns their stitched logits, the same
  arithmetic as `tiled_logits` in torch (float64 sums in tile order, so the figures equal `evaluate`'s bit for bit)
  and differentiable, so attacks and smoothing act on the whole image; one tile per forward pass, so the logits do not
  depend on the data's batch size. Its `module` is the tiler around the
  network: layer hooks would see tiles, not images, so checks that read the network's layers say they are not
  applicable (`Check.whole_images`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from trustcase.models.classifier import Classifier, ModelError
from trustcase.tasks.segmentation import Segmenter, judge_output


@dataclass(frozen=True)
class Tiling:
    """Tiles of `tile` (H, W) pixels overlapping by `overlap` (H, W) pixels, 0 <= overlap < tile; an image smaller
    than a tile is padded with `pad_value` (pixel space) for the model only."""

    tile: tuple[int, int]
    overlap: tuple[int, int] = (0, 0)
    pad_value: float = 0.0

    def __post_init__(self):
        for t, o, axis in zip(self.tile, self.overlap, ("height", "width"), strict=True):
            if t < 1 or not 0 <= o < t:
                raise ValueError(f"tile {axis} {t} with overlap {o}: need a tile of >= 1 pixel and "
                                 f"0 <= overlap < tile")

    @staticmethod
    def starts(length: int, tile: int, overlap: int) -> list[int]:
        """Where the tiles along one axis start: every tile - overlap pixels, the last one ending at the edge."""
        if length < tile:
            raise ValueError(f"{length} px is smaller than the {tile} px tile")
        stride = tile - overlap
        out = list(range(0, length - tile + 1, stride))
        if out[-1] != length - tile:
            out.append(length - tile)
        return out

    def windows(self, height: int, width: int) -> list[tuple[int, int]]:
        """The (top, left) of every tile of an image, row by row."""
        (th, tw), (oh, ow) = self.tile, self.overlap
        return [(y, x) for y in self.starts(height, th, oh) for x in self.starts(width, tw, ow)]

    def padded(self, image: np.ndarray) -> np.ndarray:
        """The image (H, W, C) padded at the bottom and right to at least one tile along each axis."""
        h, w = image.shape[:2]
        th, tw = self.tile
        if h >= th and w >= tw:
            return image
        out = np.full((max(h, th), max(w, tw), *image.shape[2:]), self.pad_value, image.dtype)
        out[:h, :w] = image
        return out


class _InFlight:
    """One image whose tiles are being run: its size, the logit sum and count per pixel of its padded input."""

    def __init__(self, key, size: tuple[int, int], padded: tuple[int, int], n_classes: int, tiles: int):
        self.key, self.left, (self.height, self.width) = key, tiles, size
        self.total = np.zeros((n_classes, *padded), np.float64)
        self.count = np.zeros(padded, np.int64)


def tiled_logits(model: Classifier, images: Iterable[tuple[object, np.ndarray]], tiling: Tiling,
                 batch: int = 32) -> Iterator[tuple[object, np.ndarray]]:
    """Per image (key, pixel-space (H, W, C) array of any size), in order: (key, its stitched (K, H, W) logits). The
    model's forward pass sees (<= batch, C, h, w) tiles through its normalisation and its output contract
    (`model.logits`, which names the image keys of a tile with NaN/inf logits)."""
    if tuple(model.spec.input_shape[1:]) != tuple(tiling.tile):
        raise ValueError(f"tiles of {tiling.tile} px, but the model takes {tuple(model.spec.input_shape[1:])}")
    h, w = tiling.tile
    queue: list[tuple[_InFlight, int, int, np.ndarray]] = []  # (image, top, left, tile pixels)
    flight: list[_InFlight] = []

    def run(part):
        logits = model.logits(np.stack([p for _, _, _, p in part]), [str(f.key) for f, _, _, _ in part])
        for (f, y, x, _), out in zip(part, logits, strict=True):
            f.total[:, y:y + h, x:x + w] += out
            f.count[y:y + h, x:x + w] += 1
            f.left -= 1
        while flight and flight[0].left == 0:  # images leave in order once their last tile is back
            f = flight.pop(0)
            yield f.key, (f.total / f.count)[:, :f.height, :f.width].astype(np.float32)  # padding cropped away

    for key, image in images:
        size, image = image.shape[:2], tiling.padded(image)
        windows = tiling.windows(*image.shape[:2])
        f = _InFlight(key, size, image.shape[:2], model.n_classes, len(windows))
        flight.append(f)
        for y, x in windows:
            queue.append((f, y, x, image[y:y + h, x:x + w]))
            if len(queue) == batch:
                yield from run(queue)
                queue = []
    if queue:
        yield from run(queue)


def tiled_segment(model: Classifier, images: Iterable[tuple[object, np.ndarray]], tiling: Tiling,
                  batch: int = 32) -> Iterator[tuple[object, np.ndarray]]:
    """Per image (key, its predicted class per pixel (H, W)), the arg max of the stitched logits (the background,
    class 0, winning ties as in `Segmenter.segment`)."""
    for key, logits in tiled_logits(model, images, tiling, batch):
        yield key, torch.from_numpy(logits).argmax(0).numpy()


def evaluate(model: Classifier, split, tiling: Tiling, defect_pixels: int, check: str = "performance",
             seed: int = 0, batch: int = 32, subgroups: list[str] | None = None):
    """A split of whole images and masks (`data.masks.MaskSplit` with `fit: tiles`, or any split whose items are
    whole images with their `Mask`) scored by tiles: a `SegmentationTally` updated image by image (only per-image
    pixel counts kept). Returns (tally, rejected): items whose image or mask breaks the contract (judged as the
    stream judges them: a mask value that is no class, NaN pixels, another mask size) are named and left out.
    A split is read item by item, so at most one whole image waits for the tiles of the batch in flight."""
    from trustcase.data.streaming import Rejected, judge_item, judge_mask
    from trustcase.tasks.segmentation_metrics import SegmentationTally

    tally = SegmentationTally(list(model.spec.class_names), defect_pixels, check, seed, subgroups or [])
    rejected: list[tuple[str, str]] = []
    items: dict[str, tuple[np.ndarray, dict]] = {}

    def images():
        for i in range(len(split)):
            try:
                item = split[i]
                image = judge_item(item.image, None)
                mask = judge_mask(item.label, model.n_classes, image.shape[:2])
            except Rejected as e:  # the item named as the stream names it (`name(i)`, else its position)
                rejected.append((str(split.name(i)) if hasattr(split, "name") else f"#{i}", str(e)))
                continue
            items[str(item.id)] = (mask, dict(item.meta))
            yield str(item.id), image.astype(np.float32)

    for key, pred in tiled_segment(model, images(), tiling, batch):
        mask, meta = items.pop(key)
        tally.update(pred[None], [mask], [key], {k: [v] for k, v in meta.items()})
    return tally, rejected


def stitch(forward, x: torch.Tensor, tiling: Tiling, batch: int, pad: torch.Tensor) -> torch.Tensor:
    """Normalised images (B, C, H, W) of one size -> their stitched logits (B, K, H, W) float32, differentiable: every
    image padded (bottom and right, with `pad`, the pad value normalised) to at least a tile, its tiles (`windows`)
    run through `forward` in passes of at most `batch` tiles (each pass's output judged against the tile:
    `judge_output`), each pixel the mean of its covering tiles' logits (float64 sums in tile order, as
    `tiled_logits`), cropped back to the image."""
    (th, tw), (b, c, h, w) = tiling.tile, x.shape
    ph, pw = max(h, th), max(w, tw)
    x = x.permute(0, 2, 3, 1)  # tiles are cut channels-last, the layout `to_input` gives the model (its fast path)
    if (ph, pw) != (h, w):
        filled = pad.reshape(1, 1, 1, c).expand(b, ph, pw, c).clone()
        filled[:, :h, :w] = x
        x = filled
    windows = tiling.windows(ph, pw)
    where = [(i, y, z) for i in range(b) for y, z in windows]
    total = count = None
    for s in range(0, len(where), batch):
        part = where[s:s + batch]
        out = forward(torch.stack([x[i, y:y + th, z:z + tw] for i, y, z in part]).permute(0, 3, 1, 2))
        if not isinstance(out, torch.Tensor) or out.ndim != 4 or tuple(out.shape[2:]) != (th, tw):
            judge_output(out, out.shape[1] if isinstance(out, torch.Tensor) and out.ndim == 4 else 0, (th, tw))
        if total is None:
            total = torch.zeros((b, out.shape[1], ph, pw), dtype=torch.float64)
            count = torch.zeros((ph, pw), dtype=torch.float64)
            for y, z in windows:  # every image of the batch has the same grid
                count[y:y + th, z:z + tw] += 1
        for (i, y, z), o in zip(part, out.double(), strict=True):
            total[i, :, y:y + th, z:z + tw] = total[i, :, y:y + th, z:z + tw] + o
    return (total / count)[:, :, :h, :w].float()


class TiledModule(torch.nn.Module):
    """A tile's network run over whole normalised images (`stitch`): what `module(x)` means for a tiled segmenter."""

    def __init__(self, inner: torch.nn.Module, tiling: Tiling, batch: int, pad: torch.Tensor):
        super().__init__()
        self.inner, self.tiling, self.batch, self.pad = inner, tiling, batch, pad
        self.training = inner.training  # never switched: the network is shared with other work

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return stitch(self.inner, x, self.tiling, self.batch, self.pad)


class TiledSegmenter(Segmenter):
    """A segmenter of tiles seen as a segmenter of whole images: pixel-space images (B, H, W, C) of any size in (one
    size per batch), their stitched per-pixel logits (B, K, H, W) out. `batch`: tiles per forward pass. A network's
    float32 output for one input can depend on how many inputs its pass holds (the bundled U-Net's by up to 1e-6
    between 1 and 16 tiles), so the assessment runs one tile per pass: the same logits whatever the data's batch size,
    shard or check, bit for bit those of `tiled_logits(..., batch=1)` (on one thread no slower: bench)."""

    def __init__(self, inner: Segmenter, tiling: Tiling, batch: int = 1):
        if tuple(inner.spec.input_shape[1:]) != tuple(tiling.tile):
            raise ModelError(f"tiles of {tiling.tile[1]}x{tiling.tile[0]} px (the loader's size), but "
                             f"model.input_shape is {list(inner.spec.input_shape)}: the model's input is one tile")
        super().__init__(inner)
        self.tiling, self.batch = tiling, batch
        c = inner.spec.input_shape[0]
        self._pad = (torch.full((1, c), float(np.float32(tiling.pad_value))) * self._scale.view(1, c)
                     + self._shift.view(1, c)).view(c)  # the pad pixel normalised as `to_input` normalises a pixel
        if inner.module is not None:
            self.module = TiledModule(inner.module, tiling, batch, self._pad)

    def to_input(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) pixel space, any H and W -> (B, C, H, W) normalised float32."""
        if isinstance(images, np.ndarray):
            x = torch.as_tensor(images if images.flags.writeable else images.copy()).float()
        else:
            x = images.float()
        c = self.spec.input_shape[0]
        if x.ndim != 4 or x.shape[3] != c:
            raise ModelError(f"expected a batch (B, H, W, {c}) of whole images, got shape {tuple(x.shape)}")
        return x.permute(0, 3, 1, 2) * self._scale + self._shift

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return stitch(self._inner.forward, x, self.tiling, self.batch, self._pad)

    def check_output(self, out: torch.Tensor, ids: list[str] | None = None) -> None:
        judge_output(out, self.n_classes, tuple(out.shape[2:]), ids)  # each tile's size was judged by `stitch`


def tiled(model: Classifier, tiling: Tiling | None, batch: int = 1) -> Classifier:
    """The model as the checks see it: under `fit: tiles` (`tiling`) a `TiledSegmenter`, else the model itself."""
    if tiling is None:
        return model
    if not isinstance(model, Segmenter):
        raise ModelError("fit: tiles stitches per-pixel logits: it needs task: segmentation")
    return TiledSegmenter(model, tiling, batch)

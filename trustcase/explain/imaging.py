"""Image helpers of the explanations: feature masks (a grid, scikit-image superpixels) and pictures of
attributions (never of confidential inputs: callers decide)."""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch


def grid_segments(h: int, w: int, cells: int) -> torch.Tensor:
    """Square superpixels as a captum feature mask (1, 1, h, w): the same segments for every image."""
    rows = torch.div(torch.arange(h) * cells, h, rounding_mode="floor")
    cols = torch.div(torch.arange(w) * cells, w, rounding_mode="floor")
    return (rows[:, None] * cells + cols[None])[None, None]


def superpixels(x: torch.Tensor, kind: Literal["slic", "quickshift"], n: int, compactness: float) -> torch.Tensor:
    """Superpixels per image (scikit-image) as captum feature masks (B, 1, H, W), on each image scaled to [0, 1]."""
    from skimage.segmentation import quickshift, slic

    out = []
    for img in x.detach().numpy():
        lo, hi = img.min(), img.max()
        im = np.moveaxis((img - lo) / (hi - lo if hi > lo else 1.0), 0, -1).astype(np.float64)  # (H, W, C)
        if kind == "slic":
            seg = slic(im, n_segments=n, compactness=compactness, channel_axis=-1, start_label=0)
        else:
            rgb = np.repeat(im, 3, axis=-1) if im.shape[-1] == 1 else im[..., :3]
            seg = quickshift(rgb, kernel_size=max(1, round(math.sqrt(im.shape[0] * im.shape[1] / n) / 2)),
                             max_dist=10 * compactness + 2, ratio=0.5, convert2lab=False)
        out.append(np.unique(seg, return_inverse=True)[1].reshape(seg.shape))  # labels 0..k-1
    return torch.from_numpy(np.stack(out))[:, None].long()


def to_uint8(images: np.ndarray, value_range: tuple[float, float]) -> np.ndarray:
    """(B, H, W, C) pixel space -> (B, H, W, 3) uint8 for display."""
    lo, hi = value_range
    x = np.clip((np.asarray(images, np.float64) - lo) / (hi - lo), 0, 1)
    x = np.repeat(x, 3, axis=-1) if x.shape[-1] == 1 else x[..., :3]
    return (x * 255).round().astype(np.uint8)


def overlay(images: np.ndarray, heatmaps: np.ndarray, value_range: tuple[float, float],
            alpha: float = 0.6) -> np.ndarray:
    """Positive relevance as a 'hot' colour map over the grey image, scaled per map (99th percentile)."""
    base = to_uint8(images, value_range).astype(np.float64) / 255
    h = np.maximum(np.asarray(heatmaps, np.float64), 0)
    scale = np.quantile(h.reshape(len(h), -1), 0.99, axis=1)[:, None, None]
    t = np.clip(h / np.where(scale > 0, scale, 1), 0, 1)
    hot = np.stack([np.clip(3 * t, 0, 1), np.clip(3 * t - 1, 0, 1), np.clip(3 * t - 2, 0, 1)], axis=-1)
    a = alpha * t[..., None]
    return (((1 - a) * base + a * hot).clip(0, 1) * 255).round().astype(np.uint8)


def tile(rows: list[list[np.ndarray]], scale: int = 2, gap: int = 2) -> np.ndarray:
    """A grid of (H, W, 3) uint8 tiles, each enlarged by `scale` (nearest), with white gaps."""
    h, w = rows[0][0].shape[:2]
    h2, w2 = h * scale, w * scale
    cols = max(len(r) for r in rows)
    out = np.full((len(rows) * (h2 + gap) + gap, cols * (w2 + gap) + gap, 3), 255, np.uint8)
    for i, r in enumerate(rows):
        for j, t in enumerate(r):
            big = np.repeat(np.repeat(t, scale, axis=0), scale, axis=1)
            out[gap + i * (h2 + gap):gap + i * (h2 + gap) + h2, gap + j * (w2 + gap):gap + j * (w2 + gap) + w2] = big
    return out


def save_png(path, image: np.ndarray) -> None:
    from PIL import Image

    Image.fromarray(image).save(path, format="PNG")


def save_gif(path, frames: list[np.ndarray], ms_per_frame: int = 700) -> None:
    from PIL import Image

    pics = [Image.fromarray(f) for f in frames]
    pics[0].save(path, format="GIF", save_all=True, append_images=pics[1:], duration=ms_per_frame, loop=0)

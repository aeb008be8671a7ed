"""Data-quality evidence (AMLAS data stage): one streaming pass over every split.

Per split: size and class balance, unreadable / constant / out-of-range images, exact and near
duplicates (perceptual hash) within and across splits (cross-split duplicates are leakage),
brightness / contrast / sharpness distributions with a drift test against the training split,
coverage of each ODD descriptor, and the content hash of the data. Only per-item scalars (three
properties and two hashes) are kept across batches, never the images.
"""

from __future__ import annotations

import cv2
import numpy as np
from scipy import fft

HASH_SIDE, HASH_BITS = 32, 8  # DCT of a 32x32 thumbnail, top-left 8x8 coefficients -> 64 bits


def perceptual_hash(images: np.ndarray) -> np.ndarray:
    """64-bit pHash per image (B, H, W, C) -> (B,) uint64; robust to small intensity/scale changes."""
    g = images.astype(np.float32).mean(axis=-1)
    thumbs = np.stack([cv2.resize(im, (HASH_SIDE, HASH_SIDE), interpolation=cv2.INTER_AREA) for im in g])
    low = fft.dctn(thumbs, axes=(1, 2), norm="ortho")[:, :HASH_BITS, :HASH_BITS].reshape(len(g), -1)
    bits = low > np.median(low, axis=1, keepdims=True)
    return np.packbits(bits, axis=1).view(">u8").ravel().astype(np.uint64)


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    x = np.bitwise_xor(a, b)
    return np.unpackbits(x.astype(">u8").view(np.uint8).reshape(-1, 8), axis=1).sum(axis=1)


def near_pairs(hashes: np.ndarray, max_distance: int) -> np.ndarray:
    """All index pairs (i < j) with Hamming distance <= max_distance, without an N^2 loop.

    Pigeonhole (multi-index hashing): split the 64 bits into max_distance + 1 chunks; two hashes
    within the distance agree exactly on at least one chunk, so only same-chunk buckets are compared.
    """
    n = len(hashes)
    if n < 2:
        return np.empty((0, 2), np.int64)
    chunks = max_distance + 1
    edges = np.linspace(0, 64, chunks + 1).astype(int)
    found = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        key = (hashes >> np.uint64(lo)) & np.uint64((1 << (hi - lo)) - 1)
        order = np.argsort(key, kind="stable")
        ks = key[order]
        starts = np.flatnonzero(np.r_[True, ks[1:] != ks[:-1]])
        sizes = np.diff(np.r_[starts, n])
        for s, size in zip(starts[sizes > 1], sizes[sizes > 1]):
            idx = order[s:s + size]
            i, j = np.triu_indices(size, 1)
            a, b = idx[i], idx[j]
            keep = hamming(hashes[a], hashes[b]) <= max_distance
            found.append(np.stack([np.minimum(a, b)[keep], np.maximum(a, b)[keep]], axis=1))
    if not found:
        return np.empty((0, 2), np.int64)
    return np.unique(np.concatenate(found), axis=0)





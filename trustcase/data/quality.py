"""Data-quality evidence (AMLAS data stage): one streaming pass over every split.

Per split: size and class balance, unreadable / constant / out-of-range images, exact and near
duplicates (perceptual hash) within and across splits (cross-split duplicates are leakage),
brightness / contrast / sharpness distributions with a drift test against the training split,
coverage of each ODD descriptor, and the content hash of the data. Only per-item scalars (three
properties and two hashes) are kept across batches, never the images.
"""

from __future__ import annotations

import hashlib
from collections import Counter

import cv2
import numpy as np
from scipy import fft, stats

from trustcase.measurement import census, proportion
from trustcase.schemas import Histogram, Measurement, Scope

HASH_SIDE, HASH_BITS = 32, 8  # DCT of a 32x32 thumbnail, top-left 8x8 coefficients -> 64 bits


def perceptual_hash(images: np.ndarray) -> np.ndarray:
    """64-bit pHash per image (B, H, W, C) -> (B,) uint64; robust to small intensity/scale changes."""
    g = images.astype(np.float32).mean(axis=-1)
    thumbs = np.stack([cv2.resize(im, (HASH_SIDE, HASH_SIDE), interpolation=cv2.INTER_AREA) for im in g])
    low = fft.dctn(thumbs, axes=(1, 2), norm="ortho")[:, :HASH_BITS, :HASH_BITS].reshape(len(g), -1)
    bits = low > np.median(low, axis=1, keepdims=True)
    return np.packbits(bits, axis=1).view(">u8").ravel().astype(np.uint64)


def exact_hash(items: np.ndarray) -> np.ndarray:
    """64 bits of the SHA-256 of each item's values (B, ...) -> (B,) uint64: equal only for the same values."""
    return np.array([int.from_bytes(hashlib.sha256(np.ascontiguousarray(x).tobytes()).digest()[:8], "little")
                     for x in items], np.uint64)


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


def duplicates(check: str, split_of: list[str], exact: np.ndarray, near: np.ndarray,
               distance: int) -> list[Measurement]:
    """Exact and near duplicates within each split, and leakage: items outside the training split that
    duplicate a training item (exact content hash, or perceptual hash within `distance` bits)."""
    roles = np.array(split_of)
    out: list[Measurement] = []
    if len(roles) == 0:
        return out

    def groups(pairs):
        per_split, leak = Counter(), Counter()
        for a, b in pairs:
            ra, rb = roles[a], roles[b]
            if ra == rb:
                per_split[ra] += 1
            else:  # the item outside the training split is the leaked one
                other = rb if ra == "train" else ra
                leak[other] += 1
        return per_split, leak

    order = np.argsort(exact, kind="stable")
    same = np.flatnonzero(exact[order][1:] == exact[order][:-1])
    exact_pairs = np.stack([order[same], order[same + 1]], axis=1)
    e_in, e_leak = groups(exact_pairs)
    n_in, n_leak = groups(near_pairs(near, distance))
    for role in dict.fromkeys(split_of):
        total = int((roles == role).sum())
        out.append(census(check=check, metric="duplicates", value=e_in[role], n=total,
                               scope=Scope(split=role)))
        out.append(census(check=check, metric="near_duplicates", value=n_in[role], n=total,
                               scope=Scope(split=role)))
        if role != "train":
            out.append(census(check=check, metric="leakage", value=max(e_leak[role], n_leak[role]),
                                   n=total, scope=Scope(split=role),
                                   details={"exact": e_leak[role], "near": n_leak[role]}))
    return out



def distributions(check: str, roles: list[str], props: dict[str, list[np.ndarray]],
                  bins: int) -> tuple[list[Measurement], dict[str, Histogram]]:
    """Per descriptor: mean and quantiles per split, histograms on shared edges, and the two-sided
    Kolmogorov-Smirnov test of each split against the train split (drift)."""
    out: list[Measurement] = []
    hist = {}
    for k, per_split in props.items():
        per_split = [v[np.isfinite(v)] for v in per_split]  # a NaN pixel has no brightness: counted above
        allv = np.concatenate(per_split)
        if allv.size == 0:
            continue
        edges = np.histogram_bin_edges(allv, bins=bins)
        hist[k] = Histogram(edges=edges.tolist())
        ref = per_split[roles.index("train")] if "train" in roles else None
        for role, v in zip(roles, per_split):
            hist[k].counts[role] = np.histogram(v, bins=edges)[0].tolist()
            q = np.quantile(v, [0.01, 0.5, 0.99]).tolist() if v.size else [np.nan] * 3
            out.append(census(check=check, metric=f"mean:{k}", value=float(v.mean()) if v.size else None,
                                   n=int(v.size), scope=Scope(split=role),
                                   details={"std": float(v.std()) if v.size else 0.0, "q01_q50_q99": q}))
            if ref is not None and role != "train" and v.size and ref.size:
                ks = stats.ks_2samp(ref, v)
                out.append(census(check=check, metric=f"drift_pvalue:{k}", value=float(ks.pvalue),
                                       n=int(v.size), scope=Scope(split=role),
                                       details={"ks_statistic": float(ks.statistic), "against": "train"}))
    return out, hist



def odd_coverage(check: str, descriptors, roles: list[str], props: dict[str, list[np.ndarray]],
                 meta_values: dict[str, Counter], confidence: float) -> tuple[list[Measurement], dict]:
    """Share of each split inside each declared ODD range or value set (k of n, with its interval)."""
    out: list[Measurement] = []
    cov = {}
    for d in descriptors:
        if d.categorical and d.source == "metadata":
            for role in roles:
                counts = meta_values.get(f"{role}/{d.name}", Counter())
                total = sum(counts.values())
                inside = sum(counts[v] for v in d.values or [])
                missing = [v for v in d.values or [] if counts[v] == 0]
                cov.setdefault(d.name, {})[role] = dict(counts)
                out.append(proportion(check, f"odd_coverage:{d.name}", inside, total, confidence, Scope(split=role),
                                      counts=dict(counts), values_without_data=missing))
        elif d.source in ("image", "feature") and d.name in props:
            for role, v in zip(roles, props[d.name]):
                lo = -np.inf if d.min is None else d.min
                hi = np.inf if d.max is None else d.max
                inside = int(((v >= lo) & (v <= hi)).sum())
                cov.setdefault(d.name, {})[role] = {"inside": inside, "total": int(v.size)}
                out.append(proportion(check, f"odd_coverage:{d.name}", inside, int(v.size), confidence,
                                      Scope(split=role), range=[d.min, d.max],
                                      observed=[float(v.min()), float(v.max())] if v.size else []))
    return out, cov

"""Each data-quality check on data built to trigger it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import context_for, folder_use_case, save_png

from trustcase.checks.data_quality import DataQuality, DataQualityParams
from trustcase.data.content import content_hash
from trustcase.data.quality import hamming, near_pairs, perceptual_hash
from trustcase.data.streaming import DataSource
from trustcase.schemas import UseCase


def textured(rng, size=16, level=128):
    return np.clip(rng.normal(level, 40, (size, size)), 0, 255).astype(np.uint8)


@pytest.fixture
def dataset(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "data"
    leaked = textured(rng)
    for i in range(12):
        save_png(root / f"train/ok/{i}.png", textured(rng, level=100))
    for i in range(4):
        save_png(root / f"train/bad/{i}.png", textured(rng, level=100))
    save_png(root / "train/ok/leaked.png", leaked)
    save_png(root / "train/ok/twin_a.png", (twin := textured(rng)))
    save_png(root / "train/ok/twin_b.png", twin)                        # exact duplicate within train
    for i in range(6):
        save_png(root / f"test/ok/{i}.png", textured(rng, level=190))   # brighter: drift
    for i in range(6):
        save_png(root / f"test/bad/{i}.png", textured(rng, level=190))
    save_png(root / "test/ok/leaked.png", leaked)                       # exact duplicate across splits
    save_png(root / "test/ok/near.png", np.clip(leaked.astype(int) + 3, 0, 255).astype(np.uint8))  # near
    save_png(root / "test/bad/flat.png", np.full((16, 16), 77, np.uint8))                          # constant
    (root / "test/bad/corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image at all")          # unreadable
    raw = folder_use_case(root)
    raw["odd"] = {"descriptors": [{"name": "brightness", "min": 50, "max": 150}]}
    return UseCase.model_validate(raw)


def run(uc, tmp_path, **params):
    module = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(256, 2))
    return DataQuality(DataQualityParams(**params))(context_for(uc, module, tmp_path / "dq"))


def value(outcome, metric, split):
    ms = [m for m in outcome.measurements if m.metric == metric and m.scope.split == split]
    assert len(ms) == 1, (metric, split, ms)
    return ms[0]


def test_counts_balance_unreadable_constant(dataset, tmp_path):
    o = run(dataset, tmp_path)
    assert value(o, "items", "train").value == 19
    assert value(o, "items", "test").value == 15             # the corrupt file is excluded ...
    assert value(o, "unreadable", "test").value == 1         # ... and reported
    assert "corrupt.png" in " ".join(o.summary["unreadable"]["test"])  # the report names the bad file
    assert value(o, "constant_images", "test").value == 1
    assert value(o, "class_share:bad", "train").value == pytest.approx(4 / 19)
    assert value(o, "imbalance_ratio", "train").value == pytest.approx(15 / 4)
    assert value(o, "out_of_range", "test").value == 0


def test_duplicates_and_leakage(dataset, tmp_path):
    o = run(dataset, tmp_path)
    assert value(o, "duplicates", "train").value == 1
    leak = value(o, "leakage", "test")
    assert leak.details["exact"] == 1
    assert leak.details["near"] >= 2                          # the exact copy and the brightened copy


def test_drift_and_coverage(dataset, tmp_path):
    o = run(dataset, tmp_path)
    assert value(o, "drift_pvalue:brightness", "test").value < 0.01
    assert value(o, "odd_coverage:brightness", "train").value == 1.0
    assert value(o, "odd_coverage:brightness", "test").value == pytest.approx(3 / 15)  # leaked, near, flat


def content(uc):
    return content_hash(DataSource(uc.data, 0, uc.model))


def test_data_hash_changes_with_one_pixel(dataset, tmp_path):
    c = content(dataset)
    assert len(c.sha256) == 64 and c.items == {"train": 19, "test": 15}  # the corrupt file is not an item
    h1 = c.sha256
    f = sorted((tmp_path / "data/train/ok").glob("0.png"))[0]
    from PIL import Image
    img = np.asarray(Image.open(f)).copy()
    img[0, 0] ^= 1
    save_png(f, img)
    assert content(dataset).sha256 != h1


def test_near_pairs_matches_brute_force():
    rng = np.random.default_rng(1)
    base = rng.integers(0, 2**63, 300, dtype=np.uint64)
    flips = np.uint64(1) << rng.integers(0, 64, 300).astype(np.uint64)
    hashes = np.concatenate([base, base[:100] ^ flips[:100]])
    got = {tuple(p) for p in near_pairs(hashes, 2)}
    i, j = np.triu_indices(len(hashes), 1)
    d = hamming(hashes[i], hashes[j])
    want = {(a, b) for a, b, x in zip(i, j, d) if x <= 2}
    assert got == want and len(want) >= 100


def test_perceptual_hash_is_stable_under_small_changes():
    rng = np.random.default_rng(2)
    img = np.clip(rng.normal(128, 50, (1, 64, 64, 1)), 0, 255)
    h = perceptual_hash(img)
    assert hamming(h, perceptual_hash(img + 2))[0] <= 2
    assert hamming(h, perceptual_hash(rng.permutation(img.ravel()).reshape(img.shape)))[0] > 10


def test_a_count_over_a_capped_split_is_no_census(dataset, tmp_path):
    """max_samples {train: 10}: the leaked training item is outside the seeded 10 (seed 0), so the leak is not
    seen; 'leakage <= 0' must not PASS on that sample (issue 28), and the verdict says why."""
    from trustcase.schemas import Requirement, Verdict
    from trustcase.verdicts import judge

    uc = dataset.model_copy(update={"data": dataset.data.model_copy(update={"max_samples": {"train": 10}})})
    sampled = {i for b in DataSource(uc.data, 0, uc.model).stream("train").batches() for i in b.ids}
    assert len(sampled) == 10 and not any("leaked" in i for i in sampled)
    o = run(uc, tmp_path)
    leak = value(o, "leakage", "test")
    assert leak.value == 0 and leak.kind == "estimate" and leak.interval is None
    assert "train 10 of 19 items" in leak.details["no_interval"]
    assert value(o, "duplicates", "train").kind == "estimate"
    assert value(o, "duplicates", "test").kind == "census"  # the test split is read whole
    req = Requirement(id="L1", text="no leakage", metric="leakage", comparator="<=", threshold=0,
                      scope={"split": "test"})
    (v,) = judge([req], [o])
    assert v.verdict is Verdict.INCONCLUSIVE, v.rationale
    assert "seeded sample" in v.rationale and "train 10 of" in v.rationale, v.rationale
    whole = value(run(dataset, tmp_path / "whole"), "leakage", "test")  # read whole, the leak is found
    assert whole.kind == "census" and whole.value >= 1

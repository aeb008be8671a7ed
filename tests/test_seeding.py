"""The one per-item seeding rule: (seed, check, item id, stream) and nothing else."""

from __future__ import annotations

import numpy as np
import torch

from trustcase.seeding import content_id, item_seed, item_seeds


def test_a_seed_depends_on_seed_check_item_and_stream_and_on_nothing_else():
    base = item_seed(0, "adversarial", "cell0058.png", "attack")
    assert base == item_seed(0, "adversarial", "cell0058.png", "attack")
    others = {item_seed(1, "adversarial", "cell0058.png", "attack"), item_seed(0, "perturbation_sweep", "cell0058.png",
              "attack"), item_seed(0, "adversarial", "cell0059.png", "attack"), item_seed(0, "adversarial",
              "cell0058.png", "noise")}
    assert base not in others and len(others) == 4
    assert 0 <= base < 2**63
    torch.Generator().manual_seed(base)  # valid for torch and numpy alike
    np.random.default_rng(base)


def test_seeds_follow_the_item_not_its_batch():
    ids = [f"cell{i:04d}.png" for i in range(10)]
    whole = item_seeds(3, "c", ids, "s")
    assert whole.dtype == np.uint64
    parts = np.concatenate([item_seeds(3, "c", ids[:3], "s"), item_seeds(3, "c", ids[3:], "s")])
    np.testing.assert_array_equal(whole, parts)
    np.testing.assert_array_equal(item_seeds(3, "c", ids[::-1], "s"), whole[::-1])


def test_an_item_without_id_is_named_by_its_content():
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    assert content_id(x) == content_id(torch.from_numpy(x.copy())) == content_id(x[None][0])
    assert content_id(x) != content_id(x.astype(np.float64)) != content_id(x.reshape(4, 3))
    y = x.copy()
    y[0, 0] = 0.5
    assert content_id(y) != content_id(x)

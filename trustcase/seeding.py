"""The one rule for random draws that belong to an item: its seed is a function of (run seed, check, item id,
stream) and of nothing else, so the same item draws the same numbers whatever the batch size, the shards,
the order of the split or the runner, and two checks (or two streams of one check) never share draws by
accident. Every per-item draw of the package goes through `item_seed` / `item_seeds`.

`item` is the item's id in its split (`Batch.ids`), never its position in a batch; where a caller has no id
(one uploaded image, a tensor handed to the science directly), `content_id` names the item by its bytes.

The arithmetic is the other half of the same figures: `torch_threads` is the one way to set torch's thread count
(and deterministic kernels) for a block of work, the caller's settings restored after.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import numpy as np


def item_seed(seed: int, check: str, item: object, stream: str) -> int:
    """A 63-bit seed (valid for numpy and torch generators) from (seed, check, item id, stream)."""
    digest = hashlib.sha256(f"{int(seed)}|{check}|{item}|{stream}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def item_seeds(seed: int, check: str, items: Iterable[object], stream: str) -> np.ndarray:
    """`item_seed` of each item, as a (B,) uint64 array."""
    return np.array([item_seed(seed, check, i, stream) for i in items], dtype=np.uint64)


def content_id(array) -> str:
    """An item's id from its content (shape, dtype and bytes), for items that come without an id."""
    a = np.ascontiguousarray(array.detach().cpu().numpy() if hasattr(array, "detach") else array)
    return hashlib.sha256(f"{a.shape}|{a.dtype}|".encode() + a.tobytes()).hexdigest()[:32]


@contextmanager
def torch_threads(count: int | None, deterministic: bool | None = None) -> Iterator[None]:
    """Torch's intra-op thread count set to `count` and its deterministic-algorithms flag to `deterministic` for
    the block (None: left as it is), both restored after. A multi-threaded sum runs in an order that depends on
    the thread count, so trained weights and float scores do; and on small tensors one thread is many times faster
    than several fighting over shared cores."""
    import torch

    threads, strict = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    try:
        if count is not None:
            torch.set_num_threads(count)
        if deterministic is not None:
            torch.use_deterministic_algorithms(deterministic)
        yield
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(strict, warn_only=warn_only)

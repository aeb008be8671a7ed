"""`seeding.torch_threads`, the one way torch's thread count and deterministic kernels are set for a block (the
runner, the certifiers' single thread, the bundled training scripts): set inside, the caller's restored after,
an error included."""

from __future__ import annotations

import pytest
import torch

from trustcase.certification.properties import single_thread
from trustcase.seeding import torch_threads


def test_the_settings_hold_inside_and_the_callers_come_back_after_an_error_too():
    before = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    other = 2 if before[0] == 1 else 1
    try:
        torch.use_deterministic_algorithms(True, warn_only=True)  # a caller's own setting, warn-only included
        with pytest.raises(RuntimeError, match="inside"):
            with torch_threads(other, deterministic=False):
                assert (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()) == (other, False)
                raise RuntimeError("inside")
        assert torch.get_num_threads() == before[0]
        assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()
        with torch_threads(None):  # None: as it was
            assert torch.get_num_threads() == before[0] and torch.is_deterministic_algorithms_warn_only_enabled()
        with single_thread():
            assert torch.get_num_threads() == 1 and torch.are_deterministic_algorithms_enabled()
        assert torch.get_num_threads() == before[0]
    finally:
        torch.use_deterministic_algorithms(before[1])
        torch.set_num_threads(before[0])

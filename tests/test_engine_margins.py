"""The verifier's floating-point margin where folding hides a cancellation, and the one deadline clock."""

from __future__ import annotations

import math
import time
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from trustcase import clock
from trustcase.certification import bab
from trustcase.certification import graph as G
from trustcase.certification.onnx_graph import read_onnx
from trustcase.certification.rounding import U32

C = 2.0 ** 20  # float32 spacing 2^-4 to 2^-3 around it: an input in [0, 1] added to it loses up to 2^-4


class Shift(nn.Module):
    """fc(x - c) with fc's bias c: the graph folds W (x - c) + b into one node of bias 0."""

    def __init__(self):
        super().__init__()
        self.register_buffer("c", torch.tensor([C]))
        self.fc = nn.Linear(1, 1)
        with torch.no_grad():
            self.fc.weight.fill_(1.0)
            self.fc.bias.fill_(C)

    def forward(self, x):
        return self.fc(x - self.c)


def batchnorm() -> nn.Module:
    """A Linear of bias c, then a BatchNorm of mean c and scale 1: folded, bias c - c = 0."""
    m = nn.Sequential(nn.Linear(1, 1), nn.BatchNorm1d(1, eps=0.0)).eval()
    with torch.no_grad():
        m[0].weight.fill_(1.0)
        m[0].bias.fill_(C)
        m[1].running_mean.fill_(C)
        m[1].running_var.fill_(1.0)
    return m


@pytest.mark.parametrize("make", [Shift, batchnorm])
@pytest.mark.parametrize("reader", ["eager", "onnx"])
def test_forward_error_counts_constants_that_cancel_in_a_folded_bias(make, reader, tmp_path):
    """The model computes x - c + c (or (x + c - c) * 1) in float32 and loses the input's low bits to c: exactly
    f(x) = x, float32 gives x rounded to a multiple of 2^-4 or 2^-5. The graph folds the constants into one bias
    of 0, so |W| |x| + |bias| is 1 over [0, 1]: gamma_n u32 of it (about 4e-7) is far below the deviation. The
    bound must count the constants as the model adds them, apart (`Node.folded`)."""
    model = make().eval()
    if reader == "eager":
        g = G.from_model(model, (1,), check=False)  # the deviation is beyond `agrees`' tolerance, on purpose
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (torch.zeros(1, 1),), str(tmp_path / "m.onnx"), dynamo=False,
                              opset_version=13)
        g = read_onnx(tmp_path / "m.onnx", check=False).graph
    lo, hi = torch.zeros(1, 1, dtype=torch.float64), torch.ones(1, 1, dtype=torch.float64)
    bound = float(bab.forward_error(g, lo, hi, U32)[0])
    x = torch.linspace(0.0, 1.0, 4001).view(-1, 1)  # float32 inputs: exact in float64, where f(x) = x exactly
    with torch.no_grad():
        deviation = float((model(x).double() - x.double()).abs().max())
    assert deviation >= 2.0 ** -6  # the cancellation is real (float32 rounding to nearest: IEEE, any CPU)
    assert deviation <= bound
    assert bound < 2.0  # and stays a useful bound: gamma_n u32 (|x| + 2 c), folded or in two nodes (ONNX)


def test_every_deadline_reads_the_injected_clock():
    """The engine's deadlines read `clock.now()`, nothing else: a clock frozen past the deadline stops the
    search at once while the wall clock has all the time in the world, and `use` gives back the clock it
    replaced."""
    g = G.from_model(nn.Sequential(nn.Linear(20, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(),
                                   nn.Linear(16, 2)).eval(), (20,))
    lo, hi = -np.ones(20), np.ones(20)
    conj = [(np.array([[1.0, -1.0]]), np.array([1e6]))]  # y0 - y1 <= 1e6: met everywhere, never refuted
    before = clock.use(lambda: 100.0)
    try:
        out = bab.split_relus(g, lo, hi, conj, deadline=50.0)
    finally:
        assert clock.use(before) is not time.perf_counter
    assert clock.now() == pytest.approx(time.perf_counter(), abs=60.0)
    assert out.verdict == "unknown" and "budget exhausted" in out.reason
    assert out.boxes == 1  # the root only: its bound, then the first look at the clock
    assert math.isfinite(clock.now())

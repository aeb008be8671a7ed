"""The search of `bab.split_relus` on networks it used to leave open: exact answers decide what it may say."""

from __future__ import annotations

import math
import time
import warnings

import numpy as np
import torch
from torch import nn

from trustcase.certification import bab
from trustcase.certification import propagation as P
from trustcase.certification.bab import split_relus
from trustcase.certification.competition import load


def sigmoid_net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(2, 12), nn.Sigmoid(), nn.Linear(12, 12), nn.Sigmoid(), nn.Linear(12, 12),
                        nn.Sigmoid(), nn.Linear(12, 1)).eval()
    with torch.no_grad():  # weights large enough to bend every sigmoid over the box
        for m in net:
            if isinstance(m, nn.Linear):
                m.weight.normal_(0.0, 3.0 / m.in_features ** 0.5)
                m.bias.normal_(0.0, 1.0)
    return net


def grid_min(net: nn.Module, lo: np.ndarray, hi: np.ndarray, n: int = 801) -> tuple[float, float]:
    """min of the output over the box on an n x n grid, and how far the true minimum can lie below it (the
    network's Lipschitz constant by the product of its layers' norms, times the largest distance to the grid)."""
    a, b = np.meshgrid(np.linspace(lo[0], hi[0], n), np.linspace(lo[1], hi[1], n))
    with torch.no_grad():
        y = net(torch.from_numpy(np.stack([a.ravel(), b.ravel()], 1)))
    lip = 1.0
    for m in net:
        if isinstance(m, nn.Linear):
            lip *= float(torch.linalg.matrix_norm(m.weight.detach(), 2))
        elif isinstance(m, nn.Sigmoid):
            lip *= 0.25
    return float(y.min()), lip * math.hypot(*(hi - lo)) / (n - 1) / 2


def test_sigmoid_networks_are_proved_by_rounds_of_alpha_crown_only_where_the_exact_minimum_allows(tmp_path,
                                                                                                 monkeypatch):
    """No ReLU to split: rounds of alpha-CROWN with more iterations each. "holds" for "y <= t" only where t lies
    below the output's true minimum over the box (a grid, within its Lipschitz error), never above it; and the
    rounds prove thresholds close to the minimum that one pass of 20 iterations leaves open."""
    monkeypatch.setattr(bab, "SMOOTH_ITERATIONS", 160)  # rounds of 40, 80, 160 iterations: a tiny network's fill
    beyond_one_pass, proved = 0, 0
    for seed in range(3):
        net = sigmoid_net(seed)
        with warnings.catch_warnings():  # S-shaped activations reach the bound engine as ONNX Sigmoid nodes
            warnings.simplefilter("ignore")
            torch.onnx.export(net, (torch.zeros(1, 2),), str(tmp_path / "s.onnx"), dynamo=False, opset_version=13)
        g = load(tmp_path / "s.onnx").graph
        net = net.double()
        x = np.random.default_rng(seed).normal(size=2)
        lo, hi = x - 1.5, x + 1.5
        low, err = grid_min(net, lo, hi)
        one = float(P.lower_bound(g, torch.from_numpy(lo)[None], torch.from_numpy(hi)[None],
                                  torch.ones(1, 1, dtype=torch.float64), "alpha-crown", iterations=20).lower)
        for t in (one - 0.1, one + 0.1 * (low - one), low + err + 1e-6):
            # "y <= t" is the unsafe set: A = [1], b = [t]; below the grid's minimum no deadline (the rounds stop
            # at their iteration cap), above it a few seconds (it can only end unknown)
            deadline = math.inf if t < low else time.perf_counter() + 3.0
            out = split_relus(g, lo, hi, [(np.ones((1, 1)), np.array([t]))], deadline)
            if out.verdict == "holds":
                assert t < low, (seed, t, low)  # above it, a grid point has y <= t
                assert out.least > 0
                proved += 1
                beyond_one_pass += one <= t
            else:
                assert out.verdict == "unknown" and out.reason
    assert proved >= 3 and beyond_one_pass >= 1

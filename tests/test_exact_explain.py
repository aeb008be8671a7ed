"""Explanation methods, their quality metrics and the root-cause clustering against answers known exactly
(closed forms on quadratic, linear, additive and global-average-pooling models; planted clusters)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from trustcase.explain import attribution as A
from trustcase.explain import quality as Q
from trustcase.explain import root_causes as R
from trustcase.models.classifier import Classifier
from trustcase.schemas import ModelSpec

SIDE = 8


def net_of(module: nn.Module, side: int = SIDE) -> A.Network:
    # value range [0, 1], no normalisation: the method's input range is 1
    spec = ModelSpec(format="torchscript", path=Path("unused.pt"), input_shape=[1, side, side], value_range=(0, 1),
                     class_names=["ok", "defect"], critical_class="defect")
    return A.Network(Classifier(spec, module=module.eval()))


class Cubic(nn.Module):
    """logit_1 = sum(x^3) / 3, logit_0 = 0: the gradient of the target is x^2, and E[(x + e)^2] = x^2 + s^2."""

    def forward(self, x):
        z = (x ** 3).flatten(1).sum(1) / 3
        return torch.stack([torch.zeros_like(z), z], 1)


class Additive(nn.Module):
    """logit_1 = sum of c_s * (sum of the pixels of quadrant s), logit_0 = 0."""

    def __init__(self, coefficients):
        super().__init__()
        q = torch.zeros(1, 1, SIDE, SIDE)
        h = SIDE // 2
        for s, c in enumerate(coefficients):
            q[0, 0, (s // 2) * h:(s // 2 + 1) * h, (s % 2) * h:(s % 2 + 1) * h] = c
        self.register_buffer("w", q)

    def forward(self, x):
        z = (x * self.w).flatten(1).sum(1)
        return torch.stack([torch.zeros_like(z), z], 1)


def linear(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(SIDE * SIDE, 2))


def images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 1, SIDE, SIDE, generator=torch.Generator().manual_seed(seed))


# --- methods -------------------------------------------------------------------------------------

@pytest.mark.parametrize("level", [0.1, 0.3])
def test_smoothgrad_is_the_average_gradient_at_the_documented_noise(level):
    x = images(2)
    maps = A.attribute(net_of(Cubic()), "smoothgrad", x, 1, seed=0,
                       options={"samples": 2000, "noise_level": level}).maps
    expected = x ** 2 + level ** 2
    assert float((maps - expected).abs().mean()) < 0.01 * (1 + level)
    assert float(maps.mean()) == pytest.approx(float(expected.mean()), rel=0.02)


def gap_network(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 4, 3, padding=1),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))


@pytest.mark.parametrize("target", [0, 1])
def test_grad_cam_equals_cam_on_a_global_average_pooling_network(target):
    """Last conv -> GAP -> Linear(W): dy_c/dA_k = W_ck / HW everywhere, so Grad-CAM = relu(sum_k W_ck A_k) / HW
    (the class activation map of Zhou et al.), at the input size already."""
    m = gap_network().eval()
    x = images(3, seed=1)
    cam = A.attribute(net_of(m), "grad_cam", x, target).maps
    with torch.no_grad():
        a = m[:3](x)  # (B, 4, H, W), the last convolution's output
        expected = torch.relu(torch.einsum("k,bkhw->bhw", m[5].weight[target], a))[:, None] / (SIDE * SIDE)
    assert expected.abs().max() > 0
    assert torch.allclose(cam, expected, atol=1e-6)


@pytest.mark.parametrize("method", ["kernel_shap", "lime"])
def test_surrogates_recover_the_coefficients_of_an_additive_model(method):
    """f = sum_s c_s (sum of quadrant s) on x = 1, baseline 0, grid segments = the quadrants: the Shapley
    value of quadrant s is 16 c_s, and captum gives every pixel its segment's value."""
    coef = torch.tensor([2.0, -1.0, 0.5, 3.0])
    x = torch.ones(1, 1, SIDE, SIDE)
    options = {"segments": "grid", "cells": 2, "samples": 300}
    maps = A.attribute(net_of(Additive(coef)), method, x, 1, seed=0, options=options).maps[0, 0]
    h = SIDE // 2
    per_segment = torch.stack([maps[:h, :h], maps[:h, h:], maps[h:, :h], maps[h:, h:]]).flatten(1)
    assert float((per_segment - per_segment.mean(1, keepdim=True)).abs().max()) < 1e-3  # constant per segment
    values = per_segment.mean(1)
    if method == "kernel_shap":
        assert values.tolist() == pytest.approx((coef * h * h).tolist(), abs=0.02)
    else:  # LIME's ridge penalty shrinks the coefficients, never their ratios or signs
        ratio = values / (coef * h * h)
        assert (ratio > 0.5).all() and (ratio <= 1.0 + 1e-3).all()
        assert float(ratio.max() - ratio.min()) < 0.05


@pytest.mark.parametrize(("window", "stride"), [(4, 4), (2, 2), (8, 8)])
def test_occlusion_patch_is_the_documented_side(window, stride):
    """Sum of pixels, baseline 0, x = 1: occluding a window removes window^2, so every pixel gets window^2;
    a one-pixel model lights exactly the windows holding that pixel."""
    x = torch.ones(1, 1, SIDE, SIDE)
    total = Additive([1.0, 1.0, 1.0, 1.0])
    maps = A.attribute(net_of(total), "occlusion", x, 1, options={"window": window, "stride": stride}).maps
    assert torch.all(maps == window * window)
    w = torch.zeros(4)
    probe = Additive(w)
    probe.w.zero_()
    probe.w[0, 0, 5, 2] = 1.0
    maps = A.attribute(net_of(probe), "occlusion", x, 1, options={"window": window, "stride": stride}).maps[0, 0]
    lit = torch.zeros(SIDE, SIDE)
    r0, c0 = (5 // window) * window, (2 // window) * window
    lit[r0:r0 + window, c0:c0 + window] = 1.0
    assert torch.equal(maps, lit)


# --- quality metrics -----------------------------------------------------------------------------

def test_infidelity_of_the_gradient_of_a_linear_model_is_zero():
    """f(x) - f(x - e) = w . e exactly, so the attribution w (the gradient) has infidelity 0, and the input
    itself (not proportional to w) does not."""
    m = linear(3).eval()
    net = net_of(m)
    x = images(4, seed=2)
    target = torch.tensor([0, 1, 1, 0])
    grad = m[1].weight.detach()[target].reshape(4, 1, SIDE, SIDE)
    exact = Q.infidelity_of(net, x, target, grad, noise=0.1, samples=16, seed=0)
    assert np.abs(exact).max() < 1e-9
    wrong = Q.infidelity_of(net, x, target, x.clone(), noise=0.1, samples=16, seed=0)
    assert (wrong > 1e-3).all()


def test_max_sensitivity_of_linear_maps():
    """The gradient of a linear model does not move (0); input x gradient moves by w * d, at most r ||w||."""
    m = linear(4).eval()
    net = net_of(m)
    x = images(3, seed=1) + 0.5
    target = torch.ones(3, dtype=torch.long)
    w = m[1].weight.detach()[1].reshape(1, 1, SIDE, SIDE)

    def saliency(inp, t):
        return A.attribute(net, "saliency", inp, t, options={"abs": False}).maps

    assert Q.sensitivity_of(saliency, x, target, 0.05, 8, seed=0) == pytest.approx(np.zeros(3), abs=1e-7)

    def input_x_gradient(inp, t):
        return inp * w

    s = Q.sensitivity_of(input_x_gradient, x, target, 0.05, 8, seed=0)
    bound = (0.05 * w.abs()).flatten().norm() / (x * w).flatten(1).norm(dim=1)
    assert (s > 0).all() and (s <= bound.numpy() + 1e-6).all()


# --- root causes: the knee on planted clusters -----------------------------------------------------

@pytest.mark.parametrize("k_true", [2, 3, 4, 5, 6])
def test_knee_finds_exactly_the_planted_clusters(k_true):
    rng = np.random.default_rng(k_true)
    centres = [np.eye(8)[i] * 10 for i in range(k_true)]
    x = np.concatenate([c + rng.normal(0, 0.5, (30, 8)) for c in centres])
    res = R.cluster(x, k_max=12)
    assert res["k"] == k_true
    truth = np.repeat(np.arange(k_true), 30)
    assert all(len(set(truth[res["labels"] == c])) == 1 for c in range(k_true))


def test_knee_of_a_curve_without_structure_is_one():
    assert R.knee(np.array([10.0, 9.0, 8.0, 7.0, 6.0])) == 1
    assert R.knee(np.array([0.0, 0.0, 0.0])) == 1

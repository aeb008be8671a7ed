"""Every attribution method against a case whose answer is known in closed form."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_attribution import SIDE, NumpySession, images, linear_model, net_of, small_cnn, spec
from torch import nn

from trustcase.errors import Unsupported, UserError
from trustcase.explain import ExplainError, imaging
from trustcase.explain import attribution as A
from trustcase.models.classifier import Classifier


def grad_x_input(module: nn.Module, x: torch.Tensor, target: int) -> torch.Tensor:
    x = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(module(x)[:, target].sum(), x)
    return g * x.detach()


def bias_free_relu_net() -> nn.Module:
    torch.manual_seed(4)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1, bias=False), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.ReLU(), nn.Flatten(), nn.Dropout(0.3),
                         nn.Linear(4 * 8 * 8, 2, bias=False)).eval()


def gap_net() -> nn.Module:
    torch.manual_seed(5)
    return nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(6, 3)).eval()


def gap_spec():
    s = spec()
    return s.model_copy(update={"class_names": ["a", "b", "c"], "critical_class": "c"})


# --- gradient family on a linear model: f_t(x) = w_t . x + b_t ------------------------------------

@pytest.mark.parametrize("target", [0, 1])
def test_linear_model_closed_forms(target):
    m = linear_model(seed=2)
    net, x, w = net_of(m), images(3, seed=1), m[1].weight.detach()[target].reshape(1, 1, SIDE, SIDE)
    def run(name, **kw):
        return A.attribute(net, name, x, target, **kw).maps
    assert torch.allclose(run("input_x_gradient"), w * x, atol=1e-6)
    assert torch.allclose(run("deep_lift", baseline=0.3), w * (x - 0.3), atol=1e-5)
    assert torch.allclose(run("deep_lift_shap", baseline=0.3, options={"noise_level": 0.0}), w * (x - 0.3), atol=1e-5)
    assert torch.allclose(run("guided_backprop"), w.expand_as(x), atol=1e-6)  # no ReLU: the plain gradient
    assert torch.allclose(run("deconvolution"), w.expand_as(x), atol=1e-6)
    # the gradient of a linear model does not depend on the input: noise changes nothing
    assert torch.allclose(run("smoothgrad_squared"), (w * w).expand_as(x), atol=1e-6)
    assert torch.allclose(run("vargrad"), torch.zeros_like(x), atol=1e-7)
    # the internal unit "output neuron t" is the class t
    assert torch.allclose(A.attribute(net, "input_x_gradient", x, A.Neuron("1", target)).maps, w * x, atol=1e-6)


def test_lrp_zero_on_a_bias_free_relu_network_is_gradient_times_input():
    m = bias_free_relu_net()
    net, x = net_of(m), images(4, seed=2)
    for options in ({"rule": "epsilon", "epsilon": 1e-9}, {"rule": "gamma", "gamma": 0.0, "epsilon": 1e-9}):
        method = A.make(net, "lrp", options)
        for _ in range(2):  # captum strips the rules after a call: the second call must still use ours
            lrp = A.attribute(net, method, x, 1).maps
            assert torch.allclose(lrp, grad_x_input(m, x, 1), atol=1e-5), options
    # an internal unit (channel 2 of the second convolution) the same way: the cut network is LRP-ready
    unit = A.attribute(net, "lrp", x, A.Neuron("3", 2), options={"rule": "epsilon", "epsilon": 1e-9}).maps
    cut = nn.Sequential(*list(m)[:4], nn.Flatten(), nn.Linear(4 * 8 * 8, 1, bias=False))
    with torch.no_grad():
        cut[-1].weight.zero_()
        cut[-1].weight.view(4, 8, 8)[2] = 1 / 64
    assert torch.allclose(unit, grad_x_input(cut, x, 0), atol=1e-5)


def test_lrp_z_plus_on_one_dense_layer():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Flatten(), nn.Linear(SIDE * SIDE, 2, bias=False)).eval()
    x = images(2, seed=3)  # positive inputs
    w = m[1].weight.detach()[1]
    zp = x.reshape(2, -1) * w.clamp(min=0)
    out = m(x)[:, 1].detach()
    expected = zp / zp.sum(dim=1, keepdim=True) * out[:, None]  # z+ rule: positive contributions share the output
    method = A.make(net_of(m), "lrp", {"rule": "z_plus"})
    for _ in range(2):
        assert torch.allclose(A.attribute(net_of(m), method, x, 1).maps.reshape(2, -1), expected, atol=1e-5)


def test_lrp_view_folds_batch_norm_and_keeps_the_function():
    torch.manual_seed(6)
    m = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Dropout(0.5),
                      nn.Linear(3 * SIDE * SIDE, 2))
    with torch.no_grad():
        m[1].running_mean.uniform_(-1, 1)
        m[1].running_var.uniform_(0.5, 2)
        m[1].weight.uniform_(0.5, 2)
    m.eval()
    view = A.make(net_of(m), "lrp").view
    assert [type(v).__name__ for v in view] == ["Conv2d", "ReLU", "Readout"]
    x = images(3, seed=5)
    assert torch.allclose(view(x), m(x), atol=1e-5)


def test_lrp_refuses_a_layer_without_rule():
    m = nn.Sequential(nn.Conv2d(1, 2, 3), nn.GELU(), nn.Flatten(), nn.Linear(2 * 14 * 14, 2)).eval()
    with pytest.raises(Unsupported, match=r"LRP has no rule for layer '1' \(GELU\)"):
        A.make(net_of(m), "lrp")


# --- class activation maps ------------------------------------------------------------------------

@pytest.mark.parametrize("target", [0, 1, 2])
def test_grad_cam_on_a_gap_network_is_cam(target):
    net = A.Network(Classifier(gap_spec(), module=gap_net()))
    x = images(3, seed=4)
    cam = A.attribute(net, "cam", x, target).maps
    grad_cam = A.attribute(net, "grad_cam", x, target, options={"layer": "1", "relu": False}).maps
    assert torch.allclose(cam, grad_cam, atol=1e-6)
    # CAM: each position's share of the logit; on the feature map itself it sums to logit - bias
    m = gap_net()
    f = m[1](m[0](x)).detach()
    logit = m(x)[:, target].detach() - m[4].bias[target].detach()
    share = torch.einsum("k,bkhw->bhw", m[4].weight.detach()[target], f) / (SIDE * SIDE)
    assert torch.allclose(share.sum(dim=(1, 2)), logit, atol=1e-5)
    assert torch.allclose(cam[:, 0], share, atol=1e-6)  # feature map and input have the same size here


def test_grad_cam_pp_closed_form_on_a_gap_network():
    m = gap_net()
    net = A.Network(Classifier(gap_spec(), module=m))
    x = images(2, seed=6)
    f = m[1](m[0](x)).detach()  # (B, K, h, w): the gradient of logit t is w_tk / hw everywhere
    w, hw = m[4].weight.detach()[2], SIDE * SIDE
    g = w / hw
    alpha = g**2 / (2 * g**2 + f.sum(dim=(2, 3)) * g**3)  # (B, K)
    expected = torch.einsum("bk,bkhw->bhw", alpha * hw * g.clamp(min=0), f).clamp(min=0)
    got = A.attribute(net, "grad_cam_pp", x, 2, options={"layer": "1"}).maps[:, 0]
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-7)


def test_score_cam_closed_form_with_one_channel():
    torch.manual_seed(7)
    m = nn.Sequential(nn.Conv2d(1, 1, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                      nn.Linear(1, 2)).eval()
    net = net_of(m)
    x = images(2, seed=8)
    a = m[1](m[0](x)).detach()
    lo, hi = a.amin(dim=(2, 3), keepdim=True), a.amax(dim=(2, 3), keepdim=True)
    mask = (a - lo) / (hi - lo)
    p = torch.softmax(m(x * mask), dim=1)[:, 1] - torch.softmax(m(torch.zeros_like(x)), dim=1)[:, 1]
    expected = (p.detach()[:, None, None, None] * a).clamp(min=0)
    got = A.attribute(net, "score_cam", x, 1, baseline=0.0, options={"layer": "1"}).maps
    assert torch.allclose(got, expected, atol=1e-6)


def test_guided_grad_cam_is_guided_backprop_times_grad_cam():
    net, x = net_of(small_cnn()), images(2, seed=9)
    gb = A.attribute(net, "guided_backprop", x, 1).maps
    gc = A.attribute(net, "grad_cam", x, 1).maps
    assert torch.allclose(A.attribute(net, "guided_grad_cam", x, 1).maps, gb * gc, atol=1e-6)


def test_cam_refuses_a_network_without_global_pooling():
    with pytest.raises(Unsupported, match="no global average pooling"):
        A.make(net_of(linear_model()), "cam")


# --- perturbation family: additive models -------------------------------------------------------

def cell_contributions(m: nn.Module, x: torch.Tensor, target: int, segments: torch.Tensor, baseline: float):
    """c_i = sum over the pixels of segment i of w * (x - baseline): the logit is additive over segments."""
    w = m[1].weight.detach()[target].reshape(1, 1, SIDE, SIDE)
    per_pixel = (w * (x - baseline))[:, 0]
    k = int(segments.max()) + 1
    return torch.stack([torch.bincount(s.flatten(), p.flatten(), minlength=k)
                        for s, p in zip(segments[:, 0], per_pixel)])  # (B, k)


def test_sobol_total_indices_of_an_additive_model():
    m = linear_model(seed=3)
    net, x = net_of(m), images(2, seed=10)
    seg = imaging.grid_segments(SIDE, SIDE, 2).expand(2, 1, -1, -1)
    c = cell_contributions(m, x, 1, seg, 0.0)  # logit = b + sum_i c_i m_i, m_i ~ U(0, 1): S_Ti = c_i^2 / sum c_j^2
    expected = (c**2 / (c**2).sum(dim=1, keepdim=True)).numpy()
    maps = A.attribute(net, "sobol", x, 1, baseline=0.0, options={"cells": 2, "designs": 2048, "logits": True}).maps
    got = np.stack([[maps[b, 0][seg[b, 0] == i][0].item() for i in range(4)] for b in range(2)])
    assert got == pytest.approx(expected, abs=0.02)


@pytest.mark.parametrize("segments", ["grid", "slic"])
def test_kernel_shap_and_lime_recover_the_coefficients_of_an_additive_model(segments):
    m = linear_model(seed=4)
    net, x = net_of(m), images(2, seed=11)
    options = {"segments": segments, "cells": 4, "superpixels": 12, "compactness": 1.0, "samples": 400}
    seg = imaging.grid_segments(SIDE, SIDE, 4).expand(2, 1, -1, -1) if segments == "grid" else \
        imaging.superpixels(x, "slic", 12, 1.0)
    c = cell_contributions(m, x, 1, seg, 0.25)
    expected = torch.gather(c, 1, seg.flatten(1)).reshape(2, 1, SIDE, SIDE)
    shap = A.attribute(net, "kernel_shap", x, 1, baseline=0.25, options=options).maps
    assert torch.allclose(shap, expected, atol=1e-3)  # an additive model is fitted exactly
    lime = A.attribute(net, "lime", x, 1, baseline=0.25, options=options).maps
    assert torch.allclose(lime, expected, atol=0.05 * float(expected.abs().max()))  # ridge shrinks a little


def test_superpixels_follow_edges():
    x = torch.zeros(1, 1, SIDE, SIDE)
    x[..., :, SIDE // 2:] = 1.0  # two flat halves
    seg = imaging.superpixels(x, "slic", 4, 0.1)[0, 0]
    left, right = set(seg[:, :SIDE // 2].unique().tolist()), set(seg[:, SIDE // 2:].unique().tolist())
    assert left and right and not left & right
    assert imaging.superpixels(x, "quickshift", 4, 0.1).shape == (1, 1, SIDE, SIDE)


def test_surrogates_do_not_depend_on_the_batch():
    net, x = net_of(small_cnn()), images(3, seed=12)
    for name in ("lime", "kernel_shap", "sobol", "deep_lift_shap"):
        opts = {"sobol": {"designs": 8, "cells": 2}}.get(name, {"samples": 30} if name != "deep_lift_shap" else {})
        whole = A.attribute(net, name, x, 1, seed=3, options=opts).maps
        alone = torch.cat([A.attribute(net, name, x[i:i + 1], 1, seed=3, options=opts).maps for i in range(3)])
        assert torch.allclose(whole, alone, atol=1e-5), name


# --- black boxes and bad targets -------------------------------------------------------------------

def test_black_box_gets_every_perturbation_method():
    w = linear_model()[1].weight.detach().numpy()
    net = A.Network(Classifier(spec(), session=NumpySession(w)))
    x = images(2)
    free = sorted(n for n in A.METHODS if not A.METHODS[n].needs_gradients)
    assert set(free) >= {"occlusion", "rise", "lime", "kernel_shap", "sobol"}
    opts = {"rise": {"masks": 16}, "sobol": {"designs": 4, "cells": 2}, "lime": {"samples": 20},
            "kernel_shap": {"samples": 20}}
    for name in free:
        assert A.attribute(net, name, x, 1, options=opts.get(name)).maps.shape[0] == 2
    for name in sorted(set(A.METHODS) - set(free)):
        with pytest.raises(Unsupported, match="black box"):
            A.attribute(net, name, x, 1)
    with pytest.raises(Unsupported, match="black box"):
        A.attribute(net, "occlusion", x, A.Neuron("0", 0))


def test_unknown_layer_channel_position_and_class_are_named():
    net, x = net_of(small_cnn()), images(1)
    with pytest.raises(ExplainError, match=r"layer '9' does not exist; layers: \['0 \(Conv2d\)'"):
        A.attribute(net, "saliency", x, A.Neuron("9", 0))
    with pytest.raises(ExplainError, match="channel 9 of layer '3' does not exist; channels: 0-7"):
        A.attribute(net, "saliency", x, A.Neuron("3", 9))
    with pytest.raises(ExplainError, match=r"position \(99, 0\) of layer '3' does not exist; its channels are 8x8"):
        A.attribute(net, "saliency", x, A.Neuron("3", 1, (99, 0)))
    with pytest.raises(ExplainError, match="target class 5 does not exist; classes: {0: 'ok', 1: 'defect'}"):
        A.attribute(net, "saliency", x, 5)


def test_options_that_do_not_fit_the_model_are_user_errors_before_any_work():
    """An occlusion window larger than the image, an unknown option or Grad-CAM layer: an `ExplainError` (a
    `UserError`: one line, exit 2) when the options are checked against the input shape or the method is made,
    never a failure in the middle of the work."""
    net, big = net_of(small_cnn()), SIDE + 1  # SIDE x SIDE inputs
    assert issubclass(ExplainError, UserError)
    with pytest.raises(ExplainError, match=rf"occlusion window {big} px is larger than the image \({SIDE}x{SIDE}\): "
                                           rf"at most {SIDE}"):
        A.options_for("occlusion", {"window": big}, (1, SIDE, SIDE))
    assert A.options_for("occlusion", {"window": big}).window == big  # no shape given: the options' own rules
    with pytest.raises(ExplainError, match="larger than the image"):
        A.make(net, "occlusion", {"window": big})
    assert A.make(net, "occlusion", {"window": SIDE}).options.window == SIDE
    with pytest.raises(ExplainError, match="occlusion options: stride"):
        A.options_for("occlusion", {"stride": 0})
    with pytest.raises(ExplainError, match="layer 'nope' does not exist"):
        A.make(net, "grad_cam", {"layer": "nope"})

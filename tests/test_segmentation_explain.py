"""Explanations of a segmenter's region against a planted cause: a segmenter whose every logit depends on the input
only through the pixels of a known square, so the region score of any region rests on those pixels alone."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from trustcase.errors import Unsupported
from trustcase.explain.methods import region as R
from trustcase.explain.network import Network
from trustcase.models.classifier import Classifier
from trustcase.schemas import ModelSpec
from trustcase.tasks.segmentation import Segmenter
from trustcase.testing import black_box_of

H = W = 16
CAUSE = np.zeros((H, W), bool)
CAUSE[4:8, 9:13] = True  # the planted cause: 16 pixels
TRUE = np.zeros((H, W), bool)
TRUE[10:14, 2:8] = True  # where the defect is predicted (elsewhere than its cause)


class Planted(nn.Module):
    """logits(i, j) = head(mean of relu(conv(x * cause))) + a fixed spatial map: the input enters only through the
    cause's pixels (the defect logit minus the background's grows with them from 0); the map decides which pixels
    are predicted a defect (TRUE, whatever the input in [0, 1])."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.conv = nn.Conv2d(1, 4, 3, padding=1, bias=False)
        self.relu = nn.ReLU()
        self.head = nn.Conv2d(4, 2, 1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.rand(4, 1, 3, 3, generator=g))  # positive: the features grow with x
            self.head.weight.copy_(torch.tensor([[-3.0] * 4, [3.0] * 4]).view(2, 4, 1, 1))
            self.head.bias.zero_()
        layout = torch.full((2, H, W), 0.0)
        layout[1] = torch.where(torch.from_numpy(TRUE), 0.5, -50.0)  # the cause's evidence is >= 0: TRUE wins
        self.register_buffer("cause", torch.from_numpy(CAUSE).float())
        self.register_buffer("layout", layout)

    def forward(self, x):
        h = self.relu(self.conv(x * self.cause))
        return self.head(h.mean((2, 3), keepdim=True)) + self.layout


def network(black_box: bool = False) -> Network:
    spec = ModelSpec(format="torchscript", path="unused.pt", input_shape=[1, H, W], value_range=(0.0, 1.0),
                     normalisation={"mean": [0.0], "std": [1.0]}, class_names=["background", "defect"],
                     critical_class="defect")
    model = Segmenter(Classifier(spec, module=Planted().eval()))
    # the real black-box class: forward passes only, no module, no gradients (as an ONNX session gives them)
    return Network(black_box_of(model) if black_box else model)


def inputs(n: int = 3) -> torch.Tensor:
    return torch.rand(n, 1, H, W, generator=torch.Generator().manual_seed(1)) * 0.8 + 0.2


def regions(net: Network, x: torch.Tensor):
    with torch.no_grad():
        return R.predicted_regions(net.forward(x).numpy())


def test_the_predicted_region_and_its_score():
    net = network()
    x = inputs()
    reg, cls = regions(net, x)
    assert (reg == TRUE).all() and (cls == 1).all()
    view = R.RegionNetwork(net, reg[0], 1)
    with torch.no_grad():
        assert torch.allclose(view.forward(x[:1])[:, 0], net.forward(x[:1])[:, 1][:, reg[0]].sum(1))
    assert view.layers().keys() == net.layers().keys()  # layers named as in the segmenter


@pytest.mark.parametrize("method", ["saliency", "input_x_gradient", "integrated_gradients", "smoothgrad"])
def test_gradient_methods_put_all_relevance_on_the_cause(method):
    net = network()
    x = inputs()
    reg, cls = regions(net, x)
    maps = R.explain_regions(net, method, x, reg, cls, seed=0)
    # the region score does not depend on a pixel outside the cause: its gradient there is exactly 0
    assert np.abs(maps[:, ~CAUSE]).max() == 0
    assert np.allclose(R.energy_inside(np.abs(maps), np.broadcast_to(CAUSE, maps.shape)), 1.0)
    assert R.energy_inside(np.abs(maps), np.broadcast_to(TRUE, maps.shape)).max() == 0  # not where the defect is


def test_grad_cam_at_the_convolution_stays_within_its_receptive_field():
    net = network()
    x = inputs()
    reg, cls = regions(net, x)
    maps = R.explain_regions(net, "grad_cam", x, reg, cls, options={"layer": "conv"})
    near = np.zeros_like(CAUSE)
    near[3:9, 8:14] = True  # the cause dilated by the 3x3 convolution: where its activations can be non-zero
    # bilinear upsampling at the same size is the identity: nothing outside the dilated cause
    assert np.abs(maps[:, ~near]).max() == 0 and maps[:, CAUSE].max() > 0


@pytest.mark.parametrize("black_box", [False, True])
def test_black_box_methods_find_the_cause(black_box):
    net = network(black_box)
    x = inputs()
    reg, cls = regions(net, x)
    share = CAUSE.mean()  # chance level of the energy inside the cause
    occ = R.explain_regions(net, "occlusion", x, reg, cls, options={"window": 4, "stride": 2})
    near = np.zeros_like(CAUSE)
    near[1:11, 6:16] = True  # within one window of the cause
    assert np.abs(occ[:, ~near]).max() == 0
    assert (R.energy_inside(occ, np.broadcast_to(CAUSE, occ.shape)) > 3 * share).all()
    # RISE: the expected score given a pixel is kept; above its mean (the chance level) it is the cause
    rise = R.explain_regions(net, "rise", x, reg, cls, seed=0, options={"masks": 1000, "cells": 4})
    rise = rise - rise.mean(axis=(1, 2), keepdims=True)
    assert (R.energy_inside(rise, np.broadcast_to(CAUSE, rise.shape)) > 3 * share).all()
    # the most relevant pixel is a cause pixel (pointing game)
    from trustcase.explain.quality import pointing_game
    assert pointing_game(occ, np.broadcast_to(CAUSE, occ.shape)).all()


def test_gradient_methods_are_refused_on_a_black_box():
    net = network(black_box=True)
    x = inputs(1)
    reg, cls = regions(net, x)
    with pytest.raises(Unsupported, match="gradients"):
        R.explain_regions(net, "saliency", x, reg, cls)


def test_deletion_on_the_region_drops_faster_along_the_cause():
    net = network()
    x = inputs()
    reg, cls = regions(net, x)
    maps = R.explain_regions(net, "saliency", x, reg, cls)
    dele, ins = R.deletion_insertion(net, x, reg, cls, maps, baseline=0.0, steps=16)
    flat = np.zeros_like(maps)  # no information: ties broken at random
    rd, ri = R.deletion_insertion(net, x, reg, cls, flat, baseline=0.0, steps=16)
    from trustcase.explain.quality import auc
    # deleting the 16 cause pixels first (the first 1/16 of the curve) removes the defect's evidence at once
    assert np.allclose(dele[:, 0], ri[:, -1]) and (dele[:, 1] < dele[:, 0]).all()
    assert (auc(dele) < auc(rd)).all() and (auc(ins) > auc(ri)).all()


# --- the explainability check on a segmentation use case -------------------------------------------------------

from test_segmentation import _context, segmentation_case  # noqa: E402, F401  (the tiny PNG use case)


def test_the_check_explains_predicted_regions_of_a_segmenter(segmentation_case):  # noqa: F811
    """The case's segmenter marks pixels brighter than mid-grey, each from its own value: a region's score rests on
    the region's own pixels, so gradients put all relevance there (t1: the predicted region is the true defect)."""
    from trustcase.checks import build
    from trustcase.schemas import CheckSpec

    uc, tmp_path = segmentation_case
    params = {"region_methods": ["saliency", "occlusion"], "options": {"occlusion": {"window": 2, "stride": 1}},
              "methods": ["saliency", "occlusion"], "items": 4, "steps": 8}
    out = build(CheckSpec(check="explainability", params=params))(_context(uc, tmp_path, "ex"))
    by = {m.metric: m for m in out.measurements}
    # t1 and t2_free have a predicted region; only t1 has a true one, and its region is exactly the true defect
    assert by["region_energy:saliency"].n == 1 and by["region_energy:saliency"].value == pytest.approx(1.0)
    assert by["pointing_game:saliency"].value == 1
    # deleting the region's own pixels first takes its probability down at once: far above a random order
    assert by["faithfulness:saliency"].value > out.summary["random_reference"]["faithfulness"] + 0.1
    assert "faithfulness:occlusion" in by
    assert {m.method for m in out.methods} == {"saliency", "occlusion"}
    assert by["recommended_methods"].kind == "census"

"""Attribution methods and their quality metrics, on small torch models whose answers are known."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from trustcase.checks import CheckError, Context, Unsupported, build
from trustcase.data.streaming import DataSource, Item
from trustcase.explain import attribution as A
from trustcase.explain import quality as Q
from trustcase.models.classifier import Classifier
from trustcase.schemas import CheckSpec, ModelSpec, UseCase

HERE = Path(__file__).resolve().parent
SIDE = 16
BOX = (slice(0, 8), slice(0, 8))  # the region the "region model" depends on: top-left quadrant


def spec(channels: int = 1) -> ModelSpec:
    # value range [0, 1], mean 0, std 1: normalised input == pixel values
    return ModelSpec(format="torchscript", path=Path("unused.pt"), input_shape=[channels, SIDE, SIDE],
                     value_range=(0, 1), class_names=["ok", "defect"], critical_class="defect")


def linear_model(seed: int = 0, channels: int = 1) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(channels * SIDE * SIDE, 2)).eval()


class Masked(nn.Module):
    def __init__(self, mask: torch.Tensor):
        super().__init__()
        self.register_buffer("mask", mask)

    def forward(self, x):
        return x * self.mask


def region_model() -> nn.Module:
    """Convolutions, but the decision depends only on the pixels of BOX (everything else is multiplied by 0)."""
    torch.manual_seed(1)
    mask = torch.zeros(1, 1, SIDE, SIDE)
    mask[0, 0][BOX] = 1
    return nn.Sequential(Masked(mask), nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(4, 2)).eval()


def small_cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 8, 3, padding=1),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, 2)).eval()


def images(n: int, seed: int = 0, channels: int = 1) -> torch.Tensor:
    return torch.rand(n, channels, SIDE, SIDE, generator=torch.Generator().manual_seed(seed))


def net_of(module: nn.Module) -> A.Network:
    return A.Network(Classifier(spec(), module=module))


# --- methods -------------------------------------------------------------------------------------

def test_saliency_is_the_absolute_gradient_of_a_linear_model():
    m = linear_model(channels=3)
    net = A.Network(Classifier(spec(3), module=m))
    x = images(4, channels=3)
    target = torch.tensor([0, 1, 1, 0])
    maps = A.attribute(net, "saliency", x, target).maps
    expected = m[1].weight.detach()[target].abs().reshape(4, 3, SIDE, SIDE)
    assert torch.allclose(maps, expected)


def test_integrated_gradients_completeness():
    net = net_of(small_cnn())
    x = images(6)
    target = torch.tensor([0, 1, 0, 1, 1, 0])
    a = A.attribute(net, "integrated_gradients", x, target, baseline=0.0, options={"n_steps": 64})
    with torch.no_grad():
        gap = net.forward(x)[torch.arange(6), target] - net.forward(torch.zeros_like(x))[torch.arange(6), target]
    sums = a.maps.sum(dim=(1, 2, 3))
    # completeness: sum of attributions = output difference, up to the convergence delta
    assert torch.allclose(sums - gap, a.delta, atol=1e-5)
    assert (a.delta.abs() < 1e-2 * gap.abs().clamp(min=1e-3) + 1e-4).all()


def test_integrated_gradients_on_a_linear_model_is_exact():
    m = linear_model()
    net = net_of(m)
    x = images(3)
    a = A.attribute(net, "integrated_gradients", x, 1, baseline=0.0, options={"n_steps": 4})
    assert torch.allclose(a.maps, (x * m[1].weight.detach()[1].reshape(1, 1, SIDE, SIDE)), atol=1e-6)


@pytest.mark.parametrize("method", ["saliency", "integrated_gradients", "smoothgrad", "occlusion", "lime",
                                    "kernel_shap"])
def test_attributions_concentrate_where_the_model_looks(method):
    net = net_of(region_model())
    x = images(4, seed=3)
    options = {"occlusion": {"window": 2, "stride": 2}, "lime": {"samples": 300, "cells": 4, "segments": "grid"},
               "kernel_shap": {"samples": 300, "cells": 4, "segments": "grid"}}.get(method)
    heat = np.abs(A.attribute(net, method, x, 1, baseline=0.0, seed=0, options=options).heatmap())
    mask = np.zeros((4, SIDE, SIDE), bool)
    mask[:, BOX[0], BOX[1]] = True
    mass = Q.relevance_mass(heat, mask)
    assert (mass >= 0.9).all(), mass  # the region is a quarter of the image


def test_rise_finds_the_region_the_decision_rests_on():
    # defect probability is high only while the top-left quadrant is visible (its mean drives the logit)
    mask = torch.zeros(1, 1, SIDE, SIDE)
    mask[0, 0][BOX] = 1
    head = nn.Linear(1, 2)
    with torch.no_grad():
        head.weight[:] = torch.tensor([[0.0], [40.0]])
        head.bias[:] = torch.tensor([0.0, -2.5])
    net = net_of(nn.Sequential(Masked(mask), nn.AdaptiveAvgPool2d(1), nn.Flatten(), head).eval())
    x = images(4, seed=3)
    heat = A.attribute(net, "rise", x, 1, baseline=0.0, options={"masks": 1000, "cells": 4}).heatmap()
    inside = heat[:, BOX[0], BOX[1]].reshape(4, -1).mean(axis=1)
    outside = np.concatenate([heat[:, 8:].reshape(4, -1), heat[:, :8, 8:].reshape(4, -1)], axis=1).mean(axis=1)
    # RISE: E[p | pixel kept]; keeping a pixel of the region raises p, keeping another one does not
    assert (inside > outside + 0.05).all(), (inside, outside)
    assert Q.pointing_game(heat, np.broadcast_to(mask[0, 0].bool().numpy(), heat.shape)).all()


@pytest.mark.parametrize("method", ["smoothgrad", "rise", "lime", "kernel_shap", "occlusion"])
def test_same_seed_same_maps(method):
    net = net_of(small_cnn())
    x = images(2)
    opts = {"rise": {"masks": 64}, "lime": {"samples": 40}, "kernel_shap": {"samples": 40}}.get(method)
    a = A.attribute(net, method, x, 1, seed=7, options=opts).maps
    b = A.attribute(net, method, x, 1, seed=7, options=opts).maps
    assert torch.allclose(a, b, atol=1e-6)
    if method != "occlusion":  # the only deterministic one by nature
        c = A.attribute(net, method, x, 1, seed=8, options=opts).maps
        assert not torch.allclose(a, c, atol=1e-6)


def test_small_memory_budget_batches_instead_of_failing(monkeypatch):
    net = net_of(small_cnn())
    x = images(3)
    full = A.attribute(net, "integrated_gradients", x, 1, options={"n_steps": 50}).maps
    monkeypatch.setattr(A, "MAX_EVAL_ELEMENTS", SIDE * SIDE * 7)  # 7 images per forward pass
    chunked = A.attribute(net, "integrated_gradients", x, 1, options={"n_steps": 50}).maps
    assert torch.allclose(full, chunked, atol=1e-5)
    assert A.attribute(net, "occlusion", x, 1).maps.shape == x.shape


def test_grad_cam_layers_automatic_named_and_wrong():
    net = net_of(small_cnn())
    assert net.conv_layers() == ["0", "3"]
    assert A.make(net, "grad_cam").layer_name == "3"
    assert A.make(net, "grad_cam", {"layer": "0"}).layer_name == "0"
    with pytest.raises(ValueError, match=r"layer 'conv9' does not exist; layers: \['0 \(Conv2d\)'"):
        A.make(net, "grad_cam", {"layer": "conv9"})
    maps = A.attribute(net, "grad_cam", images(2), 1).maps
    assert maps.shape == (2, 1, SIDE, SIDE) and (maps >= 0).all()


def test_traced_model_is_rebuilt_into_hookable_layers():
    m = small_cnn()
    traced = torch.jit.trace(m, images(1))
    net = A.Network(Classifier(spec(), module=traced))
    assert isinstance(net.module, nn.Sequential) and net.note == ""
    assert [A.Network.kind(v) for v in net.layers().values()][:3] == ["Conv2d", "ReLU", "MaxPool2d"]
    x = images(3)
    for method in ("grad_cam", "saliency"):
        eager = A.attribute(net_of(m), method, x, 1).maps
        assert torch.allclose(A.attribute(net, method, x, 1).maps, eager, atol=1e-5)


class NumpySession:
    """A black box: a linear model evaluated in numpy, seen only through an ONNX-like session."""

    class _Input:
        name = "x"

    def __init__(self, w: np.ndarray):
        self.w = w

    def get_inputs(self):
        return [self._Input()]

    def run(self, _, feeds):
        x = feeds["x"].reshape(len(feeds["x"]), -1)
        return [x @ self.w.T]


def test_black_box_refuses_gradients_and_explains_by_prediction():
    w = linear_model()[1].weight.detach().numpy()
    net = A.Network(Classifier(spec(), session=NumpySession(w)))
    x = images(2)
    for method in ("saliency", "integrated_gradients", "smoothgrad", "grad_cam"):
        with pytest.raises(Unsupported, match="black box"):
            A.attribute(net, method, x, 1)
    occ = A.attribute(net, "occlusion", x, 1, options={"window": 1, "stride": 1}).maps
    # occluding one pixel of a linear model removes exactly w * x
    assert torch.allclose(occ, x * torch.from_numpy(w[1]).reshape(1, 1, SIDE, SIDE), atol=1e-5)
    assert A.attribute(net, "rise", x, 1, options={"masks": 16}).maps.shape == (2, 1, SIDE, SIDE)


def test_unknown_method_and_option_are_named():
    with pytest.raises(ValueError, match="unknown attribution method 'gradcam'; known"):
        A.options_for("gradcam")
    with pytest.raises(ValueError, match="rise options: n_masks: Extra inputs"):
        A.options_for("rise", {"n_masks": 10})


# --- quality metrics -----------------------------------------------------------------------------

def test_deletion_and_insertion_curves_closed_form():
    m = linear_model(2)
    net = net_of(m)
    x = images(8, seed=5)
    w = m[1].weight.detach()
    contrib = (x[:, 0] * (w[1] - w[0]).reshape(SIDE, SIDE)).numpy()  # each pixel's share of the logit gap
    target = torch.ones(8, dtype=torch.long)
    d, i = Q.deletion_insertion(net, x, target, contrib, 0.0, steps=16)
    order = np.argsort(-contrib.reshape(8, -1), axis=1)
    sorted_c = np.take_along_axis(contrib.reshape(8, -1), order, axis=1)
    counts = np.round(np.linspace(0, SIDE * SIDE, 17)).astype(int)
    gap0 = float(m[1].bias[1] - m[1].bias[0])
    removed = np.concatenate([np.zeros((8, 1)), np.cumsum(sorted_c, axis=1)], axis=1)[:, counts]
    total = contrib.reshape(8, -1).sum(axis=1, keepdims=True)
    sig = lambda z: 1 / (1 + np.exp(-z))  # noqa: E731
    assert d == pytest.approx(sig(gap0 + total - removed), abs=1e-5)
    assert i == pytest.approx(sig(gap0 + removed), abs=1e-5)
    rnd = np.random.default_rng(0).random(contrib.shape)
    dr, ir = Q.deletion_insertion(net, x, target, rnd, 0.0, steps=16)
    assert Q.auc(d).mean() < Q.auc(dr).mean() and Q.auc(i).mean() > Q.auc(ir).mean()


def test_relevance_mass_and_pointing_game_closed_form():
    heat = np.zeros((2, 4, 4))
    heat[0, 0, 0], heat[0, 3, 3] = 3.0, 1.0
    heat[1, 3, 3], heat[1, 0, 1] = 2.0, -5.0
    mask = np.zeros((2, 4, 4), bool)
    mask[:, :2, :2] = True
    assert Q.relevance_mass(heat, mask).tolist() == [0.75, 0.0]
    assert Q.pointing_game(heat, mask).tolist() == [True, False]
    region = Q.Region(rule="interior", border=0.25)
    assert region.masks(np.zeros((1, 4, 4, 1)), ["a"], {})[0].astype(int).tolist() == [
        [0, 0, 0, 0], [0, 1, 1, 0], [0, 1, 1, 0], [0, 0, 0, 0]]
    with pytest.raises(ValueError, match="0 <= x0 < x1 <= 1"):
        Q.Region(rule="box", box=(0.5, 0, 0.2, 1))


def test_spearman_rows_exact():
    a = np.array([[1.0, 2, 3, 4], [1, 2, 3, 4]])
    b = np.array([[10.0, 20, 30, 40], [4, 3, 2, 1]])
    assert Q.spearman_rows(a, b).tolist() == pytest.approx([1.0, -1.0])


# --- the explainability check on a tiny use case -------------------------------------------------

class EdgeDetector(A.Method):
    """A 'method' that never looks at the model: the image's own edges. The sanity check must fail it."""

    name = "test_attribution:EdgeDetector"  # a partner's method, named by reference as in a plan
    needs_gradients = False

    def attribute(self, x, target, baseline):
        gy, gx = torch.gradient(x, dim=(2, 3))
        return A.Attribution(gx.abs() + gy.abs())


class TinySplit:
    def __init__(self, split: str):
        rng = np.random.default_rng(len(split))
        self.items = [Item(image=rng.random((SIDE, SIDE)).astype(np.float32), label=i % 2, id=f"{split}-{i}")
                      for i in range(24)]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def load(split: str) -> TinySplit:
    return TinySplit(split)


def tiny_context(tmp_path, module: nn.Module | None, confidential: bool = False, session=None) -> Context:
    uc = UseCase.model_validate({
        "id": "tiny", "title": "tiny", "owner": "tests", "criticality": "low", "intended_function": "x",
        "confidentiality": "confidential" if confidential else "public",
        "model": spec().model_dump(mode="json"),
        "data": {"loader": "test_attribution:load", "path": str(HERE), "splits": {"test": "test"}, "batch_size": 8},
        "requirements": [], "plan": {"checks": []},
    })
    clf = Classifier(uc.model, module=module, session=session)
    return Context(use_case=uc, model=clf, data=DataSource(uc.data, 0), seed=0, workdir=tmp_path / "explainability")


FAST = {"items": 8, "sensitivity_items": 2, "sensitivity_samples": 2, "infidelity_samples": 4, "steps": 8,
        "gallery": 2, "region": {"rule": "interior", "border": 0.25}}


def test_explainability_ranks_methods_and_fails_the_insensitive_one(tmp_path):
    check = build(CheckSpec(check="explainability", params={
        **FAST, "methods": ["saliency", "integrated_gradients", "test_attribution:EdgeDetector"],
        "options": {"integrated_gradients": {"n_steps": 16}}}))
    out = check(tiny_context(tmp_path, small_cnn()))
    rows = {r["method"]: r for r in out.summary["ranking"]}
    assert rows["test_attribution:EdgeDetector"]["sanity_rank_correlation"] == pytest.approx(1.0)
    assert rows["test_attribution:EdgeDetector"]["status"] == "warned"
    assert any("randomised" in r for r in rows["test_attribution:EdgeDetector"]["reasons"])
    assert rows["saliency"]["sanity_rank_correlation"] < 0.5
    assert "test_attribution:EdgeDetector" not in out.summary["recommended"]
    metrics = {m.metric for m in out.measurements}
    for name in ("saliency", "integrated_gradients"):
        for k in ("deletion_auc", "insertion_auc", "mu_fidelity", "infidelity", "sensitivity_max",
                  "average_stability", "complexity", "sparseness", "sanity_rank_correlation", "relevance_mass",
                  "pointing_game"):
            assert f"{k}:{name}" in metrics
    assert "ig_convergence_delta" in metrics and "recommended_methods" in metrics
    assert {c.id for c in out.curves} == {"explainability_deletion", "explainability_insertion",
                                          "explainability_sanity", "explainability_independent"}
    assert [a.kind for a in out.artefacts] == ["image", "file"]


def test_explainability_on_a_black_box_and_confidential(tmp_path):
    w = linear_model()[1].weight.detach().numpy()
    ctx = tiny_context(tmp_path, None, confidential=True, session=NumpySession(w))
    out = build(CheckSpec(check="explainability", params={**FAST, "methods": ["saliency", "occlusion"]}))(ctx)
    rows = {r["method"]: r for r in out.summary["ranking"]}
    assert rows["saliency"]["status"] == "not run" and "black box" in rows["saliency"]["reasons"][0]
    # no weights to randomise: the sanity rule is not measured, so a black-box method cannot be recommended
    assert rows["occlusion"]["status"] == "warned" and "not measured" in rows["occlusion"]["reasons"][0]
    assert "deletion_auc" in rows["occlusion"] and "sanity_rank_correlation" not in rows["occlusion"]
    assert not out.artefacts and any("confidential" in lim for lim in out.limitations)


def test_explainability_bad_configuration_is_named(tmp_path):
    with pytest.raises(CheckError, match="unknown attribution method"):
        build(CheckSpec(check="explainability", params={"methods": ["gradcam"]}))
    with pytest.raises(CheckError, match="n_steps"):
        build(CheckSpec(check="explainability", params={"methods": ["integrated_gradients"],
                                                         "options": {"integrated_gradients": {"n_steps": 0}}}))
    check = build(CheckSpec(check="explainability", params={**FAST, "methods": ["grad_cam"],
                                                             "options": {"grad_cam": {"layer": "conv9"}}}))
    with pytest.raises(CheckError, match="layer 'conv9' does not exist"):
        check(tiny_context(tmp_path, small_cnn()))

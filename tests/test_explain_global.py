"""Global explanations: concept tests with a planted concept, feature visualisation, channel views, the map."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_attribution import SIDE, net_of, small_cnn, tiny_context
from torch import nn

from trustcase.checks import CheckError, build
from trustcase.explain import attribution as A
from trustcase.explain import concepts as C
from trustcase.explain import representation as R
from trustcase.explain import visualisation as V
from trustcase.schemas import CheckSpec


def patch_model() -> nn.Module:
    """Class 1 fires on a bright top-left patch: its logit is 4 x the mean of channel 0 over the top-left cell."""
    torch.manual_seed(0)
    conv = nn.Conv2d(1, 4, 3, padding=1)
    head = nn.Linear(4 * 4 * 4, 2)
    with torch.no_grad():
        conv.weight[0].zero_()
        conv.weight[0, 0, 1, 1], conv.bias[0] = 1.0, 0.0  # channel 0 copies the input
        head.weight.zero_()
        head.bias.zero_()
        head.weight[1].view(4, 4, 4)[0, 0, 0], head.bias[1] = 4.0, -1.0
    return nn.Sequential(conv, nn.ReLU(), nn.AdaptiveAvgPool2d(4), nn.Flatten(), head).eval()



def test_concepts_from_the_data_are_exactly_their_members():
    """Metadata values, the brightness quartiles and perturbed items: each concept holds only its own items; one
    with too few examples is left out and said."""
    images = np.stack([np.full((4, 4, 1), v, np.float32) for v in np.linspace(0.0, 1.0, 40)])  # brightness = v
    x = torch.arange(40, dtype=torch.float32)[:, None, None, None].expand(40, 1, 4, 4)  # each input says its item
    meta = {"cell": ["rare" if i < 3 else ("mono" if i % 2 else "poly") for i in range(40)]}
    seen = {}

    def perturb(name, amp, sel):
        seen[name] = sel
        return x[sel] + 1000 * amp

    sets, small = C.concept_sets(x, images, meta, np.random.default_rng(0), 8, ["cell"], ["dark", "bright"],
                                 {"blur": 2.0}, perturb)
    items = {k: sorted(int(v) for v in t[:, 0, 0, 0]) for k, t in sets.items()}
    assert set(items) == {"cell=mono", "cell=poly", "dark", "bright", "blur@2"}
    assert small == ["concept cell=rare: only 3 examples in the sample; not tested"]
    assert all(i >= 3 and i % 2 == 1 for i in items["cell=mono"]) and len(items["cell=mono"]) == 8
    assert all(i % 2 == 0 for i in items["cell=poly"])
    assert max(items["dark"]) <= 9.75 and min(items["bright"]) >= 29.25  # the lowest / highest quartile of 0..39
    assert items["blur@2"] == sorted(2000 + int(i) for i in seen["blur"]) and len(items["blur@2"]) == 8

def test_tcav_finds_the_planted_concept_and_not_a_random_one():
    gen = torch.Generator().manual_seed(0)

    def noise(n):
        return torch.rand(n, 1, SIDE, SIDE, generator=gen) * 0.5

    def patched(n):
        x = noise(n)
        x[:, :, :4, :4] = 1.0
        return x

    net = net_of(patch_model())
    res = {r.concept: r for r in C.tcav(net, {"patch": patched(30), "noise": noise(30)},
                                         [noise(30) for _ in range(32)], patched(20), 1, ["1"])}
    assert res["patch"].mean == 1.0 and res["patch"].p_value < 0.01 and res["patch"].cav_accuracy == 1.0
    assert res["noise"].p_value > 0.05
    with pytest.raises(ValueError, match="layer '9' does not exist"):
        C.tcav(net, {"patch": patched(8)}, [noise(8)] * 6, patched(4), 1, ["9"])
    with pytest.raises(ValueError, match="at least 6"):
        C.tcav(net, {"patch": patched(8)}, [noise(8)] * 4, patched(4), 1, ["1"])


def test_class_visualisation_of_a_linear_model_follows_its_weights():
    torch.manual_seed(3)
    m = nn.Sequential(nn.Flatten(), nn.Linear(SIDE * SIDE, 2)).eval()
    net = net_of(m)
    # no jitter, no smoothing: weights without spatial structure are followed pixel by pixel
    vis = V.visualise(net, [1, A.Neuron("1", 0)], steps=64, jitter=0, tv_weight=0, seed=0)  # (2, H, W, 1) in [0, 1]
    assert vis.shape == (2, SIDE, SIDE, 1) and vis.min() >= 0 and vis.max() <= 1
    for k, t in enumerate((1, 0)):
        w = m[1].weight.detach()[t].reshape(SIDE, SIDE).numpy()
        strong = np.abs(w) > np.quantile(np.abs(w), 0.5)  # the logit is maximised by bright where w > 0
        agree = (np.sign(vis[k, ..., 0] - 0.5) == np.sign(w))[strong].mean()
        assert agree > 0.9, agree
    again = V.visualise(net, [1, A.Neuron("1", 0)], steps=64, jitter=0, tv_weight=0, seed=0)
    assert np.array_equal(vis, again)


def test_influential_and_top_activating_channels():
    net = net_of(patch_model())
    x = torch.rand(6, 1, SIDE, SIDE, generator=torch.Generator().manual_seed(1))
    # only channel 0 carries class 1 (its weight is the only non-zero one)
    assert V.influential_channels(net, "1", x, torch.ones(6, dtype=torch.long), 1) == [0]
    levels = torch.linspace(0.1, 0.9, 9)[:, None, None, None].expand(9, 1, SIDE, SIDE)
    whole = V.TopActivating(net, "1", [0], 3)
    whole.update(levels, np.arange(9))
    streamed = V.TopActivating(net, "1", [0], 3)
    for s in range(0, 9, 2):  # the same top items whatever the batches
        streamed.update(levels[s:s + 2], np.arange(9)[s:s + 2])
    assert [i for i, _ in whole.top()[0]] == [i for i, _ in streamed.top()[0]] == [8, 7, 6]
    assert V.normalise_maps(np.array([[[0.0, 2.0]], [[1.0, 1.0]]])).tolist() == [[[0, 255]], [[0, 0]]]


def test_penultimate_features_are_the_input_of_the_last_linear_layer():
    m = small_cnn()
    x = torch.rand(3, 1, SIDE, SIDE, generator=torch.Generator().manual_seed(2))
    f = R.features(net_of(m), x)
    assert np.allclose(f, m[:7](x).detach().numpy(), atol=1e-6)


FAST = {"items": 24, "concepts": {"descriptors": ["dark", "bright"], "perturbations": {"gaussian_blur": 1.0},
                                  "size": 6},
        "randoms": 3, "steps": 4, "channels": 2, "top_images": 2, "representation": False}


def test_global_explanations_check_on_a_tiny_case(tmp_path):
    out = build(CheckSpec(check="global_explanations", params=FAST))(tiny_context(tmp_path, small_cnn()))
    metrics = {m.metric for m in out.measurements}
    assert {"tcav:dark:defect", "tcav:bright:defect", "tcav:gaussian_blur@1:defect", "concepts_significant"} <= metrics
    tcav = next(m for m in out.measurements if m.metric == "tcav:dark:defect")
    assert 0 <= tcav.value <= 1 and tcav.n == 3 and "p_value" in tcav.details and tcav.interval is not None
    assert [a.path.split("/")[-1] for a in out.artefacts] == ["concepts.png", "visualisation.png", "channels.png"]
    assert len(out.summary["channels"]) == 2 and out.summary["layers"] == ["3"]


def test_global_explanations_bad_configuration_is_named(tmp_path):
    ctx = tiny_context(tmp_path, small_cnn())
    for params, msg in (({"classes": ["cat"]}, r"classes \['cat'\] do not exist; classes: \['ok', 'defect'\]"),
                        ({"layers": ["conv9"]}, "layer 'conv9' does not exist"),
                        ({"concepts": {"metadata": ["site"]}}, "metadata field 'site' not in the data"),
                        ({"concepts": {"perturbations": {"blurr": 1}}}, "unknown perturbation 'blurr'")):
        with pytest.raises(CheckError, match=msg):
            build(CheckSpec(check="global_explanations", params={**FAST, **params}))(ctx)


@pytest.mark.slow
def test_representation_map_on_a_tiny_case(tmp_path):
    """UMAP compiles with numba on first use (tens of seconds): slow."""
    out = build(CheckSpec(check="global_explanations", params={**FAST, "representation": True, "paths": 2}))(
        tiny_context(tmp_path, small_cnn()))
    assert out.summary["representation"] == {"points": 48, "perturbation": "gaussian_blur", "paths": 2}  # 24 x 2
    assert "representation.png" in [a.path.split("/")[-1] for a in out.artefacts]
    blobs = np.concatenate([np.zeros((30, 8)), np.full((30, 8), 10.0)]) + \
        np.random.default_rng(0).normal(size=(60, 8))
    xy = R.embed(blobs, seed=0)
    a, b = xy[:30].mean(axis=0), xy[30:].mean(axis=0)
    assert np.linalg.norm(a - b) > 3 * max(xy[:30].std(axis=0).max(), xy[30:].std(axis=0).max())

"""Explanation metrics on hand-computable cases, and the ranking of methods decided on intervals."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from test_attribution import SIDE, images, linear_model, net_of

from trustcase.explain import quality as Q
from trustcase.schemas import Interval, Measurement, Scope
from trustcase.verdicts import rank_methods


def test_complexity_and_sparseness_closed_forms():
    one = np.zeros((1, 2, 2))
    one[0, 0, 0] = 5.0
    flat = np.ones((1, 2, 2))
    two = np.zeros((1, 2, 2))
    two[0, 0, 0], two[0, 1, 1] = 1.0, -1.0  # signs do not matter: the absolute map
    maps = np.concatenate([one, flat, two])
    assert Q.complexity(maps).tolist() == pytest.approx([0.0, 1.0, math.log(2) / math.log(4)])
    # Gini of (0, 0, 0, 5) is 3/4, of a uniform map 0, of (0, 0, 1, 1) (2*3 - 5 + 2*4 - 5) / (4 * 2) = 1/2
    assert Q.sparseness(maps).tolist() == pytest.approx([0.75, 0.0, 0.5])
    assert np.isnan(Q.complexity(np.zeros((1, 2, 2)))).all() and np.isnan(Q.sparseness(np.zeros((1, 2, 2)))).all()


def test_stability_of_the_identity_map():
    """phi(x) = x: the relative change is ||d|| / ||x||, and E||d||^2 = n r^2 / 3 for d uniform in [-r, r]^n."""
    x = images(3, seed=2) + 1.0
    r = 0.05
    moved = Q.stability(lambda inp, t: inp, x, torch.zeros(3, dtype=torch.long), r, samples=16, seed=0)
    expected = r * math.sqrt(SIDE * SIDE / 3) / x.flatten(1).norm(dim=1).numpy()
    assert moved.mean(axis=1) == pytest.approx(expected, rel=0.03)
    assert (moved.max(axis=1) >= moved.mean(axis=1)).all()
    const = Q.stability(lambda inp, t: torch.ones_like(inp), x, torch.zeros(3, dtype=torch.long), r, 4, 0)
    assert (const == 0).all()


def test_mu_fidelity_of_exact_and_reversed_contributions():
    """A nearly linear probability (small logits): p(x) - p(x with S removed) ~ sum over S of w (x - b) / 4, so
    the exact contributions correlate perfectly with the drops, and their opposite perfectly negatively."""
    m = linear_model(seed=1)
    with torch.no_grad():
        m[1].weight.mul_(0.05)
        m[1].bias.zero_()
    net, x = net_of(m), images(4, seed=3)
    w = (m[1].weight[1] - m[1].weight[0]).detach().reshape(1, SIDE, SIDE)
    contributions = (w * x[:, 0]).numpy()
    target = torch.ones(4, dtype=torch.long)
    exact = Q.mu_fidelity(net, x, target, contributions, 0.0, cells=4, samples=64, seed=0)
    assert (exact > 0.99).all(), exact
    assert (Q.mu_fidelity(net, x, target, -contributions, 0.0, cells=4, samples=64, seed=0) < -0.99).all()


def measurement(metric, value, lo, hi):
    return Measurement(check="explainability", metric=metric, value=value, n=16, scope=Scope(split="test"),
                       interval=Interval(lower=lo, upper=hi, confidence=0.95, method="t"))


def test_methods_are_ranked_on_intervals():
    ms = [measurement("sanity_rank_correlation:a", 0.2, 0.1, 0.3), measurement("faithfulness:a", 0.3, 0.2, 0.4),
          measurement("sanity_rank_correlation:b", 0.45, 0.4, 0.6), measurement("faithfulness:b", 0.5, 0.4, 0.6),
          measurement("sanity_rank_correlation:c", 0.8, 0.7, 0.9), measurement("faithfulness:c", 0.5, 0.35, 0.65),
          measurement("faithfulness:d", 0.6, 0.5, 0.7)]
    rules = [("sanity_rank_correlation", "<=", 0.5, "sanity"), ("faithfulness", ">", 0.1, "faithful")]
    rows = {r["method"]: r for r in rank_methods(["a", "b", "c", "d"], ms, rules)}
    assert rows["a"]["status"] == "recommended" and not rows["a"]["reasons"]
    # b's point estimate passes, but its interval straddles the threshold: not recommended, and said why
    assert rows["b"]["status"] == "warned" and "sanity: INCONCLUSIVE" in rows["b"]["reasons"][0]
    assert rows["c"]["status"] == "warned" and "sanity: FAIL" in rows["c"]["reasons"][0]
    assert rows["d"]["reasons"] == ["sanity: INCONCLUSIVE (not measured)"]
    order = [r["method"] for r in rank_methods(["c", "d", "a", "b"], ms, rules)]
    assert order[0] == "a" and order[1:] == ["d", "b", "c"]  # then by the lower bound of faithfulness


def test_explainability_explains_a_chosen_class_and_a_method_that_fails_midway_is_not_run(tmp_path):
    from test_attribution import FAST, small_cnn, tiny_context

    from trustcase.checks import CheckError, build
    from trustcase.schemas import CheckSpec

    params = {**FAST, "methods": ["saliency", "grad_cam_pp"], "target": "defect", "sensitivity_items": 0,
              "options": {"grad_cam_pp": {"layer": "7"}}}  # a Linear layer: no feature map, found while running
    out = build(CheckSpec(check="explainability", params=params))(tiny_context(tmp_path, small_cnn()))
    rows = {r["method"]: r for r in out.summary["ranking"]}
    assert rows["grad_cam_pp"]["status"] == "not run" and "needs a feature map" in rows["grad_cam_pp"]["reasons"][0]
    assert rows["saliency"]["status"] in ("recommended", "warned") and out.summary["target"] == "defect"
    assert not any(m.details.get("method") == "grad_cam_pp" for m in out.measurements)
    assert "grad_cam_pp" not in {s for c in out.curves for s in c.series}
    with pytest.raises(CheckError, match=r"target 'cat' is not a class; classes: \['ok', 'defect'\]"):
        build(CheckSpec(check="explainability", params={**params, "target": "cat"}))(tiny_context(tmp_path,
                                                                                                   small_cnn()))

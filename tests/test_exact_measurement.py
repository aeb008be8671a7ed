"""The shared measurement code on cases computed by hand: intervals at their edges, 'k of n' with n = 0,
certified-accuracy curves, radius grids, per-item CSVs (written after mutation testing showed what the
other tests leave free)."""

from __future__ import annotations

import csv

import numpy as np
import pytest

from trustcase.measurement import (
    accuracy_curve,
    clopper_pearson,
    clopper_pearson_lower,
    proportion,
    radius_grid,
    wilson,
    write_items,
)
from trustcase.schemas import Scope


@pytest.mark.parametrize(("fn", "method"), [(clopper_pearson, "clopper-pearson"), (wilson, "wilson")])
def test_intervals_with_no_item_are_the_whole_range(fn, method):
    for n in (0, -1):
        iv = fn(0, n, 0.9)
        assert (iv.lower, iv.upper, iv.confidence, iv.method) == (0.0, 1.0, 0.9, method)
    iv = fn(3, 10)
    assert iv.confidence == 0.95 and iv.method == method  # the default level and the name of the method
    assert fn(0, 1, 0.95).upper < 1.0  # one item is already evidence


def test_clopper_pearson_at_the_edges():
    all_ok, none_ok = clopper_pearson(10, 10, 0.9), clopper_pearson(0, 10, 0.9)
    assert all_ok.upper == 1.0 and all_ok.lower == pytest.approx(0.05 ** 0.1, rel=1e-12)
    assert none_ok.lower == 0.0 and none_ok.upper == pytest.approx(1 - 0.05 ** 0.1, rel=1e-12)
    # the two tails at alpha / 2 each: 3 of 10 at 90% (beta quantiles, by hand with scipy's closed form)
    iv = clopper_pearson(3, 10, 0.9)
    assert (round(iv.lower, 4), round(iv.upper, 4)) == (0.0873, 0.6066)


def test_clopper_pearson_lower_bound_vectorised():
    got = clopper_pearson_lower(np.array([0, 1, 5, 10]), 10, 0.05)
    assert got[0] == 0.0
    assert got[1] == pytest.approx(1 - 0.95 ** 0.1, rel=1e-9)  # k = 1: P(X >= 1) = alpha at p = 1 - (1-alpha)^(1/n)
    assert got[3] == pytest.approx(0.05 ** 0.1, rel=1e-12)
    assert got[1] < got[2] < got[3]
    assert got[2] == pytest.approx(clopper_pearson(5, 10, 0.9).lower, rel=1e-12)  # one side of the 90% interval


def test_wilson_is_clipped_to_the_unit_range():
    assert wilson(0, 5, 0.95).lower == 0.0 and wilson(5, 5, 0.95).upper == 1.0
    iv = wilson(1, 4, 0.95)
    z = 1.959963984540054
    centre = (0.25 + z * z / 8) / (1 + z * z / 4)
    half = z * np.sqrt(0.25 * 0.75 / 4 + z * z / 64) / (1 + z * z / 4)
    assert iv.lower == pytest.approx(centre - half, rel=1e-12) and iv.upper == pytest.approx(centre + half, rel=1e-12)


def test_proportion_k_of_n_and_n_zero():
    scope = Scope(split="test")
    m = proportion("c", "accuracy", 3, 4, 0.9, scope, 0.5, extra=1)
    assert (m.check, m.metric, m.value, m.n, m.amplitude, m.scope) == ("c", "accuracy", 0.75, 4, 0.5, scope)
    assert m.interval == clopper_pearson(3, 4, 0.9) and m.details == {"extra": 1}
    empty = proportion("c", "recall:bad", 0, 0, 0.9, undefined="no bad item")
    assert empty.value is None and empty.interval is None and empty.n == 0
    assert empty.details == {"undefined": "no bad item"} and empty.scope == Scope()
    assert proportion("c", "m", 0, -3, 0.9).details["undefined"] == "no item (n = 0)"
    assert proportion("c", "m", 0, -3, 0.9).n == 0
    assert proportion("c", "m", 1, 1, 0.9).value == 1.0  # one item is already a measurement


def test_accuracy_curve_counts_correct_and_certified_items():
    radius = np.array([0.0, 0.1, 0.3, 0.5, np.inf])
    correct = np.array([True, True, False, True, True])
    ms, curve, values = accuracy_curve("lipschitz", "lipschitz_certified_accuracy", "validation", [0.0, 0.1, 0.4],
                                       radius, correct, 0.95, "title")
    assert values == [0.8, 0.6, 0.4]
    assert [m.amplitude for m in ms] == [0.0, 0.1, 0.4]
    assert all(m.scope.perturbation.name == "l2_radius" and m.n == 5 for m in ms)
    assert ms[2].scope.perturbation.max_amplitude == 0.4 and ms[2].scope.split == "validation"
    assert curve.x_label == "L2 radius (input scaled to [0, 1])" and curve.y_label == "certified accuracy"
    assert ms[1].interval == clopper_pearson(3, 5, 0.95)
    assert curve.x == [0.0, 0.1, 0.4] and curve.series["certified accuracy"].y == values
    assert curve.series["certified accuracy"].lower[1] == ms[1].interval.lower
    assert curve.series["certified accuracy"].upper[1] == ms[1].interval.upper
    assert curve.id == "lipschitz-certified-accuracy" and curve.title == "title"
    ms, curve, values = accuracy_curve("c", "m", "test", [0.0], np.zeros(0), np.zeros(0, bool), 0.95, "t")
    assert ms[0].value is None and np.isnan(values[0]) and np.isnan(curve.series["certified accuracy"].lower[0])
    assert "no readable item in split 'test'" == ms[0].details["undefined"]


def test_radius_grid():
    radius = np.array([0.2, 1.0, np.inf, 4.0])
    correct = np.array([True, True, True, False])  # the wrong item's radius and the infinite one do not count
    grid = radius_grid(None, [0.33], radius, correct)
    assert grid == sorted({*np.linspace(0, 1.0, 21).tolist(), 0.33})
    assert radius_grid([0.5, 0.1], [0.2], radius, correct) == [0.0, 0.1, 0.2, 0.5]
    assert radius_grid(None, [], np.zeros(3), np.ones(3, bool)) == [0.0]
    assert radius_grid(None, [], np.zeros(0), np.zeros(0, bool)) == [0.0]


def test_write_items(tmp_path):
    path = tmp_path / "items.csv"
    write_items(path, ["a", "b"], np.array([0, 1]), np.array([1, -1]), np.array([0.5, 0.0]))
    rows = list(csv.reader(path.open()))
    assert rows == [["id", "label", "prediction", "radius"], ["a", "0", "1", "0.5"], ["b", "1", "-1", "0.0"]]
    with pytest.raises(ValueError):
        write_items(path, ["a"], [0, 1], [0, 1], [0.1, 0.2])


def test_one_function_per_kind_of_figure():
    from trustcase.measurement import bound, census, estimate

    scope = Scope(split="test")
    c = census("data_quality", "leakage", 0, 120, scope=scope, details={"exact": 0})
    assert (c.kind, c.value, c.n, c.interval, c.details) == ("census", 0.0, 120, None, {"exact": 0})
    iv = clopper_pearson(8, 10)
    e = estimate("performance", "accuracy", 0.8, 10, iv, scope=scope)
    assert (e.kind, e.value, e.interval) == ("estimate", 0.8, iv)
    assert estimate("odd_monitor", "auroc:x", 0.9, 50, None).interval is None
    b = bound("lipschitz", "lipschitz_upper_bound", 3.5, unit="L2/L2")
    assert (b.kind, b.value, b.n, b.unit) == ("bound", 3.5, None, "L2/L2")
    assert proportion("c", "m", 3, 4, 0.95).kind == proportion("c", "m", 0, 0, 0.95).kind == "estimate"


def test_bootstrap_weights_follow_the_item_not_its_company():
    from trustcase.measurement import bootstrap_weights
    from trustcase.seeding import item_seed

    ids = [f"cell{i:04d}" for i in range(200)]
    w = bootstrap_weights(7, "performance", ids)
    assert w.shape == (200, 1000) and w.dtype == np.uint8
    assert np.array_equal(bootstrap_weights(7, "performance", ids[::-1])[::-1], w)  # order, batch: irrelevant
    assert np.array_equal(bootstrap_weights(7, "performance", ids[50:51])[0], w[50])
    assert not np.array_equal(bootstrap_weights(8, "performance", ids[:1]), w[:1])  # the seed matters
    assert not np.array_equal(bootstrap_weights(7, "perturbation_sweep", ids[:1]), w[:1])  # so does the check
    assert len({item_seed(7, "performance", "a", s) for s in ("bootstrap", "noise")}) == 2  # and the stream
    # Poisson(1): mean 1 and variance 1 (200,000 draws: 4 standard errors 0.009 and 0.013)
    assert abs(w.mean() - 1) < 0.009 and abs(w.var() - 1) < 0.013
    assert bootstrap_weights(7, "performance", []).shape == (0, 1000)


def test_bootstrap_interval_is_the_percentile_interval_of_the_replicates():
    from trustcase.measurement import bootstrap_interval

    reps = np.arange(101, dtype=float)  # percentiles of 0..100 are the numbers themselves
    iv = bootstrap_interval(np.append(reps, [np.nan, np.inf]), 0.9)  # replicates with no item drawn: left out
    assert [iv.lower, iv.upper] == pytest.approx([5.0, 95.0], rel=1e-12)  # one rounding of the quantile position
    assert iv.confidence == 0.9
    assert iv.method == "poisson bootstrap over items (101 replicates, percentile)"
    assert bootstrap_interval(np.array([np.nan]), 0.95) is None

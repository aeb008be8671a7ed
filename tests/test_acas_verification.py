"""ACAS Xu verification: the published verdicts of N_1,1 stay right, branch and bound proves what holds, the
falsifier finds the counterexamples that once escaped it, every counterexample is re-checked, and the
bounds machinery (per-box gathered CROWN rows, inherited parent bounds) is exact or sound where it must be.
Tests on the reference networks skip when the ACAS Xu data is absent."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from torch import nn

from trustcase.certification import bab
from trustcase.certification import graph as G
from trustcase.certification import propagation as P
from trustcase.certification.nnet import load_network
from trustcase.certification.properties import acasxu_root, check_property, falsify
from trustcase.certification.vnnlib import read_vnnlib

ACAS = acasxu_root()
needs_acas = pytest.mark.skipif(not (ACAS / "instances.csv").is_file(),
                                reason=f"ACAS Xu data not found at {ACAS} (set TRUSTCASE_ACASXU)")


def network(name: str) -> nn.Module:
    return load_network(ACAS / "onnx" / f"ACASXU_run2a_{name}_batch_2000.onnx")


def prop(i: int):
    return read_vnnlib(ACAS / "vnnlib" / f"prop_{i}.vnnlib")


def random_mlp(seed: int, sizes=(5, 20, 20, 20, 5)) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for a, b in zip(sizes[:-1], sizes[1:], strict=True):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers[:-1]).double().eval()


@pytest.mark.parametrize("seed", range(3))
def test_refining_the_live_neurons_too_stays_sound(seed):
    """Input splitting refines every live neuron's bounds (active ones too), not only the unstable ones: no
    sampled value falls outside either (CROWN is not monotone in its intermediate bounds, so neither set of
    bounds contains the other neuron by neuron)."""
    net = random_mlp(seed)
    g = G.from_model(net, (5,))
    gen = torch.Generator().manual_seed(seed)
    lo = torch.rand(7, 5, generator=gen, dtype=torch.float64) - 0.5
    hi = lo + 0.3
    some = P.intermediate(g, lo, hi, "crown")
    live = P.intermediate(g, lo, hi, "crown", alive=True)
    x = lo[0] + (hi[0] - lo[0]) * torch.rand(5000, 5, generator=gen, dtype=torch.float64)
    values = g.forward(x, keep=True)
    for k in range(1, len(g.nodes)):
        for lb, ub in (live[k], some[k]):
            assert torch.all(values[k] >= lb[0] - 1e-9) and torch.all(values[k] <= ub[0] + 1e-9)


@pytest.mark.parametrize("seed", range(3))
def test_bounds_of_a_child_box_with_its_parents_bounds_are_sound(seed):
    """The children of a split inherit the parent's intermediate bounds: still no sampled output below."""
    net = random_mlp(seed)
    g = G.from_model(net, (5,))
    gen = torch.Generator().manual_seed(10 + seed)
    lo = torch.rand(1, 5, generator=gen, dtype=torch.float64) - 0.5
    hi = lo + 0.4
    C = torch.tensor([[1.0, -1, 0, 0, 0], [0, 0, 1, 0, -1]], dtype=torch.float64)
    parent = P.lower_bound(g, lo, hi, C, "crown", alive=True)
    half_hi = hi.clone()
    half_hi[0, 0] = (lo[0, 0] + hi[0, 0]) / 2
    child = P.lower_bound(g, lo, half_hi, C, "alpha-crown", known=parent.bounds, alive=True)
    assert torch.all(child.lower >= parent.lower - 1e-12)  # never looser than the parent
    x = lo + (half_hi - lo) * torch.rand(20000, 5, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        values = net(x) @ C.T
    assert torch.all(child.lower[0] <= values.min(0).values + 1e-9)


def test_split_rules_propose_the_inputs_that_matter():
    """"influence": largest |Lambda| x width summed over live rows; "widest": the widest side; "pair" both."""
    lam = torch.tensor([[[0.1, 2.0, 0.0], [1.0, 0.0, 0.0]]], dtype=torch.float64)  # (1 box, 2 rows, 3 inputs)
    live = torch.ones(1, 2, dtype=torch.bool)
    width = torch.tensor([[1.0, 1.0, 3.0]], dtype=torch.float64)
    assert bab.split_dims(lam, live, width, "influence").tolist() == [[1]]
    assert bab.split_dims(lam, live, width, "widest").tolist() == [[2]]
    assert bab.split_dims(lam, live, width, "pair").tolist() == [[1, 2]]
    assert bab.split_dims(lam, live, width, "try").tolist() == [[0, 1, 2]]
    # rows of a refuted conjunction do not count
    assert bab.split_dims(lam, torch.tensor([[False, True]]), width, "influence").tolist() == [[0]]
    with pytest.raises(ValueError, match="unknown split rule"):
        bab.split_dims(lam, live, width, "random")


def test_mixed_rows_are_means_of_the_conjunctions_rows():
    """A positive mean of the rows' excesses means some row is positive: the added rows are convex weights."""
    A = np.arange(12.0).reshape(3, 4)
    b = np.array([1.0, 2.0, 3.0])
    mA, mb = bab.mixed(A, b)
    assert mA.shape == (3 + 3 + 1, 4) and np.allclose(mA[:3], A) and np.allclose(mb[:3], b)
    assert np.allclose(mA[3], (A[0] + A[1]) / 2) and np.allclose(mb[-1], b.mean())
    assert bab.mixed(A[:1], b[:1])[0].shape == (1, 4)  # one row: nothing to mix
    assert len(bab.mixed(np.eye(9), np.zeros(9))[0]) == 10  # many rows: the mean of all only


@needs_acas
@pytest.mark.parametrize("i", [1, 2, 3, 4, 5, pytest.param(6, marks=pytest.mark.slow)])
def test_published_verdicts_of_n11_stay_right(i):
    """Properties 1-6 hold on N_1,1 (Katz et al. 2017; VNN-COMP): a second or two each, property 6 ~10 s."""
    r = check_property(network("1_1"), prop(i), timeout=116)
    assert r["verdict"] == "holds", r["reason"]


@needs_acas
def test_branch_and_bound_proves_a_holding_property_in_a_small_budget():
    """N_4,5 property 10 (holds): the split rule proves it in a few thousand boxes; never "violated"."""
    g = G.from_model(network("4_5"), (5,))
    region = prop(10).regions[0]
    conj = [(c.A, c.b) for c in region.outputs]
    out = bab.decide(g, region.lower, region.upper, conj, time.perf_counter() + 60)
    assert out.verdict == "holds" and 0 < out.boxes < 5000


@needs_acas
@pytest.mark.parametrize("name,i", [("1_9", 7), ("5_3", 2)])
def test_counterexamples_that_once_escaped_are_found_and_rechecked(name, i):
    """N_1,9 property 7 (on a face of the box) and N_5,3 property 2 stayed unknown for 60 s with uniform
    sampling and large PGD steps; face sampling and small-step PGD find them, any seed, in a second."""
    import onnxruntime as ort

    p = prop(i)
    net = network(name)
    for seed in range(2):
        found = falsify(net, p, time.perf_counter() + 20, seed)
        assert found is not None
        x, _ = found
        y = ort.InferenceSession(str(ACAS / "onnx" / f"ACASXU_run2a_{name}_batch_2000.onnx"),
                                 providers=["CPUExecutionProvider"]).run(None, {"input": x.reshape(1, 1, 1, 5)})[0]
        assert p.violated_by(x[None].astype(np.float64), y.astype(np.float64))[0]  # an independent engine agrees
    r = check_property(net, p, timeout=20)
    assert r["verdict"] == "violated" and r["counterexample"] is not None


@needs_acas
def test_a_budget_of_zero_or_less_is_refused_before_any_work():
    for t in (0, -1.0):
        with pytest.raises(ValueError, match="timeout must be > 0"):
            check_property(network("1_1"), prop(1), timeout=t)


def marabou_verdict(net: str, i: int, timeout: int) -> str:
    """Marabou (maraboupy, an independent complete verifier) on one single-conjunction ACAS Xu instance:
    sat = the unsafe set is reached (violated), unsat = holds."""
    from maraboupy import Marabou

    p = prop(i)
    (region,) = p.regions
    (conj,) = region.outputs
    m = Marabou.read_onnx(str(ACAS / "onnx" / f"ACASXU_run2a_{net}_batch_2000.onnx"))
    x, y = m.inputVars[0].flatten(), m.outputVars[0].flatten()
    for k, v in enumerate(x):
        m.setLowerBound(int(v), float(region.lower[k]))
        m.setUpperBound(int(v), float(region.upper[k]))
    for a, b in zip(conj.A, conj.b, strict=True):  # the unsafe set: A y <= b
        nz = np.flatnonzero(a)
        m.addInequality([int(y[j]) for j in nz], [float(a[j]) for j in nz], float(b))
    result, _, _ = m.solve(options=Marabou.createOptions(verbosity=0, timeoutInSeconds=timeout), verbose=False)
    return {"sat": "violated", "unsat": "holds"}.get(result, "unknown")


@pytest.mark.slow
@needs_acas
@pytest.mark.parametrize("net,i,decided", [("2_1", 2, True), ("1_7", 4, True), ("1_7", 3, True),
                                            ("5_3", 2, False)])
def test_a_second_oracle_agrees(net, i, decided):
    """Marabou agrees with ours (tried: it finds these violations, the first three in seconds, N_5,3 prop 2 in
    about 80 s, so that one may run out of its budget; it times out on holding properties like N_1,1 prop 3 at
    60 s, so only violated instances are listed)."""
    theirs = marabou_verdict(net, i, 120)
    ours = check_property(network(net), prop(i), 60.0)["verdict"]
    assert ours == "violated"
    assert theirs == "violated" if decided else theirs in ("violated", "unknown")

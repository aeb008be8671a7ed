"""ONNX networks as the engine's layer graph: every operator read exactly (against onnxruntime and torch),
sound Sigmoid/Tanh relaxations (exact answers and dense sampling), verdicts on ONNX CNNs with pooling and
residuals against the exact mixed-integer program, and refusals that name the node."""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper
from test_verification import milp_margin, random_cnn, tiny_conv
from torch import nn
from typer.testing import CliRunner

from trustcase.certification import propagation as P
from trustcase.certification.local_robustness import decide
from trustcase.certification.onnx_graph import OnnxGraphError, agrees, read_onnx

ACTIVATIONS = {"relu": torch.relu, "sigmoid": torch.sigmoid, "tanh": torch.tanh}


class Kitchen(nn.Module):
    """Every operator the reader rewrites, as torch.onnx writes them."""

    def __init__(self, act: str, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.act = ACTIVATIONS[act]
        self.conv1 = nn.Conv2d(2, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1, groups=2)
        self.bn2 = nn.BatchNorm2d(4)
        self.pool = nn.MaxPool2d(2)
        self.avg = nn.AvgPool2d(2, padding=1, count_include_pad=False)
        self.fc = nn.Linear(36, 3)
        with torch.no_grad():
            for bn in (self.bn, self.bn2):
                bn.running_mean.uniform_(-0.5, 0.5)
                bn.running_var.uniform_(0.5, 2.0)
                bn.weight.uniform_(0.5, 1.5)
                bn.bias.uniform_(-0.3, 0.3)

    def forward(self, x):
        x = (x - 0.5) / 0.25  # input normalisation: Sub, Div
        h = self.act(self.bn(self.conv1(F.pad(x, (1, 0, 1, 0)))))  # Pad, Conv, BatchNormalization
        h = self.bn2(h + self.act(self.conv2(h)))  # residual Add, then a BatchNorm nothing folds into
        h = self.avg(self.pool(h))  # MaxPool 10 -> 5, AveragePool with padding not counted 5 -> 3
        h = h.permute(0, 2, 3, 1)  # Transpose
        h = h.reshape(h.size(0), -1)  # Shape, Gather, Unsqueeze, Concat, Reshape
        return self.fc(h) * 2.0  # Gemm, Mul


def export(model: nn.Module, shape, path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), (torch.zeros(1, *shape),), str(path), dynamo=False, opset_version=13,
                          do_constant_folding=False)


@pytest.mark.parametrize("act", sorted(ACTIVATIONS))
def test_every_operator_is_read_exactly(tmp_path, act):
    model = Kitchen(act).eval()
    export(model, (2, 9, 9), tmp_path / "k.onnx")
    ops = {n.op_type for n in onnx.load(str(tmp_path / "k.onnx")).graph.node}
    assert {"Pad", "Conv", "BatchNormalization", "Add", "MaxPool", "AveragePool", "Transpose", "Reshape",
            "Gemm", "Sub", "Div", "Mul", act.capitalize()} <= ops
    net = read_onnx(tmp_path / "k.onnx")  # checked against onnxruntime already
    x = torch.rand(16, 2, 9, 9, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    with torch.no_grad():
        want = model.double()(x)
    got = net.graph.forward(x)
    assert torch.allclose(got, want, rtol=1e-9, atol=1e-9 * float(want.abs().max()))  # float64 both
    ort = net.run(x.float().numpy())
    assert np.abs(ort - want.numpy()).max() <= 1e-4 * max(1.0, float(want.abs().max()))


@pytest.mark.parametrize("act", sorted(ACTIVATIONS))
def test_bounds_of_an_onnx_network_contain_every_sampled_output(tmp_path, act):
    export(Kitchen(act, seed=3), (2, 9, 9), tmp_path / "k.onnx")
    g = read_onnx(tmp_path / "k.onnx").graph
    gen = torch.Generator().manual_seed(2)
    x = torch.rand(1, 2, 9, 9, generator=gen, dtype=torch.float64)
    eps = 0.02
    C = torch.tensor([[1.0, -1.0, 0.0], [0.0, 1.0, -1.0]], dtype=torch.float64)
    low = {m: P.lower_bound(g, x - eps, x + eps, C, m, iterations=5).lower[0] for m in P.METHODS}
    probe = x + eps * (2 * torch.rand(4000, 2, 9, 9, generator=gen, dtype=torch.float64) - 1)
    probe[:1000] = torch.where(torch.rand(1000, 2, 9, 9, generator=gen) < 0.5, x - eps, x + eps)  # corners
    seen = (g.forward(probe) @ C.T).min(0).values
    for m in P.METHODS:
        assert (seen >= low[m] - 1e-9).all(), (m, seen, low[m])
    assert (low["crown"] > -np.inf).all()
    values = g.forward(probe, keep=True)  # every node's interval holds its values
    crown = P.intermediate(g, x - eps, x + eps)
    tight = P.smooth_intermediate(g, crown, 5)  # alpha-CROWN on the S-shaped activations' slopes
    for v, (lo, hi), (lo2, hi2) in zip(values, crown, tight, strict=True):
        assert (v >= lo - 1e-9).all() and (v <= hi + 1e-9).all()
        assert (v >= lo2 - 1e-9).all() and (v <= hi2 + 1e-9).all()
        assert (lo2 >= lo).all() and (hi2 <= hi).all()
    assert low["alpha-crown"].min() >= low["crown"].min() - 1e-9


@pytest.mark.parametrize("kind", ["sigmoid", "tanh"])
def test_smooth_relaxation_is_sound_on_a_dense_grid_and_exact_where_it_touches(kind):
    f = ACTIVATIONS[kind]
    gen = torch.Generator().manual_seed(0)
    lo = 6 * torch.randn(1000, generator=gen, dtype=torch.float64)
    hi = lo + 8 * torch.rand(1000, generator=gen, dtype=torch.float64) ** 2
    lo[:4], hi[:4] = torch.tensor([0.0, -3.0, -1e-3, 2.0], dtype=torch.float64), torch.tensor([3.0, 0.0, 1e-3, 2.0])
    a_l, b_l, a_u, b_u = P.smooth_relax(kind, lo, hi)
    z = lo + (hi - lo) * torch.linspace(0, 1, 2001, dtype=torch.float64)[:, None]
    assert (a_l * z + b_l <= f(z)).all() and (a_u * z + b_u >= f(z)).all()
    # exact answers: on the concave side (lo >= 0) the lower line is the chord, through both ends; on the convex
    # side (hi <= 0) the upper line is; a tangent touches
    concave, convex = lo >= 0, hi <= 0
    for mask, a, b in ((concave, a_l, b_l), (convex, a_u, b_u)):
        ends = torch.stack([lo[mask], hi[mask]])
        assert torch.allclose(a[mask] * ends + b[mask], f(ends), atol=1e-9)
    gap_up = (a_u * z + b_u - f(z)).min(0).values
    gap_low = (f(z) - a_l * z - b_l).min(0).values
    assert (gap_up < 1e-6).all() and (gap_low < 1e-6).all()  # each line touches the curve (grid resolution)


@pytest.mark.parametrize("kind", ["sigmoid", "tanh"])
def test_one_smooth_neuron_bounds_are_the_exact_extremes_on_its_monotone_sides(kind):
    """y = f(w x + b) over a box: f is increasing, so its range is [f(z_lo), f(z_hi)]; CROWN's lower bound is
    exact where the lower line is the chord (z >= 0), its upper bound where the upper line is (z <= 0)."""
    from trustcase.certification.graph import Dense, Graph, Node

    W = torch.tensor([[0.5, -1.0]], dtype=torch.float64)
    for b, side in ((2.0, "concave"), (-2.0, "convex")):
        g = Graph([Node("input", "x", (2,)), Node("affine", "z", (1,), [0], [Dense(W)],
                                                  torch.tensor([b], dtype=torch.float64)),
                   Node(kind, "y", (1,), [1])])
        lo, hi = torch.tensor([[-0.5, -0.5]], dtype=torch.float64), torch.tensor([[0.5, 0.5]], dtype=torch.float64)
        z_lo, z_hi = b - 0.75, b + 0.75
        f = ACTIVATIONS[kind]
        low = float(P.lower_bound(g, lo, hi, torch.ones(1, 1, dtype=torch.float64), "crown").lower[0, 0])
        up = -float(P.lower_bound(g, lo, hi, -torch.ones(1, 1, dtype=torch.float64), "crown").lower[0, 0])
        exact_lo, exact_hi = (float(f(torch.tensor(z, dtype=torch.float64))) for z in (z_lo, z_hi))
        assert low <= exact_lo + 1e-12 and up >= exact_hi - 1e-12
        if side == "concave":
            assert low == pytest.approx(exact_lo, abs=1e-9)
        else:
            assert up == pytest.approx(exact_hi, abs=1e-9)


@pytest.mark.parametrize("make,shape", [(random_cnn, (1, 8, 8)), (tiny_conv, (1, 6, 6))])
def test_onnx_cnn_verdicts_agree_with_the_exact_mixed_integer_program(tmp_path, make, shape):
    """Pooling (max and average), BatchNorm, residual additions: verified implies the MILP proves it; falsified
    implies a counterexample onnxruntime confirms on the original file."""
    seen = set()
    radii = (0.02, 0.5, 2.0) if make is random_cnn else (0.02, 0.1, 0.5)  # the MILP of random_cnn at 0.1: 30 s
    for seed in range(1 if make is random_cnn else 2):
        path = tmp_path / f"net{seed}.onnx"
        export(make(seed), shape, path)
        net = read_onnx(path)
        session = net.session()
        rng = np.random.default_rng(seed)
        for _ in range(2):
            x = torch.from_numpy(rng.normal(size=(1, *shape)))
            c = int(net.run(x.numpy(), session).argmax())
            n_out = net.output_size
            for eps in radii:
                out = decide(net.graph, net.forward, x, x - eps, x + eps, c, timeout=2.0)
                seen.add(out["verdict"])
                if out["verdict"] == "verified":
                    exact = min(milp_margin(net.graph, (x - eps)[0].numpy(), (x + eps)[0].numpy(), c, j)
                                for j in range(n_out) if j != c)
                    assert exact > 0, (seed, eps, exact)
                elif out["verdict"] == "falsified":
                    cx = np.asarray(out["counterexample"], np.float32)
                    assert (cx >= (x - eps).numpy() - 1e-6).all() and (cx <= (x + eps).numpy() + 1e-6).all()
                    y = net.run(cx[None], session)[0]
                    assert any(y[j] >= y[c] for j in range(n_out) if j != c)
    assert {"verified", "falsified"} <= seen


def _model(nodes, inits=(), shape=(1, 4)) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], list(inits))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def test_an_unsupported_operator_is_named_with_its_node_and_position(tmp_path):
    w = numpy_helper.from_array(np.eye(4, dtype=np.float32), "w")
    m = _model([helper.make_node("MatMul", ["x", "w"], ["h"], name="dense"),
                helper.make_node("LeakyRelu", ["h"], ["y"], name="leaky")], [w])
    onnx.save(m, tmp_path / "leaky.onnx")
    with pytest.raises(OnnxGraphError, match=r"node 1 'leaky' \(LeakyRelu\): operator LeakyRelu is not supported"):
        read_onnx(tmp_path / "leaky.onnx")
    # an attribute the rewrite does not honour: max pooling with padding
    m = _model([helper.make_node("MaxPool", ["x"], ["y"], name="mp", kernel_shape=[2, 2], pads=[1, 1, 1, 1])],
               shape=(1, 1, 4, 4))
    onnx.save(m, tmp_path / "mp.onnx")
    with pytest.raises(OnnxGraphError, match=r"node 0 'mp' \(MaxPool\): max pooling with padding"):
        read_onnx(tmp_path / "mp.onnx")
    # the command: one line, exit 2, no traceback
    prop = tmp_path / "p.vnnlib"
    prop.write_text("".join(f"(declare-const X_{i} Real)\n(assert (>= X_{i} 0))\n(assert (<= X_{i} 1))\n"
                            for i in range(4)) + "(declare-const Y_0 Real)\n(assert (<= Y_0 0))\n")
    from trustcase.cli import app

    res = CliRunner().invoke(app, ["check-property", str(tmp_path / "leaky.onnx"), str(prop)])
    assert res.exit_code == 2 and "LeakyRelu" in res.output and "Traceback" not in res.output, res.output


def test_a_graph_that_deviates_from_onnxruntime_is_refused_with_the_deviation(tmp_path):
    export(tiny_conv(0), (1, 6, 6), tmp_path / "t.onnx")
    net = read_onnx(tmp_path / "t.onnx", check=False)
    assert agrees(net) < 1e-5
    last = net.graph.nodes[-1]
    last.bias = last.bias + 0.5  # a misread bias
    with pytest.raises(OnnxGraphError, match=r"deviates from onnxruntime by 0\.5"):
        agrees(net)

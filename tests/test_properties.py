"""Formal property checks: counterexamples are real, properties built to hold are proved, and "holds" is never
returned for a property with a known counterexample. ACAS Xu tests skip when the reference data is absent."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from trustcase.certification import graph as G
from trustcase.certification import propagation as P
from trustcase.certification.nnet import NetworkFormatError, load_network, read_nnet, read_onnx
from trustcase.certification.properties import acasxu_root, check_property
from trustcase.certification.vnnlib import VnnlibError, parse_vnnlib, read_vnnlib

ROOT = Path(__file__).resolve().parent.parent
ACAS = acasxu_root()
needs_acas = pytest.mark.skipif(not (ACAS / "instances.csv").is_file(),
                                reason=f"ACAS Xu data not found at {ACAS} (set TRUSTCASE_ACASXU)")


def box_property(lo, hi, rows: str) -> str:
    n = len(lo)
    text = "".join(f"(declare-const X_{i} Real)\n" for i in range(n))
    text += "".join(f"(declare-const Y_{j} Real)\n" for j in range(2))
    text += "".join(f"(assert (>= X_{i} {lo[i]!r}))\n(assert (<= X_{i} {hi[i]!r}))\n" for i in range(n))
    return text + rows


def abs_sum() -> nn.Sequential:
    """y0 = |x0| + |x1| (as relu(x) + relu(-x)), y1 = 0: max of y0 on [-1, 1]^2 is exactly 2, at the corners."""
    first = nn.Linear(2, 4, bias=False)
    first.weight.data = torch.tensor([[1.0, 0], [-1, 0], [0, 1], [0, -1]])
    second = nn.Linear(4, 2, bias=False)
    second.weight.data = torch.tensor([[1.0, 1, 1, 1], [0, 0, 0, 0]])
    return nn.Sequential(first, nn.ReLU(), second).eval()


def test_a_property_built_to_hold_is_proved_and_its_edge_case_is_violated():
    net = abs_sum()
    holds = parse_vnnlib(box_property([-1, -1], [1, 1], "(assert (>= Y_0 2.001))"), "holds")
    r = check_property(net, holds, timeout=20)
    assert r["verdict"] == "holds" and r["counterexample"] is None
    violated = parse_vnnlib(box_property([-1, -1], [1, 1], "(assert (>= Y_0 1.999))"), "violated")
    r = check_property(net, violated, timeout=20)
    assert r["verdict"] == "violated"
    x = np.array(r["counterexample"]["x"], np.float32)
    assert np.all(np.abs(x) <= 1) and np.abs(x).sum() >= 1.999


def random_mlp(seed: int, sizes=(4, 16, 16, 2)) -> nn.Sequential:
    torch.manual_seed(seed)
    layers = []
    for i in range(len(sizes) - 1):
        layers += [nn.Linear(sizes[i], sizes[i + 1]), nn.ReLU()]
    return nn.Sequential(*layers[:-1]).eval()


@pytest.mark.parametrize("seed", range(4))
def test_holds_is_never_returned_with_a_known_counterexample(seed):
    net = random_mlp(seed)
    rng = np.random.default_rng(seed)
    x_star = rng.uniform(-1, 1, 4).astype(np.float32)
    with torch.no_grad():
        y = net(torch.from_numpy(x_star)[None])[0].double().numpy()
    lo, hi = x_star - 0.3, x_star + 0.3
    # unsafe: Y_0 - Y_1 <= the value at x_star; x_star is a counterexample by construction
    limit = float(y[0] - y[1]) + 1e-6
    prop = parse_vnnlib(box_property(lo.tolist(), hi.tolist(), f"(assert (<= (- Y_0 Y_1) {limit!r}))"), "known")
    r = check_property(net, prop, timeout=5, seed=seed)
    assert r["verdict"] in ("violated", "unknown")
    if r["verdict"] == "violated":  # real: inside the box and the output condition holds by a fresh forward pass
        x = np.array(r["counterexample"]["x"], np.float32)
        assert np.all(x >= lo - 1e-6) and np.all(x <= hi + 1e-6)
        with torch.no_grad():
            out = net(torch.from_numpy(x)[None])[0].double().numpy()
        assert out[0] - out[1] <= y[0] - y[1] + 1e-6


@pytest.mark.parametrize("seed", range(3))
def test_bounds_are_sound_on_random_networks(seed):
    net = random_mlp(seed, (3, 12, 12, 12, 4))
    graph = G.from_model(net, (3,))
    g = torch.Generator().manual_seed(seed)
    centre = torch.rand(5, 3, generator=g, dtype=torch.float64) * 2 - 1
    lo, hi = centre - 0.2, centre + 0.2
    C = torch.tensor([[1.0, -1, 0, 0], [0, 0, 1, 0], [-1, 0, 0, 1]], dtype=torch.float64)
    bound = P.lower_bound(graph, lo, hi, C, "crown", alive=True).lower
    ibp_lo, ibp_hi = P.intermediate(graph, lo, hi, "ibp")[-1]
    x = lo[:, None] + (hi - lo)[:, None] * torch.rand(5, 4000, 3, generator=g, dtype=torch.float64)
    with torch.no_grad():
        y = net.double()(x)
    values = y @ C.T  # (5, 4000, 3)
    assert torch.all(bound[:, None, :] <= values + 1e-9)
    assert torch.all((ibp_lo[:, None] <= y + 1e-9) & (y <= ibp_hi[:, None] + 1e-9))
    # CROWN is at least as tight as intervals on a single output
    single = P.lower_bound(graph, lo, hi, torch.eye(4, dtype=torch.float64), "crown").lower
    assert torch.all(single >= ibp_lo - 1e-9)


def test_vnnlib_reader_names_unsupported_constructs():
    base = "(declare-const X_0 Real)\n(declare-const Y_0 Real)\n(assert (>= X_0 0))\n(assert (<= X_0 1))\n"
    with pytest.raises(VnnlibError, match="not"):
        parse_vnnlib(base + "(assert (not (<= Y_0 1)))", "p")
    with pytest.raises(VnnlibError, match=r"=>"):
        parse_vnnlib(base + "(assert (=> (<= Y_0 1) (<= Y_0 2)))", "p")
    with pytest.raises(VnnlibError, match="only linear"):
        parse_vnnlib(base + "(assert (<= (* Y_0 Y_0) 1))", "p")
    with pytest.raises(VnnlibError, match="mixing"):
        parse_vnnlib(base + "(assert (<= X_0 Y_0))", "p")
    with pytest.raises(VnnlibError, match="X_0 has no lower"):
        parse_vnnlib("(declare-const X_0 Real)\n(declare-const Y_0 Real)\n(assert (<= X_0 1))", "p")
    with pytest.raises(VnnlibError, match=r"p:5: .*unknown symbol 'Z'"):
        parse_vnnlib(base + "(assert (<= Z 1))", "p")
    p = parse_vnnlib(base + "(assert (or (and (<= Y_0 1)) (and (>= (+ Y_0 1) 3) (< Y_0 5))))", "p")
    assert len(p.regions) == 1 and len(p.regions[0].outputs) == 2
    c = p.regions[0].outputs[1]
    assert c.satisfied(np.array([[2.0], [5.0], [1.0]])).tolist() == [True, False, False]


@needs_acas
def test_acasxu_readers_agree_with_onnxruntime():
    import onnxruntime as ort

    nnet = read_nnet(ACAS / "nnet" / "ACASXU_run2a_1_1_batch_2000.nnet")
    onnx_path = ACAS / "onnx" / "ACASXU_run2a_1_1_batch_2000.onnx"
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).uniform(-0.5, 0.5, (20, 5)).astype(np.float32)
    ref = np.concatenate([session.run(None, {"input": xi.reshape(1, 1, 1, 5)})[0] for xi in x])
    with torch.no_grad():
        for module in (nnet.module(), read_onnx(onnx_path)):
            assert np.abs(module(torch.from_numpy(x)).numpy() - ref).max() < 1e-5
    assert nnet.input_range[0] == 60261.0 and nnet.output_range == pytest.approx(373.94992)
    with pytest.raises(NetworkFormatError, match="not found"):
        load_network(ACAS / "nnet" / "missing.nnet")


@needs_acas
def test_acasxu_properties_all_parse():
    for i in range(1, 11):
        p = read_vnnlib(ACAS / "vnnlib" / f"prop_{i}.vnnlib")
        assert p.n_inputs == 5 and p.n_outputs == 5
        assert len(p.regions) == (2 if i == 6 else 1)


@needs_acas
def test_acasxu_known_verdicts_and_an_independent_recheck():
    import onnxruntime as ort

    onnx_path = ACAS / "onnx" / "ACASXU_run2a_2_1_batch_2000.onnx"
    prop = read_vnnlib(ACAS / "vnnlib" / "prop_2.vnnlib")
    r = check_property(load_network(onnx_path), prop, timeout=30)
    assert r["verdict"] == "violated"  # N_2,1 violates property 2 (a known result)
    x = np.array(r["counterexample"]["x"], np.float32)
    y = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"]).run(
        None, {"input": x.reshape(1, 1, 1, 5)})[0]
    assert prop.violated_by(x[None].astype(np.float64), y.astype(np.float64))[0]
    r = check_property(load_network(ACAS / "nnet" / "ACASXU_run2a_1_1_batch_2000.nnet"),
                       read_vnnlib(ACAS / "vnnlib" / "prop_1.vnnlib"), timeout=60)
    assert r["verdict"] == "holds"


@needs_acas
def test_cli_check_property_prints_one_json_line_and_rejects_bad_input(tmp_path):
    import json

    from trustcase.cli import app

    runner = CliRunner()
    res = runner.invoke(app, ["check-property", str(ACAS / "nnet" / "ACASXU_run2a_2_1_batch_2000.nnet"),
                              str(ACAS / "vnnlib" / "prop_2.vnnlib"), "--timeout", "20"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["verdict"] == "violated" and len(out["counterexample"]["x"]) == 5
    bad = tmp_path / "bad.vnnlib"
    bad.write_text("(declare-const X_0 Real)\n(declare-const Y_0 Real)\n(assert (not (<= Y_0 1)))\n")
    res = runner.invoke(app, ["check-property", str(ACAS / "nnet" / "ACASXU_run2a_2_1_batch_2000.nnet"), str(bad)])
    assert res.exit_code == 2
    res = runner.invoke(app, ["check-property", str(tmp_path / "none.nnet"), str(bad)])
    assert res.exit_code == 2


@needs_acas
def test_formal_properties_check_on_the_acasxu_use_case(tmp_path):
    """The use case's own model (negated scores) through the check: prop_1 holds, prop_2 judged the same."""
    from conftest import acas_use_case

    from trustcase.checks import CheckError, Context, build
    from trustcase.data.streaming import DataSource
    from trustcase.models.loading import load_classifier
    from trustcase.schemas import CheckSpec, Requirement
    from trustcase.verdicts import judge

    uc = acas_use_case(tmp_path)
    check = build(CheckSpec(check="formal_properties", params={
        "properties": ["${TRUSTCASE_ACASXU}/vnnlib/prop_1.vnnlib", "${TRUSTCASE_ACASXU}/vnnlib/prop_4.vnnlib"],
        "timeout": 60, "outputs": "negated_scores"}))
    assert len(check.shards()) == 2
    ctx = Context(use_case=uc, model=load_classifier(uc.model), data=DataSource(uc.data, 0), seed=0,
                  workdir=tmp_path / "checks" / "formal_properties")
    out = check.shards()[0](ctx)
    holds = next(m for m in out.measurements if m.metric == "property_holds.prop_1")
    assert holds.value == 1.0 and holds.details["verdict"] == "holds"
    req = Requirement(id="P1", text="p1", metric="property_holds.prop_1", comparator=">=", threshold=1)
    assert judge([req], [out])[0].verdict.value == "PASS"
    # the advisory is the arg-max of the exported model's outputs (negated scores)
    batch = next(ctx.batches("test"))
    assert (ctx.model.logits(batch.images).argmax(1) == batch.labels).all()
    with pytest.raises(CheckError, match="property file not found"):
        build(CheckSpec(check="formal_properties", params={"properties": [str(tmp_path / "none.vnnlib")]}))

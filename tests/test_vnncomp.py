"""The competition interface: vnncomp/run_instance.sh writes the result file the VNN-COMP harness reads (a
counterexample onnxruntime confirms), and every verdict on the shared VNN-COMP 2021 benchmarks agrees with the
published results."""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, SHARED
from torch import nn

from trustcase.certification.competition import load, read_property, result_text, solve

VNNCOMP = SHARED / "vnncomp2021"
sys.path.insert(0, str(ROOT / "bench"))


def tiny_onnx(path: Path) -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (torch.zeros(1, 1, 2, 2),), str(path), dynamo=False, opset_version=13)


def robustness(path: Path, x: np.ndarray, eps: float, label: int) -> None:
    text = "".join(f"(declare-const X_{i} Real)\n" for i in range(4)) + "(declare-const Y_0 Real)\n" \
        "(declare-const Y_1 Real)\n"
    for i, v in enumerate(x):
        text += f"(assert (>= X_{i} {float(v - eps)!r}))\n(assert (<= X_{i} {float(v + eps)!r}))\n"
    path.write_text(text + f"(assert (or (and (>= Y_{1 - label} Y_{label}))))\n")


def test_run_instance_writes_sat_with_a_counterexample_onnxruntime_confirms(tmp_path):
    import onnxruntime as ort

    tiny_onnx(tmp_path / "net.onnx")
    x = np.array([0.3, -0.2, 0.5, 0.1])
    sess = ort.InferenceSession(str(tmp_path / "net.onnx"), providers=["CPUExecutionProvider"])
    label = int(sess.run(None, {sess.get_inputs()[0].name: x.astype(np.float32).reshape(1, 1, 2, 2)})[0].argmax())
    robustness(tmp_path / "big.vnnlib", x, 5.0, label)  # wide enough to change the class
    script = ROOT / "vnncomp"
    assert subprocess.run([script / "prepare_instance.sh", "v1", "test", tmp_path / "net.onnx",
                           tmp_path / "big.vnnlib"]).returncode == 0
    out = tmp_path / "result.txt"
    subprocess.run([script / "run_instance.sh", "v1", "test", tmp_path / "net.onnx", tmp_path / "big.vnnlib", out,
                    "60"], check=True, capture_output=True)
    lines = out.read_text().split("\n")
    assert lines[0] == "sat"
    values = {}
    for line in lines[1:]:
        tok = line.strip("() ").split()
        if len(tok) == 2:
            values[tok[0]] = float(tok[1])
    cx = np.array([values[f"X_{i}"] for i in range(4)], np.float32)
    assert (np.abs(cx - x) <= 5.0 + 1e-6).all()
    y = sess.run(None, {sess.get_inputs()[0].name: cx.reshape(1, 1, 2, 2)})[0][0]
    assert y[1 - label] >= y[label]
    assert np.allclose([values["Y_0"], values["Y_1"]], y, atol=1e-4)  # the competition's tolerance


@pytest.mark.slow
def test_run_instance_writes_error_and_the_reason_for_a_file_it_cannot_read(tmp_path):
    """The harness still gets a result file: "error" and the one-line reason."""
    robustness(tmp_path / "big.vnnlib", np.zeros(4), 1.0, 0)
    out = tmp_path / "result.txt"
    subprocess.run([ROOT / "vnncomp" / "run_instance.sh", "v1", "test", tmp_path / "none.onnx",
                    tmp_path / "big.vnnlib", out, "60"], check=True, capture_output=True)
    first, reason = out.read_text().split("\n")[:2]
    assert first == "error" and "none.onnx" in reason


def test_result_files_of_each_verdict(tmp_path):
    tiny_onnx(tmp_path / "net.onnx")
    net = load(tmp_path / "net.onnx")
    x = np.array([0.3, -0.2, 0.5, 0.1])
    label = int(net.reference(x[None]).argmax())
    robustness(tmp_path / "small.vnnlib", x, 1e-4, label)
    r = solve(net, read_property(tmp_path / "small.vnnlib", net), timeout=10)
    assert r["verdict"] == "holds" and result_text(r, 10) == "unsat\n"
    unknown = {**r, "verdict": "unknown", "seconds": 1.0}
    assert result_text(unknown, 10) == "unknown\n" and result_text({**unknown, "seconds": 9.9}, 10) == "timeout\n"


def published() -> dict:
    from bench_vnncomp import published as read

    return read()


def _decide(bench: str, network: str, prop: str, budget: float) -> str:
    net = load(VNNCOMP / bench / network)
    return solve(net, read_property(VNNCOMP / bench / prop, net), timeout=budget)["verdict"]


@pytest.mark.skipif(not VNNCOMP.is_dir(), reason="no VNN-COMP 2021 data in ../shared")
@pytest.mark.parametrize("bench,network,prop", [
    ("verivital", "Convnet_avgpool.onnx", "specs/avgpool_specs/prop_7_0.02.vnnlib"),
    ("verivital", "Convnet_maxpool.onnx", "specs/maxpool_specs/prop_12_0.004.vnnlib"),
    ("oval21", "nets/cifar_base_kw.onnx", "vnnlib/cifar_base_kw-img1697-eps0.0014379084967320263.vnnlib"),
    ("mnistfc", "mnist-net_256x2.onnx", "prop_11_0.03.vnnlib"),
])
def test_shared_benchmark_instances_get_their_published_verdict(bench, network, prop):
    want = published()[(bench, Path(network).name, Path(prop).name)]
    assert _decide(bench, network, prop, 30.0) == want


@pytest.mark.slow
@pytest.mark.skipif(not VNNCOMP.is_dir(), reason="no VNN-COMP 2021 data in ../shared")
def test_every_verdict_of_the_quick_sample_agrees_with_the_published_results():
    """The bench's --quick sample (4 instances per benchmark, 30 s each): no verdict contradicts the verifiers
    that agreed; each holds is one of theirs."""
    from bench_vnncomp import BENCHMARKS, QUICK_BUDGET, instances

    truth = published()
    decided = 0
    for bench in BENCHMARKS:
        for net_path, prop_path, limit in instances(bench, quick=True):
            net = load(net_path)
            verdict = solve(net, read_property(prop_path, net), timeout=min(limit, QUICK_BUDGET))["verdict"]
            want = truth.get((bench, net_path.name, prop_path.name))
            if verdict == "holds":
                assert want == "holds", (bench, prop_path.name)
            if verdict == "violated":
                assert want in ("violated", None), (bench, prop_path.name)
            decided += verdict != "unknown"
    assert decided >= 4


def test_conjunctions_of_several_rows_on_an_image_network(tmp_path):
    """'Y_j >= Y_c and Y_j <= 1e6' for some other class j (conjunctions of two rows) on a CNN of 36 inputs: held
    near a point the network classifies with room to spare, violated on a box wide enough, with a counterexample
    onnxruntime confirms."""
    from test_onnx_graph import export
    from test_verification import tiny_conv

    export(tiny_conv(1), (1, 6, 6), tmp_path / "cnn.onnx")
    net = load(tmp_path / "cnn.onnx")
    rng = np.random.default_rng(0)
    x = rng.normal(size=36)
    y = net.reference(x[None])[0]
    c = int(y.argmax())
    others = [j for j in range(3) if j != c]
    head = "".join(f"(declare-const X_{i} Real)\n" for i in range(36)) + \
        "".join(f"(declare-const Y_{j} Real)\n" for j in range(3))
    for eps, want in ((1e-4, "holds"), (3.0, "violated")):
        body = "".join(f"(assert (>= X_{i} {float(v - eps)!r}))\n(assert (<= X_{i} {float(v + eps)!r}))\n"
                       for i, v in enumerate(x))
        rows = " ".join(f"(and (>= Y_{j} Y_{c}) (<= Y_{j} 1e6))" for j in others)
        path = tmp_path / f"p{eps}.vnnlib"
        path.write_text(head + body + f"(assert (or {rows}))\n")
        r = solve(net, read_property(path, net), timeout=20)
        if want:
            assert r["verdict"] == want, r
        if r["verdict"] == "violated":
            cx = np.asarray(r["counterexample"]["x"], np.float32)
            out = net.reference(cx[None])[0]
            assert np.abs(cx - x).max() <= eps + 1e-6
            assert any(out[j] >= out[c] for j in others)

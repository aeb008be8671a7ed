"""VNN-LIB as the competitions write it: disjunctions of conjunctions, several input boxes, .vnnlib.gz, inputs in
row-major order of the network's input shape, and located refusals."""

from __future__ import annotations

import gzip

import numpy as np
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from trustcase.certification.vnnlib import VnnlibError, parse_vnnlib, read_vnnlib
from trustcase.cli import app


def declare(n_x: int, n_y: int) -> str:
    return "".join(f"(declare-const X_{i} Real)\n" for i in range(n_x)) + \
        "".join(f"(declare-const Y_{j} Real)\n" for j in range(n_y))


def box(lo, hi) -> str:
    return "".join(f"(assert (>= X_{i} {a}))\n(assert (<= X_{i} {b}))\n" for i, (a, b) in enumerate(zip(lo, hi)))


def test_a_disjunction_of_conjunctions_and_several_input_boxes(tmp_path):
    text = declare(2, 3) + """
(assert (or
    (and (>= X_0 0) (<= X_0 1) (>= X_1 0) (<= X_1 1))
    (and (>= X_0 2) (<= X_0 3) (>= X_1 -1) (<= X_1 0))
))
(assert (or
    (and (>= Y_0 Y_1) (>= Y_0 Y_2))
    (and (<= Y_2 -1.5))
))
"""
    prop = parse_vnnlib(text, "p")
    assert len(prop.regions) == 2
    for r in prop.regions:
        assert [len(c.b) for c in r.outputs] == [2, 1]
    assert np.allclose(prop.regions[1].lower, [2, -1]) and np.allclose(prop.regions[1].upper, [3, 0])
    x = np.array([[0.5, 0.5], [2.5, -0.5], [1.5, 0.5]])
    y = np.array([[3.0, 1.0, 2.0], [0.0, 1.0, -2.0], [3.0, 1.0, 2.0]])
    assert prop.violated_by(x, y).tolist() == [True, True, False]  # the third x lies in no box
    # the same file gzipped is read directly
    (tmp_path / "p.vnnlib.gz").write_bytes(gzip.compress(text.encode()))
    (tmp_path / "p.vnnlib").write_text(text)
    a, b = read_vnnlib(tmp_path / "p.vnnlib.gz"), read_vnnlib(tmp_path / "p.vnnlib")
    assert a.violated_by(x, y).tolist() == b.violated_by(x, y).tolist()
    assert [r.lower.tolist() for r in a.regions] == [r.lower.tolist() for r in b.regions]


def test_a_construct_outside_the_grammar_is_named_with_its_line(tmp_path):
    text = declare(1, 1) + box([0], [1]) + "(assert (=> (<= Y_0 1) (<= Y_0 2)))\n"
    line = text.count("\n")  # the last line
    with pytest.raises(VnnlibError, match=rf"p:{line}: unsupported construct \(=> \.\.\.\)"):
        parse_vnnlib(text, "p")
    (tmp_path / "bad.vnnlib.gz").write_bytes(b"not gzip")
    with pytest.raises(VnnlibError, match="cannot read"):
        read_vnnlib(tmp_path / "bad.vnnlib.gz")


def test_a_variable_count_that_does_not_match_the_network_says_both_numbers(tmp_path):
    path = tmp_path / "p.vnnlib"
    path.write_text(declare(4, 2) + box([0] * 4, [1] * 4) + "(assert (<= Y_0 Y_1))\n")
    with pytest.raises(VnnlibError, match=r"declares 4 inputs \(X_i\), the network has 784"):
        read_vnnlib(path, n_inputs=784, n_outputs=2)
    with pytest.raises(VnnlibError, match=r"declares 2 outputs \(Y_j\), the network has 10"):
        read_vnnlib(path, n_inputs=4, n_outputs=10)


def pixel_picker(h: int, w: int, row: int, col: int) -> nn.Module:
    """A CNN whose one output is the pixel (row, col) of a 1 x h x w image."""
    conv = nn.Conv2d(1, 1, 1, bias=False)
    fc = nn.Linear(h * w, 1, bias=False)
    with torch.no_grad():
        conv.weight.fill_(1.0)
        fc.weight.zero_()
        fc.weight[0, row * w + col] = 1.0
    return nn.Sequential(conv, nn.ReLU(), nn.Flatten(), fc).eval()


def test_a_torchscript_cnn_takes_the_property_inputs_in_row_major_order(tmp_path):
    """X_k is pixel (k // W, k % W): only X_1 = pixel (0, 1) is at least 1, so 'Y_0 <= 0.5' is unreachable;
    read column-major, X_3 (0) would be the pixel and the property violated. Before: exit 1, a flat batch fed to
    a model expecting (N, C, H, W)."""
    model = torch.jit.trace(pixel_picker(3, 3, 0, 1), torch.zeros(1, 1, 3, 3))
    model.save(str(tmp_path / "cnn.pt"))
    lo, hi = [0.0] * 9, [0.0] * 9
    lo[1], hi[1] = 1.0, 2.0
    prop = tmp_path / "p.vnnlib"
    prop.write_text(declare(9, 1) + box(lo, hi) + "(assert (<= Y_0 0.5))\n")
    runner = CliRunner()
    res = runner.invoke(app, ["check-property", str(tmp_path / "cnn.pt"), str(prop), "--timeout", "10"])
    assert res.exit_code == 0, res.output
    assert '"verdict": "holds"' in res.output
    # a property of another size: both numbers, exit 2, one line
    other = tmp_path / "p16.vnnlib"
    other.write_text(declare(16, 1) + box([0.0] * 16, [1.0] * 16) + "(assert (<= Y_0 0.5))\n")
    res = runner.invoke(app, ["check-property", str(tmp_path / "cnn.pt"), str(other), "--input-shape", "1,3,3"])
    assert res.exit_code == 2 and "declares 16 inputs (X_i), the network has 9" in res.output, res.output
    assert len(res.output.strip().splitlines()) == 1
    res = runner.invoke(app, ["check-property", str(tmp_path / "cnn.pt"), str(prop), "--input-shape", "1,4,4"])
    assert res.exit_code == 2 and "does not take inputs of shape (1, 4, 4)" in res.output, res.output
    assert len(res.output.strip().splitlines()) == 1

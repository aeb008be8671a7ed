"""Readers for fully connected ReLU networks: the `.nnet` text format (Kyle Julian, Stanford) and simple
ONNX graphs (MatMul/Gemm/Add/Sub/Relu/Flatten/Reshape, as in VNN-COMP's ACAS Xu files), both to torch.

`.nnet`: comment lines start with `//`; then `layers, inputs, outputs, max size`; the layer sizes; a
symmetry flag; input minimums, maximums, means (+ output mean) and ranges (+ output range); then per layer
the weight rows and the biases. Hidden layers use ReLU, the last one is linear. The networks work on
normalised values: x_n = (clip(x, min, max) - mean) / range and y = y_n * range + mean.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from trustcase.errors import UserError


class NetworkFormatError(UserError, ValueError):
    """A network file that cannot be read; says which file and what is wrong."""


@dataclass
class Network:
    weights: list[np.ndarray]  # (out, in) per layer
    biases: list[np.ndarray]
    input_min: np.ndarray
    input_max: np.ndarray
    input_mean: np.ndarray
    input_range: np.ndarray
    output_mean: float
    output_range: float

    def normalise(self, x: np.ndarray) -> np.ndarray:
        """Physical inputs -> the network's inputs (clipped to the declared range, as the format specifies)."""
        return (np.clip(x, self.input_min, self.input_max) - self.input_mean) / self.input_range

    def module(self) -> nn.Sequential:
        """Normalised inputs -> normalised outputs, as torch (Linear/ReLU layers, float32)."""
        layers: list[nn.Module] = []
        for i, (w, b) in enumerate(zip(self.weights, self.biases, strict=True)):
            lin = nn.Linear(w.shape[1], w.shape[0])
            with torch.no_grad():
                lin.weight.copy_(torch.from_numpy(w))
                lin.bias.copy_(torch.from_numpy(b))
            layers.append(lin)
            if i < len(self.weights) - 1:
                layers.append(nn.ReLU())
        return nn.Sequential(*layers).eval()


def read_nnet(path: str | Path) -> Network:
    path = Path(path)
    try:
        lines = [ln.strip() for ln in path.read_text().splitlines()]
    except (OSError, UnicodeDecodeError) as e:
        raise NetworkFormatError(f"cannot read {path}: {e}") from None
    rows = [ln for ln in lines if ln and not ln.startswith("//")]

    def numbers(line: str) -> list[float]:
        return [float(t) for t in line.replace(",", " ").split()]

    try:
        n_layers, n_in, n_out, _ = (int(v) for v in numbers(rows[0])[:4])
        sizes = [int(v) for v in numbers(rows[1])]
        if len(sizes) != n_layers + 1 or sizes[0] != n_in or sizes[-1] != n_out:
            raise NetworkFormatError(f"{path}: layer sizes {sizes} do not match the header {rows[0]}")
        mins, maxs = np.array(numbers(rows[3])), np.array(numbers(rows[4]))
        means, ranges = np.array(numbers(rows[5])), np.array(numbers(rows[6]))
        flat = np.array([v for ln in rows[7:] for v in numbers(ln)], dtype=np.float64)
    except (IndexError, ValueError) as e:
        raise NetworkFormatError(f"{path}: not a .nnet file ({e})") from None
    weights, biases, at = [], [], 0
    for i in range(n_layers):
        n_w = sizes[i + 1] * sizes[i]
        if at + n_w + sizes[i + 1] > len(flat):
            raise NetworkFormatError(f"{path}: layer {i + 1} is truncated")
        weights.append(flat[at:at + n_w].reshape(sizes[i + 1], sizes[i]).astype(np.float32))
        at += n_w
        biases.append(flat[at:at + sizes[i + 1]].astype(np.float32))
        at += sizes[i + 1]
    if at != len(flat):
        raise NetworkFormatError(f"{path}: {len(flat) - at} values after the last layer")
    if len(mins) < n_in or len(maxs) < n_in or len(means) < n_in + 1 or len(ranges) < n_in + 1:
        raise NetworkFormatError(f"{path}: normalisation lines are shorter than {n_in} inputs (+1 output)")
    return Network(weights, biases, mins[:n_in], maxs[:n_in], means[:n_in], ranges[:n_in],
                   float(means[n_in]), float(ranges[n_in]))


class _Shift(nn.Module):
    def __init__(self, c: torch.Tensor):
        super().__init__()
        self.register_buffer("c", c)

    def forward(self, x):
        return x + self.c


def read_onnx(path: str | Path) -> nn.Sequential:
    """A feed-forward ONNX graph (one data path) as torch layers: Linear, ReLU, Flatten, constant shifts."""
    import onnx
    from onnx import numpy_helper

    path = Path(path)
    try:
        graph = onnx.load(str(path)).graph
    except Exception as e:
        raise NetworkFormatError(f"cannot read ONNX model {path}: {e}") from None
    consts = {t.name: numpy_helper.to_array(t).astype(np.float32) for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            consts[node.output[0]] = numpy_helper.to_array(node.attribute[0].t).astype(np.float32)
    data = [i.name for i in graph.input if i.name not in consts]
    if len(data) != 1:
        raise NetworkFormatError(f"{path}: expected one data input, found {data}")
    current, layers = data[0], []
    for node in graph.node:
        if node.op_type == "Constant":
            continue
        ins = list(node.input)
        if current not in ins:
            raise NetworkFormatError(f"{path}: node {node.name or node.op_type} is not on the single data path")
        other = [consts[i] for i in ins if i != current and i in consts]
        op = node.op_type
        if op in ("Flatten", "Reshape"):
            layers.append(nn.Flatten())
        elif op == "Relu":
            layers.append(nn.ReLU())
        elif op in ("Add", "Sub") and len(other) == 1:
            c = torch.from_numpy(other[0].reshape(-1).copy())
            layers.append(_Shift(c if op == "Add" else -c) if ins[0] == current else None)
            if layers[-1] is None:
                raise NetworkFormatError(f"{path}: constant - input (Sub) is not supported")
        elif op == "MatMul" and len(other) == 1 and ins[0] == current:
            w = other[0]
            lin = nn.Linear(w.shape[0], w.shape[1], bias=False)
            lin.weight.data.copy_(torch.from_numpy(w.T.copy()))
            layers.append(lin)
        elif op == "Gemm" and ins[0] == current:
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            w = other[0] if attrs.get("transB", 0) else other[0].T
            w = w * attrs.get("alpha", 1.0)
            if attrs.get("transA", 0):
                raise NetworkFormatError(f"{path}: Gemm with transA is not supported")
            lin = nn.Linear(w.shape[1], w.shape[0])
            lin.weight.data.copy_(torch.from_numpy(np.ascontiguousarray(w)))
            b = other[1] * attrs.get("beta", 1.0) if len(other) > 1 else np.zeros(w.shape[0], np.float32)
            lin.bias.data.copy_(torch.from_numpy(b.reshape(-1)))
            layers.append(lin)
        else:
            raise NetworkFormatError(f"{path}: ONNX operator {op} ({node.name}) is not supported")
        current = node.output[0]
    return nn.Sequential(*layers).eval()


def load_network(path: str | Path) -> nn.Module:
    """A .nnet, .onnx or TorchScript (.pt) network as an eval-mode torch module on normalised values."""
    path = Path(path)
    if not path.is_file():
        raise NetworkFormatError(f"network file not found: {path}")
    if path.suffix == ".nnet":
        return read_nnet(path).module()
    if path.suffix == ".onnx":
        return read_onnx(path)
    try:
        return torch.jit.load(str(path), map_location="cpu").eval()
    except Exception as e:
        raise NetworkFormatError(f"{path}: not a .nnet, .onnx or TorchScript file ({type(e).__name__})") from None

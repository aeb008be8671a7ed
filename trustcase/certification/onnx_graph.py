"""ONNX networks as the layer graph of `graph.py` (the node types every bound of the engine runs on).

`read_onnx(path)` walks the ONNX graph node by node (the `onnx` package; nodes are topologically sorted by
the standard) and rewrites each operator into the engine's nodes, in float64:

- Conv (any stride, dilation, group; asymmetric pads as a Pad first), Gemm, MatMul by a constant, Add / Sub /
  Mul / Div by a constant (input normalisation), BatchNormalization (folded into the Conv/Gemm before it when
  that one feeds it alone, else a per-channel affine), AveragePool (a depthwise convolution; padding without
  count_include_pad divides each position by its own count), Pad (constant mode), Flatten, Reshape,
  Squeeze / Unsqueeze, Transpose (batch axis kept first), Identity / Dropout: affine nodes;
  Add / Sub of two tensors of one shape (residual connections): an affine node with two inputs;
- Relu: a ReLU node; MaxPool (no padding): max(a, b) = b + relu(a - b) over each window (`graph._Builder`);
- Sigmoid, Tanh: S-shaped activation nodes (`graph.SMOOTH`), relaxed soundly by `propagation.smooth_relax`;
- Shape of the data (its fixed sizes, batch 1), and any operator of constants only (Constant, the shape
  arithmetic of a `torch.onnx` export of `x.view(x.size(0), -1)` or of `F.pad`): evaluated once by onnx's
  reference implementation.

Any other operator, or an attribute the rewrite does not honour, is an `OnnxGraphError` naming the node, its
operator and its position. The graph is then checked against onnxruntime on the original file on seeded
random inputs (`agrees`): a deviation beyond the float32 arithmetic's is a refusal stating the deviation,
so a misread operator is an error, never a wrong proof. The first dimension of every data tensor is the
batch (the competitions' files declare it 1); shapes in the graph exclude it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from trustcase.certification.graph import (
    FOLDED,
    SMOOTH,
    Conv,
    Dense,
    Graph,
    GraphError,
    Node,
    Pad,
    Permute,
    Reshape,
    Scale,
    _Builder,
    batchnorm_magnitude,
    magnitude,
)

OPERATORS = ("Conv", "Gemm", "MatMul", "Add", "Sub", "Mul", "Div", "Relu", "Sigmoid", "Tanh", "AveragePool",
             "MaxPool", "BatchNormalization", "Flatten", "Reshape", "Squeeze", "Unsqueeze", "Transpose", "Pad",
             "Identity", "Dropout", "Shape")  # on the data; any operator on constants only is evaluated once


class OnnxGraphError(GraphError):
    """An ONNX network the engine cannot read exactly: the node, its operator and position, or the deviation."""


# --- reading ---------------------------------------------------------------------------------------------

@dataclass
class OnnxNetwork:
    """The layer graph of an ONNX file, with what checks and re-checks it."""

    path: Path
    graph: Graph
    input_name: str
    input_shape: tuple[int, ...]  # without the batch dimension
    output_size: int

    @property
    def n_inputs(self) -> int:
        return math.prod(self.input_shape)

    def session(self):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = options.inter_op_num_threads = 1
        return ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])

    def run(self, x: np.ndarray, session=None) -> np.ndarray:
        """onnxruntime on the original file: inputs (N, *input_shape) or flat (N, n_inputs) -> outputs (N, m),
        one item at a time (the files fix the batch size to 1)."""
        session = session or self.session()
        x = np.asarray(x, np.float32).reshape(-1, 1, *self.input_shape)
        return np.stack([np.asarray(session.run(None, {self.input_name: xi})[0], np.float64).reshape(-1)
                         for xi in x])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The graph in float32-in / float64 arithmetic, for attacks (differentiable)."""
        return self.graph.forward(x.reshape(len(x), *self.input_shape)).reshape(len(x), -1)


def _attrs(node) -> dict:
    import onnx

    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


class _Reader:
    def __init__(self, path: Path, model):
        from onnx import numpy_helper

        self.path, self.model = path, model
        g = model.graph
        self.consts: dict[str, np.ndarray] = {t.name: numpy_helper.to_array(t) for t in g.initializer}
        data = [i for i in g.input if i.name not in self.consts]
        if len(data) != 1:
            raise OnnxGraphError(f"{path.name}: expected one data input, found {[i.name for i in data]}")
        dims = [d.dim_value if d.HasField("dim_value") else None for d in data[0].type.tensor_type.shape.dim]
        if len(dims) < 2 or any(d is None or d <= 0 for d in dims[1:]):
            raise OnnxGraphError(f"{path.name}: input {data[0].name!r} has shape {dims}: expected a batch "
                                 "dimension followed by fixed sizes")
        self.input_name = data[0].name
        self.b = _Builder(tuple(dims[1:]))
        self.where: dict[str, int] = {data[0].name: 0}  # data tensors -> graph nodes

    def where_(self, node, pos) -> str:
        return f"{self.path.name}: node {pos} {node.name or '(unnamed)'!r} ({node.op_type})"

    def fail(self, node, pos, what: str) -> OnnxGraphError:
        return OnnxGraphError(f"{self.where_(node, pos)}: {what}")

    def shape(self, i: int) -> tuple[int, ...]:
        return self.b.shape(i)

    def add(self, kind: str, name: str, shape, inputs, maps=(), bias=None) -> int:
        return self.b.g.add(Node(kind, name, tuple(int(s) for s in shape), list(inputs), list(maps), bias))

    def foldable(self, i: int) -> bool:
        """Node i is an affine map of one input, the last node, read by nothing yet: the next one may absorb it."""
        n = self.b.g.nodes[i]
        return n.kind == "affine" and len(n.inputs) == 1 and i == len(self.b.g.nodes) - 1 and \
            self.b.consumers(i) == 0 and i > 0

    def shift(self, src: int, c: torch.Tensor, name: str) -> int:
        """x + c, folded into the bias of the affine node before when it feeds nothing else."""
        if self.foldable(src):
            prev = self.b.g.nodes[src]
            prev.folded = magnitude(prev) + c.abs()  # the model adds them apart (`Node.folded`)
            prev.bias = c.clone() if prev.bias is None else prev.bias + c
            return src
        shape = self.shape(src)
        return self.add("affine", name, shape, [src], [Reshape(shape, shape)], c.clone())

    def const_of(self, value: np.ndarray, shape: tuple[int, ...], node, pos) -> torch.Tensor:
        """A constant operand broadcast to a data tensor of `shape` (no batch), as float64."""
        c = np.asarray(value, np.float64)
        if c.ndim == len(shape) + 1:  # written with the batch dimension
            if c.shape[0] != 1:
                raise self.fail(node, pos, f"a constant of shape {c.shape} varies along the batch dimension")
            c = c[0]
        try:
            return torch.from_numpy(np.broadcast_to(c, shape).copy())
        except ValueError:
            raise self.fail(node, pos, f"a constant of shape {np.shape(value)} does not broadcast to the data "
                                       f"shape {shape}") from None

    def read(self) -> Graph:
        nodes = list(self.model.graph.node)
        for pos, node in enumerate(nodes):
            ins = [i for i in node.input if i]
            if all(i in self.consts for i in ins) and node.domain in ("", "ai.onnx"):
                self.fold(node, pos, ins)
                continue
            if node.op_type not in OPERATORS or node.domain not in ("", "ai.onnx"):
                raise self.fail(node, pos, f"operator {node.op_type} is not supported (supported: "
                                           f"{', '.join(OPERATORS)})")
            missing = [i for i in ins if i not in self.consts and i not in self.where]
            if missing:
                raise self.fail(node, pos, f"input {missing[0]!r} is produced by no node before it")
            out = self.op(node, pos, ins)
            if isinstance(out, np.ndarray):
                self.consts[node.output[0]] = out
            else:
                self.where[node.output[0]] = out
        outputs = [o.name for o in self.model.graph.output]
        if len(outputs) != 1 or outputs[0] not in self.where:
            raise OnnxGraphError(f"{self.path.name}: expected one output computed from the input, found {outputs}")
        last = self.where[outputs[0]]
        g = self.b.g
        if last != len(g.nodes) - 1 or last == 0:  # the output is the last node
            s = self.shape(last)
            self.add("affine", "output", s, [last], [Reshape(s, s)])
        if len(g.nodes) > 1 and len(self.shape(len(g.nodes) - 1)) != 1:
            s = self.shape(len(g.nodes) - 1)
            self.add("affine", "output", (math.prod(s),), [len(g.nodes) - 1], [Reshape(s, (math.prod(s),))])
        return g

    # constants (shape arithmetic, weights computed in the graph) ----------------------------------------
    def fold(self, node, pos, ins):
        """A node of constants only, evaluated once by onnx's reference implementation (any operator)."""
        from onnx.reference import ReferenceEvaluator

        try:
            outs = ReferenceEvaluator(node).run(None, {i: self.consts[i] for i in ins})
        except Exception as e:  # noqa: BLE001 - a malformed constant computation, named
            raise self.fail(node, pos, f"cannot evaluate on its constant inputs: {str(e)[:200]}") from None
        for name, value in zip(node.output, outs, strict=False):
            if name:
                self.consts[name] = np.asarray(value)

    # data operators ----------------------------------------------------------------------------------
    def op(self, node, pos, ins):
        op, a, name = node.op_type, _attrs(node), node.name or f"{node.op_type}_{pos}"
        data = [i for i in ins if i in self.where]
        src = self.where[data[0]]
        shape = self.shape(src)
        consts = [self.consts[i] for i in ins if i in self.consts]
        if op in ("Identity", "Dropout"):
            if op == "Dropout" and len(ins) > 2:  # training_mode input
                if bool(np.asarray(self.consts.get(ins[2], False)).any()):
                    raise self.fail(node, pos, "dropout in training mode")
            return src
        if op == "Shape":
            return np.array([1, *shape], np.int64)[a.get("start", 0):a.get("end")]
        if op in ("Relu", "Sigmoid", "Tanh"):
            kind = op.lower()
            if kind != "relu" and kind not in SMOOTH:
                raise self.fail(node, pos, "no relaxation for this activation")
            return self.add(kind, name, shape, [src])
        if op in ("Add", "Sub"):
            if len(data) == 2:
                other = self.where[data[1]]
                if self.shape(other) != shape:
                    raise self.fail(node, pos, f"adds tensors of shapes {shape} and {self.shape(other)} "
                                               "(broadcasting between data tensors is not supported)")
                second = Reshape(shape, shape) if op == "Add" else Scale(torch.tensor(-1.0, dtype=torch.float64))
                return self.add("affine", name, shape, [src, other], [Reshape(shape, shape), second])
            c = self.const_of(consts[0], shape, node, pos)
            if op == "Sub" and ins[0] != data[0]:  # c - x
                return self.add("affine", name, shape, [src], [Scale(torch.tensor(-1.0, dtype=torch.float64))], c)
            return self.shift(src, c if op == "Add" else -c, name)
        if op in ("Mul", "Div"):
            if len(data) != 1 or (op == "Div" and ins[0] != data[0]):
                raise self.fail(node, pos, "only multiplication or division of the data by a constant is linear")
            c = self.const_of(consts[0], shape, node, pos)
            if op == "Div" and bool((c == 0).any()):
                raise self.fail(node, pos, "division by zero")
            return self.add("affine", name, shape, [src], [Scale(c if op == "Mul" else 1.0 / c)])
        if op in ("Flatten", "Reshape", "Squeeze", "Unsqueeze"):
            return self.b.reshape(src, self.reshaped(node, pos, op, a, ins, shape), name)
        if op == "Transpose":
            perm = list(a.get("perm", range(len(shape) + 1)[::-1]))
            if perm[0] != 0:
                raise self.fail(node, pos, f"perm {perm} moves the batch axis")
            p = tuple(q - 1 for q in perm[1:])
            return self.add("affine", name, tuple(shape[q] for q in p), [src], [Permute(p)])
        if op == "Gemm":
            return self.gemm(node, pos, a, ins, src, shape, name)
        if op == "MatMul":
            if ins[0] != data[0] or len(shape) != 1 or consts[0].ndim != 2:
                raise self.fail(node, pos, "only (batch, n) @ constant (n, m) is supported")
            W = torch.from_numpy(np.asarray(consts[0], np.float64).T.copy())
            return self.add("affine", name, (W.shape[0],), [src], [Dense(W)])
        if op == "Conv":
            return self.conv(node, pos, a, ins, src, shape, name)
        if op == "BatchNormalization":
            return self.batchnorm(node, pos, a, ins, src, shape, name)
        if op == "Pad":
            return self.pad(node, pos, a, ins, src, shape, name)
        if op == "AveragePool":
            return self.avgpool(node, pos, a, src, shape, name)
        if op == "MaxPool":
            return self.maxpool(node, pos, a, src, shape, name)
        raise self.fail(node, pos, "is not supported")

    def reshaped(self, node, pos, op, a, ins, shape) -> tuple[int, ...]:
        full = (1, *shape)
        if op == "Flatten":
            ax = a.get("axis", 1) % (len(full) + 1) if a.get("axis", 1) else 0
            if ax != 1:
                raise self.fail(node, pos, f"axis {a.get('axis')} flattens across the batch dimension")
            return (math.prod(shape),)
        if op == "Reshape":
            target = [int(d) for d in self.consts[ins[1]].tolist()]
            if a.get("allowzero", 0):
                raise self.fail(node, pos, "allowzero is not supported")
            target = [full[i] if d == 0 else d for i, d in enumerate(target)]
            try:
                out = np.empty(full).reshape(target).shape
            except ValueError:
                raise self.fail(node, pos, f"cannot reshape {list(full)} to {target}") from None
            return tuple(out[1:]) if out and out[0] == 1 and len(out) > 1 else tuple(out)
        axes = a.get("axes", self.consts[ins[1]].tolist() if len(ins) > 1 else None)
        if op == "Squeeze":
            axes = [ax % len(full) for ax in (axes if axes is not None else
                                                [i for i, d in enumerate(full) if d == 1 and i > 0])]
            if 0 in axes:
                raise self.fail(node, pos, "squeezes the batch dimension")
            return tuple(d for i, d in enumerate(full) if i not in axes)[1:]
        out = list(full)
        for ax in sorted(int(x) % (len(full) + len(axes)) for x in axes):
            if ax == 0:
                raise self.fail(node, pos, "inserts an axis before the batch dimension")
            out.insert(ax, 1)
        return tuple(out[1:])

    def gemm(self, node, pos, a, ins, src, shape, name):
        if ins[0] not in self.where or a.get("transA", 0) or len(shape) != 1:
            raise self.fail(node, pos, "only data (batch, n) as the first operand, without transA, is supported")
        if ins[1] not in self.consts:
            raise self.fail(node, pos, "the weight must be a constant")
        W = np.asarray(self.consts[ins[1]], np.float64)
        W = (W if a.get("transB", 0) else W.T) * a.get("alpha", 1.0)
        if W.shape[1] != shape[0]:
            raise self.fail(node, pos, f"weight {W.shape} does not fit {shape[0]} inputs")
        bias = None
        if len(ins) > 2:
            if ins[2] not in self.consts:
                raise self.fail(node, pos, "the bias must be a constant")
            bias = torch.from_numpy(np.broadcast_to(np.asarray(self.consts[ins[2]], np.float64).reshape(-1)
                                                    if np.size(self.consts[ins[2]]) in (1, W.shape[0]) else
                                                    self.consts[ins[2]], (W.shape[0],)) * a.get("beta", 1.0))
        return self.add("affine", name, (W.shape[0],), [src], [Dense(torch.from_numpy(W.copy()))],
                        None if bias is None else bias.clone())

    def _spatial(self, node, pos, a, shape, kernel):
        if a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET", b"VALID", "VALID"):
            raise self.fail(node, pos, f"auto_pad {a['auto_pad']!r} is not supported (explicit pads only)")
        if len(shape) != 3 or len(kernel) != 2:
            raise self.fail(node, pos, f"only 2-d operations on (C, H, W) are supported, data {shape}")
        pads = list(a.get("pads", [0, 0, 0, 0]))
        strides = tuple(a.get("strides", [1, 1]))
        dil = tuple(a.get("dilations", [1, 1]))
        return pads, strides, dil

    def _pad_first(self, src, pads, name) -> tuple[int, tuple[int, int]]:
        """Asymmetric padding [top, left, bottom, right] as a Pad node, then the symmetric remainder."""
        top, left, bottom, right = pads
        if top == bottom and left == right:
            return src, (top, left)
        c, h, w = self.shape(src)
        p = (left, right, top, bottom)
        return self.add("affine", f"{name}.pad", (c, h + top + bottom, w + left + right), [src],
                        [Pad(p, (c, h, w))]), (0, 0)

    def conv(self, node, pos, a, ins, src, shape, name):
        if any(i not in self.consts for i in ins[1:]):
            raise self.fail(node, pos, "weights and bias must be constants")
        W = torch.from_numpy(np.asarray(self.consts[ins[1]], np.float64).copy())
        pads, strides, dil = self._spatial(node, pos, a, shape, tuple(W.shape[2:]))
        src, pad = self._pad_first(src, pads, name)
        c, h, w = self.shape(src)
        groups = int(a.get("group", 1))
        if W.shape[1] * groups != c:
            raise self.fail(node, pos, f"weight {tuple(W.shape)} with group {groups} does not fit {c} channels")
        mp = Conv(W, (c, h, w), strides, pad, dil, groups)
        out = tuple(mp.forward(torch.zeros(1, c, h, w, dtype=torch.float64)).shape[1:])
        bias = None
        if len(ins) > 2:
            bias = torch.from_numpy(np.asarray(self.consts[ins[2]], np.float64).copy()).view(-1, 1, 1)
            bias = bias.expand(out).clone()
        return self.add("affine", name, out, [src], [mp], bias)

    def batchnorm(self, node, pos, a, ins, src, shape, name):
        if len(node.output) > 1 and any(node.output[1:]) or a.get("training_mode", 0):
            raise self.fail(node, pos, "training mode (running statistics as outputs) is not supported")
        if any(i not in self.consts for i in ins[1:5]):
            raise self.fail(node, pos, "scale, bias, mean and variance must be constants")
        gamma, beta, mean, var = (np.asarray(self.consts[i], np.float64) for i in ins[1:5])
        scale = gamma / np.sqrt(var + a.get("epsilon", 1e-5))
        shift = beta - mean * scale
        view = (-1,) + (1,) * (len(shape) - 1)
        s, t = torch.from_numpy(scale).view(view), torch.from_numpy(shift).view(view)
        constants = batchnorm_magnitude(0.0, s, torch.from_numpy(mean).view(view), torch.from_numpy(beta).view(view))
        prev = self.b.g.nodes[src]
        if self.foldable(src) and isinstance(prev.maps[0], Conv | Dense):  # scaled output channels
            mp = prev.maps[0]
            W = mp.W * torch.from_numpy(scale).view((-1,) + (1,) * (mp.W.ndim - 1))
            prev.maps[0] = Conv(W, mp.in_shape, mp.stride, mp.padding, mp.dilation, mp.groups) \
                if isinstance(mp, Conv) else Dense(W)
            b = prev.bias if prev.bias is not None else torch.zeros(prev.shape, dtype=torch.float64)
            prev.folded = (s.abs() * magnitude(prev) + constants).expand(prev.shape).clone()  # `Node.folded`
            prev.bias = b * s + t
            prev.name, prev.rounded = f"{prev.name}+{name}", FOLDED  # its weights rounded again (graph.FOLDED)
            return src
        i = self.add("affine", name, shape, [src], [Scale(s)], t.expand(shape).clone())
        self.b.g.nodes[i].rounded = FOLDED  # scale = gamma / sqrt(var + eps): its float64 roundings
        self.b.g.nodes[i].folded = constants.expand(shape).clone()
        return i

    def pad(self, node, pos, a, ins, src, shape, name):
        mode = a.get("mode", b"constant")
        if mode not in (b"constant", "constant"):
            raise self.fail(node, pos, f"mode {mode!r} is not supported (constant only)")
        pads = a.get("pads") if "pads" in a else (self.consts[ins[1]].tolist() if len(ins) > 1 else None)
        if pads is None or (len(ins) > 3 and ins[3]):
            raise self.fail(node, pos, "pads must be constants, over every axis")
        value = float(np.asarray(a.get("value", self.consts[ins[2]] if len(ins) > 2 else 0.0)).reshape(-1)[0]) \
            if ("value" in a or len(ins) > 2) else 0.0
        r = len(pads) // 2
        before, after = pads[:r], pads[r:]
        if before[0] or after[0] or any(p < 0 for p in pads):
            raise self.fail(node, pos, f"pads {pads}: padding the batch axis or cropping is not supported")
        torch_pads: list[int] = []
        for d in range(r - 1, 0, -1):  # torch order: last axis first
            torch_pads += [int(before[d]), int(after[d])]
        mp = Pad(tuple(torch_pads), shape)
        out = tuple(mp.forward(torch.zeros(1, *shape, dtype=torch.float64)).shape[1:])
        bias = None
        if value:
            bias = value * (1.0 - mp.forward(torch.ones(1, *shape, dtype=torch.float64))[0])
        return self.add("affine", name, out, [src], [mp], bias)

    def avgpool(self, node, pos, a, src, shape, name):
        k = tuple(a["kernel_shape"])
        if a.get("ceil_mode", 0):
            raise self.fail(node, pos, "ceil_mode is not supported")
        pads, strides, dil = self._spatial(node, pos, a, shape, k)
        src, pad = self._pad_first(src, pads, name) if a.get("count_include_pad", 0) or not any(pads) else \
            (src, None)
        c, h, w = self.shape(src)
        ones = torch.ones(c, 1, *k, dtype=torch.float64)
        if pad is not None:  # every window divided by the kernel size
            mp = Conv(ones / (k[0] * k[1]), (c, h, w), strides, pad, dil, c)
            out = tuple(mp.forward(torch.zeros(1, c, h, w, dtype=torch.float64)).shape[1:])
            return self.add("affine", name, out, [src], [mp])
        # padded positions are not counted: a sum, then each position divided by its own count
        padded = self.add("affine", f"{name}.pad", (c, h + pads[0] + pads[2], w + pads[1] + pads[3]), [src],
                          [Pad((pads[1], pads[3], pads[0], pads[2]), (c, h, w))])
        ph, pw = self.shape(padded)[1:]
        mp = Conv(ones, (c, ph, pw), strides, (0, 0), dil, c)
        count = mp.forward(Pad((pads[1], pads[3], pads[0], pads[2]), (c, h, w)).forward(
            torch.ones(1, c, h, w, dtype=torch.float64)))[0]
        node_sum = self.add("affine", f"{name}.sum", tuple(count.shape), [padded], [mp])
        return self.add("affine", name, tuple(count.shape), [node_sum], [Scale(1.0 / count)])

    def maxpool(self, node, pos, a, src, shape, name):
        k = tuple(a["kernel_shape"])
        pads, strides, dil = self._spatial(node, pos, a, shape, k)
        if any(pads) or a.get("ceil_mode", 0) or a.get("storage_order", 0) or len(node.output) > 1 \
                and node.output[1]:
            raise self.fail(node, pos, "max pooling with padding, ceil_mode, storage_order or indices is not "
                                       "supported")
        m = nn.MaxPool2d(k, strides, 0, dil)
        out = tuple(m(torch.zeros(1, *shape)).shape[1:])
        return self.b.maxpool(self.where_(node, pos), name, m, src, out)


def read_onnx(path: str | Path, check: bool = True, samples: int = 4) -> OnnxNetwork:
    """The layer graph of an ONNX network, checked against onnxruntime on the original file (check=True)."""
    import onnx

    path = Path(path)
    if not path.is_file():
        raise OnnxGraphError(f"network file not found: {path}")
    try:
        model = onnx.load(str(path))
    except Exception as e:  # noqa: BLE001 - any decoding failure is a bad file
        raise OnnxGraphError(f"cannot read ONNX model {path}: {str(e)[:200]}") from None
    reader = _Reader(path, model)
    g = reader.read()
    out = g.nodes[-1].shape
    net = OnnxNetwork(path, g, reader.input_name, g.nodes[0].shape, math.prod(out))
    if check:
        agrees(net, samples)
    return net


def agrees(net: OnnxNetwork, samples: int = 4) -> float:
    """The graph reproduces onnxruntime on the original file on seeded random inputs (uniform in [-1, 1] and
    in [0, 1]), within the float32 arithmetic's error; else an OnnxGraphError with the deviation."""
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(samples, *net.input_shape, generator=gen, dtype=torch.float64)
    x[: samples // 2] = 2 * x[: samples // 2] - 1
    x = x.float().double()  # the float32 points both evaluate
    try:
        want = net.run(x.numpy())
    except Exception as e:  # noqa: BLE001 - onnxruntime refuses the file: say so
        raise OnnxGraphError(f"{net.path.name}: onnxruntime cannot run it: {str(e)[:200]}") from None
    with torch.no_grad():
        got = net.graph.forward(x).reshape(samples, -1).numpy()
    if want.shape != got.shape:
        raise OnnxGraphError(f"{net.path.name}: the layer graph gives {got.shape[1]} outputs, onnxruntime "
                             f"{want.shape[1]}")
    err = float(np.abs(want - got).max())
    if not err <= 1e-4 * max(1.0, float(np.abs(want).max())):  # float32 error of these sizes: about 1e-6
        raise OnnxGraphError(f"{net.path.name}: the layer graph deviates from onnxruntime by {err:.3g} "
                             "(max over random inputs); an operator was misread, no bound is trusted")
    return err

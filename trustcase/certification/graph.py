"""The layer graph of a ReLU network, reduced to two kinds of node: affine maps and ReLUs.

`from_model(module, input_shape)` reads the same graph as the Lipschitz bound (`models.anatomy`:
a torch.fx trace of an eager module, the plain chain of a traced TorchScript Sequential) and rewrites
every layer into affine nodes and ReLU nodes, all in float64:

- Linear, Conv2d (any stride, padding, dilation, groups), average pooling (a depthwise convolution):
  affine; an eval-mode BatchNorm is folded into the Conv2d/Linear before it, or is a per-channel affine;
- flatten / reshape / view, Dropout (eval), Identity: reshapes; residual additions: an affine node with
  several inputs;
- max pooling (padding 0): exactly, as a tree of max(a, b) = b + relu(a - b) over each window, so a
  sound relaxation of it is the relaxation of those ReLUs (and branch and bound may split them).

Each linear map knows its forward, its transpose (`backward`: convolutions go back by transposed
convolutions, never through a dense matrix) and its absolute value (interval arithmetic). The graph is
checked against the model on random inputs before use, so a misread layer is an error, not a wrong proof.
Anything else is a `GraphError` naming the layer's type and position.
"""

from __future__ import annotations

import dataclasses
import operator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from trustcase.errors import UserError
from trustcase.models.anatomy import UnsupportedLayer, _const, describe_eager, describe_script, script_chain


class GraphError(UserError, ValueError):
    """The network cannot be bounded: an unsupported layer (named with its type and position), NaN weights."""


# --- linear maps (batched: a leading batch dimension on every tensor) ---------------------------------

class Map:
    """A linear map between two tensor shapes, its transpose and its entry-wise absolute value."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def backward(self, lam: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def abs(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def abs_backward(self, lam: torch.Tensor) -> torch.Tensor:
        """The transpose of the absolute value (which outputs an input element reaches)."""
        raise NotImplementedError


@dataclass
class Dense(Map):
    W: torch.Tensor  # (out, in)

    def forward(self, x):
        return x.flatten(1) @ self.W.T

    def backward(self, lam):
        return lam.flatten(1) @ self.W

    def abs(self, x):
        return x.flatten(1) @ self.W.abs().T

    def abs_backward(self, lam):
        return lam.flatten(1) @ self.W.abs()


@dataclass
class Conv(Map):
    W: torch.Tensor  # (out, in / groups, kh, kw)
    in_shape: tuple[int, int, int]
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1

    def forward(self, x):
        return F.conv2d(x, self.W, None, self.stride, self.padding, self.dilation, self.groups)

    def abs(self, x):
        return F.conv2d(x, self.W.abs(), None, self.stride, self.padding, self.dilation, self.groups)

    def backward(self, lam, weight=None):
        # the transpose of a convolution; output_padding restores the rows/columns the stride dropped
        out_hw = lam.shape[-2:]
        k = self.W.shape[-2:]
        extra = [self.in_shape[1 + a] - ((out_hw[a] - 1) * self.stride[a] - 2 * self.padding[a]
                                         + self.dilation[a] * (k[a] - 1) + 1) for a in range(2)]
        return F.conv_transpose2d(lam, self.W if weight is None else weight, None, self.stride, self.padding,
                                  tuple(extra), self.groups, self.dilation)

    def abs_backward(self, lam):
        return self.backward(lam, self.W.abs())


@dataclass
class Reshape(Map):
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]

    def forward(self, x):
        return x.reshape(len(x), *self.out_shape)

    def backward(self, lam):
        return lam.reshape(len(lam), *self.in_shape)

    abs = forward
    abs_backward = backward


@dataclass
class Scale(Map):
    """Per-channel scaling (dimension 1 of (B, C, ...)): BatchNorm without a layer to fold it into."""

    s: torch.Tensor  # (C, 1, 1) or (C,)

    def forward(self, x):
        return x * self.s

    backward = forward

    def abs(self, x):
        return x * self.s.abs()

    abs_backward = abs


@dataclass
class Mix(Map):
    """A matrix S (out, in) applied along dimension 2 of (B, C, n, H, W): the windows of a max pooling."""

    S: torch.Tensor

    def forward(self, x):
        return torch.einsum("oi,bcihw->bcohw", self.S, x)

    def backward(self, lam):
        return torch.einsum("oi,bcohw->bcihw", self.S, lam)

    def abs(self, x):
        return torch.einsum("oi,bcihw->bcohw", self.S.abs(), x)

    def abs_backward(self, lam):
        return torch.einsum("oi,bcohw->bcihw", self.S.abs(), lam)


# --- the graph -------------------------------------------------------------------------------------------

SMOOTH = {"sigmoid": torch.sigmoid, "tanh": torch.tanh}  # S-shaped activations: `propagation.smooth_relax`


@dataclass
class Node:
    kind: str  # "input", "affine", "relu", or an S-shaped activation of SMOOTH ("sigmoid", "tanh")
    name: str  # the layer it comes from, for messages and reports
    shape: tuple[int, ...]  # without the batch dimension
    inputs: list[int] = field(default_factory=list)
    maps: list[Map] = field(default_factory=list)  # affine: one linear map per input
    bias: torch.Tensor | None = None  # affine: (*shape)


@dataclass
class Graph:
    nodes: list[Node]  # in topological order; node 0 is the input, the last node the output

    @property
    def relus(self) -> list[int]:
        return [i for i, n in enumerate(self.nodes) if n.kind == "relu"]

    def forward(self, x: torch.Tensor, keep: bool = False):
        """Evaluate the graph (float64); keep=True returns every node's value."""
        values = [x.double()]
        for node in self.nodes[1:]:
            if node.kind == "relu":
                values.append(values[node.inputs[0]].clamp_min(0))
            elif node.kind in SMOOTH:
                values.append(SMOOTH[node.kind](values[node.inputs[0]]))
            else:
                values.append(affine(node, [values[i] for i in node.inputs]))
        return values if keep else values[-1]

    def add(self, node: Node) -> int:
        self.nodes.append(node)
        return len(self.nodes) - 1


def astype(g: Graph, dtype: torch.dtype) -> Graph:
    """The same graph with every weight in `dtype` (float32: a fast search for good relaxation parameters,
    whose bound is then computed again in float64)."""
    def conv(v):
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            return v.to(dtype)
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            return dataclasses.replace(v, **{f.name: conv(getattr(v, f.name)) for f in dataclasses.fields(v)})
        return v

    return Graph([dataclasses.replace(n, maps=[conv(m) for m in n.maps], bias=conv(n.bias)) for n in g.nodes])


def affine(node: Node, xs: list[torch.Tensor]) -> torch.Tensor:
    out = sum(m.forward(x) for m, x in zip(node.maps, xs, strict=True))
    return out if node.bias is None else out + node.bias


# --- building from a torch module ------------------------------------------------------------------------

def _d(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach().double()


def _finite(name: str, m: nn.Module) -> None:
    for pname, p in list(m.named_parameters(recurse=False)) + list(m.named_buffers(recurse=False)):
        if p is not None and p.is_floating_point() and not torch.isfinite(p).all():
            raise GraphError(f"layer {name} ({_kind(m)}): {pname} holds NaN or infinite values")


def _kind(m: nn.Module) -> str:
    return m.original_name if isinstance(m, torch.jit.ScriptModule) else type(m).__name__


class _Builder:
    def __init__(self, input_shape: tuple[int, ...]):
        self.g = Graph([Node("input", "input", tuple(input_shape))])

    def shape(self, i: int) -> tuple[int, ...]:
        return self.g.nodes[i].shape

    def layer(self, pos: int, name: str, m: nn.Module, src: int, out_shape: tuple[int, ...], fold: bool = True) -> int:
        """The node(s) of one layer applied to node src; returns the node of its output. fold: src feeds this
        layer only (a BatchNorm may then be folded into it)."""
        kind = _kind(m)
        where = f"layer {pos} {name!r} ({kind})"
        _finite(f"{pos} {name!r}", m)
        if kind in ("ReLU",):
            return self.g.add(Node("relu", name, self.shape(src), [src]))
        if kind in ("Identity", "Dropout", "Dropout1d", "Dropout2d", "AlphaDropout", "Flatten", "Unflatten"):
            if kind.startswith("Dropout") and not isinstance(m, torch.jit.ScriptModule) and m.training:
                raise GraphError(f"{where} is in training mode")
            return self.reshape(src, out_shape, name)
        if kind == "MaxPool2d":
            return self.maxpool(where, name, m, src, out_shape)
        try:
            d = describe_script(name, m) if isinstance(m, torch.jit.ScriptModule) else describe_eager(name, m)
        except UnsupportedLayer as e:
            raise GraphError(f"{where} cannot be bounded: {e}") from None
        in_shape = self.shape(src)
        if d.kind == "linear":
            W, bias = _d(d.weight), _d(getattr(m, "bias", None))
            prev = self.g.nodes[src]
            if self.foldable(src) and isinstance(prev.maps[0], Reshape) and prev.bias is not None:
                # a constant shift just before (an input normalisation, ONNX Add/Sub): W (x + c) + b
                shift = W @ prev.bias.flatten()
                bias = shift if bias is None else bias + shift
                self.g.nodes[src] = Node("affine", f"{prev.name}+{name}", tuple(out_shape), prev.inputs,
                                         [Dense(W)], bias.reshape(out_shape))
                return src
            return self.g.add(Node("affine", name, out_shape, [src], [Dense(W)], None if bias is None else
                                   bias.reshape(out_shape)))
        if d.kind == "conv2d":
            mp = Conv(_d(d.weight), in_shape, d.stride, d.padding, d.dilation, d.groups)
            bias = _d(getattr(m, "bias", None))
            return self.g.add(Node("affine", name, out_shape, [src], [mp],
                                   None if bias is None else bias.view(-1, 1, 1).expand(out_shape).clone()))
        if d.kind == "batchnorm":
            scale = _d(d.scale)
            shift = -_d(m.running_mean) * scale + (_d(m.bias) if getattr(m, "bias", None) is not None else 0.0)
            view = (-1,) + (1,) * (len(in_shape) - 1)
            prev = self.g.nodes[src]
            if prev.kind == "affine" and len(prev.inputs) == 1 and isinstance(prev.maps[0], Conv | Dense) \
                    and fold and src == len(self.g.nodes) - 1 and self.consumers(src) == 0:
                mp = prev.maps[0]  # fold into the layer before: scaled output channels
                w = mp.W * scale.view((-1,) + (1,) * (mp.W.ndim - 1))
                prev.maps[0] = Conv(w, mp.in_shape, mp.stride, mp.padding, mp.dilation, mp.groups) \
                    if isinstance(mp, Conv) else Dense(w)
                b = prev.bias if prev.bias is not None else torch.zeros(prev.shape, dtype=torch.float64)
                prev.bias = b * scale.view(view) + shift.view(view)
                prev.name = f"{prev.name}+{name}"
                return src
            return self.g.add(Node("affine", name, out_shape, [src], [Scale(scale.view(view))],
                                   shift.view(view).expand(out_shape).clone()))
        if d.kind == "avgpool":
            return self.avgpool(where, name, m, src, out_shape)
        raise GraphError(f"{where} cannot be bounded (supported: Linear, Conv2d, BatchNorm, ReLU, average and "
                         "max pooling, flatten/reshape, residual additions)")

    def foldable(self, i: int) -> bool:
        """Node i is an affine map of one input, the last node, read by nothing yet: the next one may absorb it."""
        n = self.g.nodes[i]
        return n.kind == "affine" and len(n.inputs) == 1 and i == len(self.g.nodes) - 1 and self.consumers(i) == 0

    def shift(self, src: int, c: torch.Tensor, name: str) -> int:
        """x + c for a constant c (broadcast to x's shape), folded into the affine node before when it can be."""
        c = c.double().expand(self.shape(src)).clone()
        if self.foldable(src):
            prev = self.g.nodes[src]
            prev.bias = c if prev.bias is None else prev.bias + c
            return src
        shape = self.shape(src)
        return self.g.add(Node("affine", name, shape, [src], [Reshape(shape, shape)], c))

    def consumers(self, i: int) -> int:
        return sum(i in n.inputs for n in self.g.nodes)

    def reshape(self, src: int, out_shape: tuple[int, ...], name: str) -> int:
        if tuple(out_shape) == self.shape(src):
            return src
        return self.g.add(Node("affine", name, tuple(out_shape), [src], [Reshape(self.shape(src), tuple(out_shape))]))

    def avgpool(self, where: str, name: str, m: nn.Module, src: int, out_shape) -> int:
        c, h, w = self.shape(src)
        if isinstance(m, nn.AvgPool2d):
            k, s, p = (m.kernel_size,) * 2 if isinstance(m.kernel_size, int) else m.kernel_size, \
                m.stride or m.kernel_size, m.padding
            if m.ceil_mode or (not m.count_include_pad and p) or m.divisor_override:
                raise GraphError(f"{where}: ceil_mode, count_include_pad=False with padding and divisor_override "
                                 "are not supported")
        else:  # adaptive, or a TorchScript module: the uniform window that gives out_shape
            oh, ow = out_shape[-2:]
            if h % oh or w % ow:
                raise GraphError(f"{where}: adaptive pooling {h}x{w} -> {oh}x{ow} has unequal windows")
            k, s, p = (h // oh, w // ow), (h // oh, w // ow), 0
        k, s, p = _pair(k), _pair(s), _pair(p)
        W = torch.full((c, 1, *k), 1.0 / (k[0] * k[1]), dtype=torch.float64)
        return self.g.add(Node("affine", name, tuple(out_shape), [src], [Conv(W, (c, h, w), s, p, (1, 1), c)]))

    def maxpool(self, where: str, name: str, m: nn.Module, src: int, out_shape) -> int:
        if isinstance(m, torch.jit.ScriptModule):
            ops = [n for n in m.graph.nodes() if n.kind() == "aten::max_pool2d"]
            if len(ops) != 1:
                raise GraphError(f"{where}: not a plain max_pool2d")
            k, s, p, dil, ceil = (_const(v) for v in list(ops[0].inputs())[1:6])
        else:
            if m.return_indices:
                raise GraphError(f"{where}: return_indices is not supported")
            k, s, p, dil, ceil = m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode
        k, p, dil = _pair(k), _pair(p), _pair(dil)
        s = _pair(s) if s not in (None, []) else k
        if any(p) or ceil:
            raise GraphError(f"{where}: max pooling with padding or ceil_mode is not supported")
        c, h, w = self.shape(src)
        ho, wo = out_shape[-2:]
        n = k[0] * k[1]
        # the windows: a depthwise convolution with one-hot kernels, (C n, Ho, Wo) viewed as (C, n, Ho, Wo)
        eye = torch.eye(n, dtype=torch.float64).view(n, 1, *k).repeat(c, 1, 1, 1)
        node = self.g.add(Node("affine", f"{name}.windows", (c, n, ho, wo), [src],
                               [Conv(eye, (c, h, w), s, (0, 0), dil, c)]))
        self.g.nodes[node].maps[0] = _Windows(self.g.nodes[node].maps[0], (c, n, ho, wo))
        while n > 1:  # pairs (a, b) -> b + relu(a - b); an odd one out passes through
            half, rest = n // 2, n % 2
            diff = torch.zeros(half, n, dtype=torch.float64)
            keep = torch.zeros(half + rest, n, dtype=torch.float64)
            for j in range(half):
                diff[j, 2 * j], diff[j, 2 * j + 1] = 1.0, -1.0
                keep[j, 2 * j + 1] = 1.0
            if rest:
                keep[half, n - 1] = 1.0
            lift = torch.eye(half + rest, half, dtype=torch.float64)
            d = self.g.add(Node("affine", f"{name}.diff", (c, half, ho, wo), [node], [Mix(diff)]))
            r = self.g.add(Node("relu", f"{name}.max", (c, half, ho, wo), [d]))
            node = self.g.add(Node("affine", f"{name}.max", (c, half + rest, ho, wo), [node, r],
                                   [Mix(keep), Mix(lift)]))
            n = half + rest
        return self.reshape(node, tuple(out_shape), name)


@dataclass
class _Windows(Map):
    """The windows of a pooling: a one-hot depthwise convolution whose channels are viewed as (C, n)."""

    conv: Conv
    shape: tuple[int, ...]

    def forward(self, x):
        return self.conv.forward(x).reshape(len(x), *self.shape)

    def backward(self, lam):
        return self.conv.backward(lam.reshape(len(lam), self.shape[0] * self.shape[1], *self.shape[-2:]))

    abs = forward
    abs_backward = backward


def _pair(v) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int | float) else (int(v[0]), int(v[-1]))


def _chain(module: torch.jit.ScriptModule, input_shape) -> Graph:
    try:
        chain = script_chain(module)
    except UnsupportedLayer as e:
        raise GraphError(str(e)) from None
    b = _Builder(input_shape)
    x, src = torch.zeros(1, *input_shape), 0
    with torch.no_grad():
        for pos, (name, m) in enumerate(chain):
            try:
                x = m(x)
            except Exception as e:
                raise GraphError(f"input shape {tuple(input_shape)} does not fit layer {pos} {name!r}: "
                                 f"{str(e)[:200]}") from None
            src = b.layer(pos, name, m, src, tuple(x.shape[1:]))
    return b.g


ADD = {operator.add, torch.add, operator.iadd}
SUB = {operator.sub, torch.sub, operator.isub}
RESHAPE_F = {torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze}
RESHAPE_M = {"view", "reshape", "flatten", "contiguous", "squeeze", "unsqueeze", "clone"}


def _fx(module: nn.Module, input_shape) -> Graph:
    from torch.fx import symbolic_trace
    from torch.fx.passes.shape_prop import ShapeProp

    try:
        gm = symbolic_trace(module)
        ShapeProp(gm).propagate(torch.zeros(1, *input_shape, dtype=_dtype(module)))
    except Exception as e:
        raise GraphError(f"cannot trace the model with torch.fx on inputs {tuple(input_shape)}: "
                         f"{type(e).__name__}: {str(e)[:200]}") from None
    modules = dict(gm.named_modules())
    b = _Builder(input_shape)
    where: dict[str, int] = {}
    consts: dict[str, torch.Tensor] = {}
    for pos, n in enumerate(gm.graph.nodes, start=-1):  # positions count the operations after the input
        meta = n.meta.get("tensor_meta")
        shape = tuple(meta.shape[1:]) if hasattr(meta, "shape") else None
        ins = [a for a in n.all_input_nodes if a.name in where]
        label = f"operation {pos} {n.name!r}"
        if n.op == "placeholder":
            where[n.name] = 0
        elif n.op == "get_attr":
            consts[n.name] = gm.get_parameter(n.target) if n.target in dict(gm.named_parameters()) \
                else gm.get_buffer(n.target)
        elif n.op == "output":
            arg = n.args[0]
            if not isinstance(arg, torch.fx.Node) or arg.name not in where:
                raise GraphError("the model must return one tensor of scores")
            if where[arg.name] != len(b.g.nodes) - 1:  # the output is the last node
                src = where[arg.name]
                b.g.add(Node("affine", "output", b.shape(src), [src], [Reshape(b.shape(src), b.shape(src))]))
            return b.g
        elif shape is None:
            continue  # sizes and other Python values
        elif n.op == "call_module":
            where[n.name] = b.layer(pos, str(n.target), modules[n.target], where[ins[0].name], shape,
                                    fold=len(ins[0].users) == 1)
        elif n.op == "call_function" and n.target in ADD | SUB and len(ins) == 1 and len(n.args) == 2 \
                and not n.kwargs and isinstance(n.args[0], torch.fx.Node) and n.args[0].name in where \
                and isinstance(n.args[1], torch.fx.Node) and n.args[1].name in consts:  # x + c, x - c
            c = consts[n.args[1].name].detach()
            if tuple(torch.broadcast_shapes(c.shape, (1, *shape))) != (1, *shape):
                raise GraphError(f"{label}: a constant of shape {tuple(c.shape)} broadcast beyond the input")
            where[n.name] = b.shift(where[ins[0].name], -c if n.target in SUB else c, n.name)
        elif n.op == "call_function" and n.target in ADD and len(ins) == 2 and not n.kwargs:
            srcs = [where[a.name] for a in ins]
            if any(b.shape(s) != shape for s in srcs):
                raise GraphError(f"{label}: an addition with broadcasting is not supported")
            where[n.name] = b.g.add(Node("affine", n.name, shape, srcs, [Reshape(shape, shape)] * 2))
        elif (n.op == "call_function" and n.target in (torch.relu, F.relu)) or (n.op == "call_method"
                                                                                   and n.target == "relu"):
            where[n.name] = b.g.add(Node("relu", n.name, shape, [where[ins[0].name]]))
        elif (n.op == "call_function" and n.target in RESHAPE_F) or (n.op == "call_method"
                                                                       and n.target in RESHAPE_M):
            where[n.name] = b.reshape(where[ins[0].name], shape, n.name)
        else:
            raise GraphError(f"{label} ({n.op} {getattr(n.target, '__name__', n.target)}) cannot be bounded "
                             "(supported: Linear, Conv2d, BatchNorm, ReLU, pooling, reshapes, residual additions)")
    raise GraphError("the model's graph has no output")


def _dtype(module: nn.Module) -> torch.dtype:
    """The floating type the model computes in (float32 unless its weights say otherwise)."""
    p = next((t for t in [*module.parameters(), *module.buffers()] if t.is_floating_point()), None)
    return torch.float32 if p is None else p.dtype


def from_model(module: nn.Module, input_shape, check: bool = True) -> Graph:
    """The layer graph of an eval-mode ReLU network on inputs of `input_shape` (no batch dimension)."""
    input_shape = tuple(int(d) for d in input_shape)
    if module.training:
        raise GraphError("the model is in training mode; call model.eval() (BatchNorm and Dropout differ)")
    with torch.no_grad():
        if isinstance(module, torch.jit.ScriptModule):
            g = _chain(module, input_shape)
        elif not list(module.children()):
            b = _Builder(input_shape)
            out = module(torch.zeros(1, *input_shape, dtype=_dtype(module)))
            b.layer(0, type(module).__name__, module, 0, tuple(out.shape[1:]))
            g = b.g
        else:
            g = _fx(module, input_shape)
    if len(g.nodes) == 1:
        raise GraphError("the model has no layer")
    if check:
        agrees(g, module, input_shape)
    return g


def agrees(g: Graph, module: nn.Module, input_shape, samples: int = 4, tol: float = 1e-3) -> None:
    """The graph reproduces the model (float32 against float64) on seeded random inputs, or a GraphError."""
    x = torch.randn(samples, *input_shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = module(x.to(_dtype(module))).double()
        got = g.forward(x.double())
    err = float((want - got).abs().max())
    if not err <= tol * max(1.0, float(want.abs().max())):
        raise GraphError(f"the layer graph does not reproduce the model (difference {err:.3g}); a layer was "
                         "misread")

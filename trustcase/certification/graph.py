"""The layer graph of a network: the one reading of a model that every bound and certificate runs on.

`read(module, input_shape)` reads an eager module (a torch.fx trace; trustcase's 1-Lipschitz layers are read
whole) or a TorchScript module (the plain chain of a traced Sequential; its leaves' graphs give stride, padding,
eps) into nodes, all in float64 (`onnx_graph.read_onnx` and `nnet` read ONNX and .nnet files into the same
nodes):

- Linear, Conv2d (any stride, padding, dilation, groups), average pooling (a depthwise convolution):
  affine; an eval-mode BatchNorm is folded into the Conv2d/Linear before it, or is a per-channel affine;
- flatten / reshape / view / permute, Dropout (eval), Identity: reshapes; residual additions and
  subtractions, concatenation, multiplication by a constant: affine nodes (several inputs for the first two);
- ReLU; max pooling (padding 0): exactly, as a tree of max(a, b) = b + relu(a - b) over each window, so a
  sound relaxation of it is the relaxation of those ReLUs (and branch and bound may split them);
- any other layer whose Lipschitz constant is known (GroupSort, max pooling with padding, LeakyReLU, GELU,
  sigmoid, pixel shuffles, ...): an "op" node that evaluates the layer and states its constant.

A node that stands for a whole layer states that layer's Lipschitz constant (`Node.lipschitz`; a max pooling's
relu tree is 1-Lipschitz per window, far below the product of its parts), and `certification.lipschitz`
composes the bound over the nodes. `from_model` is the same graph for the bound engine (`propagation`, `bab`),
which refuses "op" nodes: the layer is named with its type and position.

Each linear map knows its forward, its transpose (`backward`: convolutions go back by transposed
convolutions, never through a dense matrix) and its absolute value (interval arithmetic). The graph is
checked against the model on random inputs before use, so a misread layer is an error, not a wrong proof.
Anything else is a `GraphError` naming the layer's type and position.
"""

from __future__ import annotations

import dataclasses
import io
import math
import operator
import re
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from trustcase.certification.rounding import gamma
from trustcase.errors import UserError
from trustcase.models.lipschitz_layers import BjorckLinear, GroupSort, LipschitzConv2d, ScaledAvgPool2d, bjorck


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


@dataclass
class Place(Map):
    """A tensor placed at `offset` along axis `axis` (no batch) of a larger one, zeros elsewhere: one input of a
    concatenation (the inputs' places are disjoint)."""

    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    axis: int
    offset: int

    def forward(self, x):
        out = x.new_zeros(len(x), *self.out_shape)
        out.narrow(self.axis + 1, self.offset, self.in_shape[self.axis]).copy_(x)
        return out

    def backward(self, lam):
        return lam.narrow(self.axis + 1, self.offset, self.in_shape[self.axis])

    abs = forward
    abs_backward = backward


@dataclass
class Pad(Map):
    """Zero padding of the trailing dimensions (`pads`: torch order, last dimension first)."""

    pads: tuple[int, ...]
    in_shape: tuple[int, ...]

    def forward(self, x):
        return F.pad(x, self.pads)

    def backward(self, lam):
        index = [slice(None)] * lam.ndim
        for d in range(len(self.pads) // 2):  # crop what the padding added
            before, after = self.pads[2 * d], self.pads[2 * d + 1]
            index[lam.ndim - 1 - d] = slice(before, lam.shape[lam.ndim - 1 - d] - after)
        return lam[tuple(index)]

    abs = forward
    abs_backward = backward


@dataclass
class Permute(Map):
    """A transposition of the non-batch axes (`perm` over them, 0-based)."""

    perm: tuple[int, ...]

    def forward(self, x):
        return x.permute(0, *(p + 1 for p in self.perm))

    def backward(self, lam):
        inverse = [0] * len(self.perm)
        for i, p in enumerate(self.perm):
            inverse[p] = i
        return lam.permute(0, *(p + 1 for p in inverse))

    abs = forward
    abs_backward = backward


# --- the graph -------------------------------------------------------------------------------------------

SMOOTH = {"sigmoid": torch.sigmoid, "tanh": torch.tanh}  # S-shaped activations: `propagation.smooth_relax`


@dataclass
class Node:
    kind: str  # "input", "affine", "relu", an S-shaped activation of SMOOTH ("sigmoid", "tanh"), or "op"
    name: str  # the layer it comes from, for messages and reports
    shape: tuple[int, ...]  # without the batch dimension
    inputs: list[int] = field(default_factory=list)
    maps: list[Map] = field(default_factory=list)  # affine: one linear map per input
    bias: torch.Tensor | None = None  # affine: (*shape)
    fn: Callable | None = None  # "op": the layer itself (float64), which the bound engine does not relax
    lipschitz: tuple[int, float] | None = None  # (j, c): this node is a c-Lipschitz (L2) function of node j
    rounded: float = 0.0  # affine: relative rounding of its weights against the model's (a folded BatchNorm)
    folded: torch.Tensor | None = None  # affine: per output, the sum of the magnitudes of the constants folded into
    # its bias (a shift before it, a BatchNorm after it): the model adds them apart, so its rounding scales with
    # them, not with the bias they cancel to (`bab.forward_error`)
    layer: str = ""  # the type of the layer it comes from, with its position: "layer 1 '1' (Sigmoid)"


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
            elif node.kind == "op":
                values.append(node.fn(values[node.inputs[0]]))
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


def magnitude(node: Node) -> torch.Tensor | float:
    """Per output, the magnitude of the constants an affine node adds (`Node.folded`, else |bias|, else 0)."""
    if node.folded is not None:
        return node.folded
    return 0.0 if node.bias is None else node.bias.abs()


def batchnorm_magnitude(before, scale: torch.Tensor, mean: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """The magnitude of a BatchNorm's constants, (t - mean) scale + beta, folded after constants of magnitude
    `before` (the layer's bias): |scale| (before + |mean|) + |beta|."""
    return scale.abs() * (before + mean.abs()) + beta.abs()


def affine(node: Node, xs: list[torch.Tensor]) -> torch.Tensor:
    out = sum(m.forward(x) for m, x in zip(node.maps, xs, strict=True))
    return out if node.bias is None else out + node.bias


# --- describing one layer (eager and TorchScript alike) ---------------------------------------------------

# largest slope (sup |f'|) of each elementwise operation that reshapes or activates without weights
ACTIVATIONS = {
    "ReLU": 1.0, "ReLU6": 1.0, "Hardtanh": 1.0, "Tanh": 1.0, "Softplus": 1.0, "Softsign": 1.0,
    "Sigmoid": 0.25, "Hardsigmoid": 1.0 / 6.0, "GELU": 1.13, "SiLU": 1.1, "Mish": 1.09, "Hardswish": 1.5,
    "Identity": 1.0, "Flatten": 1.0, "Unflatten": 1.0, "Dropout": 1.0, "Dropout2d": 1.0, "Dropout1d": 1.0,
    "AlphaDropout": 1.0,
    "PixelUnshuffle": 1.0, "PixelShuffle": 1.0,  # permutations of their input (invertible down/up-sampling)
}
RESHAPES = ("Identity", "Dropout", "Dropout1d", "Dropout2d", "AlphaDropout", "Flatten", "Unflatten")
FOLDED = gamma(5)  # a folded weight entry: the BatchNorm scale's four float64 roundings and the product's


class UnsupportedLayer(ValueError):
    """A layer whose structure cannot be read (named with its position and type)."""


@dataclass
class Layer:
    """One operation, described the same way for eager and TorchScript modules."""

    name: str
    kind: str  # "linear", "conv2d", "batchnorm", "activation", "maxpool2d", "avgpool", "adaptive_maxpool2d"
    weight: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1
    kernel: tuple[int, int] = (1, 1)
    scale: torch.Tensor | None = None  # BatchNorm: gamma / sqrt(var + eps)
    slope: float = 1.0  # activation: sup |f'|; average pooling: the factor the average is multiplied by
    ceil: bool = False  # pooling: ceil_mode
    eps: float = 0.0  # BatchNorm
    output: tuple[int, int] | None = None  # adaptive pooling: the output size


def _pair(v) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int | float) else (int(v[0]), int(v[-1]))


def _bn_scale(weight, var, eps) -> torch.Tensor:
    s = 1.0 / torch.sqrt(var.detach().double() + eps)
    return s * weight.detach().double() if weight is not None else s


def is_lipschitz_layer(m: nn.Module) -> bool:
    """One of trustcase's 1-Lipschitz layers (read whole, not traced into)."""
    return isinstance(m, LipschitzConv2d | BjorckLinear | GroupSort | ScaledAvgPool2d)


def describe_eager(name: str, m: nn.Module) -> Layer:
    kind = type(m).__name__
    # the 1-Lipschitz layers first: the weights they apply are normalised, not their raw parameters
    if isinstance(m, LipschitzConv2d):
        with torch.no_grad():
            weight = m.weight / m.sigma() if not m.training else None
        if weight is None:
            raise UnsupportedLayer(f"layer {name}: LipschitzConv2d in training mode (its norm estimate moves)")
        return Layer(name, "conv2d", weight=weight, bias=m.bias, stride=_pair(m.stride), padding=_pair(m.padding),
                     dilation=_pair(m.dilation), groups=m.groups)
    if isinstance(m, BjorckLinear):
        with torch.no_grad():
            return Layer(name, "linear", weight=bjorck(m.weight, m.iterations), bias=m.bias)
    if isinstance(m, GroupSort):  # a permutation of its input at every point
        return Layer(name, "activation", slope=1.0)
    if isinstance(m, ScaledAvgPool2d):
        k = _pair(m.kernel_size)
        return Layer(name, "avgpool", kernel=k, stride=k, slope=float(m.kernel_size))
    if isinstance(m, nn.Linear):
        return Layer(name, "linear", weight=m.weight, bias=m.bias)
    if isinstance(m, nn.Conv2d):
        if m.padding_mode != "zeros":
            raise UnsupportedLayer(f"layer {name}: Conv2d with padding_mode={m.padding_mode!r} is not supported")
        pad = m.padding
        if isinstance(pad, str):  # 'same' pads d (k - 1) / 2 per side: even totals only (else asymmetric)
            total = [0 if pad == "valid" else d * (k - 1) for d, k in zip(m.dilation, m.kernel_size, strict=True)]
            if any(t % 2 for t in total):
                raise UnsupportedLayer(f"layer {name}: Conv2d padding {pad!r} pads asymmetrically here")
            pad = tuple(t // 2 for t in total)
        return Layer(name, "conv2d", weight=m.weight, bias=m.bias, stride=_pair(m.stride), padding=_pair(pad),
                     dilation=_pair(m.dilation), groups=m.groups)
    if isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d):
        if not m.track_running_stats or m.running_var is None:
            raise UnsupportedLayer(f"layer {name}: BatchNorm without running statistics uses batch statistics")
        return Layer(name, "batchnorm", scale=_bn_scale(m.weight, m.running_var, m.eps), eps=m.eps)
    if isinstance(m, nn.LeakyReLU):
        return Layer(name, "activation", slope=max(1.0, abs(m.negative_slope)))
    if isinstance(m, nn.ELU):
        return Layer(name, "activation", slope=max(1.0, m.alpha))
    if isinstance(m, nn.MaxPool2d):
        if m.return_indices:
            raise UnsupportedLayer(f"layer {name}: max pooling with return_indices is not supported")
        return Layer(name, "maxpool2d", kernel=_pair(m.kernel_size), stride=_pair(m.stride or m.kernel_size),
                     padding=_pair(m.padding), dilation=_pair(m.dilation), ceil=bool(m.ceil_mode))
    if isinstance(m, nn.AdaptiveMaxPool2d):
        return Layer(name, "adaptive_maxpool2d", kernel=_pair(m.output_size))
    if isinstance(m, nn.AvgPool2d):
        if m.ceil_mode or (not m.count_include_pad and m.padding) or m.divisor_override:
            raise UnsupportedLayer(f"layer {name}: average pooling with ceil_mode, count_include_pad=False with "
                                   "padding or divisor_override is not supported")
        k = _pair(m.kernel_size)
        return Layer(name, "avgpool", kernel=k, stride=_pair(m.stride or k), padding=_pair(m.padding))
    if isinstance(m, nn.AdaptiveAvgPool2d):
        return Layer(name, "avgpool", kernel=(0, 0), output=_pair(m.output_size))  # windows from the output size
    if kind in ACTIVATIONS:
        return Layer(name, "activation", slope=ACTIVATIONS[kind])
    raise UnsupportedLayer(f"layer {name} ({kind}) is not supported")


def _const(value: torch._C.Value):
    node = value.node()
    if node.kind() == "prim::ListConstruct":
        return [_const(v) for v in node.inputs()]
    if node.kind() == "prim::Constant":
        return value.toIValue()
    raise UnsupportedLayer(f"non-constant argument ({node.kind()}) in a TorchScript layer")


def _ops(m: torch.jit.ScriptModule) -> list[torch._C.Node]:
    skip = {"prim::Constant", "prim::ListConstruct", "prim::GetAttr", "prim::TupleConstruct", "prim::NumToTensor"}
    return [n for n in m.graph.nodes() if n.kind() not in skip]


_LAYERS = "__torch__.trustcase.models.lipschitz_layers."  # the traced class names of those layers


def describe_script(name: str, m: torch.jit.ScriptModule) -> Layer:
    """A TorchScript leaf: its class name says what it is, its graph gives stride/padding/eps."""
    kind = m.original_name
    ops = _ops(m)
    op_kinds = [n.kind() for n in ops]
    if kind in ("Linear",) and op_kinds == ["aten::linear"]:
        return Layer(name, "linear", weight=m.weight, bias=getattr(m, "bias", None))
    if kind == "Conv2d" and op_kinds in (["aten::_convolution"], ["aten::conv2d"]):
        args = [_const(v) for v in list(ops[0].inputs())[3:]]
        if op_kinds[0] == "aten::_convolution":
            stride, padding, dilation, transposed, _, groups = args[:6]
            if transposed:
                raise UnsupportedLayer(f"layer {name}: transposed convolution is not supported")
        else:
            stride, padding, dilation, groups = args[:4]
        if isinstance(padding, str):
            raise UnsupportedLayer(f"layer {name}: Conv2d padding {padding!r} is not supported in TorchScript")
        return Layer(name, "conv2d", weight=m.weight, bias=getattr(m, "bias", None), stride=_pair(stride),
                     padding=_pair(padding), dilation=_pair(dilation), groups=int(groups))
    if kind in ("BatchNorm2d", "BatchNorm1d") and op_kinds == ["aten::batch_norm"]:
        args = list(ops[0].inputs())
        if _const(args[5]):
            raise UnsupportedLayer(f"layer {name}: BatchNorm was traced in training mode (batch statistics)")
        return Layer(name, "batchnorm", scale=_bn_scale(getattr(m, "weight", None), m.running_var, _const(args[7])),
                     eps=float(_const(args[7])))
    if kind == "MaxPool2d" and op_kinds == ["aten::max_pool2d"]:
        k, s, p, d, ceil = (_const(v) for v in list(ops[0].inputs())[1:6])
        return Layer(name, "maxpool2d", kernel=_pair(k), stride=_pair(s or k), padding=_pair(p), dilation=_pair(d),
                     ceil=bool(ceil))
    if kind == "AvgPool2d" and op_kinds == ["aten::avg_pool2d"]:
        k, s, p, ceil, include, divisor = (_const(v) for v in list(ops[0].inputs())[1:7])
        if ceil or (not include and any(_pair(p))) or divisor is not None:
            raise UnsupportedLayer(f"layer {name}: average pooling with ceil_mode, count_include_pad=False with "
                                   "padding or divisor_override is not supported")
        return Layer(name, "avgpool", kernel=_pair(k), stride=_pair(s or k), padding=_pair(p))
    if kind == "AdaptiveAvgPool2d" and op_kinds == ["aten::adaptive_avg_pool2d"]:
        return Layer(name, "avgpool", kernel=(0, 0), output=_pair(_const(list(ops[0].inputs())[1])))
    qualified = re.sub(r"___torch_mangle_\d+\.", "", m._c._type().qualified_name())  # traced twice: mangled
    if qualified == _LAYERS + "GroupSort" and op_kinds == ["aten::unflatten", "aten::sort", "aten::flatten"] \
            and _const(list(ops[1].inputs())[1]) >= 1 and not list(ops[1].outputs())[1].uses():
        # the sorted values (never the indices) of a reshape: a permutation of the input, 1-Lipschitz
        return Layer(name, "activation", slope=1.0)
    if qualified == _LAYERS + "ScaledAvgPool2d" and op_kinds == ["aten::avg_pool2d", "aten::mul"]:
        k, s, p, ceil, include, divisor = (_const(v) for v in list(ops[0].inputs())[1:7])
        factor = float(_const(list(ops[1].inputs())[1]))
        if factor > 0 and not ceil and not any(_pair(p)) and divisor is None:
            return Layer(name, "avgpool", kernel=_pair(k), stride=_pair(s or k), slope=factor)
    if kind == "LeakyReLU" and op_kinds and op_kinds[0].startswith("aten::leaky_relu"):
        return Layer(name, "activation", slope=max(1.0, abs(float(_const(list(ops[0].inputs())[1])))))
    if kind in ("Dropout", "Dropout2d", "Dropout1d", "AlphaDropout"):
        for n in ops:  # traced in eval mode: dropout(x, p, train=False) or nothing at all
            if "dropout" in n.kind() and _const(list(n.inputs())[2]):
                raise UnsupportedLayer(f"layer {name}: Dropout was traced in training mode")
        return Layer(name, "activation", slope=1.0)
    if kind in ACTIVATIONS and kind not in ("LeakyReLU", "ELU"):
        return Layer(name, "activation", slope=ACTIVATIONS[kind])
    raise UnsupportedLayer(f"layer {name} ({kind}, ops {op_kinds}) is not supported")


def script_chain(m: torch.jit.ScriptModule, prefix: str = "") -> list[tuple[str, torch.jit.ScriptModule]]:
    """The children of a TorchScript module whose forward is a plain chain child_1(...child_0(x)); else error."""
    children = dict(m.named_children())
    if not children:
        return [(prefix or m.original_name, m)]
    names = {}
    current = list(m.graph.inputs())[1]
    chain = []
    for node in m.graph.nodes():
        k = node.kind()
        if k == "prim::GetAttr" and node.s("name") in children:
            names[node.output().debugName()] = node.s("name")
        elif k == "prim::CallMethod" and node.s("name") == "forward":
            owner, *args = list(node.inputs())
            if owner.debugName() not in names or len(args) != 1 or args[0].debugName() != current.debugName():
                raise UnsupportedLayer(f"TorchScript module {prefix or m.original_name}: forward is not a plain chain")
            chain.append(names[owner.debugName()])
            current = node.output()
        elif k != "prim::Constant":
            raise UnsupportedLayer(
                f"TorchScript module {prefix or m.original_name} ({m.original_name}): its forward uses {k}, not a "
                "plain chain of layers; load the model as an eager nn.Module (state_dict + factory) to read it")
    ret = list(m.graph.outputs())[0]
    if ret.debugName() != current.debugName():
        raise UnsupportedLayer(f"TorchScript module {prefix or m.original_name}: forward does not return the chain")
    out = []
    for c in chain:
        out += script_chain(children[c], f"{prefix}.{c}" if prefix else c)
    return out


def pool_coverage(k: int, s: int, d: int = 1) -> int:
    """Largest number of pooling windows containing one input position (one axis)."""
    return min(k, math.ceil((d * (k - 1) + 1) / s))


def adaptive_coverage(n_in: int, n_out: int) -> int:
    count = [0] * n_in
    for i in range(n_out):
        for j in range((i * n_in) // n_out, -(-((i + 1) * n_in) // n_out)):
            count[j] += 1
    return max(count)


def maxpool_constant(layer: Layer) -> float:
    """The L2 Lipschitz constant of a max pooling: sqrt of the largest number of windows holding one input
    (each output moves by at most the largest move in its window)."""
    if layer.kind == "maxpool2d":
        (kh, kw), (sh, sw), (dh, dw) = layer.kernel, layer.stride, layer.dilation
        return math.sqrt(pool_coverage(kh, sh, dh) * pool_coverage(kw, sw, dw))
    raise ValueError(f"{layer.name}: not a max pooling")


# --- building the graph -----------------------------------------------------------------------------------

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
            return self.g.add(Node("relu", name, self.shape(src), [src], layer=where))
        if kind in RESHAPES:
            if kind.startswith("Dropout") and not isinstance(m, torch.jit.ScriptModule) and m.training:
                raise GraphError(f"{where} is in training mode")
            return self.reshape(src, out_shape, name)
        try:
            d = describe_script(name, m) if isinstance(m, torch.jit.ScriptModule) else describe_eager(name, m)
        except UnsupportedLayer as e:
            raise GraphError(f"{where} cannot be read: {e}") from None
        in_shape = self.shape(src)
        if d.kind == "linear":
            W, bias = _d(d.weight), _d(d.bias)
            prev = self.g.nodes[src]
            if self.foldable(src) and isinstance(prev.maps[0], Reshape) and prev.bias is not None:
                # a constant shift just before (an input normalisation, ONNX Add/Sub): W (x + c) + b
                shift = W @ prev.bias.flatten()
                folded = W.abs() @ magnitude(prev).flatten() + (0.0 if bias is None else bias.abs())
                bias = shift if bias is None else bias + shift
                self.g.nodes[src] = Node("affine", f"{prev.name}+{name}", tuple(out_shape), prev.inputs,
                                         [Dense(W)], bias.reshape(out_shape), layer=where,
                                         folded=folded.reshape(out_shape))
                return src
            return self.g.add(Node("affine", name, out_shape, [src], [Dense(W)], None if bias is None else
                                   bias.reshape(out_shape), layer=where))
        if d.kind == "conv2d":
            mp = Conv(_d(d.weight), in_shape, d.stride, d.padding, d.dilation, d.groups)
            bias = _d(d.bias)
            return self.g.add(Node("affine", name, out_shape, [src], [mp],
                                   None if bias is None else bias.view(-1, 1, 1).expand(out_shape).clone(),
                                   layer=where))
        if d.kind == "batchnorm":
            scale = _d(d.scale)
            mean = _d(m.running_mean)
            beta = _d(m.bias) if getattr(m, "bias", None) is not None else torch.zeros_like(mean)
            shift = -mean * scale + beta
            view = (-1,) + (1,) * (len(in_shape) - 1)
            prev = self.g.nodes[src]
            if prev.kind == "affine" and len(prev.inputs) == 1 and isinstance(prev.maps[0], Conv | Dense) \
                    and fold and src == len(self.g.nodes) - 1 and self.consumers(src) == 0:
                mp = prev.maps[0]  # fold into the layer before: scaled output channels
                w = mp.W * scale.view((-1,) + (1,) * (mp.W.ndim - 1))
                prev.maps[0] = Conv(w, mp.in_shape, mp.stride, mp.padding, mp.dilation, mp.groups) \
                    if isinstance(mp, Conv) else Dense(w)
                b = prev.bias if prev.bias is not None else torch.zeros(prev.shape, dtype=torch.float64)
                prev.folded = batchnorm_magnitude(magnitude(prev), scale.view(view), mean.view(view),
                                                  beta.view(view)).expand(prev.shape).clone()
                prev.bias = b * scale.view(view) + shift.view(view)
                prev.name, prev.rounded = f"{prev.name}+{name}", FOLDED
                return src
            return self.g.add(Node("affine", name, out_shape, [src], [Scale(scale.view(view))],
                                   shift.view(view).expand(out_shape).clone(), rounded=gamma(4), layer=where,
                                   folded=batchnorm_magnitude(0.0, scale.view(view), mean.view(view),
                                                              beta.view(view)).expand(out_shape).clone()))
        if d.kind == "avgpool":
            return self.avgpool(where, name, d, src, out_shape)
        if d.kind == "maxpool2d" and not any(d.padding) and not d.ceil:
            return self.maxpool(where, name, m, src, out_shape)
        # the bound engine does not relax these; their Lipschitz constant is known
        if d.kind == "maxpool2d":
            c = maxpool_constant(d)
        elif d.kind == "adaptive_maxpool2d":
            c = math.sqrt(adaptive_coverage(in_shape[-2], out_shape[-2]) * adaptive_coverage(in_shape[-1],
                                                                                           out_shape[-1]))
        else:
            c = d.slope
        return self.g.add(Node("op", name, tuple(out_shape), [src], fn=m, lipschitz=(src, c), layer=where))

    def foldable(self, i: int) -> bool:
        """Node i is an affine map of one input, the last node, read by nothing yet: the next one may absorb it."""
        n = self.g.nodes[i]
        return n.kind == "affine" and len(n.inputs) == 1 and i == len(self.g.nodes) - 1 and self.consumers(i) == 0

    def shift(self, src: int, c: torch.Tensor, name: str) -> int:
        """x + c for a constant c (broadcast to x's shape), folded into the affine node before when it can be."""
        c = c.double().expand(self.shape(src)).clone()
        if self.foldable(src):
            prev = self.g.nodes[src]
            prev.folded = magnitude(prev) + c.abs()
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

    def avgpool(self, where: str, name: str, d: Layer, src: int, out_shape) -> int:
        """Average pooling (times d.slope) as a depthwise convolution of constant kernels."""
        c, h, w = self.shape(src)
        k, s, p = d.kernel, d.stride, d.padding
        if k == (0, 0):  # adaptive: the uniform window that gives out_shape
            oh, ow = out_shape[-2:]
            if h % oh or w % ow:
                raise GraphError(f"{where}: adaptive pooling {h}x{w} -> {oh}x{ow} has unequal windows")
            k, s, p = (h // oh, w // ow), (h // oh, w // ow), (0, 0)
        W = torch.full((c, 1, *k), d.slope / (k[0] * k[1]), dtype=torch.float64)
        return self.g.add(Node("affine", name, tuple(out_shape), [src], [Conv(W, (c, h, w), s, p, (1, 1), c)],
                               layer=where))

    def maxpool(self, where: str, name: str, m: nn.Module, src: int, out_shape) -> int:
        d = describe_script(name, m) if isinstance(m, torch.jit.ScriptModule) else describe_eager(name, m)
        k, s, dil = d.kernel, d.stride, d.dilation
        if any(d.padding) or d.ceil:
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
            dn = self.g.add(Node("affine", f"{name}.diff", (c, half, ho, wo), [node], [Mix(diff)]))
            r = self.g.add(Node("relu", f"{name}.max", (c, half, ho, wo), [dn]))
            node = self.g.add(Node("affine", f"{name}.max", (c, half + rest, ho, wo), [node, r],
                                   [Mix(keep), Mix(lift)]))
            n = half + rest
        out = self.reshape(node, tuple(out_shape), name)
        # the whole tree is the max pooling: its constant, not the product of its parts'
        self.g.nodes[out].lipschitz, self.g.nodes[out].layer = (src, maxpool_constant(d)), where
        return out


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


def _chain(module: torch.jit.ScriptModule, input_shape) -> Graph:
    buf = io.BytesIO()  # the submodules of an in-process trace cannot be called; those of a reloaded one can
    torch.jit.save(module, buf)
    buf.seek(0)
    module = torch.jit.load(buf, map_location="cpu")
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
MUL = {operator.mul, torch.mul, operator.imul, "mul"}
RESHAPE_F = {torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze}
RESHAPE_M = {"view", "reshape", "flatten", "contiguous", "squeeze", "unsqueeze", "clone"}
PERMUTE = {torch.permute, torch.transpose, "permute", "transpose"}


class _Tracer(torch.fx.Tracer):
    """torch.fx's tracer with trustcase's 1-Lipschitz layers read whole, like torch's own layers."""

    def is_leaf_module(self, m: nn.Module, name: str) -> bool:
        return is_lipschitz_layer(m) or super().is_leaf_module(m, name)


def _permutation(n, shape: tuple[int, ...]) -> tuple[int, ...] | None:
    """The permutation of the non-batch axes a permute/transpose node applies (None if it moves the batch)."""
    rank = len(shape) + 1
    args = [a for a in n.args[1:]]
    if n.target in ("permute", torch.permute):
        dims = args[0] if len(args) == 1 and isinstance(args[0], list | tuple) else args
        perm = [int(d) % rank for d in dims]
    else:
        a, b = (int(d) % rank for d in args[:2])
        perm = list(range(rank))
        perm[a], perm[b] = perm[b], perm[a]
    if len(perm) != rank or perm[0] != 0:
        return None
    return tuple(p - 1 for p in perm[1:])


def _fx(module: nn.Module, input_shape) -> Graph:
    from torch.fx.passes.shape_prop import ShapeProp

    try:
        gm = torch.fx.GraphModule(module, _Tracer().trace(module))
    except Exception as e:
        raise GraphError(f"cannot trace the model with torch.fx: {type(e).__name__}: {str(e)[:200]}") from None
    try:
        ShapeProp(gm).propagate(torch.zeros(1, *input_shape, dtype=_dtype(module)))
    except Exception as e:
        raise GraphError(f"input shape {tuple(input_shape)} does not fit the model: {str(e)[:200]}") from None
    modules = dict(gm.named_modules())
    b = _Builder(input_shape)
    where: dict[str, int] = {}
    consts: dict[str, torch.Tensor] = {}
    for pos, n in enumerate(gm.graph.nodes, start=-1):  # positions count the operations after the input
        meta = n.meta.get("tensor_meta")
        shape = tuple(meta.shape[1:]) if hasattr(meta, "shape") else None
        ins = [a for a in n.all_input_nodes if a.name in where]
        label = f"operation {pos} {n.name!r}"
        numbers = [a for a in n.args if isinstance(a, int | float) and not isinstance(a, bool)]
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
        elif any(a.name not in where and a.name not in consts for a in n.all_input_nodes
                 if hasattr(a.meta.get("tensor_meta"), "shape")):
            raise GraphError(f"{label} ({n.op} {getattr(n.target, '__name__', n.target)}) reads a tensor "
                             "computed by an operation that is not supported")
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
        elif n.op == "call_function" and n.target in ADD | SUB and len(ins) == 2 and len(n.args) == 2 \
                and set(n.kwargs) <= {"alpha"}:  # a + alpha b, a - alpha b: residual connections
            srcs = [where[a.name] for a in n.args]
            if any(b.shape(s) != shape for s in srcs):
                raise GraphError(f"{label}: an addition with broadcasting is not supported")
            alpha = float(n.kwargs.get("alpha", 1.0)) * (-1.0 if n.target in SUB else 1.0)
            second = Reshape(shape, shape) if alpha == 1.0 else Scale(torch.tensor(alpha, dtype=torch.float64))
            where[n.name] = b.g.add(Node("affine", n.name, shape, srcs, [Reshape(shape, shape), second]))
        elif n.op in ("call_function", "call_method") and n.target in MUL and len(ins) == 1 \
                and len(n.args) == 2 and len(numbers) == 1 and not n.kwargs:  # x * c for a number c
            src = where[ins[0].name]
            where[n.name] = b.g.add(Node("affine", n.name, shape, [src],
                                         [Scale(torch.tensor(float(numbers[0]), dtype=torch.float64))]))
        elif n.op == "call_function" and n.target is torch.cat and len(ins) == len(n.args[0]) >= 1:
            axis = int(n.args[1] if len(n.args) > 1 else n.kwargs.get("dim", 0)) % (len(shape) + 1) - 1
            if axis < 0:
                raise GraphError(f"{label}: a concatenation along the batch dimension is not supported")
            maps, offset = [], 0
            for a in n.args[0]:
                s = b.shape(where[a.name])
                maps.append(Place(s, shape, axis, offset))
                offset += s[axis]
            where[n.name] = b.g.add(Node("affine", n.name, shape, [where[a.name] for a in n.args[0]], maps))
        elif (n.op == "call_function" and n.target in (torch.relu, F.relu)) or (n.op == "call_method"
                                                                                   and n.target == "relu"):
            where[n.name] = b.g.add(Node("relu", n.name, shape, [where[ins[0].name]]))
        elif n.op == "call_function" and n.target is F.dropout and len(ins) == 1:
            if n.kwargs.get("training", n.args[2] if len(n.args) > 2 else True):
                raise GraphError(f"{label}: dropout in training mode")
            where[n.name] = where[ins[0].name]
        elif (n.op == "call_function" and n.target in RESHAPE_F) or (n.op == "call_method"
                                                                       and n.target in RESHAPE_M):
            where[n.name] = b.reshape(where[ins[0].name], shape, n.name)
        elif n.target in PERMUTE and len(ins) == 1 and n.op in ("call_function", "call_method") \
                and _permutation(n, b.shape(where[ins[0].name])) is not None:
            perm = _permutation(n, b.shape(where[ins[0].name]))
            where[n.name] = b.g.add(Node("affine", n.name, shape, [where[ins[0].name]], [Permute(perm)]))
        else:
            raise GraphError(f"{label} ({n.op} {getattr(n.target, '__name__', n.target)}) is not supported "
                             "(supported: Linear, Conv2d, BatchNorm, activations, pooling, reshapes, permutations, "
                             "residual additions, concatenation, multiplication by a number)")
    raise GraphError("the model's graph has no output")


def _dtype(module: nn.Module) -> torch.dtype:
    """The floating type the model computes in (float32 unless its weights say otherwise)."""
    p = next((t for t in [*module.parameters(), *module.buffers()] if t.is_floating_point()), None)
    return torch.float32 if p is None else p.dtype


def read(module: nn.Module, input_shape, check: bool = True) -> Graph:
    """The layer graph of an eval-mode network on inputs of `input_shape` (no batch dimension), "op" nodes
    included (the Lipschitz bound reads them; the bound engine refuses them: `from_model`)."""
    input_shape = tuple(int(d) for d in input_shape)
    if not input_shape or any(d < 1 for d in input_shape):
        raise GraphError(f"invalid input shape {input_shape}")
    if module.training:
        raise GraphError("the model is in training mode; call model.eval() (BatchNorm and Dropout differ)")
    with torch.no_grad():
        if isinstance(module, torch.jit.ScriptModule):
            g = _chain(module, input_shape)
        elif not list(module.children()) and (type(module).__module__.startswith("torch.nn")
                                              or is_lipschitz_layer(module)):  # one layer: tracing would look inside
            b = _Builder(input_shape)
            try:
                out = module(torch.zeros(1, *input_shape, dtype=_dtype(module)))
            except Exception as e:
                raise GraphError(f"input shape {input_shape} does not fit the model: {str(e)[:200]}") from None
            b.layer(0, type(module).__name__, module, 0, tuple(out.shape[1:]))
            g = b.g
        else:
            g = _fx(module, input_shape)
    if len(g.nodes) == 1:
        raise GraphError("the model has no layer")
    if check:
        agrees(g, module, input_shape)
    return g


def from_model(module: nn.Module, input_shape, check: bool = True) -> Graph:
    """The layer graph of an eval-mode ReLU network, for the bound engine: affine, ReLU and S-shaped nodes."""
    g = read(module, input_shape, check=False)
    op = next((n for n in g.nodes if n.kind == "op"), None)
    if op is not None:
        raise GraphError(f"{op.layer} cannot be bounded (supported: Linear, Conv2d, BatchNorm, ReLU, average and "
                         "max pooling without padding, reshapes, residual additions, concatenation)")
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

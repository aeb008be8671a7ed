"""The anatomy of a model: the one place where trustcase reads how a model is built.

- `Layer`, `describe_eager`, `describe_script`, `script_chain`: each operation described the same way for
  eager modules and TorchScript (a traced nn.Sequential is a plain chain of submodules; its leaves' graphs
  give stride, padding, eps). Read by the Lipschitz bound and by bound propagation (`certification`).
- `hookable`: an eager, hookable copy of a traced sequential model, rebuilt layer by layer and verified on
  a probe (captum needs forward hooks; attribution methods and root causes).
- `SplitHead`: a Sequential cut before its last Linear layer, (features, logits) in one pass (the ODD
  monitor's feature extractor).
A layer that cannot be read is an `UnsupportedLayer` naming it, never a silent guess.
"""

from __future__ import annotations

import io
import re
from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import nn

from trustcase.models.lipschitz_layers import BjorckLinear, GroupSort, LipschitzConv2d, ScaledAvgPool2d, bjorck

# largest slope (sup |f'|) of each elementwise operation that reshapes or activates without weights
ACTIVATIONS = {
    "ReLU": 1.0, "ReLU6": 1.0, "Hardtanh": 1.0, "Tanh": 1.0, "Softplus": 1.0, "Softsign": 1.0,
    "Sigmoid": 0.25, "Hardsigmoid": 1.0 / 6.0, "GELU": 1.13, "SiLU": 1.1, "Mish": 1.09, "Hardswish": 1.5,
    "Identity": 1.0, "Flatten": 1.0, "Unflatten": 1.0, "Dropout": 1.0, "Dropout2d": 1.0, "Dropout1d": 1.0,
    "AlphaDropout": 1.0,
    "PixelUnshuffle": 1.0, "PixelShuffle": 1.0,  # permutations of their input (invertible down/up-sampling)
}


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
    slope: float = 1.0  # activation
    module: nn.Module | None = None  # for layers bounded with the module itself (average pooling)


# --- describing layers (eager and TorchScript alike) -------------------------------------------

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
        return Layer(name, "avgpool", module=m)
    if isinstance(m, nn.Linear):
        return Layer(name, "linear", weight=m.weight, bias=m.bias)
    if isinstance(m, nn.Conv2d):
        if m.padding_mode != "zeros":
            raise UnsupportedLayer(f"layer {name}: Conv2d with padding_mode={m.padding_mode!r} is not supported")
        pad = m.padding
        if isinstance(pad, str):
            # 'same': at most d (k - 1) zeros per side; a larger circle is still a sound embedding
            pad = (0, 0) if pad == "valid" else tuple(d * (k - 1) for d, k in zip(m.dilation, m.kernel_size,
                                                                                    strict=True))
        return Layer(name, "conv2d", weight=m.weight, bias=m.bias, stride=_pair(m.stride), padding=_pair(pad),
                     dilation=_pair(m.dilation), groups=m.groups)
    if isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d):
        if not m.track_running_stats or m.running_var is None:
            raise UnsupportedLayer(f"layer {name}: BatchNorm without running statistics uses batch statistics")
        return Layer(name, "batchnorm", scale=_bn_scale(m.weight, m.running_var, m.eps))
    if isinstance(m, nn.LeakyReLU):
        return Layer(name, "activation", slope=max(1.0, abs(m.negative_slope)))
    if isinstance(m, nn.ELU):
        return Layer(name, "activation", slope=max(1.0, m.alpha))
    if isinstance(m, nn.MaxPool2d):
        return Layer(name, "maxpool2d", kernel=_pair(m.kernel_size), stride=_pair(m.stride or m.kernel_size),
                     dilation=_pair(m.dilation))
    if isinstance(m, nn.AdaptiveMaxPool2d):
        return Layer(name, "adaptive_maxpool2d", kernel=_pair(m.output_size))
    if isinstance(m, nn.AvgPool2d | nn.AdaptiveAvgPool2d | nn.AvgPool1d | nn.AdaptiveAvgPool1d):
        return Layer(name, "avgpool", module=m)
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
        return Layer(name, "conv2d", weight=m.weight, stride=_pair(stride), padding=_pair(padding),
                     dilation=_pair(dilation), groups=int(groups))
    if kind in ("BatchNorm2d", "BatchNorm1d") and op_kinds == ["aten::batch_norm"]:
        args = list(ops[0].inputs())
        if _const(args[5]):
            raise UnsupportedLayer(f"layer {name}: BatchNorm was traced in training mode (batch statistics)")
        return Layer(name, "batchnorm", scale=_bn_scale(getattr(m, "weight", None), m.running_var, _const(args[7])))
    if kind == "MaxPool2d" and op_kinds == ["aten::max_pool2d"]:
        k, s, _, d = (_const(v) for v in list(ops[0].inputs())[1:5])
        return Layer(name, "maxpool2d", kernel=_pair(k), stride=_pair(s or k), dilation=_pair(d))
    if kind in ("AvgPool2d", "AdaptiveAvgPool2d"):
        return Layer(name, "avgpool", module=m)
    qualified = re.sub(r"___torch_mangle_\d+\.", "", m._c._type().qualified_name())  # traced twice: mangled
    if qualified == _LAYERS + "GroupSort" and op_kinds == ["aten::unflatten", "aten::sort", "aten::flatten"] \
            and _const(list(ops[1].inputs())[1]) >= 1 and not list(ops[1].outputs())[1].uses():
        # the sorted values (never the indices) of a reshape: a permutation of the input, 1-Lipschitz
        return Layer(name, "activation", slope=1.0)
    if qualified == _LAYERS + "ScaledAvgPool2d" and op_kinds == ["aten::avg_pool2d", "aten::mul"] \
            and float(_const(list(ops[1].inputs())[1])) > 0:
        return Layer(name, "avgpool", module=m)  # a non-negative linear map
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
                "plain chain of layers; load the model as an eager nn.Module (state_dict + factory) to bound it")
    ret = list(m.graph.outputs())[0]
    if ret.debugName() != current.debugName():
        raise UnsupportedLayer(f"TorchScript module {prefix or m.original_name}: forward does not return the chain")
    out = []
    for c in chain:
        out += script_chain(children[c], f"{prefix}.{c}" if prefix else c)
    return out



# --- a hookable eager copy of a traced model ------------------------------------------------------

class Opaque(nn.Module):
    """A scripted layer we could not rebuild: an eager shell so that forward hooks can be attached."""

    def __init__(self, inner: nn.Module, kind: str):
        super().__init__()
        self.inner, self.kind = inner, kind

    def forward(self, x):
        return self.inner(x)


def _ints(s: str) -> tuple[int, ...]:
    return tuple(int(v) for v in re.findall(r"-?\d+", s))


_NUM = r"(-?[\d.e+-]+)"


def _rebuild(child: torch.jit.ScriptModule) -> nn.Module | None:
    """An eager layer equal to a traced one, from its parameters and the constants in its code."""
    kind, code = child.original_name, getattr(child, "code", "")
    params = dict(child.named_parameters(recurse=False))
    buffers = dict(child.named_buffers(recurse=False))
    if kind in ("ReLU", "Tanh", "Sigmoid", "Identity", "Dropout"):
        return getattr(nn, kind)()
    if kind == "Conv2d":
        m = re.search(r"_convolution\(\w+, \w+, (\w+), (\[[-\d, ]+\]), (\[[-\d, ]+\]), (\[[-\d, ]+\]), "
                      r"False, \[[-\d, ]+\], (\d+)", code)
        if not m:
            return None
        w = params["weight"]
        layer = nn.Conv2d(w.shape[1] * int(m[5]), w.shape[0], tuple(w.shape[2:]), stride=_ints(m[2]),
                          padding=_ints(m[3]), dilation=_ints(m[4]), groups=int(m[5]), bias="bias" in params)
    elif kind == "BatchNorm2d":
        m = re.search(r"batch_norm\(\w+, \w+, \w+, \w+, \w+, False, " + _NUM + ", " + _NUM, code)
        if not m or "running_mean" not in buffers:
            return None
        layer = nn.BatchNorm2d(buffers["running_mean"].numel(), eps=float(m[2]), affine="weight" in params)
    elif kind == "Linear":
        w = params["weight"]
        layer = nn.Linear(w.shape[1], w.shape[0], bias="bias" in params)
    elif kind in ("MaxPool2d", "AvgPool2d"):
        m = re.search(r"(max|avg)_pool2d\(\w+, (\[[-\d, ]+\]), (\[[-\d, ]*\]), (\[[-\d, ]+\])", code)
        if not m:
            return None
        k, s, p = _ints(m[2]), _ints(m[3]) or None, _ints(m[4])
        layer = nn.MaxPool2d(k, s, p) if kind == "MaxPool2d" else nn.AvgPool2d(k, s, p)
    elif kind == "AdaptiveAvgPool2d":
        m = re.search(r"adaptive_avg_pool2d\(\w+, (\[[-\d, ]+\])", code)
        if not m:
            return None
        layer = nn.AdaptiveAvgPool2d(_ints(m[1]))
    elif kind == "Flatten":
        m = re.search(r"flatten\(\w+, (-?\d+)(?:, (-?\d+))?\)", code)
        layer = nn.Flatten(int(m[1]), int(m[2]) if m and m[2] else -1) if m else nn.Flatten()
    else:
        return None
    state = {**{k: v.detach() for k, v in params.items()}, **{k: v.detach() for k, v in buffers.items()}}
    layer.load_state_dict(state, strict=False)
    return layer


def hookable(scripted: torch.jit.ScriptModule, probe: torch.Tensor) -> tuple[nn.Module | None, str]:
    """A hookable eager copy of a traced sequential model, verified layer by layer on `probe`."""
    buf = io.BytesIO()  # in-process traces have uncallable submodules; a saved and reloaded one has not
    torch.jit.save(scripted, buf)
    buf.seek(0)
    scripted = torch.jit.load(buf, map_location="cpu")
    children = list(scripted.named_children())
    if not children:
        return None, "the TorchScript model has no submodules"
    layers, opaque, h = OrderedDict(), [], probe
    with torch.no_grad():
        for name, child in children:
            try:
                out = child(h)
            except Exception as e:  # not a chain: the children do not feed each other
                return None, f"the TorchScript model is not a sequential chain ({name}: {type(e).__name__})"
            layer = _rebuild(child)
            if layer is not None:
                layer.eval()
                if not (layer(h).shape == out.shape and torch.allclose(layer(h), out, rtol=1e-4, atol=1e-5)):
                    layer = None
            if layer is None:
                opaque.append(f"{name} ({child.original_name})")
                layer = Opaque(child, child.original_name)
            layers[name] = layer
            h = out
        seq = nn.Sequential(layers).eval()
        if not torch.allclose(seq(probe), scripted(probe), rtol=1e-4, atol=1e-4):
            return None, "the TorchScript model's children in order do not reproduce its output"
    note = f"layers kept opaque (no LRP rule): {opaque}" if opaque else ""
    return seq, note


# --- cutting a model before its head ----------------------------------------------------------------

class SplitHead(torch.nn.Module):
    """A Sequential model cut before its last Linear layer: (features, logits) in one forward pass."""

    def __init__(self, body: torch.nn.Module, head: torch.nn.Module):
        super().__init__()
        self.body, self.head = body, head

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.body(x).flatten(1)
        return f, self.head(f)


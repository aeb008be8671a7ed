"""What the explanation and ODD methods need of a model's structure, read through the layer graph's reading.

- `hookable`: an eager, hookable copy of a traced sequential model, rebuilt layer by layer from the layer
  descriptions of `certification.graph` (the one reading of a model: `graph.describe_script` gives each traced
  leaf's stride, padding, eps) and verified on a probe (captum needs forward hooks; attribution methods and
  root causes).
- `SplitHead`: a Sequential cut before its last Linear layer, (features, logits) in one pass (the ODD
  monitor's feature extractor).
A layer that cannot be rebuilt stays an `Opaque` shell around the traced one, named in the note.
"""

from __future__ import annotations

import io
from collections import OrderedDict

import torch
from torch import nn

from trustcase.certification import graph as G

# --- a hookable eager copy of a traced model ------------------------------------------------------

class Opaque(nn.Module):
    """A scripted layer we could not rebuild: an eager shell so that forward hooks can be attached."""

    def __init__(self, inner: nn.Module, kind: str):
        super().__init__()
        self.inner, self.kind = inner, kind

    def forward(self, x):
        return self.inner(x)


def _rebuild(child: torch.jit.ScriptModule) -> nn.Module | None:
    """An eager layer equal to a traced one, from its parameters and the graph's description of it."""
    kind = child.original_name
    params = dict(child.named_parameters(recurse=False))
    buffers = dict(child.named_buffers(recurse=False))
    if kind in ("ReLU", "Tanh", "Sigmoid", "Identity", "Dropout"):
        return getattr(nn, kind)()
    if kind == "Flatten":
        ops = [n for n in G._ops(child) if n.kind() == "aten::flatten"]
        if len(ops) != 1:
            return None
        start, end = (int(G._const(v)) for v in list(ops[0].inputs())[1:3])
        return nn.Flatten(start, end)
    try:
        d = G.describe_script(kind, child)
    except G.UnsupportedLayer:
        return None
    if kind == "Conv2d" and d.kind == "conv2d":
        w = params["weight"]
        layer = nn.Conv2d(w.shape[1] * d.groups, w.shape[0], tuple(w.shape[2:]), stride=d.stride, padding=d.padding,
                          dilation=d.dilation, groups=d.groups, bias="bias" in params)
    elif kind == "BatchNorm2d" and d.kind == "batchnorm" and "running_mean" in buffers:
        layer = nn.BatchNorm2d(buffers["running_mean"].numel(), eps=d.eps, affine="weight" in params)
    elif kind == "Linear" and d.kind == "linear":
        w = params["weight"]
        layer = nn.Linear(w.shape[1], w.shape[0], bias="bias" in params)
    elif kind == "MaxPool2d" and d.kind == "maxpool2d":
        layer = nn.MaxPool2d(d.kernel, d.stride, d.padding, d.dilation, ceil_mode=d.ceil)
    elif kind == "AvgPool2d" and d.kind == "avgpool":
        layer = nn.AvgPool2d(d.kernel, d.stride, d.padding)
    elif kind == "AdaptiveAvgPool2d" and d.output is not None:
        layer = nn.AdaptiveAvgPool2d(d.output)
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
        chained, whole = seq(probe), scripted(probe)
        if chained.shape != whole.shape or not torch.allclose(chained, whole, rtol=1e-4, atol=1e-4):
            return None, "the TorchScript model's children in order do not reproduce its output"
    note = f"layers kept opaque (no LRP rule): {opaque}" if opaque else ""
    return seq, note


def convolution_taps(scripted: torch.jit.ScriptModule):
    """A TorchScript model's forward that also returns the output of each of its convolutions, in execution order:
    `run(x) -> (output, [activations])`, differentiable (a script module takes no hooks, and a model that is not a
    sequential chain has no `hookable` copy). Read from its inlined graph; convolutions inside control flow are not
    tapped. None when the graph has no convolution."""
    g = scripted.forward.graph.copy()
    torch._C._jit_pass_inline(g)
    taps = [n.output() for n in g.nodes() if n.kind() in ("aten::_convolution", "aten::conv2d")]
    if not taps:
        return None
    values = [next(iter(g.outputs())), *taps]
    pack = g.create("prim::TupleConstruct", values)
    pack.output().setType(torch._C.TupleType([v.type() for v in values]))
    g.appendNode(pack)
    g.eraseOutput(0)
    g.registerOutput(pack.output())
    tapped = torch._C._create_function_from_graph("forward_with_convolutions", g)

    def run(x: torch.Tensor):
        out = tapped(scripted._c, x)
        return out[0], list(out[1:])

    return run


# --- cutting a model before its head ----------------------------------------------------------------

class SplitHead(torch.nn.Module):
    """A Sequential model cut before its last Linear layer: (features, logits) in one forward pass."""

    def __init__(self, body: torch.nn.Module, head: torch.nn.Module):
        super().__init__()
        self.body, self.head = body, head

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.body(x).flatten(1)
        return f, self.head(f)


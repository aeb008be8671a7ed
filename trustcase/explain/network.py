"""The model as attribution methods see it (captum's view): a forward on normalised inputs, named layers,
and the surgery that explains an internal unit like a class (`Network.focus`) or re-draws weights for the
sanity test (`Network.randomised`).

Traced TorchScript models do not accept hooks, which captum's layer methods and LRP need. `Network`
rebuilds an eager `nn.Sequential` from a traced sequential model (real Conv2d / BatchNorm2d / Linear /
... layers with the same parameters, each verified against the scripted layer on a probe input);
layers it cannot rebuild are wrapped so hooks still work, and if the chain does not reproduce the
model, layer methods are refused with that reason.
"""

from __future__ import annotations

import copy
import math
from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import nn

from trustcase.errors import Unsupported
from trustcase.explain import ExplainError
from trustcase.models import anatomy
from trustcase.models.classifier import Classifier


class Readout(nn.Linear):
    """A dense layer on flattened inputs. Flatten + Linear become one layer in LRP's view of a model (captum
    has no LRP rule for Flatten), and an internal unit is read out by one (a channel's mean, or one value)."""

    def forward(self, x):
        return nn.functional.linear(x.flatten(1), self.weight, self.bias)

    @classmethod
    def of(cls, linear: nn.Linear) -> Readout:
        r = cls(linear.in_features, linear.out_features, bias=linear.bias is not None)
        r.load_state_dict(linear.state_dict())
        return r.eval()

    @classmethod
    def unit(cls, shape: tuple[int, ...], channel: int, position: tuple[int, ...] | None) -> Readout:
        w = torch.zeros(shape)
        if position is None:
            w[channel] = 1.0 / max(1, math.prod(shape[1:]))
        else:
            w[(channel, *position)] = 1.0
        r = cls(w.numel(), 1, bias=False)
        with torch.no_grad():
            r.weight.copy_(w.reshape(1, -1))
        return r.requires_grad_(False).eval()


@dataclass(frozen=True)
class Neuron:
    """An internal unit as the explained output: a channel of a named layer (its mean over positions), or
    one activation when `position` is given (e.g. (row, col) of a convolution's feature map)."""

    layer: str
    channel: int
    position: tuple[int, ...] | None = None

    def label(self) -> str:
        at = f" at {self.position}" if self.position is not None else ""
        return f"channel {self.channel} of layer {self.layer}{at}"


class _Tapped(nn.Module):
    """The model run whole, its output replaced by the read-out of one layer's activation (non-sequential models)."""

    def __init__(self, module: nn.Module, layer: nn.Module, readout: Readout):
        super().__init__()
        self.module, self.readout, self._layer = module, readout, [layer]

    def forward(self, x):
        seen = []
        h = self._layer[0].register_forward_hook(lambda m, i, o: seen.append(o))
        try:
            self.module(x)
        finally:
            h.remove()
        return self.readout(seen[-1])


class Network:
    """A classifier as attribution methods see it: a forward on normalised inputs and named layers.

    `module` is an eager nn.Module when the model has gradients (a traced model is rebuilt, see the
    module docstring), None for a black box, whose forward runs through `Classifier.forward`.
    """

    def __init__(self, model: Classifier, module: nn.Module | None = None):
        self.model = model
        self.note = ""
        self.unit: Neuron | None = None  # set on the view of an internal unit (see `focus`)
        if module is None and model.module is not None:
            module = model.module
            if isinstance(module, torch.jit.ScriptModule):
                probe = torch.randn(2, *model.spec.input_shape, generator=torch.Generator().manual_seed(0))
                eager, self.note = anatomy.hookable(module, probe)
                module = eager if eager is not None else module
        self.module = module
        if module is not None:
            module.eval()
            lo, hi = model.spec.value_range
            span = model._scale * (hi - lo)  # normalised width of the pixel range, per channel
            self.input_range = float(span.mean())
        else:
            self.input_range = float((model._scale * (model.spec.value_range[1] - model.spec.value_range[0])).mean())

    @property
    def differentiable(self) -> bool:
        return self.module is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x) if self.module is not None else self.model.forward(x)

    def probabilities(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.forward(x), dim=1)

    def score(self, x: torch.Tensor) -> torch.Tensor:
        """What perturbation methods follow: class probabilities, or the raw value of an internal unit."""
        return self.probabilities(x) if self.unit is None else self.forward(x)

    def activations(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The output of `layer` for inputs `x` (no gradient)."""
        seen = []
        h = layer.register_forward_hook(lambda m, i, o: seen.append(o.detach()))
        try:
            with torch.no_grad():
                self.forward(x)
        finally:
            h.remove()
        return seen[-1]

    def focus(self, neuron: Neuron) -> Network:
        """The network whose single output is `neuron`: explain an internal unit like a class (target 0)."""
        if not self.differentiable:
            raise Unsupported(f"{neuron.label()}: internal units need the model's internals; the model is a black box")
        name, layer = self.layer(neuron.layer)
        shape = tuple(self.activations(layer, torch.zeros(1, *self.model.spec.input_shape)).shape[1:])
        if not 0 <= neuron.channel < shape[0]:
            raise ExplainError(f"channel {neuron.channel} of layer {name!r} does not exist; channels: 0-{shape[0] - 1}")
        if neuron.position is not None and (len(neuron.position) != len(shape) - 1 or not all(
                0 <= p < n for p, n in zip(neuron.position, shape[1:]))):
            raise ExplainError(f"position {tuple(neuron.position)} of layer {name!r} does not exist; its channels are "
                             f"{'x'.join(map(str, shape[1:])) or 'scalars'}")
        readout = Readout.unit(shape, neuron.channel, neuron.position)
        children = list(self.module.named_children()) if isinstance(self.module, nn.Sequential) else []
        names = [n for n, _ in children]
        if name in names:  # a sequential model: cut it after the layer, so every method (LRP too) sees a chain
            module = nn.Sequential(OrderedDict(children[:names.index(name) + 1] + [("unit", readout)])).eval()
        else:
            module = _Tapped(self.module, layer, readout).eval()
        view = Network(self.model, module)
        view.unit, view.note = neuron, self.note
        return view

    def layers(self) -> dict[str, nn.Module]:
        """Leaf layers by dotted name (empty when layers cannot be hooked)."""
        if self.module is None or isinstance(self.module, torch.jit.ScriptModule):
            return {}
        out = {}
        for n, m in self.module.named_modules():
            if n and not any(n.startswith(o + ".") for o in out if isinstance(out[o], anatomy.Opaque)):
                if isinstance(m, anatomy.Opaque) or not list(m.children()):
                    out[n] = m
        return out

    @staticmethod
    def kind(layer: nn.Module) -> str:
        return layer.kind if isinstance(layer, anatomy.Opaque) else type(layer).__name__

    def conv_layers(self) -> list[str]:
        return [n for n, m in self.layers().items() if self.kind(m) == "Conv2d"]

    def layer(self, name: str | None = None) -> tuple[str, nn.Module]:
        """A named layer, or the last convolution; clear errors when there is none."""
        if not self.differentiable:
            raise Unsupported("layer attributions need the model's internals; the model is a black box")
        layers = self.layers()
        if not layers:
            raise Unsupported(f"layer attributions need hookable layers: {self.note or 'none found'}")
        if name is None:
            convs = self.conv_layers()
            if not convs:
                raise Unsupported(f"the model has no Conv2d layer; name one of {self.describe()}")
            name = convs[-1]
        if name not in layers:
            raise ExplainError(f"layer {name!r} does not exist; layers: {self.describe()}")
        return name, layers[name]

    def describe(self) -> list[str]:
        return [f"{n} ({self.kind(m)})" for n, m in self.layers().items()]

    def parametric_layers(self) -> int:
        if self.module is None:
            return 0
        return sum(any(p.ndim > 1 for p in m.parameters(recurse=False)) for m in self.module.modules())

    def randomised(self, top_layers: int, seed: int, independent: bool = False) -> Network:
        """A copy with the parameters of its last `top_layers` parametric layers re-drawn (Adebayo et al.):
        cascading, or, `independent`, only the `top_layers`-th layer from the output."""
        if self.module is None:
            raise Unsupported("model randomisation needs the model's weights; the model is a black box")
        module = copy.deepcopy(self.module)
        # convolutions and linear layers (weights of rank >= 2), from the output down
        parametric = [m for m in module.modules() if any(p.ndim > 1 for p in m.parameters(recurse=False))]
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for m in parametric[::-1][top_layers - 1 if independent else 0:top_layers]:
                for p in m.parameters(recurse=False):
                    fan_in = p[0].numel() if p.ndim > 1 else p.numel()
                    p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(fan_in))
        return Network(self.model, module)

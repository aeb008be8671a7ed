"""Attribution methods behind one interface, on captum: which input pixels a decision rests on.

    net = Network(classifier)                    # once per model
    a = attribute(net, "integrated_gradients", x, target, baseline=0.0, seed=0, options={"n_steps": 32})
    a.maps  # (B, C, H, W) or (B, 1, H, W) in the model's normalised input space; a.heatmap() -> (B, H, W)
    attribute(net, "lrp", x, Neuron("8", channel=3))  # an internal unit instead of a class

Methods (registry `METHODS`, by name; each one class and one entry point):

| name | on | gradients | notes |
|---|---|---|---|
| saliency | Saliency | yes | abs of the gradient of the target logit |
| input_x_gradient | InputXGradient | yes | gradient x input |
| integrated_gradients | IntegratedGradients | yes | also returns the convergence delta (completeness) |
| smoothgrad, smoothgrad_squared, vargrad | NoiseTunnel(Saliency) | yes | noise level as a fraction of the input range |
| guided_backprop, deconvolution | GuidedBackprop, Deconvolution | yes | ReLU rules of the backward pass |
| deep_lift, deep_lift_shap | DeepLift, DeepLiftShap | yes | rescale rule; shap: references = baseline + noise |
| lrp | LRP | yes | epsilon, gamma, z-plus or composite per layer type; Flatten+Linear merged |
| grad_cam, guided_grad_cam | LayerGradCam, GuidedGradCam | yes | last Conv2d by default, or `layer: <name>` |
| grad_cam_pp | (Chattopadhay 2018) | yes | closed-form alpha weights |
| score_cam | (Wang 2020) | activations | channel maps as input masks |
| cam | (Zhou 2016) | weights | global-average-pooling networks only |
| occlusion | Occlusion | no | sliding window replaced by the baseline |
| rise | (RISE, Petsiuk 2018) | no | random low-resolution masks, probability-weighted |
| sobol | (Fel 2021) | no | total Sobol indices of grid masks, scrambled Sobol QMC designs |
| lime, kernel_shap | Lime, KernelShap | no | SLIC / quickshift superpixels (scikit-image) or a grid; closed-form fits |

A target is a class (per item or one for all) or a `Neuron` (a channel of a named layer, or one of its
activations): `Network.focus` turns it into a one-output network (a sequential model is cut after the
layer), so every method explains it the same way. Unknown layers, channels, positions and classes are
errors that list the valid ones; a method that cannot run on a model raises `Unsupported` with the reason.

Methods without gradients need only predictions, so they also explain black boxes (ONNX). Every
method evaluates the model in chunks bounded by `MAX_EVAL_ELEMENTS` input values (captum's internal
batch sizes), so a large number of samples costs time, never memory. Every call runs under a forked
torch RNG seeded by the caller: the same seed gives the same maps.

Traced TorchScript models do not accept hooks, which captum's layer methods and LRP need. `Network`
rebuilds an eager `nn.Sequential` from a traced sequential model (real Conv2d / BatchNorm2d / Linear /
... layers with the same parameters, each verified against the scripted layer on a probe input);
layers it cannot rebuild are wrapped so hooks still work, and if the chain does not reproduce the
model, layer methods are refused with that reason.
"""

from __future__ import annotations

import copy
import hashlib
import math
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from typing import ClassVar, Literal

import numpy as np
import torch
from captum._utils.models.linear_model import LinearModel
from captum.attr import (
    LRP,
    Deconvolution,
    DeepLift,
    DeepLiftShap,
    GuidedBackprop,
    GuidedGradCam,
    InputXGradient,
    IntegratedGradients,
    KernelShap,
    LayerAttribution,
    LayerGradCam,
    Lime,
    NoiseTunnel,
    Occlusion,
    Saliency,
)
from captum.attr._utils.lrp_rules import Alpha1_Beta0_Rule, EpsilonRule, GammaRule
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from scipy.stats import qmc
from torch import nn

from trustcase.errors import Unsupported
from trustcase.models import anatomy
from trustcase.models.classifier import Classifier
from trustcase.registry import Registry

MAX_EVAL_ELEMENTS = 1 << 23  # input values per forward pass (32 MB of float32): chunk size for every method


# --- the model as captum sees it ------------------------------------------------------------------

class _Readout(nn.Linear):
    """A dense layer on flattened inputs. Flatten + Linear become one layer in LRP's view of a model (captum
    has no LRP rule for Flatten), and an internal unit is read out by one (a channel's mean, or one value)."""

    def forward(self, x):
        return nn.functional.linear(x.flatten(1), self.weight, self.bias)

    @classmethod
    def of(cls, linear: nn.Linear) -> _Readout:
        r = cls(linear.in_features, linear.out_features, bias=linear.bias is not None)
        r.load_state_dict(linear.state_dict())
        return r.eval()

    @classmethod
    def unit(cls, shape: tuple[int, ...], channel: int, position: tuple[int, ...] | None) -> _Readout:
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

    def __init__(self, module: nn.Module, layer: nn.Module, readout: _Readout):
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
            raise ValueError(f"channel {neuron.channel} of layer {name!r} does not exist; channels: 0-{shape[0] - 1}")
        if neuron.position is not None and (len(neuron.position) != len(shape) - 1 or not all(
                0 <= p < n for p, n in zip(neuron.position, shape[1:]))):
            raise ValueError(f"position {tuple(neuron.position)} of layer {name!r} does not exist; its channels are "
                             f"{'x'.join(map(str, shape[1:])) or 'scalars'}")
        readout = _Readout.unit(shape, neuron.channel, neuron.position)
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
            raise ValueError(f"layer {name!r} does not exist; layers: {self.describe()}")
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


# --- methods -------------------------------------------------------------------------------------

class Options(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _chunk(per_item: int, factor: int = 1) -> int:
    """How many expanded inputs fit one forward pass under the memory budget."""
    return max(1, MAX_EVAL_ELEMENTS // max(1, per_item * factor))


@dataclass
class Attribution:
    maps: torch.Tensor  # (B, C, H, W) or (B, 1, H, W), normalised input space
    delta: torch.Tensor | None = None  # convergence delta per item (integrated gradients)

    def heatmap(self) -> np.ndarray:
        """(B, H, W) float32: channels summed."""
        return self.maps.detach().sum(dim=1).float().numpy()


class Method:
    name: ClassVar[str]
    needs_gradients: ClassVar[bool] = True
    Options: ClassVar[type[Options]] = Options

    def __init__(self, net: Network, options: Options):
        self.net, self.options = net, options

    def attribute(self, x: torch.Tensor, target: torch.Tensor, baseline: float | torch.Tensor) -> Attribution:
        raise NotImplementedError


METHODS = Registry("trustcase.attribution_methods", Method, "attribution method")


def options_for(method: str, options: dict | None = None) -> Options:
    """Validated options of a method; unknown method or option names are errors that list the known ones."""
    cls = METHODS.resolve(method)  # RegistryError (a ValueError) names the known methods
    try:
        return cls.Options.model_validate(options or {})
    except ValidationError as e:
        msgs = "; ".join(f"{'.'.join(map(str, x['loc']))}: {x['msg']}" for x in e.errors())
        raise ValueError(f"{method} options: {msgs}") from None


def make(net: Network, method: str | type[Method], options: dict | Options | None = None) -> Method:
    cls = method if isinstance(method, type) else METHODS.resolve(method)
    if not isinstance(options, Options):
        options = options_for(method, options) if isinstance(method, str) else cls.Options.model_validate(options or {})
    if cls.needs_gradients and not net.differentiable:
        free = sorted(n for n in METHODS if not METHODS[n].needs_gradients)
        raise Unsupported(f"{cls.name} needs gradients; the model is a black box (use {', '.join(free)})")
    return cls(net, options)


def attribute(net: Network, method: str | Method, x: torch.Tensor, target: torch.Tensor | int | Neuron,
              baseline: float | torch.Tensor = 0.0, seed: int = 0, options: dict | None = None) -> Attribution:
    """Attributions of `target` for normalised inputs `x` (B, C, H, W); deterministic for `seed`.

    `target`: a class per item, one class for all, or a `Neuron` (an internal unit of a named layer)."""
    if isinstance(target, Neuron):
        net = net.focus(target)
        m = make(net, type(method), method.options) if isinstance(method, Method) else make(net, method, options)
        target = 0
    else:
        m = method if isinstance(method, Method) else make(net, method, options)
    if isinstance(target, int):
        target = torch.full((len(x),), target, dtype=torch.long)
    n_out = 1 if net.unit is not None else net.model.n_classes
    bad = [int(t) for t in target.unique() if not 0 <= int(t) < n_out]
    if bad:
        raise ValueError(f"target class {bad[0]} does not exist; classes: "
                         f"{dict(enumerate(net.model.spec.class_names))}")
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(did not already require gradients|multiple inputs for Lime"
                                                  "|Setting (forward, )?backward hooks)")
        torch.manual_seed(seed)
        out = m.attribute(x.detach().float(), target.long(), baseline)
    return Attribution(out.maps.detach(), None if out.delta is None else out.delta.detach())


def _item_seed(base: int, x: torch.Tensor) -> int:
    """A seed per item from its content: the same maps for an item whatever batch it comes in."""
    h = hashlib.blake2b(x.detach().numpy().tobytes(), digest_size=8, key=base.to_bytes(8, "little"))
    return int.from_bytes(h.digest(), "little") & (2**63 - 1)


def _base_seed() -> int:
    return int(torch.randint(0, 2**31 - 1, (1,)))  # from the caller's seeded RNG


def _batched(fn, x: torch.Tensor, target: torch.Tensor, per: int) -> torch.Tensor:
    """fn over slices of at most `per` items (methods whose memory grows with a sample count per item)."""
    return torch.cat([fn(x[s:s + per], target[s:s + per]) for s in range(0, len(x), max(1, per))])


class SaliencyMethod(Method):
    name = "saliency"

    class Options(Options):
        abs: bool = True

    def attribute(self, x, target, baseline):
        return Attribution(Saliency(self.net.forward).attribute(x, target=target, abs=self.options.abs))


class IntegratedGradientsMethod(Method):
    name = "integrated_gradients"

    class Options(Options):
        n_steps: int = Field(32, ge=1, le=10_000)
        method: Literal["gausslegendre", "riemann_trapezoid", "riemann_middle"] = "gausslegendre"

    def attribute(self, x, target, baseline):
        o = self.options
        ig = IntegratedGradients(self.net.forward)
        maps, delta = ig.attribute(x, baselines=baseline, target=target, n_steps=o.n_steps, method=o.method,
                                   internal_batch_size=_chunk(x[0].numel()), return_convergence_delta=True)
        return Attribution(maps, delta)


class SmoothGradMethod(Method):
    name = "smoothgrad"

    class Options(Options):
        samples: int = Field(16, ge=1, le=10_000)
        noise_level: float = Field(0.15, gt=0, le=1, description="noise std as a fraction of the input range")

    nt_type: ClassVar[str] = "smoothgrad"
    absolute: ClassVar[bool] = True

    def attribute(self, x, target, baseline):
        o = self.options
        nt = NoiseTunnel(Saliency(self.net.forward))
        base = int(torch.randint(0, 2**31 - 1, (1,)))  # from the caller's seeded RNG
        maps = []
        for j in range(len(x)):  # each item's noise from (seed, its content): the same in any batch
            digest = hashlib.sha256(base.to_bytes(8, "little") + x[j].contiguous().numpy().tobytes()).digest()
            torch.manual_seed(int.from_bytes(digest[:8], "little") >> 1)
            maps.append(nt.attribute(x[j:j + 1], nt_type=self.nt_type, nt_samples=o.samples,
                                     stdevs=o.noise_level * self.net.input_range, target=target[j:j + 1],
                                     nt_samples_batch_size=min(o.samples, _chunk(x[0].numel())), abs=self.absolute))
        return Attribution(torch.cat(maps))


class VarGradMethod(SmoothGradMethod):
    """VarGrad (Adebayo et al. 2018): the variance of the gradient under input noise."""

    name = "vargrad"
    nt_type = "vargrad"
    absolute = False


class SmoothGradSquaredMethod(VarGradMethod):
    """SmoothGrad-squared, also called SquareGrad (Hooker et al. 2019): the mean squared gradient under noise."""

    name = "smoothgrad_squared"
    nt_type = "smoothgrad_sq"


class InputXGradientMethod(Method):
    name = "input_x_gradient"

    def attribute(self, x, target, baseline):
        return Attribution(InputXGradient(self.net.forward).attribute(x, target=target))


class GuidedBackpropMethod(Method):
    """Guided backpropagation (Springenberg et al. 2015): only positive gradients pass the ReLUs backwards."""

    name = "guided_backprop"
    explainer: ClassVar[type] = GuidedBackprop

    def attribute(self, x, target, baseline):
        return Attribution(self.explainer(self.net.module).attribute(x, target=target))


class DeconvolutionMethod(GuidedBackpropMethod):
    """DeconvNet (Zeiler and Fergus 2014): the ReLUs applied to the backward signal, not the forward one."""

    name = "deconvolution"
    explainer = Deconvolution


class DeepLiftMethod(Method):
    """DeepLIFT rescale rule (Shrikumar et al. 2017): contributions relative to the baseline, summing to the
    difference of the outputs."""

    name = "deep_lift"

    def attribute(self, x, target, baseline):
        maps, delta = DeepLift(self.net.module).attribute(x, baselines=baseline, target=target,
                                                          return_convergence_delta=True)
        return Attribution(maps, delta)


class DeepLiftShapMethod(Method):
    """DeepLIFT averaged over a distribution of references (Lundberg and Lee 2017): the baseline plus Gaussian
    noise, the same references for every item."""

    name = "deep_lift_shap"

    class Options(Options):
        references: int = Field(8, ge=2, le=1000)
        noise_level: float = Field(0.1, ge=0, le=1, description="reference noise std, fraction of the input range")

    def attribute(self, x, target, baseline):
        o = self.options
        gen = torch.Generator().manual_seed(_base_seed())
        refs = torch.as_tensor(baseline, dtype=x.dtype).expand(1, *x.shape[1:]) + \
            o.noise_level * self.net.input_range * torch.randn(o.references, *x.shape[1:], generator=gen)
        dls = DeepLiftShap(self.net.module)
        return Attribution(_batched(lambda xs, ts: dls.attribute(xs, baselines=refs, target=ts), x, target,
                                    _chunk(x[0].numel(), o.references)))


_RULES = {"epsilon": EpsilonRule, "gamma": GammaRule, "z_plus": Alpha1_Beta0_Rule}
_WEIGHTED = ("Conv2d", "Linear")


def _fold(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """A convolution followed by an eval-mode batch norm, as one convolution (the same function)."""
    out = copy.deepcopy(conv)
    scale = (bn.weight if bn.affine else torch.ones_like(bn.running_var)) / torch.sqrt(bn.running_var + bn.eps)
    shift = bn.bias if bn.affine else torch.zeros_like(bn.running_mean)
    bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
    with torch.no_grad():
        out.weight = nn.Parameter(conv.weight * scale[:, None, None, None])
        out.bias = nn.Parameter((bias - bn.running_mean) * scale + shift)
    return out.eval()


class LrpMethod(Method):
    """Layer-wise relevance propagation (Bach et al. 2015) on captum's LRP: one rule everywhere, or a composite
    rule per layer type (Montavon et al. 2019: gamma in convolutions, epsilon in dense layers). A batch norm
    after a convolution is folded into it (canonisation); pooling and other batch-norm layers take the epsilon
    rule, ReLU / dropout pass relevance through; any other layer is refused with its name. With epsilon -> 0
    on a bias-free ReLU network, LRP equals Gradient x Input."""

    name = "lrp"

    class Options(Options):
        rule: Literal["epsilon", "gamma", "z_plus", "composite"] = "epsilon"  # the steadiest on the demo model
        epsilon: float = Field(0.25, gt=0, description="stabiliser of the epsilon rule (0.25: Montavon et al. 2019)")
        gamma: float = Field(0.25, ge=0)
        composite: dict[Literal["Conv2d", "Linear"], Literal["epsilon", "gamma", "z_plus"]] = {
            "Conv2d": "gamma", "Linear": "epsilon"}

    def __init__(self, net, options):
        super().__init__(net, options)
        self.view = self._view(net.module)

    def _rule(self, kind: str):
        o = self.options
        name = (o.composite.get(kind, "epsilon") if o.rule == "composite" else o.rule) if kind in _WEIGHTED \
            else "epsilon"
        return {"epsilon": lambda: EpsilonRule(o.epsilon), "gamma": lambda: GammaRule(o.gamma),
                "z_plus": Alpha1_Beta0_Rule}[name]()

    def _view(self, module: nn.Module) -> nn.Module:
        """A copy captum's LRP accepts: Flatten + Linear merged, each layer given its rule."""
        view = copy.deepcopy(module)
        for container in [m for m in view.modules() if isinstance(m, nn.Sequential)]:
            # dropout (eval) and identity layers do nothing: left out, so that Flatten meets its Linear
            items = [(n, m) for n, m in container.named_children() if not isinstance(m, (nn.Dropout, nn.Identity))]
            merged, i = OrderedDict(), 0
            while i < len(items):
                (n, m), nxt = items[i], items[i + 1][1] if i + 1 < len(items) else None
                if isinstance(m, nn.Conv2d) and isinstance(nxt, nn.BatchNorm2d):
                    merged[n] = _fold(m, nxt)  # canonisation: relevance is not divided by a batch-norm shift
                    i += 2
                    continue
                if isinstance(m, nn.Flatten) and m.start_dim == 1 and isinstance(nxt, nn.Linear):
                    merged[items[i + 1][0]] = _Readout.of(nxt)
                    i += 2
                    continue
                merged[n] = m
                i += 1
            for n in list(container._modules):
                del container._modules[n]
            for n, m in merged.items():
                container.add_module(n, m)
        self._attach(view)  # every layer has a rule, or the method is refused now
        return view.eval()

    def _attach(self, view: nn.Module) -> None:
        for name, m in view.named_modules():
            if list(m.children()):
                continue
            kind = "Linear" if isinstance(m, nn.Linear) else type(m).__name__
            if kind in ("ReLU", "Tanh"):
                continue
            if kind in ("Conv2d", "Linear", "MaxPool2d", "AvgPool2d", "AdaptiveAvgPool2d", "BatchNorm2d"):
                m.rule = self._rule(kind)
            else:
                raise Unsupported(f"LRP has no rule for layer {name!r} ({Network.kind(m)})")

    def attribute(self, x, target, baseline):
        self._attach(self.view)  # captum removes the rules after each call
        return Attribution(LRP(self.view).attribute(x, target=target))


class GradCamMethod(Method):
    name = "grad_cam"

    class Options(Options):
        layer: str | None = Field(None, description="layer name; default: the last Conv2d")
        relu: bool = True

    def __init__(self, net, options):
        super().__init__(net, options)
        self.layer_name, self.layer = net.layer(options.layer)

    def attribute(self, x, target, baseline):
        gc = LayerGradCam(self.net.forward, self.layer)
        cam = gc.attribute(x, target=target, relu_attributions=self.options.relu)
        return Attribution(LayerAttribution.interpolate(cam, tuple(x.shape[2:]), interpolate_mode="bilinear"))


def _upsample(cam: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return LayerAttribution.interpolate(cam, tuple(x.shape[2:]), interpolate_mode="bilinear")


class GuidedGradCamMethod(GradCamMethod):
    """Guided Grad-CAM (Selvaraju et al. 2017): guided backpropagation weighted by the Grad-CAM map."""

    name = "guided_grad_cam"

    class Options(Options):
        layer: str | None = Field(None, description="layer name; default: the last Conv2d")

    def attribute(self, x, target, baseline):
        return Attribution(GuidedGradCam(self.net.module, self.layer).attribute(x, target=target,
                                                                                interpolate_mode="bilinear"))


class _RectifiedCam(GradCamMethod):
    """CAM variants whose weights assume non-negative feature maps: by default the first ReLU after the last
    convolution (the rectified maps the papers use), else the convolution itself."""

    class Options(Options):
        layer: str | None = Field(None, description="layer name; default: the ReLU after the last Conv2d")
        relu: bool = True

    def __init__(self, net, options):
        if options.layer is None and net.differentiable and net.conv_layers():
            names = list(net.layers())
            after = names[names.index(net.conv_layers()[-1]) + 1:]
            relu = next((n for n in after if net.kind(net.layers()[n]) == "ReLU"), None)
            options = options.model_copy(update={"layer": relu}) if relu else options
        super().__init__(net, options)


class GradCamPlusPlusMethod(_RectifiedCam):
    """Grad-CAM++ (Chattopadhay et al. 2018): pixel-wise weights of the positive gradients, in the closed form
    of the paper for an exponential of the score (its higher derivatives are powers of the first)."""

    name = "grad_cam_pp"

    def attribute(self, x, target, baseline):
        seen = []
        h = self.layer.register_forward_hook(lambda m, i, o: seen.append(o))
        try:
            with torch.enable_grad():
                xs = x.clone().requires_grad_(True)
                out = self.net.forward(xs)
                (g,) = torch.autograd.grad(out[torch.arange(len(x)), target].sum(), seen[-1])
        finally:
            h.remove()
        a, g = seen[-1].detach(), g.detach()
        if a.ndim != 4:
            raise Unsupported(f"grad_cam_pp needs a feature map (B, C, H, W); layer {self.layer_name!r} gives "
                              f"{tuple(a.shape)}")
        g2, g3 = g * g, g * g * g
        den = 2 * g2 + a.sum(dim=(2, 3), keepdim=True) * g3
        # the closed form assumes non-negative activations; where a signed map (e.g. before a ReLU) drives the
        # denominator to zero or below, the position gets no weight instead of an unbounded one
        alpha = torch.where(den > 0, g2 / torch.where(den > 0, den, torch.ones_like(den)), torch.zeros_like(den))
        weights = (alpha * g.clamp(min=0)).sum(dim=(2, 3), keepdim=True)
        cam = (weights * a).sum(dim=1, keepdim=True)
        return Attribution(_upsample(cam.clamp(min=0) if self.options.relu else cam, x))


class ScoreCamMethod(_RectifiedCam):
    """Score-CAM (Wang et al. 2020): each channel's map, normalised to [0, 1], masks the input; the channel's
    weight is the gain of the target score over the baseline's. Gradient-free, but needs the activations."""

    name = "score_cam"

    def attribute(self, x, target, baseline):
        b, c, h, w = x.shape
        a = self.net.activations(self.layer, x)
        if a.ndim != 4:
            raise Unsupported(f"score_cam needs a feature map (B, C, H, W); layer {self.layer_name!r} gives "
                              f"{tuple(a.shape)}")
        k = a.shape[1]
        up = nn.functional.interpolate(a, size=(h, w), mode="bilinear", align_corners=False)
        lo, hi = up.amin(dim=(2, 3), keepdim=True), up.amax(dim=(2, 3), keepdim=True)
        masks = torch.where(hi > lo, (up - lo) / torch.where(hi > lo, hi - lo, torch.ones_like(hi)), 0.0)
        base = torch.as_tensor(baseline, dtype=x.dtype).expand(1, c, h, w)
        rows = torch.arange(b)
        with torch.no_grad():
            s0 = self.net.score(base.expand(b, c, h, w))[rows, target]
            gains = torch.zeros(b, k)
            per = max(1, _chunk(x[0].numel(), b))
            for s in range(0, k, per):
                m = masks[:, s:s + per, None]  # (b, k', 1, h, w)
                inputs = (x[:, None] * m + base[:, None] * (1 - m)).reshape(-1, c, h, w)
                gains[:, s:s + per] = self.net.score(inputs).reshape(b, m.shape[1], -1)[rows, :, target] - s0[:, None]
        cam = torch.einsum("bk,bkhw->bhw", gains, a)[:, None]
        return Attribution(_upsample(cam.clamp(min=0) if self.options.relu else cam, x))


class CamMethod(Method):
    """Class activation mapping (Zhou et al. 2016) for networks that end in global average pooling and one
    linear layer: each position's share of the class logit, sum_k w_ck F_k(i, j) / (h w), so that the map sums
    to the logit minus its bias. Grad-CAM (no ReLU) at the layer feeding the pooling gives the same map."""

    name = "cam"

    def __init__(self, net, options):
        super().__init__(net, options)
        why = "CAM needs a network ending in AdaptiveAvgPool2d(1) -> [Flatten, Dropout] -> Linear"
        if net.unit is not None:
            raise Unsupported("CAM explains classes, not internal units")
        layers = list(net.layers().items())
        gap = [i for i, (_, m) in enumerate(layers)
               if isinstance(m, nn.AdaptiveAvgPool2d) and m.output_size in (1, (1, 1))]
        if not gap:
            raise Unsupported(f"{why}; this model has no global average pooling")
        tail = [m for _, m in layers[gap[-1] + 1:] if not isinstance(m, (nn.Flatten, nn.Dropout, nn.Identity))]
        if len(tail) != 1 or not isinstance(tail[0], nn.Linear):
            raise Unsupported(f"{why}; after the pooling come {[Network.kind(m) for m in tail]}")
        self.gap, self.linear = layers[gap[-1]][1], tail[0]

    def attribute(self, x, target, baseline):
        seen = []
        h = self.gap.register_forward_pre_hook(lambda m, i: seen.append(i[0].detach()))
        try:
            with torch.no_grad():
                self.net.forward(x)
        finally:
            h.remove()
        f = seen[-1]
        cam = torch.einsum("bk,bkhw->bhw", self.linear.weight.detach()[target], f)[:, None] / (f.shape[2] * f.shape[3])
        return Attribution(_upsample(cam, x))


class OcclusionMethod(Method):
    name = "occlusion"
    needs_gradients = False

    class Options(Options):
        window: int = Field(8, ge=1, description="side of the occluding square, in pixels")
        stride: int = Field(4, ge=1)

    def attribute(self, x, target, baseline):
        o = self.options
        c, h, w = x.shape[1:]
        if o.window > min(h, w):
            raise ValueError(f"occlusion window {o.window} px is larger than the image ({h}x{w})")
        maps = Occlusion(self.net.forward).attribute(
            x, sliding_window_shapes=(c, o.window, o.window), strides=(c, o.stride, o.stride), baselines=baseline,
            target=target, perturbations_per_eval=_chunk(x[0].numel(), len(x)))
        return Attribution(maps)


class RiseMethod(Method):
    """RISE: the saliency of a pixel is the expected class probability over random masks that keep it."""

    name = "rise"
    needs_gradients = False

    class Options(Options):
        masks: int = Field(500, ge=1, le=100_000)
        cells: int = Field(8, ge=2, description="mask grid resolution (cells per side)")
        keep: float = Field(0.5, gt=0, lt=1, description="probability that a cell is kept")

    def masks(self, n: int, h: int, w: int, gen: torch.Generator) -> torch.Tensor:
        o = self.options
        ch, cw = math.ceil(h / o.cells), math.ceil(w / o.cells)
        grid = (torch.rand(n, 1, o.cells, o.cells, generator=gen) < o.keep).float()
        up = nn.functional.interpolate(grid, size=((o.cells + 1) * ch, (o.cells + 1) * cw), mode="bilinear",
                                       align_corners=False)
        dy = torch.randint(0, ch, (n,), generator=gen)
        dx = torch.randint(0, cw, (n,), generator=gen)
        rows = (dy[:, None] + torch.arange(h)[None])[:, :, None].expand(n, h, w)
        cols = (dx[:, None] + torch.arange(w)[None])[:, None, :].expand(n, h, w)
        return up[torch.arange(n)[:, None, None], 0, rows, cols]  # (n, h, w): random shifts of the smooth grid

    def attribute(self, x, target, baseline):
        o = self.options
        b, c, h, w = x.shape
        gen = torch.Generator().manual_seed(_base_seed())  # the same masks for every item and batch
        sal = torch.zeros(b, h, w)
        per = max(1, min(o.masks, _chunk(x[0].numel(), b)))
        rows = torch.arange(b)
        with torch.no_grad():
            done = 0
            while done < o.masks:
                m = self.masks(min(per, o.masks - done), h, w, gen)
                mm = m[None, :, None]  # (1, n, 1, h, w)
                inputs = (x[:, None] * mm + baseline * (1 - mm)).reshape(-1, c, h, w)
                p = self.net.score(inputs).reshape(b, len(m), -1)[rows, :, target]  # (b, n)
                sal += torch.einsum("bn,nhw->bhw", p, m)
                done += len(m)
        return Attribution((sal / (o.masks * o.keep))[:, None])


def _ridge_fit(model: LinearModel, dataloader, construct_kwargs: dict, **_) -> dict:
    """Closed-form weighted ridge regression for captum's interpretable models (no sklearn, deterministic)."""
    xs, ys, ws = [], [], []
    for data in dataloader:
        xs.append(data[0].double())
        ys.append(data[1].double().reshape(len(data[0]), -1))
        ws.append(data[2].double().reshape(-1) if len(data) == 3 else torch.ones(len(data[0]), dtype=torch.double))
    x, y, w = torch.cat(xs), torch.cat(ys), torch.cat(ws)
    a = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], dim=1)  # intercept column, not penalised
    reg = construct_kwargs.get("alpha", 1e-3) * torch.eye(a.shape[1], dtype=a.dtype)
    reg[-1, -1] = 0
    aw = a * w[:, None]
    coef = torch.linalg.lstsq(a.T @ aw + reg, aw.T @ y).solution  # (features + 1, outputs)
    model._construct_model_params(norm_type=None, weight_values=coef[:-1].T.float(),
                                  bias_value=coef[-1].float().reshape(1, -1).squeeze(0))
    return {}


def grid_segments(h: int, w: int, cells: int) -> torch.Tensor:
    """Square superpixels as a captum feature mask (1, 1, h, w): the same segments for every image."""
    rows = torch.div(torch.arange(h) * cells, h, rounding_mode="floor")
    cols = torch.div(torch.arange(w) * cells, w, rounding_mode="floor")
    return (rows[:, None] * cells + cols[None])[None, None]


def superpixels(x: torch.Tensor, kind: Literal["slic", "quickshift"], n: int, compactness: float) -> torch.Tensor:
    """Superpixels per image (scikit-image) as captum feature masks (B, 1, H, W), on each image scaled to [0, 1]."""
    from skimage.segmentation import quickshift, slic

    out = []
    for img in x.detach().numpy():
        lo, hi = img.min(), img.max()
        im = np.moveaxis((img - lo) / (hi - lo if hi > lo else 1.0), 0, -1).astype(np.float64)  # (H, W, C)
        if kind == "slic":
            seg = slic(im, n_segments=n, compactness=compactness, channel_axis=-1, start_label=0)
        else:
            rgb = np.repeat(im, 3, axis=-1) if im.shape[-1] == 1 else im[..., :3]
            seg = quickshift(rgb, kernel_size=max(1, round(math.sqrt(im.shape[0] * im.shape[1] / n) / 2)),
                             max_dist=10 * compactness + 2, ratio=0.5, convert2lab=False)
        out.append(np.unique(seg, return_inverse=True)[1].reshape(seg.shape))  # labels 0..k-1
    return torch.from_numpy(np.stack(out))[:, None].long()


class _Surrogate(Method):
    """A local linear surrogate on superpixels, fitted per item (its own segments and its own seed)."""

    needs_gradients = False
    ridge: ClassVar[float] = 1e-3

    class Options(Options):
        samples: int = Field(200, ge=2, le=100_000)
        segments: Literal["slic", "quickshift", "grid"] = "slic"
        superpixels: int = Field(50, ge=2, description="SLIC / quickshift: about this many superpixels")
        compactness: float = Field(0.1, gt=0, description="SLIC: shape regularity against intensity (image in [0, 1])")
        cells: int = Field(8, ge=2, description="grid: cells per side")

    def explainer(self):
        raise NotImplementedError

    def segments(self, x: torch.Tensor) -> torch.Tensor:
        o = self.options
        if o.segments == "grid":
            return grid_segments(x.shape[2], x.shape[3], o.cells).expand(len(x), 1, -1, -1)
        segs = superpixels(x, o.segments, o.superpixels, o.compactness)
        flat = segs.flatten(1).amax(dim=1) < 2  # fewer than 3 superpixels (e.g. pure noise): the grid instead
        segs[flat] = grid_segments(x.shape[2], x.shape[3], o.cells)[0]
        return segs

    def attribute(self, x, target, baseline):
        o = self.options
        segs, base, explainer = self.segments(x), _base_seed(), self.explainer()
        maps = []
        for i in range(len(x)):
            torch.manual_seed(_item_seed(base, x[i]))
            maps.append(explainer.attribute(
                x[i:i + 1], target=target[i:i + 1], baselines=baseline, n_samples=o.samples,
                feature_mask=segs[i:i + 1].expand(1, x.shape[1], -1, -1), perturbations_per_eval=_chunk(x[0].numel())))
        return Attribution(torch.cat(maps))

    def surrogate(self) -> LinearModel:
        return LinearModel(train_fn=_ridge_fit, alpha=self.ridge)


class LimeMethod(_Surrogate):
    name = "lime"
    ridge = 1.0

    def explainer(self):
        return Lime(self.net.forward, interpretable_model=self.surrogate())


class KernelShapMethod(_Surrogate):
    name = "kernel_shap"

    def explainer(self):
        ks = KernelShap(self.net.forward)
        ks.interpretable_model = self.surrogate()
        return ks


class SobolMethod(Method):
    """Sobol attribution (Fel et al. 2021): total Sobol indices of the target score with respect to the
    intensities of a grid of mask cells, from quasi-Monte-Carlo designs (scrambled Sobol sequence, Jansen
    estimator). Each cell's pixels are x * m + baseline * (1 - m) for its mask value m in [0, 1]."""

    name = "sobol"
    needs_gradients = False

    class Options(Options):
        cells: int = Field(8, ge=1, description="mask grid (cells per side)")
        designs: int = Field(32, ge=2, le=65_536, description="quasi-Monte-Carlo designs N (a power of 2): "
                                                              "N x (cells^2 + 2) model calls per item")
        logits: bool = Field(False, description="follow the target logit instead of its probability")

    def attribute(self, x, target, baseline):
        o = self.options
        b, c, h, w = x.shape
        d, n = o.cells * o.cells, o.designs
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*balance properties of Sobol")
            design = qmc.Sobol(2 * d, scramble=True, seed=_base_seed()).random(n)
        a_, b_ = design[:, :d], design[:, d:]
        mixed = np.repeat(a_[None], d, axis=0)  # C_i: A with column i taken from B
        mixed[np.arange(d), :, np.arange(d)] = b_.T
        cells = torch.from_numpy(np.concatenate([a_, b_, mixed.reshape(-1, d)])).float()  # (N (d + 2), d)
        seg = grid_segments(h, w, o.cells)[0, 0]  # (h, w) cell of each pixel
        base = torch.as_tensor(baseline, dtype=x.dtype).expand(1, c, h, w)
        score = self.net.forward if o.logits else self.net.score
        y = torch.zeros(b, len(cells))
        per = max(1, _chunk(x[0].numel()))
        with torch.no_grad():
            for i in range(b):
                for s in range(0, len(cells), per):
                    m = cells[s:s + per][:, seg][:, None]  # (k, 1, h, w)
                    y[i, s:s + per] = score(x[i:i + 1] * m + base * (1 - m))[:, target[i]]
        fa, fb, fc = y[:, :n], y[:, n:2 * n], y[:, 2 * n:].reshape(b, d, n)
        var = torch.cat([fa, fb], dim=1).var(dim=1)
        total = ((fa[:, None] - fc) ** 2).mean(dim=2) / 2 / torch.where(var > 0, var, torch.ones_like(var))[:, None]
        return Attribution(total[:, seg][:, None])


# --- pictures of attributions (never of confidential inputs: callers decide) ----------------------

def to_uint8(images: np.ndarray, value_range: tuple[float, float]) -> np.ndarray:
    """(B, H, W, C) pixel space -> (B, H, W, 3) uint8 for display."""
    lo, hi = value_range
    x = np.clip((np.asarray(images, np.float64) - lo) / (hi - lo), 0, 1)
    x = np.repeat(x, 3, axis=-1) if x.shape[-1] == 1 else x[..., :3]
    return (x * 255).round().astype(np.uint8)


def overlay(images: np.ndarray, heatmaps: np.ndarray, value_range: tuple[float, float],
            alpha: float = 0.6) -> np.ndarray:
    """Positive relevance as a 'hot' colour map over the grey image, scaled per map (99th percentile)."""
    base = to_uint8(images, value_range).astype(np.float64) / 255
    h = np.maximum(np.asarray(heatmaps, np.float64), 0)
    scale = np.quantile(h.reshape(len(h), -1), 0.99, axis=1)[:, None, None]
    t = np.clip(h / np.where(scale > 0, scale, 1), 0, 1)
    hot = np.stack([np.clip(3 * t, 0, 1), np.clip(3 * t - 1, 0, 1), np.clip(3 * t - 2, 0, 1)], axis=-1)
    a = alpha * t[..., None]
    return (((1 - a) * base + a * hot).clip(0, 1) * 255).round().astype(np.uint8)


def tile(rows: list[list[np.ndarray]], scale: int = 2, gap: int = 2) -> np.ndarray:
    """A grid of (H, W, 3) uint8 tiles, each enlarged by `scale` (nearest), with white gaps."""
    h, w = rows[0][0].shape[:2]
    h2, w2 = h * scale, w * scale
    cols = max(len(r) for r in rows)
    out = np.full((len(rows) * (h2 + gap) + gap, cols * (w2 + gap) + gap, 3), 255, np.uint8)
    for i, r in enumerate(rows):
        for j, t in enumerate(r):
            big = np.repeat(np.repeat(t, scale, axis=0), scale, axis=1)
            out[gap + i * (h2 + gap):gap + i * (h2 + gap) + h2, gap + j * (w2 + gap):gap + j * (w2 + gap) + w2] = big
    return out


def save_png(path, image: np.ndarray) -> None:
    from PIL import Image

    Image.fromarray(image).save(path, format="PNG")


def save_gif(path, frames: list[np.ndarray], ms_per_frame: int = 700) -> None:
    from PIL import Image

    pics = [Image.fromarray(f) for f in frames]
    pics[0].save(path, format="GIF", save_all=True, append_images=pics[1:], duration=ms_per_frame, loop=0)

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
layer), so every method explains it the same way. Unknown layers, channels, positions, classes and options, and
options that do not fit the model's input shape (`Method.fits`), are `ExplainError`s (user errors) that list the
valid ones, raised when the method is made, before any work; a method that cannot run on a model raises
`Unsupported` with the reason.

Methods without gradients need only predictions, so they also explain black boxes (ONNX). Every
method evaluates the model in chunks bounded by `MAX_EVAL_ELEMENTS` input values (captum's internal
batch sizes), so a large number of samples costs time, never memory. Every call runs under a forked
torch RNG seeded by the caller: the same seed gives the same maps.

The methods live by family in `explain/methods/` (gradient, propagation, cam, perturbation), each
registered by its own entry point; the model surgery in `explain/network.py`.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, ValidationError

from trustcase.errors import Unsupported, validation_message
from trustcase.explain import ExplainError
from trustcase.explain.network import Network, Neuron
from trustcase.registry import Registry

MAX_EVAL_ELEMENTS = 1 << 23  # input values per forward pass (32 MB of float32): chunk size for every method


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

    @classmethod
    def fits(cls, options: Options, input_shape: tuple[int, ...]) -> None:
        """Raise `ExplainError` when `options` cannot serve inputs of `input_shape` ((C, H, W) or (F,))."""

    def attribute(self, x: torch.Tensor, target: torch.Tensor, baseline: float | torch.Tensor) -> Attribution:
        raise NotImplementedError


METHODS = Registry("trustcase.attribution_methods", Method, "attribution method")


def options_for(method: str, options: dict | None = None, input_shape: tuple[int, ...] | None = None) -> Options:
    """Validated options of a method (and, given the model's `input_shape`, options that fit it); unknown method
    or option names are user errors that list the known ones."""
    cls = METHODS.resolve(method)  # RegistryError (a user error) names the known methods
    try:
        opts = cls.Options.model_validate(options or {})
    except ValidationError as e:
        raise ExplainError(f"{method} options: {validation_message(e)}") from None
    if input_shape is not None:
        cls.fits(opts, tuple(input_shape))
    return opts


def make(net: Network, method: str | type[Method], options: dict | Options | None = None) -> Method:
    """The method ready to explain `net`'s model: options validated against its input shape, layers resolved."""
    cls = method if isinstance(method, type) else METHODS.resolve(method)
    if not isinstance(options, Options):
        options = options_for(method, options) if isinstance(method, str) else cls.Options.model_validate(options or {})
    cls.fits(options, tuple(net.model.spec.input_shape))
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
        raise ExplainError(f"target class {bad[0]} does not exist; classes: "
                         f"{dict(enumerate(net.model.spec.class_names))}")
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(did not already require gradients|multiple inputs for Lime"
                                                  "|Setting (forward, )?backward hooks)")
        torch.manual_seed(seed)
        out = m.attribute(x.detach().float(), target.long(), baseline)
    return Attribution(out.maps.detach(), None if out.delta is None else out.delta.detach())


def _base_seed() -> int:
    """The call's seed, from the caller's seeded RNG; a method's per-item draws then follow
    `seeding.item_seed(_base_seed(), method, seeding.content_id(item), stream)`: the same maps for an item
    whatever batch it comes in."""
    return int(torch.randint(0, 2**31 - 1, (1,)))


def _batched(fn, x: torch.Tensor, target: torch.Tensor, per: int) -> torch.Tensor:
    """fn over slices of at most `per` items (methods whose memory grows with a sample count per item)."""
    return torch.cat([fn(x[s:s + per], target[s:s + per]) for s in range(0, len(x), max(1, per))])

"""Attribution methods behind one interface, on captum: which input pixels a decision rests on.

    net = Network(classifier)                    # once per model
    a = attribute(net, "integrated_gradients", x, target, baseline=0.0, seed=0, options={"n_steps": 32})
    a.maps  # (B, C, H, W) or (B, 1, H, W) in the model's normalised input space; a.heatmap() -> (B, H, W)

Methods (registry `METHODS`, by name):

| name | captum | gradients | notes |
|---|---|---|---|
| saliency | Saliency | yes | abs of the gradient of the target logit |
| integrated_gradients | IntegratedGradients | yes | also returns the convergence delta (completeness) |
| smoothgrad | NoiseTunnel(Saliency) | yes | noise level as a fraction of the input range |
| grad_cam | LayerGradCam | yes | last Conv2d by default, or `layer: <name>`; upsampled to the input |
| occlusion | Occlusion | no | sliding window replaced by the baseline |
| rise | (RISE, Petsiuk 2018) | no | random low-resolution masks, probability-weighted |
| lime | Lime | no | grid superpixels, closed-form weighted ridge (no sklearn) |
| kernel_shap | KernelShap | no | grid superpixels, closed-form weighted least squares |

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
import io
import math
import re
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from typing import ClassVar, Literal

import numpy as np
import torch
from captum._utils.models.linear_model import LinearModel
from captum.attr import (
    IntegratedGradients,
    KernelShap,
    LayerAttribution,
    LayerGradCam,
    Lime,
    NoiseTunnel,
    Occlusion,
    Saliency,
)
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torch import nn

from trustcase.errors import Unsupported
from trustcase.models.classifier import Classifier
from trustcase.registry import Registry

MAX_EVAL_ELEMENTS = 1 << 23  # input values per forward pass (32 MB of float32): chunk size for every method


# --- the model as captum sees it ------------------------------------------------------------------

class _Opaque(nn.Module):
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


def _eager(scripted: torch.jit.ScriptModule, probe: torch.Tensor) -> tuple[nn.Module | None, str]:
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
                layer = _Opaque(child, child.original_name)
            layers[name] = layer
            h = out
        seq = nn.Sequential(layers).eval()
        if not torch.allclose(seq(probe), scripted(probe), rtol=1e-4, atol=1e-4):
            return None, "the TorchScript model's children in order do not reproduce its output"
    note = f"layers kept opaque (no LRP rule): {opaque}" if opaque else ""
    return seq, note


class Network:
    """A classifier as attribution methods see it: a forward on normalised inputs and named layers.

    `module` is an eager nn.Module when the model has gradients (a traced model is rebuilt, see the
    module docstring), None for a black box, whose forward runs through `Classifier.forward`.
    """

    def __init__(self, model: Classifier, module: nn.Module | None = None):
        self.model = model
        self.note = ""
        if module is None and model.module is not None:
            module = model.module
            if isinstance(module, torch.jit.ScriptModule):
                probe = torch.randn(2, *model.spec.input_shape, generator=torch.Generator().manual_seed(0))
                eager, self.note = _eager(module, probe)
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

    def layers(self) -> dict[str, nn.Module]:
        """Leaf layers by dotted name (empty when layers cannot be hooked)."""
        if self.module is None or isinstance(self.module, torch.jit.ScriptModule):
            return {}
        out = {}
        for n, m in self.module.named_modules():
            if n and not any(n.startswith(o + ".") for o in out if isinstance(out[o], _Opaque)):
                if isinstance(m, _Opaque) or not list(m.children()):
                    out[n] = m
        return out

    @staticmethod
    def kind(layer: nn.Module) -> str:
        return layer.kind if isinstance(layer, _Opaque) else type(layer).__name__

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

    def randomised(self, top_layers: int, seed: int) -> Network:
        """A copy with the parameters of its last `top_layers` parametric layers re-drawn (Adebayo et al.)."""
        if self.module is None:
            raise Unsupported("model randomisation needs the model's weights; the model is a black box")
        module = copy.deepcopy(self.module)
        # convolutions and linear layers (weights of rank >= 2), from the output down
        parametric = [m for m in module.modules() if any(p.ndim > 1 for p in m.parameters(recurse=False))]
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for m in parametric[::-1][:top_layers]:
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


def make(net: Network, method: str, options: dict | Options | None = None) -> Method:
    opts = options if isinstance(options, Options) else options_for(method, options)
    cls = METHODS.resolve(method)
    if cls.needs_gradients and not net.differentiable:
        raise Unsupported(f"{method} needs gradients; the model is a black box (use occlusion, rise, lime "
                          "or kernel_shap)")
    return cls(net, opts)


def attribute(net: Network, method: str | Method, x: torch.Tensor, target: torch.Tensor | int,
              baseline: float | torch.Tensor = 0.0, seed: int = 0, options: dict | None = None) -> Attribution:
    """Attributions of `target` for normalised inputs `x` (B, C, H, W); deterministic for `seed`."""
    m = method if isinstance(method, Method) else make(net, method, options)
    if isinstance(target, int):
        target = torch.full((len(x),), target, dtype=torch.long)
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(did not already require gradients|multiple inputs for Lime)")
        torch.manual_seed(seed)
        out = m.attribute(x.detach().float(), target.long(), baseline)
    return Attribution(out.maps.detach(), None if out.delta is None else out.delta.detach())


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

    def attribute(self, x, target, baseline):
        o = self.options
        nt = NoiseTunnel(Saliency(self.net.forward))
        maps = nt.attribute(x, nt_type="smoothgrad", nt_samples=o.samples, stdevs=o.noise_level * self.net.input_range,
                            nt_samples_batch_size=min(o.samples, _chunk(x[0].numel(), len(x))), target=target)
        return Attribution(maps)


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
        gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, (1,))))  # from the caller's seeded RNG
        sal = torch.zeros(b, h, w)
        per = max(1, min(o.masks, _chunk(x[0].numel(), b)))
        rows = torch.arange(b)
        with torch.no_grad():
            done = 0
            while done < o.masks:
                m = self.masks(min(per, o.masks - done), h, w, gen)
                mm = m[None, :, None]  # (1, n, 1, h, w)
                inputs = (x[:, None] * mm + baseline * (1 - mm)).reshape(-1, c, h, w)
                p = self.net.probabilities(inputs).reshape(b, len(m), -1)[rows, :, target]  # (b, n)
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


class _Surrogate(Method):
    needs_gradients = False
    ridge: ClassVar[float] = 1e-3

    class Options(Options):
        samples: int = Field(200, ge=2, le=100_000)
        cells: int = Field(8, ge=2, description="superpixel grid (cells per side)")

    def explainer(self):
        raise NotImplementedError

    def attribute(self, x, target, baseline):
        o = self.options
        mask = grid_segments(x.shape[2], x.shape[3], o.cells).expand(1, x.shape[1], -1, -1)
        maps = self.explainer().attribute(x, target=target, baselines=baseline, feature_mask=mask,
                                          n_samples=o.samples, perturbations_per_eval=_chunk(x[0].numel()))
        return Attribution(maps)

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

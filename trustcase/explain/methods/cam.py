"""Class activation maps: a convolutional layer's feature maps weighted per channel (by gradients, by the
score they keep when they mask the input, or by the last linear layer), upsampled to the input."""

from __future__ import annotations

import torch
from captum.attr import GuidedGradCam, LayerAttribution, LayerGradCam
from pydantic import Field
from torch import nn

from trustcase.errors import Unsupported
from trustcase.explain.attribution import Attribution, Method, Options, _chunk
from trustcase.explain.network import Network


def _upsample(cam: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return LayerAttribution.interpolate(cam, tuple(x.shape[2:]), interpolate_mode="bilinear")


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
        return Attribution(_upsample(cam, x))


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

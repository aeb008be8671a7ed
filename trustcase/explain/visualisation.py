"""What a network responds to: feature visualisation, per-channel activation maps, top-activating inputs.

- `visualise` (Olah et al. 2017, "Feature Visualization"): an input that maximises a class logit or the mean
  of a channel, found by gradient ascent on a decorrelated Fourier parameterisation (frequencies scaled by
  1/f, so the ascent does not climb into high-frequency noise), squashed by a sigmoid into the pixel range,
  with random jitter at each step (the image must work wherever it is shifted by a few pixels).
- `influential_channels`: the channels of a layer that carry a class's decision (mean gradient x mean
  activation over inputs, Grad-CAM's weights times what the channel holds).
- `TopActivating`: streamed over a split, per channel the items whose mean activation is highest.
"""

from __future__ import annotations

import heapq

import numpy as np
import torch

from trustcase.explain.network import Network, Neuron


def _to_input(net: Network, pixels: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) pixels in [0, 1] of the value range -> the model's normalised input (differentiable)."""
    lo, hi = net.model.spec.value_range
    x = pixels * (hi - lo) + lo
    return x * net.model._scale + net.model._shift


def visualise(net: Network, targets: list[int | Neuron], steps: int = 128, lr: float = 0.05, jitter: int = 2,
              tv_weight: float = 1.0, grey_weight: float = 1.0, seed: int = 0) -> np.ndarray:
    """One image per target (a class index or a `Neuron`) that maximises it: (K, H, W, C) in the pixel range."""
    c, h, w = net.model.spec.input_shape
    gen = torch.Generator().manual_seed(seed)
    fy = torch.fft.fftfreq(h)[:, None]
    fx = torch.fft.rfftfreq(w)[None]
    scale = 1.0 / torch.sqrt(fx * fx + fy * fy).clamp(min=1.0 / max(h, w))  # 1/f: natural-image spectrum
    scale = scale / scale.pow(2).mean().sqrt()
    spectrum = (0.01 * torch.randn(len(targets), c, h, w // 2 + 1, 2, generator=gen)).requires_grad_(True)
    outputs = [net.focus(t) if isinstance(t, Neuron) else None for t in targets]
    opt = torch.optim.Adam([spectrum], lr=lr)

    def image() -> torch.Tensor:
        field = torch.fft.irfft2(torch.view_as_complex(spectrum) * scale, s=(h, w), norm="ortho")
        return torch.sigmoid(field)

    for _ in range(steps):
        dy, dx = (int(v) for v in torch.randint(-jitter, jitter + 1, (2,), generator=gen))
        x = _to_input(net, torch.roll(image(), shifts=(dy, dx), dims=(2, 3)))
        logits = net.forward(x)
        value = torch.stack([logits[i, t] if view is None else view.forward(x[i:i + 1])[0, 0]
                             for i, (t, view) in enumerate(zip(targets, outputs))])
        img = image()
        # total variation and distance from mid-grey: no saturated salt-and-pepper, a readable picture
        tv = (img[..., 1:, :] - img[..., :-1, :]).abs().mean() + (img[..., :, 1:] - img[..., :, :-1]).abs().mean()
        opt.zero_grad()
        (-value.sum() + len(targets) * (tv_weight * tv + grey_weight * (img - 0.5).pow(2).mean())).backward()
        opt.step()
    lo, hi = net.model.spec.value_range
    with torch.no_grad():
        return (image() * (hi - lo) + lo).permute(0, 2, 3, 1).numpy()


def influential_channels(net: Network, layer: str, x: torch.Tensor, target: torch.Tensor, k: int) -> list[int]:
    """The `k` channels of `layer` whose contribution to the target logit is largest on average."""
    _, module = net.layer(layer)
    seen = []
    h = module.register_forward_hook(lambda m, i, o: seen.append(o))
    try:
        with torch.enable_grad():
            out = net.forward(x.clone().requires_grad_(True))
            (g,) = torch.autograd.grad(out[torch.arange(len(x)), target].sum(), seen[-1])
    finally:
        h.remove()
    a = seen[-1].detach()
    dims = tuple(range(2, a.ndim))
    contribution = (g.mean(dim=dims) * a.mean(dim=dims)).mean(dim=0) if dims else (g * a).mean(dim=0)
    return contribution.argsort(descending=True)[:k].tolist()


class TopActivating:
    """Per channel of a layer, the `k` items with the highest mean activation: update per batch, then `top`."""

    def __init__(self, net: Network, layer: str, channels: list[int], k: int):
        self.net, self.channels, self.k = net, channels, k
        self.name, self.module = net.layer(layer)
        self.heaps: dict[int, list[tuple[float, int]]] = {ch: [] for ch in channels}

    def update(self, x: torch.Tensor, index: np.ndarray) -> None:
        a = self.net.activations(self.module, x)
        means = a.flatten(2).mean(dim=2) if a.ndim > 2 else a
        for ch in self.channels:
            heap = self.heaps[ch]
            for v, i in zip(means[:, ch].tolist(), index.tolist()):
                item = (v, -int(i))  # ties: the lower position first
                if len(heap) < self.k:
                    heapq.heappush(heap, item)
                elif item > heap[0]:
                    heapq.heapreplace(heap, item)

    def top(self) -> dict[int, list[tuple[int, float]]]:
        """channel -> [(item position, mean activation)], highest first."""
        return {ch: [(-i, v) for v, i in sorted(h, reverse=True)] for ch, h in self.heaps.items()}


def normalise_maps(maps: np.ndarray) -> np.ndarray:
    """Activation maps (K, h, w) -> uint8 grey, each scaled to its own range."""
    lo = maps.min(axis=(1, 2), keepdims=True)
    hi = maps.max(axis=(1, 2), keepdims=True)
    return ((maps - lo) / np.where(hi > lo, hi - lo, 1) * 255).round().astype(np.uint8)

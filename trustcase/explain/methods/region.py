"""Explanations of a segmenter's region: which input pixels the score of a predicted region rests on.

A segmenter's logits are (B, K, H, W). The explained output is the REGION SCORE of class c over a region R (an
(H, W) mask): sum over R of the class-c logits (Vinogradova et al. 2020, Seg-Grad-CAM). `RegionNetwork` is the
segmenter as attribution methods see it with that one output, so every method of the registry that explains its
output through `Network.forward` / `Network.score` serves it unchanged: gradients (saliency, input x gradient,
integrated gradients, SmoothGrad), Grad-CAM / Grad-CAM++ at any of the segmenter's layers (named as in the
model), and for black boxes occlusion and RISE (forward passes only; RISE follows the raw score). One region per
image: `explain_regions` explains item by item (the region travels with its image through every expansion a
method makes).

Quality, each per item with a t interval over items (`quality.mean_interval`):
- deletion / insertion on the region (Petsiuk et al. 2018): pixels from the most relevant down are replaced by
  (taken from) the baseline and the mean class-c probability over R is followed; a faithful map gives a low
  deletion and a high insertion area, a random order the chance level;
- energy inside the true region (the share of positive relevance inside the true defect mask, Arras et al.'s
  relevance mass: `quality.relevance_mass`) and the pointing game (`quality.pointing_game`); the region's share
  of the image is their chance level.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from trustcase.explain import attribution as A
from trustcase.explain import quality
from trustcase.explain.network import Network

# methods whose output is read through Network.forward / score (the region score): gradients, CAMs, perturbations
REGION_METHODS = ("saliency", "input_x_gradient", "integrated_gradients", "smoothgrad", "grad_cam", "grad_cam_pp",
                  "occlusion", "rise")


@dataclass(frozen=True)
class RegionUnit:
    """The explained output of a `RegionNetwork` (what `Network.unit` names: one output, no probabilities)."""

    cls: int
    pixels: int

    def label(self) -> str:
        return f"the score of class {self.cls} over a region of {self.pixels} pixels"


class RegionScore(nn.Module):
    """(N, 1): the sum of class `cls`'s logits over `region` (H, W) of a segmenter's output (N, K, H, W)."""

    def __init__(self, segmenter, region: torch.Tensor, cls: int):
        super().__init__()
        self.segmenter, self.cls = segmenter, cls
        self.register_buffer("region", region.float())

    def forward(self, x):
        return (self.segmenter(x)[:, self.cls] * self.region).sum((-2, -1))[:, None]


class RegionNetwork(Network):
    """A segmenter's `Network` whose one output is a region score; its layers are the segmenter's, by name."""

    def __init__(self, base: Network, region: np.ndarray | torch.Tensor, cls: int):
        region = torch.as_tensor(np.asarray(region, bool))
        self.model, self.note, self.input_range, self.base = base.model, base.note, base.input_range, base
        self.unit = RegionUnit(cls, int(region.sum()))
        self.module = None if base.module is None else RegionScore(base.module, region, cls).eval()
        self._score = RegionScore(base.forward, region, cls)  # a black box's forward too

    def forward(self, x):
        return self._score(x)

    def layers(self):
        return self.base.layers()


def predicted_regions(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per image the region to explain: the pixels of its most frequent predicted defect class (class 0 is the
    background), and that class; an image with no predicted defect gets an empty region and class 0."""
    pred = logits.argmax(1)
    k = logits.shape[1]
    counts = np.stack([(pred == c).reshape(len(pred), -1).sum(1) for c in range(k)], 1)
    cls = np.where(counts[:, 1:].sum(1) > 0, counts[:, 1:].argmax(1) + 1, 0)
    return pred == cls[:, None, None], cls


def explain_regions(net: Network, method: str, x: torch.Tensor, regions: np.ndarray, classes: np.ndarray,
                    baseline: float | torch.Tensor = 0.0, seed: int = 0, options: dict | None = None) -> np.ndarray:
    """(B, H, W) heatmaps of each item's region score (x normalised (B, C, H, W), regions (B, H, W) bool);
    deterministic for `seed`, item by item."""
    maps = []
    for i in range(len(x)):
        view = RegionNetwork(net, regions[i], int(classes[i]))
        m = A.make(view, method, options)
        base = baseline[i:i + 1] if isinstance(baseline, torch.Tensor) and baseline.ndim == 4 else baseline
        maps.append(A.attribute(view, m, x[i:i + 1], 0, base, seed).heatmap())
    return np.concatenate(maps) if maps else np.zeros((0, *x.shape[2:]), np.float32)


def region_probability(net: Network, x: torch.Tensor, region: torch.Tensor, cls: int) -> torch.Tensor:
    """(N,) the mean probability of class `cls` over `region` (H, W) of each input."""
    p = torch.softmax(net.forward(x), dim=1)[:, cls]
    return (p * region).sum((-2, -1)) / region.sum().clamp_min(1)


def deletion_insertion(net: Network, x: torch.Tensor, regions: np.ndarray, classes: np.ndarray, heatmaps: np.ndarray,
                       baseline: float | torch.Tensor = 0.0, steps: int = 20, seed: int = 0
                       ) -> tuple[np.ndarray, np.ndarray]:
    """The region's mean class probability as the most relevant pixels are deleted / inserted: (B, steps + 1) each."""
    b, c, h, w = x.shape
    ranks = torch.from_numpy(quality._order(heatmaps, seed))  # (B, HW), ties broken per item
    counts = torch.round(torch.linspace(0, h * w, steps + 1)).long()
    base = torch.as_tensor(baseline, dtype=x.dtype).expand_as(x)
    dele, ins = np.zeros((b, steps + 1)), np.zeros((b, steps + 1))
    with torch.no_grad():
        for i in range(b):
            gone = (ranks[i, None, :] < counts[:, None]).float().view(steps + 1, 1, h, w)
            xi, bi = x[i:i + 1], base[i:i + 1]
            both = torch.cat([xi * (1 - gone) + bi * gone, bi * (1 - gone) + xi * gone])
            p = region_probability(net, both, torch.as_tensor(regions[i]).float(), int(classes[i])).numpy()
            dele[i], ins[i] = p[:steps + 1], p[steps + 1:]
    return dele, ins


def energy_inside(heatmaps: np.ndarray, true_regions: np.ndarray) -> np.ndarray:
    """Per item the share of positive relevance inside the true region (nan for a map without any)."""
    return quality.relevance_mass(heatmaps, true_regions)

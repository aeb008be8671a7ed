"""Certified segmentation benchmark: noisy samples per second of `segmentation_smoothing.sample_votes` against the
bare forward pass of the same segmenter at the same batch size (target >= 0.9, as for classification smoothing).

    .venv/bin/python bench/bench_segmentation_certify.py [--model MODEL.pt] [--size 128] [--quick]

The segmenter is a TorchScript model taking (B, 1, H, W) (e.g. the magnetic-tile use case's), else a small U-Net-like
network with random weights (the cost of a vote does not depend on what the weights learnt). Alternating rounds
(the machine is shared): the median of the rounds' paired ratios.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from trustcase.certification import segmentation_smoothing as SS  # noqa: E402
from trustcase.models.classifier import Classifier  # noqa: E402
from trustcase.schemas import ModelSpec  # noqa: E402


class SmallUNet(nn.Module):
    """Two levels, 16 and 32 channels: a defect segmenter of the size a CPU trains in minutes."""

    def __init__(self, classes: int = 2):
        super().__init__()
        self.down = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU())
        self.mid = nn.Sequential(nn.MaxPool2d(2), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
                                 nn.ConvTranspose2d(32, 16, 2, stride=2))
        self.head = nn.Sequential(nn.Conv2d(32, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, classes, 1))

    def forward(self, x):
        d = self.down(x)
        return self.head(torch.cat([d, self.mid(d)], 1))


def segmenter(model: Path | None, size: int) -> Classifier:
    module = torch.jit.load(str(model)).eval() if model else SmallUNet().eval()
    spec = ModelSpec(format="torchscript", path=str(model or "random.pt"), input_shape=[1, size, size],
                     value_range=(0.0, 255.0), normalisation={"mean": [0.5], "std": [0.25]},
                     class_names=["background", "defect"], critical_class="defect")
    return Classifier(spec, module=module)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args()
    seg = segmenter(a.model, a.size)
    rng = np.random.default_rng(0)
    k, n0, n, bs = 2, 32, (96 if a.quick else 224), 64
    x = rng.uniform(0, 255, (k, a.size, a.size, 1)).astype(np.float32)
    xin = seg.to_input(np.repeat(x[:1], bs, axis=0))
    reps = k * (n0 + n) // bs
    rates = {"bare": [], "votes": []}
    inner, in_forward = seg.forward, [0.0]

    def timed(z):  # the votes' own forward passes, timed: the rest of a votes call is its overhead
        t0 = time.perf_counter()
        out = inner(z)
        in_forward[0] += time.perf_counter() - t0
        return out

    seg.forward = timed
    votes_time = 0.0
    for _ in range(3 if a.quick else 7):  # each round times both, one after the other: its ratio is paired
        with torch.inference_mode():
            t = time.perf_counter()
            for _ in range(reps):
                inner(xin).argmax(1)
            rates["bare"].append(reps * bs / (time.perf_counter() - t))
        t = time.perf_counter()
        SS.sample_votes(seg, x, sigma=0.12, n0=n0, n=n, batch_size=bs, seed=0)
        rates["votes"].append(k * (n0 + n) / (time.perf_counter() - t))
        votes_time += time.perf_counter() - t
    bare, votes = (float(np.median(rates[key])) for key in ("bare", "votes"))
    ratios = np.array(rates["votes"]) / np.array(rates["bare"])
    print(f"torch threads: {torch.get_num_threads()}")
    print(f"Certified segmentation, {'model ' + str(a.model) if a.model else 'random-weight U-Net'} on "
          f"{a.size}x{a.size} grey images, batch size {bs}, n0 = {n0}, n = {n}, {k} images, {len(ratios)} rounds")
    print(f"   {'bare forward + argmax':<34}{bare:>10.1f} samples/s (median)")
    print(f"   {'segmentation_smoothing votes':<34}{votes:>10.1f} samples/s (median)")
    print(f"   ratio votes / bare, median of the rounds' ratios {np.median(ratios):.3f} (rounds {ratios.min():.3f}-"
          f"{ratios.max():.3f}; target >= 0.9)")
    print(f"   share of the votes' time in the model's forward pass {in_forward[0] / votes_time:.3f} (the ratio if a "
          "noisy batch costs the model what a clean one does; less exposed to the load)")


if __name__ == "__main__":
    main()

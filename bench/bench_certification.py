"""Certification benchmark: randomized smoothing throughput, Lipschitz bound cost and tightness.

    .venv/bin/python bench/bench_certification.py [--quick]

1. Smoothing: noisy samples/s of `smoothing.certify` / forward samples/s of the bare model at the same batch
   size (target >= 0.9), and the speed-up over a per-image implementation of the reference algorithm (one
   image at a time, votes counted in a Python loop, as in the authors' code), on the solar-cell CNN.
2. Lipschitz: time of `lipschitz.upper_bound` on the solar-cell CNN, and its tightness ratio
   (upper bound / largest gradient-ascent lower bound from test images), in the [0, 1]-scaled input.
ACAS Xu and local robustness: bench/bench_verification.py.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from trustcase.certification import lipschitz as L  # noqa: E402
from trustcase.certification import smoothing as S  # noqa: E402
from trustcase.data.streaming import DataSource  # noqa: E402
from trustcase.models.loading import load_classifier  # noqa: E402
from trustcase.schemas import load_use_case  # noqa: E402

SOLAR = ROOT / "use_cases" / "solar_cells" / "use_case.yaml"


def reference_certify(model, x, sigma, n0, n, alpha, batch_size):
    """Cohen et al.'s code path: one image at a time, repeated along the batch, votes counted in Python."""
    lo, hi = model.spec.value_range
    out = []
    for img in x:
        counts = []
        for num in (n0, n):
            c = np.zeros(model.n_classes, int)
            remaining = num
            with torch.no_grad():
                while remaining > 0:
                    k = min(batch_size, remaining)
                    remaining -= k
                    batch = np.repeat(img[None], k, axis=0).astype(np.float32)
                    noisy = batch + np.random.normal(0, sigma * (hi - lo), batch.shape).astype(np.float32)
                    for idx in model.forward(model.to_input(noisy)).argmax(1).numpy():
                        c[idx] += 1
            counts.append(c)
        out.append(counts[1][counts[0].argmax()])
    return out


def bench_smoothing(quick: bool) -> None:
    """Alternating rounds (the machine is shared): median of each rate over the rounds."""
    uc = load_use_case(SOLAR)
    model = load_classifier(uc.model)
    images = next(DataSource(uc.data, 0).stream("test").batches(16)).images
    bs, n0, n = 256, 64, 448
    k = 4
    x = images[:k]
    xin = model.to_input(np.repeat(x[:1], bs, axis=0))
    reps = k * (n0 + n) // bs
    rates = {"bare": [], "ours": [], "ref": []}
    for _ in range(2 if quick else 3):
        with torch.inference_mode():
            t = time.perf_counter()
            for _ in range(reps):
                model.forward(xin).argmax(1)
            rates["bare"].append(reps * bs / (time.perf_counter() - t))
        t = time.perf_counter()
        S.certify(model, x, sigma=0.12, n0=n0, n=n, alpha=0.001, batch_size=bs, seed=0)
        rates["ours"].append(k * (n0 + n) / (time.perf_counter() - t))
        t = time.perf_counter()
        reference_certify(model, x, 0.12, n0, n, 0.001, bs)
        rates["ref"].append(k * (n0 + n) / (time.perf_counter() - t))
    bare, ours, ref = (float(np.median(rates[key])) for key in ("bare", "ours", "ref"))
    print(f"\n1. Randomized smoothing on the solar-cell CNN (64x64), batch size {bs}, n0 = {n0}, n = {n}, "
          f"{k} images, median of {len(rates['bare'])} rounds")
    print(f"   {'bare forward':<34}{bare:>12.0f} samples/s")
    print(f"   {'smoothing.certify':<34}{ours:>12.0f} samples/s   ratio {ours / bare:.3f}  (target >= 0.9)")
    print(f"   {'per-image reference (authors)':<34}{ref:>12.0f} samples/s   speed-up of certify {ours / ref:.2f}x")


def bench_lipschitz(quick: bool) -> None:
    uc = load_use_case(SOLAR)
    model = load_classifier(uc.model)
    t = time.perf_counter()
    bound = L.upper_bound(model.module, uc.model.input_shape)
    seconds = time.perf_counter() - t
    scale = 1.0 / min(uc.model.normalisation.std)
    x = model.to_input(next(DataSource(uc.data, 0).stream("test").batches(8 if quick else 16)).images)
    t = time.perf_counter()
    lower = L.empirical_lower_bound(model.module, x, steps=10 if quick else 30)
    ascent = time.perf_counter() - t
    print("\n2. Lipschitz bound on the solar-cell CNN (L2, input scaled to [0, 1])")
    print(f"   upper bound {bound * scale:12.4g}   time {seconds:.3f} s")
    print(f"   lower bound {lower * scale:12.4g}   ({len(x)} points, ascent {ascent:.1f} s)")
    print(f"   tightness (upper / lower) {bound / lower:.1f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args()
    print(f"torch threads: {torch.get_num_threads()}")
    bench_smoothing(a.quick)
    bench_lipschitz(a.quick)


if __name__ == "__main__":
    main()

"""Benchmark: attribution overhead vs direct captum calls, and root-cause clustering growth.

    .venv/bin/python bench/bench_explainability.py [--quick]

1. Throughput (images/s) of each attribution method through `trustcase.explain.attribution`
   against a direct captum call with the same parameters on the same eager module (the bundled
   solar-cell CNN, rebuilt from TorchScript). Ratio = our time / captum's time (target <= 1.1).
2. Ward clustering (`root_causes.cluster`: pdist + Ward + knee + compactness) of 500, 2,000 and 8,000
   error feature vectors: time, growth exponent between sizes (<= 2 is no worse than quadratic) and
   peak traced memory (numpy/scipy buffers) next to the size of the condensed distance matrix.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np
import torch
from captum import attr as C
from captum._utils.models.linear_model import LinearModel

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from trustcase.explain import attribution as A  # noqa: E402
from trustcase.explain import root_causes as R  # noqa: E402
from trustcase.models.loading import load_classifier  # noqa: E402
from trustcase.schemas import load_use_case  # noqa: E402


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def direct_calls(net: A.Network, x: torch.Tensor, target: torch.Tensor, opts: dict) -> dict:
    """The same computations written straight against captum (what a user would write by hand)."""
    f = net.forward
    n = x[0].numel()
    chunk = A._chunk(n)
    mask = A.grid_segments(x.shape[2], x.shape[3], 8).expand(1, x.shape[1], -1, -1)
    layer = net.layer(None)[1]

    def gradcam():
        cam = C.LayerGradCam(f, layer).attribute(x, target=target, relu_attributions=True)
        return C.LayerAttribution.interpolate(cam, tuple(x.shape[2:]), interpolate_mode="bilinear")

    def surrogate(cls, alpha):
        expl = cls(f, interpretable_model=LinearModel(train_fn=A._ridge_fit, alpha=alpha)) if cls is C.Lime else cls(f)
        if cls is C.KernelShap:
            expl.interpretable_model = LinearModel(train_fn=A._ridge_fit, alpha=alpha)
        return expl.attribute(x, target=target, baselines=0.0, feature_mask=mask, n_samples=opts["samples"],
                              perturbations_per_eval=chunk)

    return {
        "saliency": lambda: C.Saliency(f).attribute(x, target=target, abs=True),
        "integrated_gradients": lambda: C.IntegratedGradients(f).attribute(
            x, baselines=0.0, target=target, n_steps=32, method="gausslegendre", internal_batch_size=chunk,
            return_convergence_delta=True),
        "smoothgrad": lambda: C.NoiseTunnel(C.Saliency(f)).attribute(
            x, nt_type="smoothgrad", nt_samples=16, stdevs=0.15 * net.input_range,
            nt_samples_batch_size=min(16, A._chunk(n, len(x))), target=target),
        "grad_cam": gradcam,
        "occlusion": lambda: C.Occlusion(f).attribute(x, sliding_window_shapes=(x.shape[1], 8, 8),
                                                    strides=(x.shape[1], 4, 4), baselines=0.0, target=target,
                                                    perturbations_per_eval=A._chunk(n, len(x))),
        "lime": lambda: surrogate(C.Lime, 1.0),
        "kernel_shap": lambda: surrogate(C.KernelShap, 1e-3),
    }


def throughput(quick: bool) -> list[tuple]:
    uc = load_use_case(ROOT / "use_cases" / "solar_cells" / "use_case.yaml")
    clf = load_classifier(uc.model)
    net = A.Network(clf)
    items = 4 if quick else 16
    x = torch.randn(items, *uc.model.input_shape, generator=torch.Generator().manual_seed(0))
    target = torch.arange(items) % 2
    samples = 50 if quick else 200
    repeats = 2 if quick else 3
    direct = direct_calls(net, x, target, {"samples": samples})
    rows = []
    for name in A.METHODS:
        opts = {"samples": samples} if name in ("lime", "kernel_shap") else None
        if name == "rise":
            opts = {"masks": 100 if quick else 500}
        method = A.make(net, name, opts)
        run = lambda m=method: A.attribute(net, m, x, target, 0.0, 0)  # noqa: E731
        run()  # warm-up (first-call allocations), then alternate the two so that load drifts hit both
        if name in direct:
            direct[name]()
            ours = theirs = float("inf")
            for _ in range(repeats):
                theirs = min(theirs, best_of(direct[name], 1))
                ours = min(ours, best_of(run, 1))
            rows.append((name, items / ours, items / theirs, ours / theirs))
        else:
            ours = best_of(run, repeats)
            rows.append((name, items / ours, float("nan"), float("nan")))
    return rows


def clustering(sizes: list[int], dim: int = 256) -> list[tuple]:
    rows = []
    for n in sizes:
        rng = np.random.default_rng(n)
        centres = rng.normal(0, 1, (5, dim))
        x = (centres[rng.integers(0, 5, n)] + rng.normal(0, 0.3, (n, dim))).astype(np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        tracemalloc.start()
        t = time.perf_counter()
        res = R.cluster(x, k_max=20)
        dt = time.perf_counter() - t
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        rows.append((n, dt, res["k"], peak / 2**20, n * (n - 1) / 2 * 8 / 2**20))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)  # a fair, stable comparison on a shared machine

    print("Attribution throughput, bundled solar-cell CNN (64x64), 1 thread")
    print(f"{'method':<22}{'ours img/s':>12}{'captum img/s':>14}{'overhead':>10}")
    for name, ours, theirs, ratio in throughput(args.quick):
        flag = "" if math.isnan(ratio) else ("  ok" if ratio <= 1.1 else "  > 1.1")
        print(f"{name:<22}{ours:>12.1f}{theirs:>14.1f}{ratio:>10.3f}{flag}"
              if not math.isnan(ratio) else f"{name:<22}{ours:>12.1f}{'(no captum)':>14}{'-':>10}")

    sizes = [250, 500, 1000] if args.quick else [500, 2000, 8000]
    print("\nRoot-cause clustering (pdist + Ward + knee), 256-dim unit-norm relevance vectors, 5 planted groups")
    print(f"{'errors':>8}{'time s':>10}{'k':>4}{'peak MB':>10}{'dist MB':>10}{'growth exp':>12}")
    prev = None
    for n, dt, k, peak, dist in clustering(sizes):
        growth = "" if prev is None else f"{math.log(dt / prev[1]) / math.log(n / prev[0]):>12.2f}"
        print(f"{n:>8}{dt:>10.3f}{k:>4}{peak:>10.1f}{dist:>10.1f}{growth}")
        prev = (n, dt)
    print("growth exponent = log(t2/t1) / log(n2/n1); <= 2 means no worse than quadratic")


if __name__ == "__main__":
    main()

"""Certification benchmark: randomized smoothing throughput, Lipschitz bound cost and tightness, ACAS Xu.

    .venv/bin/python bench/bench_certification.py [--quick] [--acas] [--timeout 60]

1. Smoothing: noisy samples/s of `smoothing.certify` / forward samples/s of the bare model at the same batch
   size (target >= 0.9), and the speed-up over a per-image implementation of the reference algorithm (one
   image at a time, votes counted in a Python loop, as in the authors' code), on the solar-cell CNN.
2. Lipschitz: time of `lipschitz.upper_bound` on the solar-cell CNN, and its tightness ratio
   (upper bound / largest gradient-ascent lower bound from test images), in the [0, 1]-scaled input.
3. ACAS Xu: verdict counts (violated / holds / unknown) and time per instance. Default: a sample of 6
   instances with a 10 s budget; `--acas`: all 186 instances of instances.csv with `--timeout` per instance.
4. Local robustness on ACAS Xu N_1,1 around sampled situations: what `local_robustness` decides (CROWN +
   input splitting + falsification) against the reference algorithm, plain interval bound propagation
   (IBP: one pass, sound, looser), at the same radii; and the cost per (input, radius) in forward passes.
"""

from __future__ import annotations

import argparse
import csv
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


def bench_acas(all_instances: bool, timeout: float) -> None:
    from trustcase.certification.nnet import load_network
    from trustcase.certification.properties import acasxu_root, check_property
    from trustcase.certification.vnnlib import read_vnnlib

    root = acasxu_root()
    if not (root / "instances.csv").is_file():
        print(f"\n3. ACAS Xu: skipped, no data at {root} (set TRUSTCASE_ACASXU)")
        return
    rows = list(csv.reader((root / "instances.csv").read_text().splitlines()))
    if not all_instances:
        picks = [("1_1", "prop_1"), ("2_1", "prop_2"), ("1_1", "prop_4"), ("3_3", "prop_9"), ("4_5", "prop_10"),
                 ("2_9", "prop_8")]
        rows = [r for r in rows if any(f"_{a}_batch" in r[0] and r[1] == f"{b}.vnnlib" for a, b in picks)]
        timeout = min(timeout, 10.0)
    counts = {"violated": 0, "holds": 0, "unknown": 0}
    times = []
    print(f"\n3. ACAS Xu: {len(rows)} instances, budget {timeout:g} s each")
    for net, prop, _ in rows:
        t = time.perf_counter()
        r = check_property(load_network(root / "onnx" / net), read_vnnlib(root / "vnnlib" / prop), timeout, seed=0)
        times.append(time.perf_counter() - t)
        counts[r["verdict"]] += 1
        if not all_instances:
            print(f"   {net:<36}{prop:<16}{r['verdict']:<10}{times[-1]:7.2f} s")
    t = np.array(times)
    print(f"   violated {counts['violated']}  holds {counts['holds']}  unknown {counts['unknown']}")
    print(f"   time per instance: mean {t.mean():.2f} s, median {np.median(t):.2f} s, max {t.max():.2f} s, "
          f"total {t.sum():.0f} s")


def bench_local(quick: bool) -> None:
    import importlib.util

    from trustcase.certification import bounds as B
    from trustcase.certification.local_robustness import change_property, verify_ball
    from trustcase.certification.properties import acasxu_root, single_thread

    if not (acasxu_root() / "nnet").is_dir():
        print(f"\n4. Local robustness: skipped, no ACAS Xu data at {acasxu_root()} (set TRUSTCASE_ACASXU)")
        return
    spec = importlib.util.spec_from_file_location("acas_bench", ROOT / "use_cases" / "acas_xu" / "acas.py")
    acas = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(acas)
    net = acas.negated("1_1")  # arg-max = the advisory
    layers = B.linearise(net)
    points = acas.Samples("test").x[: 30 if quick else 100].astype(np.float64)
    radii = [0.0005, 0.001, 0.002, 0.005, 0.01]  # L-inf, input scaled to [0, 1] (the value range is [-1, 1])
    with torch.no_grad():
        preds = net(torch.from_numpy(points).float()).argmax(1).numpy()

    def ibp(x, eps, c):
        lo, hi = torch.from_numpy(x - eps)[None], torch.from_numpy(x + eps)[None]
        z_lo, z_hi = B.interval(layers[:-1], lo, hi)[-1] if len(layers) > 1 else (lo, hi)
        h_lo, h_hi = z_lo.clamp_min(0), z_hi.clamp_min(0)
        last = layers[-1]
        diff_w = last.W[c] - last.W  # rows: y_c - y_j
        mid, rad = (h_lo + h_hi) / 2, (h_hi - h_lo) / 2
        lower = mid @ diff_w.T - rad @ diff_w.abs().T + (last.b[c] - last.b)
        return bool((torch.cat([lower[0, :c], lower[0, c + 1:]]) > B.TOLERANCE).all())

    x1 = torch.from_numpy(points[:1]).float()
    with torch.no_grad():
        t = time.perf_counter()
        for _ in range(200):
            net(x1)
    forward = (time.perf_counter() - t) / 200
    print(f"\n4. Local robustness, ACAS Xu N_1,1, {len(points)} sampled situations (verified / falsified / unknown)")
    print(f"{'radius':>8} {'trustcase':>16} {'ms/ball':>8} {'IBP verified':>13} {'ms/ball':>8} "
          f"{'forward passes/ball':>20}")
    with single_thread():
        for r in radii:
            eps = 2 * r
            t = time.perf_counter()
            verdicts = [verify_ball(layers, lambda v: net(v), change_property("b", x - eps, x + eps, int(c), 5), 2.0)
                        for x, c in zip(points, preds, strict=True)]
            ours = (time.perf_counter() - t) / len(points)
            t = time.perf_counter()
            ref = sum(ibp(x, eps, int(c)) for x, c in zip(points, preds, strict=True))
            ib = (time.perf_counter() - t) / len(points)
            v, f = verdicts.count("verified"), verdicts.count("falsified")
            print(f"{r:>8g} {f'{v} / {f} / {len(points) - v - f}':>16} {ours * 1e3:>8.2f} {ref:>13} {ib * 1e3:>8.2f} "
                  f"{ours / forward:>20.0f}")
    print("   IBP never verifies more (it is looser); a falsified ball has a re-checked counterexample")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--acas", action="store_true", help="all 186 ACAS Xu instances (long)")
    ap.add_argument("--timeout", type=float, default=60.0, help="ACAS Xu budget per instance, seconds")
    a = ap.parse_args()
    print(f"torch threads: {torch.get_num_threads()}")
    bench_smoothing(a.quick)
    bench_lipschitz(a.quick)
    bench_acas(a.acas, a.timeout)
    bench_local(a.quick)


if __name__ == "__main__":
    main()

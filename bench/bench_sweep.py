"""Perturbation sweep benchmark: overhead, memory/time scale, per-perturbation throughput.

    .venv/bin/python bench/bench_sweep.py [--quick]

1. Overhead: wall time of a sweep / (time to apply the same perturbations alone + time of the model's
   forward passes alone on the same batches), inline and with a 2-thread perturbation pool. Target <= 1.15.
2. Scale: peak RSS and wall time of the same sweep over 2k and 20k images (1k and 10k with --quick), each
   in a fresh process. Target: peak memory within 1.2x, time growing linearly.
3. Throughput of every perturbation (images/s) against a plain OpenCV/numpy implementation of the
   same operation (and albumentations where it has one), on one batch.

Data: Fashion-MNIST from Debian (`apt-get install dataset-fashion-mnist`), read item by item from
the files (nothing held in memory); synthetic 28x28 images when it is absent (said in the output).
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

from trustcase.data.streaming import Item  # noqa: E402

FASHION = Path("/usr/share/datasets/fashion-mnist")
CLASSES = ["tshirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot"]
PERTURBATIONS = ["gaussian_blur", "dead_pixels", "jpeg", "rotation"]


def _unpacked(name: str) -> Path:
    """The IDX file decompressed once into a cache folder, so that items can be read one by one."""
    out = Path(tempfile.gettempdir()) / "trustcase-bench-fashion" / name.removesuffix(".gz")
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".part")
        tmp.write_bytes(gzip.decompress((FASHION / name).read_bytes()))
        tmp.rename(out)
    return out


class FashionSplit:
    """Fashion-MNIST read item by item (pread): memory does not grow with the number of items."""

    def __init__(self, split: str, n: int | None = None):
        prefix = "t10k" if split == "test" else "train"
        self.images = os.open(_unpacked(f"{prefix}-images-idx3-ubyte.gz"), os.O_RDONLY)
        self.labels = os.open(_unpacked(f"{prefix}-labels-idx1-ubyte.gz"), os.O_RDONLY)
        total = int.from_bytes(os.pread(self.images, 4, 4), "big")
        self.n = total if n is None else min(n, total)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> Item:
        image = np.frombuffer(os.pread(self.images, 784, 16 + 784 * i), np.uint8).reshape(28, 28)
        label = os.pread(self.labels, 1, 8 + i)[0]
        return Item(image=image.copy(), label=int(label), id=f"fm{i}")


class SyntheticSplit:
    """Seeded 28x28 blobs, generated on demand: the fallback when Fashion-MNIST is not installed."""

    def __init__(self, split: str, n: int | None = None):
        self.n = n or 10_000

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> Item:
        rng = np.random.default_rng(i)
        yy, xx = np.mgrid[:28, :28]
        cy, cx, r = rng.uniform(8, 20), rng.uniform(8, 20), rng.uniform(3, 9)
        image = 200 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r)) + rng.normal(0, 10, (28, 28))
        return Item(image=np.clip(image, 0, 255).astype(np.uint8), label=int(r // 0.61) % 10, id=f"syn{i}")


def loader_name() -> str:
    installed = (FASHION / "t10k-images-idx3-ubyte.gz").exists()
    return "bench_sweep:FashionSplit" if installed else "bench_sweep:SyntheticSplit"


def setup(n: int, split: str = "test", seed: int = 0):
    import torch

    from trustcase.data.streaming import DataSource
    from trustcase.models.classifier import Classifier
    from trustcase.schemas import UseCase

    uc = UseCase.model_validate({
        "id": "fashion", "title": "bench", "owner": "bench", "criticality": "low", "intended_function": "bench",
        "model": {"format": "torchscript", "path": "unused.pt", "input_shape": [1, 28, 28],
                  "normalisation": {"mean": [0.286], "std": [0.353]}, "class_names": CLASSES,
                  "critical_class": "bag"},
        "data": {"loader": loader_name(), "path": str(HERE), "params": {"n": n},
                 "splits": {"test": split}, "batch_size": 256},
        "requirements": [], "plan": {"checks": []},
    })
    torch.manual_seed(seed)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(1, 16, 3), torch.nn.ReLU(), torch.nn.MaxPool2d(2), torch.nn.Conv2d(16, 32, 3),
        torch.nn.ReLU(), torch.nn.MaxPool2d(2), torch.nn.Flatten(), torch.nn.Linear(32 * 5 * 5, 10),
    ).eval()
    return uc, Classifier(uc.model, module=net), DataSource(uc.data, seed)


def run_sweep(uc, clf, data, perturbations, workers: int, workdir: Path):
    from trustcase.checks import Context, build
    from trustcase.schemas import CheckSpec

    check = build(CheckSpec(check="perturbation_sweep",
                            params={"perturbations": {p: None for p in perturbations}, "workers": workers,
                                    "strip": False}))
    ctx = Context(use_case=uc, model=clf, data=data, seed=0, workdir=workdir / "perturbation_sweep")
    t0 = time.perf_counter()
    out = check(ctx)
    return time.perf_counter() - t0, out


def reference_time(uc, clf, batches) -> tuple[float, float]:
    """Seconds to apply the sweep's perturbations alone, and to run the model alone on their outputs."""
    from trustcase.robustness import perturbations as P
    from trustcase.seeding import item_seeds
    perturbed, t_pert = [], 0.0
    for name in PERTURBATIONS:
        pert = P.get(name, uc.model.value_range)
        for b in batches:
            seeds = item_seeds(0, "perturbation_sweep", b.ids, name)
            for a in [0.0, *pert.grid]:
                t0 = time.perf_counter()
                perturbed.append(pert.apply(b.images, a, seeds))
                t_pert += time.perf_counter() - t0
    t0 = time.perf_counter()
    for x in perturbed:
        clf.logits(x)
    return t_pert, time.perf_counter() - t0


def overhead(n: int, repeats: int) -> None:
    from trustcase.checks import check_class
    from trustcase.robustness import perturbations as P

    check_class("perturbation_sweep")  # import every check module now, not inside the first timing
    uc, clf, data = setup(n)
    batches = list(data.stream("test").batches())  # the reference may hold them: it measures compute only
    best = {"perturb": math.inf, "model": math.inf, 0: math.inf, 2: math.inf}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(repeats):  # interleaved, best of each: the machine is shared
            t_pert, t_model = reference_time(uc, clf, batches)
            best["perturb"], best["model"] = min(best["perturb"], t_pert), min(best["model"], t_model)
            for workers in (0, 2):
                best[workers] = min(best[workers], run_sweep(uc, clf, data, PERTURBATIONS, workers, Path(tmp))[0])
    ref = best["perturb"] + best["model"]
    print(f"\n## 1. Sweep overhead ({n} images, {', '.join(PERTURBATIONS)} on their default grids, "
          f"{sum(len(P.get(p, (0, 255)).grid) + 1 for p in PERTURBATIONS)} passes per image, best of {repeats})")
    print(f"perturbations alone: {best['perturb']:7.2f} s   model forward alone: {best['model']:7.2f} s   "
          f"sum: {ref:7.2f} s")
    print(f"{'perturbation threads':>22} | {'sweep s':>8} | {'overhead ratio':>14} | target <= 1.15")
    for workers in (0, 2):
        r = best[workers] / ref
        print(f"{workers or 'inline':>22} | {best[workers]:8.2f} | {r:14.3f} | {'ok' if r <= 1.15 else 'ABOVE'}")


def child(n: int) -> None:
    """One sweep in this fresh process; prints its time and memory as JSON."""
    from trustcase.checks import check_class

    check_class("perturbation_sweep")  # imports outside the timing
    uc, clf, data = setup(n, split="train")
    base = _rss_mb()
    cpu = time.process_time()
    with tempfile.TemporaryDirectory() as tmp:
        t, out = run_sweep(uc, clf, data, ["gaussian_blur", "dead_pixels"], 0, Path(tmp))
    cpu = time.process_time() - cpu  # CPU seconds of every thread: less sensitive to other users of the machine
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"n": out.summary["gaussian_blur"]["n"], "seconds": t, "cpu": cpu, "peak_mb": peak,
                      "base_mb": base}))


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def scale(small: int, large: int) -> None:
    runs = []
    for n in (small, large, small):  # the small size twice, around the large: load drifts on a shared machine
        p = subprocess.run([sys.executable, __file__, "--child", str(n)], capture_output=True, text=True, check=True)
        runs.append(json.loads(p.stdout.strip().splitlines()[-1]))
    s = min(runs[0], runs[2], key=lambda r: r["seconds"]) | {"peak_mb": max(runs[0]["peak_mb"], runs[2]["peak_mb"]),
                                                             "cpu": min(runs[0]["cpu"], runs[2]["cpu"])}
    lg = runs[1]
    print("\n## 2. Scale (gaussian_blur + dead_pixels sweep, default grids, one process per run; small size: "
          "faster of two runs)")
    print(f"{'images':>8} | {'seconds':>8} | {'us/image':>8} | {'CPU us/image':>12} | {'peak RSS MB':>11} | "
          f"{'RSS before sweep MB':>19}")
    for r in (s, lg):
        print(f"{r['n']:>8} | {r['seconds']:8.2f} | {1e6 * r['seconds'] / r['n']:8.1f} | "
              f"{1e6 * r['cpu'] / r['n']:12.1f} | {r['peak_mb']:11.1f} | {r['base_mb']:19.1f}")
    mem = lg["peak_mb"] / s["peak_mb"]
    grow = (lg["peak_mb"] - lg["base_mb"]) / max(s["peak_mb"] - s["base_mb"], 1e-9)
    t = (lg["seconds"] / lg["n"]) / (s["seconds"] / s["n"])
    print(f"peak memory ratio {lg['n']}/{s['n']}: {mem:.3f} (target <= 1.2: {'ok' if mem <= 1.2 else 'ABOVE'}); "
          f"growth during the sweep ratio: {grow:.2f}")
    cpu = (lg["cpu"] / lg["n"]) / (s["cpu"] / s["n"])
    print(f"time per image ratio {lg['n']}/{s['n']}: wall {t:.3f}, CPU {cpu:.3f} (1.0 = linear)")


def references():
    """Plain OpenCV/numpy versions of each perturbation, for the throughput comparison."""
    import cv2

    from trustcase.robustness.perturbations import disk_kernel, line_kernel

    def per(fn):
        return lambda x, a, rng: np.stack([fn(img, a, rng).reshape(img.shape) for img in x])

    def line(img, a, rng):
        k = line_kernel(a, rng.uniform(0, 180)).astype(np.float32)
        return cv2.filter2D(img, -1, k)

    def occlude(img, a, rng):
        out, s = img.copy(), int(round(a * 28))
        y, x = rng.integers(0, 28 - s + 1, 2)
        out[y:y + s, x:x + s] = 0
        return out

    def columns(img, a, rng):
        out = img.copy()
        out[:, rng.choice(28, int(a), replace=False)] = 0
        return out

    def rows(img, a, rng):
        return columns(img.T, a, rng).T

    def rotate(img, a, rng):
        return cv2.warpAffine(img, cv2.getRotationMatrix2D((13.5, 13.5), a, 1.0), (28, 28),
                              borderMode=cv2.BORDER_REFLECT_101)

    def translate(img, a, rng):
        t = rng.uniform(0, 2 * np.pi)
        return cv2.warpAffine(img, np.float32([[1, 0, a * np.cos(t)], [0, 1, a * np.sin(t)]]), (28, 28),
                              borderMode=cv2.BORDER_REFLECT_101)

    def jpeg(img, a, rng):
        return cv2.imdecode(cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, int(100 - a)])[1], 0)

    def noise(x, a, rng):
        return np.clip(x + rng.normal(0, a * 255, x.shape), 0, 255).astype(np.uint8)

    def dead(x, a, rng):
        out = x.copy()
        out[rng.random(x.shape) < a] = 0
        return out

    def gamma(x, a, rng):
        lut = np.clip(255 * (np.arange(256) / 255) ** (1 + a), 0, 255).astype(np.uint8)
        return cv2.LUT(x, lut)

    def contrast(x, a, rng):
        m = x.mean(axis=(1, 2, 3), keepdims=True)
        return np.clip(m + (1 - a) * (x - m), 0, 255).astype(np.uint8)

    return {
        "gaussian_blur": per(lambda img, a, r: cv2.GaussianBlur(img, (2 * math.ceil(3 * a) + 1,) * 2, a)),
        "motion_blur": per(line),
        "defocus": per(lambda img, a, r: cv2.filter2D(img, -1, disk_kernel(a).astype(np.float32))),
        "brightness": lambda x, a, rng: np.clip(x.astype(np.int16) + int(a * 255), 0, 255).astype(np.uint8),
        "contrast": contrast, "gamma": gamma, "gaussian_noise": noise, "dead_pixels": dead,
        "dead_columns": per(columns), "dead_rows": per(rows), "jpeg": per(jpeg), "occlusion": per(occlude),
        "rotation": per(rotate), "translation": per(translate),
    }


def albumentations_versions():
    import albumentations as A

    def per(make):
        def run(x, a, rng):
            t = make(a)
            return np.stack([t(image=img)["image"].reshape(img.shape) for img in x])
        return run

    return {
        "gaussian_blur": per(lambda a: A.GaussianBlur(blur_limit=(2 * math.ceil(3 * a) + 1,) * 2,
                                                      sigma_limit=(a, a), p=1)),
        "defocus": per(lambda a: A.Defocus(radius=(max(1, int(a)),) * 2, p=1)),
        "motion_blur": per(lambda a: A.MotionBlur(blur_limit=(int(a) | 1,) * 2, p=1)),
        "jpeg": per(lambda a: A.ImageCompression(quality_range=(int(100 - a),) * 2, p=1)),
        "rotation": per(lambda a: A.Affine(rotate=(a, a), p=1)),
        "gaussian_noise": per(lambda a: A.GaussNoise(std_range=(a, a), p=1)),
    }


def throughput(n: int) -> None:
    from trustcase.robustness import perturbations as P
    from trustcase.seeding import item_seeds
    uc, _, data = setup(n)
    batch = next(iter(data.stream("test").batches(n)))
    x = batch.images
    seeds = item_seeds(0, "bench", batch.ids, "perturbations")
    refs, albu = references(), albumentations_versions()

    def rate(fn) -> float:
        fn()  # warm-up
        reps, t0 = 0, time.perf_counter()
        while reps < 3 or time.perf_counter() - t0 < 0.5:
            fn()
            reps += 1
        return reps * len(x) / (time.perf_counter() - t0)

    print(f"\n## 3. Throughput per perturbation (one batch of {len(x)} 28x28 uint8 images, middle of the grid)")
    print(f"{'perturbation':>15} | {'amplitude':>9} | {'trustcase img/s':>15} | {'OpenCV/numpy img/s':>18} | "
          f"{'cost vs plain':>13} | {'albumentations img/s':>20}")
    rng = np.random.default_rng(0)
    for name in sorted(P.PERTURBATIONS):
        pert = P.get(name, (0, 255))
        a = pert.grid[len(pert.grid) // 2]
        ours = rate(lambda p=pert, a=a: p.apply(x, a, seeds))
        ref = rate(lambda f=refs[name], a=a: f(x, a, rng))
        alb = f"{rate(lambda f=albu[name], a=a: f(x, a, rng)):20.0f}" if name in albu else f"{'-':>20}"
        print(f"{name:>15} | {a:9g} | {ours:15.0f} | {ref:18.0f} | {ref / ours:12.2f}x | {alb}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller sizes (about a minute)")
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child)
        return
    import torch

    src = "Fashion-MNIST (Debian)" if loader_name().endswith("FashionSplit") else \
        "SYNTHETIC images (Fashion-MNIST not installed: apt-get install dataset-fashion-mnist)"
    print(f"# Perturbation sweep benchmark: data {src}; torch threads {torch.get_num_threads()}, "
          f"cores {os.cpu_count()}, load average {os.getloadavg()[0]:.1f}")
    overhead(500 if args.quick else 2000, 1 if args.quick else 3)
    scale(*((1000, 10_000) if args.quick else (2000, 20_000)))
    throughput(256 if args.quick else 512)


if __name__ == "__main__":
    main()

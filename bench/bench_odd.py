"""ODD monitor cost next to the model it guards, and calibration cost vs the number of calibration images.

    .venv/bin/python bench/bench_odd.py [--quick]

1. Monitor cost per input / model forward cost per input, at batch 1 and 64 (target <= 0.1), on the bundled
   solar-cell CNN. "monitor" is what the monitor adds to the forward pass production runs anyway: the
   descriptors of the specification plus the learned scores from the features that pass yields. Also the
   end-to-end ratio (forward with feature capture + monitor, minus the plain forward). Timings are medians
   of interleaved repetitions (robust to other load on the machine).
2. Calibration (streaming fit + threshold calibration) time and peak traced memory (numpy/Python, by
   tracemalloc) for growing numbers of calibration images: memory must stay flat.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time
import tracemalloc
from pathlib import Path

from trustcase.data.streaming import Batch, DataSource
from trustcase.models.classifier import sha256_file
from trustcase.models.loading import load_classifier
from trustcase.odd import monitor as odd
from trustcase.schemas import load_use_case

ROOT = Path(__file__).resolve().parent.parent
USE_CASE = ROOT / "use_cases" / "solar_cells" / "use_case.yaml"


def median_time(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def stream(data: DataSource, role: str, n: int, batch: int = 64):
    """n items of a split in batches, cycling when n exceeds the split (positions kept unique)."""
    seen = 0
    for rnd in itertools.count():
        for b in data.stream(role).batches(batch):
            take = min(len(b), n - seen)
            yield Batch(images=b.images[:take], labels=b.labels[:take], ids=b.ids[:take],
                        meta={k: v[:take] for k, v in b.meta.items()}, index=b.index[:take] + rnd * 10**6)
            seen += take
            if seen >= n:
                return


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer repetitions and calibration sizes")
    args = ap.parse_args()
    uc = load_use_case(USE_CASE)
    if not Path(uc.model.path).is_file():
        raise SystemExit(f"no bundled model at {uc.model.path}: run `trustcase demo` once to train it")
    clf = load_classifier(uc.model)
    sha = sha256_file(Path(uc.model.path))
    data = DataSource(uc.data, 0)
    spec = odd.SpecificationMonitor.from_odd(uc.odd.descriptors, uc.model.value_range)
    n_fit = 400 if args.quick else 1600
    mon = odd.fit(clf, sha, spec, stream(data, "train", n_fit), stream(data, "validation", 300))
    ex = mon.extractor
    images = next(iter(data.stream("test").batches(64))).images
    meta64 = {"cell_type": ["mono"] * 64}

    print(f"model: {uc.model.path.name}, input {uc.model.input_shape}, features {ex.mode} "
          f"({mon.learned.info['feature_dim']} dims, Mahalanobis rank {mon.learned.mahalanobis.rank})")
    print("\n1. cost per input (median of interleaved repetitions)")
    print(f"{'batch':>5} {'forward ms':>11} {'spec ms':>8} {'learned ms':>11} {'monitor/forward':>16} "
          f"{'end-to-end/forward':>19}")
    for bs in (1, 64):
        x, meta = images[:bs], {k: v[:bs] for k, v in meta64.items()}
        reps = (40 if bs == 1 else 8) if args.quick else (200 if bs == 1 else 30)
        feats, logits = ex(x)
        fwd, sp, le, e2e = [], [], [], []
        for _ in range(reps):  # interleaved, so that load on the machine hits every measure alike
            fwd.append(median_time(lambda x=x: clf.logits(x), 1))
            sp.append(median_time(lambda x=x, meta=meta: mon.spec.evaluate(x, meta), 1))
            le.append(median_time(lambda f=feats, lg=logits: mon.learned.judge(
                mon.learned.statistic(mon.learned.raw(f, lg))), 1))
            e2e.append(median_time(lambda x=x, meta=meta: mon.evaluate(x, meta), 1))
        f, s, lr, e = (statistics.median(v) for v in (fwd, sp, le, e2e))
        print(f"{bs:>5} {f / bs * 1e3:>11.3f} {s / bs * 1e3:>8.3f} {lr / bs * 1e3:>11.3f} {(s + lr) / f:>16.3f} "
              f"{(e - f) / f:>19.3f}")
    print("   target: monitor/forward <= 0.1")

    print("\n2. calibration vs number of calibration images (fit on n, calibrate on n; batches of 64)")
    print(f"{'n':>6} {'time s':>8} {'ms/image':>9} {'peak traced MB':>15}")
    for n in ((128, 512) if args.quick else (128, 256, 512, 1024, 2048)):
        tracemalloc.start()
        t = time.perf_counter()
        odd.fit(clf, sha, spec, stream(data, "train", n), stream(data, "validation", n))
        dt = time.perf_counter() - t
        peak = tracemalloc.get_traced_memory()[1] / 2**20
        tracemalloc.stop()
        print(f"{n:>6} {dt:>8.2f} {dt / (2 * n) * 1e3:>9.2f} {peak:>15.1f}")
    print("   flat memory: the fit keeps K means and one d x d scatter; calibration one scalar per score and item")


if __name__ == "__main__":
    main()

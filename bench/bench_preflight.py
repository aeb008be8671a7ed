"""Bad-input guards benchmark: what judging every item and the one preflight cost.

    .venv/bin/python bench/bench_preflight.py [--quick]

1. Streaming overhead: time to stream the ELPV train split (64x64, through the elpv loader) with every item
   judged against the model's input contract (shape, numeric type, finite values) / without, same process,
   interleaved repetitions, best of each. Target <= 1.05. Then the same cost measured directly: judging one
   item / reading one (robust when other work shares the machine).
2. Preflight: wall time of `preflight` on the bundled solar-cell use case (schema, plan, claims, model load and
   probe, loader signature, first item of each split) against the time of streaming its test split once
   (the cheapest part of an assessment). Printed as a ratio; target < 1.
Needs the `elpv-dataset` package and the bundled model (`trustcase demo` trains it), else a tiny stand-in.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from trustcase.data.streaming import DataSource, judge_item  # noqa: E402
from trustcase.flows.preflight import preflight  # noqa: E402
from trustcase.schemas import load_use_case  # noqa: E402

USE_CASE = ROOT / "use_cases" / "solar_cells" / "use_case.yaml"


def stream(source: DataSource, role: str) -> int:
    return sum(len(b) for b in source.stream(role).batches())


def best(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="a capped split, fewer repetitions")
    a = ap.parse_args()
    uc = load_use_case(USE_CASE)
    if a.quick:
        uc = uc.model_copy(update={"data": uc.data.model_copy(update={"max_samples": {"train": 400}})})
    reps = 2 if a.quick else 3
    judged, plain = DataSource(uc.data, 0, uc.model), DataSource(uc.data, 0)
    n = stream(judged, "train")  # warm the file cache for both
    t_judged, t_plain = [], []
    for _ in range(reps):  # interleaved, so drift on a shared machine hits both alike
        t_plain.append(best(lambda: stream(plain, "train"), 1))  # noqa: B023  (called at once)
        t_judged.append(best(lambda: stream(judged, "train"), 1))  # noqa: B023
    ratio = min(t_judged) / min(t_plain)
    print(f"1. streaming {n} train items: judged {min(t_judged):.2f} s, not judged {min(t_plain):.2f} s "
          f"-> overhead ratio {ratio:.3f} (target <= 1.05)")
    # the same cost measured directly (robust on a busy machine): judging one item vs reading one
    batch = next(plain.stream("train").batches())
    t0 = time.perf_counter()
    for _ in range(20):
        for image in batch.images:
            judge_item(image, judged.expected)
    per_item = (time.perf_counter() - t0) / (20 * len(batch))
    print(f"   judging one item {per_item * 1e6:.1f} us vs reading one {min(t_plain) / n * 1e3:.2f} ms "
          f"-> ratio {per_item / (min(t_plain) / n):.4f}")

    if not Path(uc.model.path).is_file():
        print(f"2. skipped: no bundled model at {uc.model.path} (run `trustcase demo` once)")
        return
    t_pre = best(lambda: preflight(USE_CASE), reps)
    t_test = best(lambda: stream(DataSource(uc.data, 0, uc.model), "test"), reps)
    print(f"2. preflight of the bundled use case {t_pre:.2f} s vs one pass over its test split {t_test:.2f} s "
          f"-> ratio {t_pre / t_test:.2f} (target < 1)")


if __name__ == "__main__":
    main()

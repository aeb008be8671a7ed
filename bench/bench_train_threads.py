"""The solar training on one torch thread against two, alternated in one run.

    .venv/bin/python bench/bench_train_threads.py [--rounds 3] [--epochs 2]

Each round trains the default recipe for `--epochs` epochs (whole training split) with `THREADS` = 1, then 2, and
prints wall and CPU seconds and the load; then the wall ratio two threads / one per round. Two threads give other
weights (sums in another order), so the default stays one thread unless two are clearly faster where the demo
runs. Measured beside other jobs (load 15-21, 2 cores): 3.6, 7.3, 7.3 times slower, with 5.7-7.3 times the CPU
seconds (each thread spins while the other waits for a core).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import tempfile
import time
from pathlib import Path

TRAIN = Path(__file__).resolve().parent.parent / "use_cases" / "solar_cells" / "train.py"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=2)
    a = ap.parse_args()
    spec = importlib.util.spec_from_file_location("solar_train_bench", TRAIN)
    train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train)
    walls: dict[int, list[float]] = {1: [], 2: []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(a.rounds):
            for threads in (1, 2):
                train.THREADS = threads
                t0, c0 = time.perf_counter(), time.process_time()
                train.train(Path(tmp) / f"m{threads}.pt", epochs=a.epochs, log=lambda *_: None)
                wall, cpu = time.perf_counter() - t0, time.process_time() - c0
                walls[threads].append(wall)
                print(f"round {r + 1}, {threads} thread(s): wall {wall:6.1f} s, CPU {cpu:6.1f} s "
                      f"(load {os.getloadavg()[0]:.1f})", flush=True)
    print("wall ratio 2 threads / 1 per round:", ", ".join(f"{b / a:.2f}" for a, b in zip(walls[1], walls[2])))


if __name__ == "__main__":
    main()

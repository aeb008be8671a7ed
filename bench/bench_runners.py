"""The demo's assessment on the thread runner against a local Dask cluster of two worker processes.

    .venv/bin/python bench/bench_runners.py [--quick] [--rounds 1]

Each round runs `trustcase assess` on the bundled solar-cell use case twice, from a fresh cache, Prefect home
and MLflow store: threads in one process with one torch thread (`OMP_NUM_THREADS=1`), then `--runner dask`
(two workers, one torch thread each: what `trustcase demo` runs). Printed per run: wall seconds, CPU seconds of
the command and everything it started (workers, Prefect's server), the load; per round the wall ratio dask /
thread, measured in one run so the machine's load weighs on both. Then the evidence of the two runs: every
claim and every measurement must be identical, but for the balls `local_robustness` decides within a
wall-clock budget (a loaded machine may leave more of them unknown), listed apart. `--quick`: a 700-cell
subset. The bundled model must exist (`make demo`).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
BUNDLED = ROOT / "use_cases" / "solar_cells" / "use_case.yaml"
TRUSTCASE = ROOT / ".venv" / "bin" / "trustcase"
WALL_CLOCK_BUDGET = "local_robustness"  # its balls get `timeout` seconds of wall clock: load may move them


def use_case_file(tmp: Path, quick: bool) -> Path:
    raw = yaml.safe_load(BUNDLED.read_text())
    raw["model"]["path"] = str((BUNDLED.parent / raw["model"]["path"]).resolve())
    if not Path(raw["model"]["path"]).is_file():
        sys.exit(f"bench: no {raw['model']['path']}: train the bundled model first (`make demo`)")
    raw["data"]["path"] = str(BUNDLED.parent)
    if quick:
        raw["data"]["max_samples"] = {"train": 400, "validation": 100, "test": 200}
    path = tmp / "use_case.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def assess(path: Path, folder: Path, runner: str) -> dict:
    """One `trustcase assess` from scratch: its wall and CPU seconds (children reaped included) and its record."""
    (folder / "prefect").mkdir(parents=True)
    env = {**os.environ, "TRUSTCASE_CACHE": str(folder / "cache"), "PREFECT_HOME": str(folder / "prefect")}
    if runner == "thread":
        env["OMP_NUM_THREADS"] = "1"  # the workers' torch thread count: the same evidence bit for bit
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    load, t0 = os.getloadavg()[0], time.perf_counter()
    done = subprocess.run([str(TRUSTCASE), "assess", str(path), "--out", str(folder / "out"), "--tracking-uri",
                           f"sqlite:///{folder / 'mlflow.db'}", "--runner", runner], env=env, capture_output=True,
                          text=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode not in (0, 3):
        sys.exit(f"bench: {runner} runner exit {done.returncode}:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    noise = [line for line in done.stderr.splitlines() if line.strip() and not line.startswith("Assessing ")]
    return {"wall": wall, "cpu": cpu, "load": (load + os.getloadavg()[0]) / 2, "noise": noise,
            "record": json.loads((folder / "out" / "assessment.json").read_text())}


def measurements(record: dict) -> dict:
    return {(m["check"], m["metric"], json.dumps(m.get("scope"), sort_keys=True), m.get("amplitude")): m["value"]
            for o in record["outcomes"] for m in o["measurements"]}


def compare(a: dict, b: dict) -> tuple[list, list]:
    """Claims and measurements that differ: (outside the wall-clock budget, inside it)."""
    claims = {e["claim_id"]: (e["verdict"], e["value"]) for e in a["evidence"] if e.get("claim_id")}
    other = {e["claim_id"]: (e["verdict"], e["value"]) for e in b["evidence"] if e.get("claim_id")}
    ma, mb = measurements(a), measurements(b)
    differ = [("claim", k, claims.get(k), other.get(k)) for k in sorted(set(claims) | set(other))
              if claims.get(k) != other.get(k)]
    differ += [("measurement", k, ma.get(k), mb.get(k)) for k in sorted(set(ma) | set(mb), key=str)
               if ma.get(k) != mb.get(k)]
    budget = {e["claim_id"] for e in a["evidence"] if e.get("check") == WALL_CLOCK_BUDGET}
    inside = [d for d in differ if (d[1][0] == WALL_CLOCK_BUDGET if d[0] == "measurement" else d[1] in budget)]
    return [d for d in differ if d not in inside], inside


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="a 700-cell subset instead of the whole dataset")
    ap.add_argument("--rounds", type=int, default=1)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = use_case_file(Path(tmp), a.quick)
        for r in range(a.rounds):
            runs = {runner: assess(path, Path(tmp) / f"{runner}{r}", runner) for runner in ("thread", "dask")}
            for runner, x in runs.items():
                print(f"round {r + 1} {runner:6s}: wall {x['wall']:6.1f} s, CPU {x['cpu']:6.1f} s (load "
                      f"{x['load']:.1f}); {len(x['noise'])} lines on the terminal besides the progress bar")
                for line in x["noise"][:5]:
                    print("    ", line[:160])
            print(f"round {r + 1} wall ratio dask / thread: {runs['dask']['wall'] / runs['thread']['wall']:.2f}, "
                  f"CPU ratio {runs['dask']['cpu'] / runs['thread']['cpu']:.2f}")
            differ, budget = compare(runs["thread"]["record"], runs["dask"]["record"])
            n = len(measurements(runs["thread"]["record"]))
            print(f"evidence: {n} measurements; {len(differ)} differ outside the wall-clock budget, {len(budget)} "
                  f"inside it ({WALL_CLOCK_BUDGET}'s balls)")
            for d in differ + budget:
                print("  ", d[0], d[1], d[2], "->", d[3])


if __name__ == "__main__":
    main()

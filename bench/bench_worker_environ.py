"""The CPU a local Dask cluster's workers spend on the same checks, with and without Dask's default worker
environment (`MALLOC_TRIM_THRESHOLD_=65536`, which `runners.WORKER_ENVIRON` unsets).

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python bench/bench_worker_environ.py [--rounds 2] [--full]
        [--checks adversarial,randomized_smoothing,...]

One process runs `runners.run(..., runner="dask", workers=2)` on the bundled solar-cell case (the 700-cell subset
of `bench_runners.py --quick`; `--full`: all of it; `--checks`: only those checks of the plan and the claims they
measure) in alternating order (ours, Dask's, Dask's, ours, ...: a
drift of the machine's load weighs on both), each from a fresh result cache and MLflow store. Printed per run:
the workers' CPU seconds, user and system (the children this process reaped when the cluster closed), this
process's own, and the load; then the ratio Dask's / ours of the workers' CPU per round, and whether the two
evidences are identical (`bench_runners.compare`: every claim and measurement, `local_robustness`'s wall-clock
balls listed apart). The bundled model must exist (`make demo`).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_runners import compare, measurements, use_case_file  # noqa: E402


def one(path: Path, folder: Path, environ: dict) -> dict:
    from trustcase.flows import runners

    os.environ["TRUSTCASE_CACHE"] = str(folder / "cache")
    os.environ.pop("MALLOC_TRIM_THRESHOLD_", None)  # a nanny leaves its workers' environment in this process's
    runners.WORKER_ENVIRON = environ
    children, me = resource.getrusage(resource.RUSAGE_CHILDREN), resource.getrusage(resource.RUSAGE_SELF)
    load = os.getloadavg()[0]
    runners.run(str(path), str(folder / "out"), tracking_uri=f"sqlite:///{folder / 'mlflow.db'}", runner="dask",
                workers=2)
    children2, me2 = resource.getrusage(resource.RUSAGE_CHILDREN), resource.getrusage(resource.RUSAGE_SELF)
    return {"user": children2.ru_utime - children.ru_utime, "sys": children2.ru_stime - children.ru_stime,
            "main": (me2.ru_utime - me.ru_utime) + (me2.ru_stime - me.ru_stime),
            "load": (load + os.getloadavg()[0]) / 2,
            "record": json.loads((folder / "out" / "assessment.json").read_text())}


def only(path: Path, checks: list[str]) -> None:
    """The use case at `path` with only `checks` in its plan and the requirements they measure (preflight's rule)."""
    import yaml

    from trustcase.flows.preflight import plan
    from trustcase.schemas import parse_use_case

    raw = yaml.safe_load(path.read_text())
    raw["plan"]["checks"] = [c for c in raw["plan"]["checks"] if c["check"] in checks]
    uc = parse_use_case(yaml.safe_dump(raw, sort_keys=False), path)
    declared = [p for d in plan(uc, lambda *_: None) for p in d.produces or []]
    raw["requirements"] = [r for r, req in zip(raw["requirements"], uc.requirements, strict=True)
                           if any(p.covers(req) for p in declared)]
    path.write_text(yaml.safe_dump(raw, sort_keys=False))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--full", action="store_true", help="the whole dataset instead of the 700-cell subset")
    ap.add_argument("--checks", help="comma-separated checks of the plan to keep (default: the whole plan)")
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="trustcase-bench-environ-"))
    os.environ.setdefault("PREFECT_HOME", str(tmp / "prefect"))
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "ERROR")
    os.chdir(tmp)  # the workers' log (.trustcase/dask-workers.log) stays in the scratch folder
    from trustcase.flows import runners

    ours, dasks = dict(runners.WORKER_ENVIRON), {}
    path = use_case_file(tmp, not a.full)
    if a.checks:
        only(path, a.checks.split(","))
    for r in range(a.rounds):
        order = [("ours", ours), ("dask", dasks)]
        runs = {}
        for name, environ in order if r % 2 == 0 else order[::-1]:
            x = runs[name] = one(path, tmp / f"{name}{r}", environ)
            print(f"round {r + 1} {name:4s} environment: workers' CPU {x['user'] + x['sys']:6.1f} s (user "
                  f"{x['user']:.1f}, system {x['sys']:.1f}), this process {x['main']:.1f} s; load {x['load']:.1f}",
                  flush=True)
        w = {k: x["user"] + x["sys"] for k, x in runs.items()}
        differ, budget = compare(runs["ours"]["record"], runs["dask"]["record"])
        print(f"round {r + 1} workers' CPU ratio dask / ours: {w['dask'] / w['ours']:.2f}; system CPU "
              f"{runs['dask']['sys']:.1f} s vs {runs['ours']['sys']:.1f} s; "
              f"evidence: {len(measurements(runs['ours']['record']))} measurements, {len(differ)} differ outside "
              f"the wall-clock budget, {len(budget)} inside it", flush=True)
        for d in differ + budget:
            print("  ", d[0], d[1], d[2], "->", d[3])


if __name__ == "__main__":
    main()

"""Production figures: sweep wall time on a local Dask cluster (2 worker processes) vs the default
runner, and the overhead of `trustcase watch --once` when no new version is registered.

    .venv/bin/python bench/bench_production.py [--quick]

A small CNN is trained on real ELPV images (seconds), then the same assessment (data quality + a sweep
of several perturbations, one shard each) runs on each runner in a fresh output folder (no cache
reuse). Dask time includes starting and closing the local cluster, as a user would see it.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
SOLAR = ROOT / "use_cases" / "solar_cells"
sys.path.insert(0, str(ROOT))


def _train(model: Path, contract: Path, limit: int) -> None:
    spec = importlib.util.spec_from_file_location("solar_train_bench", SOLAR / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.train(model, epochs=2, width=4, use_case=contract, limit=limit, log=lambda *_: None)


def _case(folder: Path, model: Path, test: int, grid: list[float]) -> Path:
    raw = yaml.safe_load((SOLAR / "use_case.yaml").read_text())
    raw["model"].update(path=str(model), input_shape=[1, 32, 32])
    raw["data"].update(path=str(SOLAR), params={"size": 32, "threshold": 0.5},
                       max_samples={"train": 100, "validation": 50, "test": test}, batch_size=32)
    raw["plan"]["checks"] = [
        {"check": "data_quality"},
        {"check": "perturbation_sweep", "params": {"perturbations": {
            "gaussian_blur": grid, "gaussian_noise": [g / 20 for g in grid],
            "motion_blur": [2 * g for g in grid], "jpeg": [min(99.0, 20 * g) for g in grid]}}},
    ]
    path = folder / "use_case.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer images and amplitudes")
    args = ap.parse_args()
    test, grid = (80, [1.0, 2.0]) if args.quick else (300, [0.5, 1.0, 2.0, 3.0])
    tmp = Path(tempfile.mkdtemp(prefix="trustcase-bench-production-"))
    os.environ.setdefault("PREFECT_HOME", str(tmp / "prefect"))
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "ERROR")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "600")
    import trustcase  # noqa: F401  (telemetry off)
    from trustcase.flows import runners, tracking, watch
    from trustcase.models.classifier import sha256_file
    from trustcase.schemas import load_use_case

    model = tmp / "tiny.pt"
    case = _case(tmp, model, test, grid)
    _train(model, case, 300)
    uri = f"sqlite:///{tmp / 'mlflow.db'}"

    # warm-up: the temporary Prefect server and imports, not counted
    runners.run(str(case), str(tmp / "warmup"), tracking_uri=uri)
    rows = []
    for runner in ("thread", "dask"):
        t0 = time.perf_counter()
        result = runners.run(str(case), str(tmp / runner), tracking_uri=uri, runner=runner, workers=2)
        rows.append((runner, time.perf_counter() - t0, result.complete))

    # watch --once with nothing new: one version, already assessed
    tracking.configure(uri)
    uc = load_use_case(case)
    version = tracking.register_model(uc, model, sha256_file(model), {})
    client = watch._client(uri)[0]
    client.set_model_version_tag(tracking.registered_name(uc), version, "trustcase.verdict", "PASS")
    t0 = time.perf_counter()
    outcomes = watch.once(case, tmp / "watch", uri)
    idle = time.perf_counter() - t0
    assert outcomes == []

    shards = 4
    print(f"\nsweep: {test} test images, {shards} perturbations x {len(grid) + 1} amplitudes "
          f"(one shard per perturbation); {os.cpu_count()} cores")
    print(f"{'runner':<28}{'wall time (s)':>14}{'complete':>10}")
    for runner, t, ok in rows:
        label = "default (thread)" if runner == "thread" else "Dask local, 2 processes"
        print(f"{label:<28}{t:>14.1f}{str(ok):>10}")
    print(f"{'ratio dask / default':<28}{rows[1][1] / rows[0][1]:>14.2f}")
    print(f"\nwatch --once, nothing new: {idle:.2f} s")


if __name__ == "__main__":
    main()

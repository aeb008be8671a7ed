"""Prefect + MLflow overhead of the assess flow, as a ratio to the same checks called directly.

    .venv/bin/python bench/bench_assess.py [--quick]

Both sides run the same checks of the bundled solar-cell use case (data quality, performance, sweep),
judge the claims and render the report; the flow side adds Prefect tasks, persisted results and the
MLflow run with its artefacts. Each flow run writes to a fresh folder so nothing is served from cache.
The ephemeral Prefect server's start-up is a one-off per process and is reported on its own line.

The MLflow run lives as long as the assessment (created at the start, each check's metrics logged as it
finishes): the time spent in those live writes is measured during the warm flow run and set beside the
same metrics logged the old way, in one batch at the end, into a fresh run of the same store.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

import yaml  # noqa: E402

import trustcase  # noqa: E402,F401
from trustcase.checks import Context, build  # noqa: E402
from trustcase.data.streaming import DataSource  # noqa: E402
from trustcase.flows import tracking  # noqa: E402
from trustcase.models.loading import load_classifier  # noqa: E402
from trustcase.schemas import load_use_case  # noqa: E402
from trustcase.verdicts import judge  # noqa: E402

BUNDLED = ROOT / "use_cases" / "solar_cells" / "use_case.yaml"


def use_case_file(tmp: Path, quick: bool) -> Path:
    raw = yaml.safe_load(BUNDLED.read_text())
    raw["model"]["path"] = str((BUNDLED.parent / raw["model"]["path"]).resolve())
    raw["data"]["path"] = str(BUNDLED.parent)
    raw["plan"]["checks"] = [{"check": "data_quality"}, {"check": "performance"},
                             {"check": "perturbation_sweep",
                              "params": {"perturbations": {"gaussian_blur": [0.5, 1.0, 1.5, 2.0, 3.0]}}}]
    if quick:
        raw["data"]["max_samples"] = {"train": 400, "validation": 100, "test": 200}
    path = tmp / "use_case.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def direct(path: Path, out: Path) -> tuple[float, list]:
    from trustcase.data.content import content_hash

    t0 = time.perf_counter()
    uc = load_use_case(path)
    model = load_classifier(uc.model)
    content_hash(DataSource(uc.data, uc.plan.seed))  # the flow's data fingerprint
    outcomes = []
    for spec in uc.plan.checks:
        for check in build(spec).shards():
            ctx = Context(use_case=uc, model=model, data=DataSource(uc.data, uc.plan.seed), seed=uc.plan.seed,
                          workdir=out / "checks" / check.name)
            outcomes.append(check(ctx))
    judge(uc.requirements, outcomes)
    return time.perf_counter() - t0, outcomes


class LiveWrites:
    """Seconds spent in the run's writes before the end (creation, tags, each check's metrics)."""

    def __init__(self):
        self.seconds, self.calls = 0.0, 0
        for name in ("__init__", "tag", "log_outcome"):
            setattr(tracking.AssessmentRun, name, self._timed(getattr(tracking.AssessmentRun, name)))

    def _timed(self, fn):
        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - t0
                self.calls += 1
        return wrapper


def logged_at_the_end(record, use_case) -> float:
    """The old way: the run opened after the checks, every metric in one go (same keys, same batches)."""
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    t0 = time.perf_counter()
    client = MlflowClient()
    run = client.create_run(tracking.experiment(use_case), run_name="bench: logged at the end",
                            tags={"use_case": use_case.id})
    batch = []
    for o in record.outcomes:
        for m in o.measurements:
            if m.value is not None and m.value == m.value:
                batch.append(Metric(tracking.metric_key(m), float(m.value), 0, 0))
    for i in range(0, len(batch), 900):
        client.log_batch(run.info.run_id, metrics=batch[i:i + 900])
    client.set_terminated(run.info.run_id)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="a 700-image subset instead of the whole dataset")
    a = ap.parse_args()
    if not (BUNDLED.parent / "artefacts" / "solar_cnn.pt").exists():
        sys.exit("bench: train the bundled model first (`make demo` or use_cases/solar_cells/train.py)")
    from trustcase import reports
    from trustcase.flows.assess import assess
    from trustcase.schemas import Assessment

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        path = use_case_file(tmp, a.quick)
        uri = f"sqlite:///{tmp / 'mlflow.db'}"
        t_direct, _ = direct(path, tmp / "direct")
        t0 = time.perf_counter()
        first = assess(str(path), str(tmp / "flow0"), None, uri)
        t_first = time.perf_counter() - t0
        live = LiveWrites()
        t0 = time.perf_counter()
        assess(str(path), str(tmp / "flow1"), None, uri)
        t_flow = time.perf_counter() - t0
        record = Assessment.model_validate_json((first.out_dir / "assessment.json").read_text())
        t0 = time.perf_counter()
        reports.render(record, tmp / "render-only")
        t_render = time.perf_counter() - t0
        t_direct += t_render
        t_direct2, _ = direct(path, tmp / "direct2")  # again, to see the noise of the machine
        t_direct2 += t_render
        base = min(t_direct, t_direct2)
        print(f"{'quantity':52s} {'seconds':>9s}")
        print(f"{'checks called directly (+ report render), best of 2':52s} {base:9.2f}")
        print(f"{'flow, first in the process (starts Prefect server)':52s} {t_first:9.2f}")
        print(f"{'flow, server already running':52s} {t_flow:9.2f}")
        print(f"overhead ratio (flow / direct), warm server: {t_flow / base:.3f}  (target < 1.10)")
        print(f"overhead ratio including server start-up:    {t_first / base:.3f}")
        t_end = logged_at_the_end(record, load_use_case(path))
        print(f"{'live MLflow run: writes before the end (' + str(live.calls) + ' calls)':52s} {live.seconds:9.2f}")
        print(f"{'the same metrics logged at the end (old way)':52s} {t_end:9.2f}")
        print(f"live run's extra cost, share of the warm flow: {(live.seconds - t_end) / t_flow:+.3%}")


if __name__ == "__main__":
    main()

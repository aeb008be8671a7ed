"""What HUDD's root causes cost on a bundled case, against the performance check on the same split (CPU seconds of
this process, one thread, measured in one run): the root_causes check as the plan runs it (errors of the test split,
their Grad-CAM at every convolution, Ward clusters, pictures, and the unsafe set assigned over the improvement
split), and what it found.

    OMP_NUM_THREADS=1 python bench/bench_root_causes.py steel_defects magnetic_tiles [--max-samples N]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from trustcase.checks import Context, build
from trustcase.data.streaming import DataSource
from trustcase.flows.preflight import import_paths
from trustcase.schemas import CheckSpec, load_use_case
from trustcase.tasks import task_of

ROOT = Path(__file__).resolve().parents[1]


def cpu_of(check: str, params: dict, ctx: Context):
    t = time.process_time()
    out = build(CheckSpec(check=check, params=params))(ctx)
    return time.process_time() - t, out


def bench(case: str, max_samples: int | None) -> None:
    path = ROOT / "use_cases" / case / "use_case.yaml"
    uc = load_use_case(path)
    import_paths(uc, path)
    plan = {c.check: c.params for c in uc.plan.checks}
    rc = plan.get("root_causes")
    if rc is None:
        raise SystemExit(f"{case}: no root_causes in the plan")
    if max_samples:
        caps = {r: max_samples for r in ("test", rc.get("improvement_split") or "test")}
        uc = uc.model_copy(update={"data": uc.data.model_copy(update={"max_samples": caps})})
    model = task_of(uc).load_model(uc.model)
    with tempfile.TemporaryDirectory() as tmp:
        def ctx(name):
            return Context(use_case=uc, model=model, data=DataSource(uc.data, uc.plan.seed, uc.model),
                           seed=uc.plan.seed, workdir=Path(tmp) / name)

        perf, _ = cpu_of("performance", {"split": rc.get("split", "test")}, ctx("performance"))
        cost, out = cpu_of("root_causes", rc, ctx("root_causes"))
    s = out.summary
    print(f"{case}: performance {perf:.1f} s CPU, root_causes {cost:.1f} s CPU (ratio {cost / perf:.1f}); "
          f"{s.get('errors')} errors of {out.measurements[0].n} items, k {s.get('k')} at layer {s.get('layer')}")
    for c in s.get("clusters", []):
        print(f"  cluster {c['id']}: {c['text']}")
    for c, u in s.get("unsafe_set", {}).items():
        print(f"  unsafe set, cluster {c}: {u['count']} copies, {u['candidates_within_radius']} pool items in reach")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("cases", nargs="+")
    ap.add_argument("--max-samples", type=int, default=None, help="cap the test and improvement splits")
    a = ap.parse_args()
    torch.set_num_threads(1)
    for case in a.cases:
        bench(case, a.max_samples)


if __name__ == "__main__":
    main()

"""Segmentation benchmark on the magnetic-tile use case (real images, the bundled U-Net).

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_segmentation.py [--quick] [--train]

1. The bundled network: its test IoU and Dice of the defect class and the image-level rates, with their intervals
   (`train.evaluate`); with --train it is trained again first (seed 0) and its wall and CPU seconds printed.
2. The assessment's time against the same checks called directly (data quality, performance, perturbation sweep, the
   claims judged, the report rendered), the flow run after a warm-up flow on 8 images per split has started the
   ephemeral Prefect server. Target <= 1.15. --quick reads a seeded sample of each split. The plan is the use
   case's: whatever checks it holds (certified segmentation, attacks, explanations too) are timed both ways.
3. Streaming: peak RSS of the performance check over the test split and over the test split repeated 10 times
   (each copy its own ids), each in a fresh process. Target <= 1.2x.

Ratios are measured in one run; the machine's load is printed with them.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CASE = ROOT / "use_cases" / "magnetic_tiles"
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(CASE))
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

import yaml  # noqa: E402

from trustcase.checks import Context, build  # noqa: E402
from trustcase.data.streaming import DataSource, Item  # noqa: E402
from trustcase.schemas import load_use_case  # noqa: E402
from trustcase.tasks import task_of  # noqa: E402
from trustcase.verdicts import judge  # noqa: E402

MODEL = CASE / "artefacts" / "tile_segmenter.pt"


class Repeated:
    """A split read `times` over, each copy of an item with its own id (so the bootstrap sees distinct images)."""

    def __init__(self, split, times: int):
        self.split, self.times = split, times

    def __len__(self) -> int:
        return len(self.split) * self.times

    def __getitem__(self, i: int) -> Item:
        item = self.split[i % len(self.split)]
        return Item(image=item.image, label=item.label, id=f"{item.id}#{i // len(self.split)}", meta=item.meta)

    def name(self, i: int) -> str:
        return f"{self.split.name(i % len(self.split))}#{i // len(self.split)}"


def repeated(split: str, times: int = 1, **params) -> Repeated:
    from tiles import load_split

    return Repeated(load_split(split, **params), times)


def use_case_file(tmp: Path, quick: bool, times: int | None = None, warmup: bool = False) -> Path:
    raw = yaml.safe_load((CASE / "use_case.yaml").read_text())
    raw["model"]["path"] = str(MODEL)
    raw["data"]["path"] = str(CASE)
    if times is not None:  # the memory child: the performance check over the test split repeated
        raw["data"].update(loader="bench_segmentation:repeated", path=str(HERE))
        raw["data"]["params"]["times"] = times
        raw["plan"]["checks"] = [{"check": "performance", "params": {"split": "test"}}]
        raw["requirements"] = [r for r in raw["requirements"] if "perturbation" not in r.get("scope", {})]
    elif quick or warmup:
        raw["data"]["max_samples"] = {"train": 8, "validation": 8, "test": 8} if warmup else \
            {"train": 120, "validation": 40, "test": 60}
    path = tmp / ("warmup.yaml" if warmup else "use_case.yaml")
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def direct(path: Path, out: Path) -> float:
    """The checks called directly, the claims judged and the report rendered: what the flow does without Prefect,
    MLflow, caching and the pack."""
    from trustcase.data.content import content_hash

    t0 = time.perf_counter()
    uc = load_use_case(path)
    model = task_of(uc).load_model(uc.model)
    content_hash(DataSource(uc.data, uc.plan.seed, uc.model))  # the flow's data fingerprint
    outcomes = []
    for spec in uc.plan.checks:
        for check in build(spec).shards():
            ctx = Context(use_case=uc, model=model, data=DataSource(uc.data, uc.plan.seed, uc.model),
                          seed=uc.plan.seed, workdir=out / "checks" / check.name)
            outcomes.append(check(ctx))
    judge(uc.requirements, outcomes)
    return time.perf_counter() - t0


def memory_child(times: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        uc = load_use_case(use_case_file(Path(tmp), False, times))
        ctx = Context(use_case=uc, model=task_of(uc).load_model(uc.model),
                      data=DataSource(uc.data, uc.plan.seed, uc.model), seed=uc.plan.seed, workdir=Path(tmp) / "p")
        t0 = time.perf_counter()
        out = build(uc.plan.checks[0])(ctx)
        n = next(m.n for m in out.measurements if m.metric == "iou:defect" and not m.scope.subgroup)
        print(n, time.perf_counter() - t0, high_water())


def high_water() -> int:
    """This process's peak resident memory in KiB since its exec (VmHWM). Not ru_maxrss: Linux carries the forking
    parent's resident size over fork and exec into it, so a child of a large parent would report the parent."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def peak(times: int) -> tuple[int, float, int]:
    r = subprocess.run([sys.executable, __file__, "--memory-child", str(times)], capture_output=True, text=True,
                       check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    n, seconds, kib = r.stdout.split()[-3:]
    return int(n), float(seconds), int(kib)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="a seeded sample of each split for the assessment")
    ap.add_argument("--train", action="store_true", help="train the bundled network again first (about 10 min CPU)")
    ap.add_argument("--memory-only", action="store_true", help="only the streaming measurement (3.)")
    ap.add_argument("--memory-child", type=int, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.memory_child:
        return memory_child(a.memory_child)
    if a.memory_only:
        return streaming()
    import torch
    import train as trainer

    torch.set_num_threads(1)
    print(f"load average at the start: {os.getloadavg()[0]:.1f} (2 cores shared)")
    if a.train:
        result = trainer.train(out=MODEL)
        print(f"training: {result['train_seconds']:.0f} s wall, {result['train_cpu_seconds']:.0f} s CPU (one thread)")
    if not MODEL.exists():
        sys.exit(f"bench: train the bundled model first (python {CASE / 'train.py'})")
    figures = trainer.evaluate(torch.jit.load(str(MODEL)), defect_pixels=load_use_case(CASE / "use_case.yaml")
                               .model.defect_pixels)
    for metric, (value, (lo, hi)) in figures.items():
        print(f"test {metric:24s} {value:.3f}  (95% interval {lo:.3f} - {hi:.3f})")

    from trustcase import reports
    from trustcase.flows.assess import assess
    from trustcase.schemas import Assessment

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        path = use_case_file(tmp, a.quick)
        uri = f"sqlite:///{tmp / 'mlflow.db'}"
        t_direct = direct(path, tmp / "direct")
        os.environ["TRUSTCASE_CACHE"] = str(tmp / "cache0")  # a fresh result store: nothing served from a cache
        assess(str(use_case_file(tmp, quick=False, warmup=True)), str(tmp / "flow0"), None, uri)  # starts Prefect
        os.environ["TRUSTCASE_CACHE"] = str(tmp / "cache1")
        t0 = time.perf_counter()
        first = assess(str(path), str(tmp / "flow1"), None, uri)
        t_flow = time.perf_counter() - t0
        record = Assessment.model_validate_json((first.out_dir / "assessment.json").read_text())
        t0 = time.perf_counter()
        reports.render(record, tmp / "render-only")
        t_direct += time.perf_counter() - t0
        print(f"assessment {t_flow:.1f} s, checks called directly + report {t_direct:.1f} s: ratio "
              f"{t_flow / t_direct:.3f} (target <= 1.15; load {os.getloadavg()[0]:.1f})")

    streaming()


def streaming() -> None:
    n1, s1, k1 = peak(1)
    n10, s10, k10 = peak(10)
    print(f"streaming: performance over {n1} images peak RSS {k1 / 1024:.0f} MiB ({s1:.0f} s), over {n10} images "
          f"{k10 / 1024:.0f} MiB ({s10:.0f} s): ratio {k10 / k1:.3f} (target <= 1.2; load {os.getloadavg()[0]:.1f})")


if __name__ == "__main__":
    main()

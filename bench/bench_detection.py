"""Detection benchmark (issue 26): the bundled detector's test mAP@0.5 with its interval, and trustcase's COCO
evaluation against pycocotools' COCOeval on the same detections (time ratio, and that the figures agree); the full
assessment against the sum of its checks called directly; the perturbation sweep's peak memory at 10x the images.

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_detection.py            # evaluation ratio on the test split
    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_detection.py --train    # also trains (train.py, ~10 min idle)
    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_detection.py --assess   # flow / direct (target <= 1.15)
    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_detection.py --memory   # sweep peak RSS, 10x / 1x (<= 1.2)

Without a trained model (use_cases/steel_defects/artefacts/steel_detector.pt) the evaluation runs on a seeded,
untrained network's detections, which still compares the two implementations; --assess and --memory need it.

--assess: the use case's own plan on each side: the flow (Prefect tasks, persisted results, the MLflow run, the report
and pack; its Prefect server started by a first flow on two items per split, before the timing) and the same work
without it: the model loaded once, the data fingerprint, the same checks called one after another, the verdicts and
the render of the report and pack of the flow's record. `--repeats` pairs in alternating order, each flow with a fresh
result store (nothing served from a cache); the ratio of CPU seconds (this process and its children, the Prefect
server's included), summed over the pairs. --max-samples caps every split.
--memory: one sweep (gaussian_blur over its 3 amplitudes and clean) over the test split and over the test split
tiled 10 times (each copy its own ids), each in a fresh process; the peak resident memory of each (VmHWM).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

STEEL = Path(__file__).resolve().parents[1] / "use_cases" / "steel_defects"
sys.path.insert(0, str(STEEL))
from neu import CLASSES, load_split  # noqa: E402
from train import CenterNet, evaluate, normalise, read, train  # noqa: E402

from trustcase.tasks.detection_metrics import DetectionTally  # noqa: E402


def detections(model, images: np.ndarray) -> list[np.ndarray]:
    out = []
    with torch.inference_mode():
        for s in range(0, len(images), 32):
            out += [rows[rows[:, 4] >= 0] for rows in model(normalise(images[s:s + 32])).double().numpy()]
    return out


def ours(dets, boxes, names, replicates: int) -> tuple[float, float, float]:
    t = time.perf_counter()
    tally = DetectionTally(CLASSES, 0.3, "performance", seed=0)
    tally.update(dets, boxes, names)
    ms = {m.metric: m for m in tally.compute("test", 0.95, replicates)}
    return time.perf_counter() - t, ms["map50"].value, ms["map"].value


def coco(dets, boxes) -> tuple[float, float, float]:
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    t = time.perf_counter()
    images = [{"id": i + 1, "width": 200, "height": 200} for i in range(len(boxes))]
    anns = [{"id": k + 1, "image_id": i + 1, "category_id": int(c) + 1, "iscrowd": 0,
             "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1)}
            for k, (i, (x1, y1, x2, y2, c)) in enumerate((i, b) for i, g in enumerate(boxes) for b in g)]
    res = [{"image_id": i + 1, "category_id": int(c) + 1, "bbox": [x1, y1, x2 - x1, y2 - y1], "score": s}
           for i, d in enumerate(dets) for x1, y1, x2, y2, s, c in d]
    gt = COCO()
    gt.dataset = {"info": {}, "images": images, "annotations": anns,
                  "categories": [{"id": k + 1, "name": n} for k, n in enumerate(CLASSES)]}
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
        ev = COCOeval(gt, gt.loadRes(res), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return time.perf_counter() - t, ev.stats[1], ev.stats[0]


class Tiled:
    """A split read `times` over, item by item from its files (nothing held), each copy with its own ids."""

    def __init__(self, split: str, times: int):
        self.base, self.times = load_split(split), times

    def __len__(self) -> int:
        return len(self.base) * self.times

    def name(self, i: int) -> str:
        return f"{self.base.name(i % len(self.base))}~{i // len(self.base)}"

    def __getitem__(self, i: int):
        item = self.base[i % len(self.base)]
        return dataclasses.replace(item, id=f"{item.id}~{i // len(self.base)}")


def tiled(split: str, times: int = 1) -> Tiled:
    return Tiled(split, times)


def use_case_file(folder: Path, max_samples: int | None = None, times: int | None = None) -> Path:
    """The bundled use case with absolute paths; capped splits, or the loader reading the splits `times` over."""
    import yaml

    raw = yaml.safe_load((STEEL / "use_case.yaml").read_text())
    raw["model"]["path"] = str((STEEL / raw["model"]["path"]).resolve())
    raw["data"]["path"] = str(STEEL)
    if max_samples:
        raw["data"]["max_samples"] = {k: max_samples for k in raw["data"]["splits"]}
    if times:
        raw["data"].update(loader="bench_detection:tiled", path=str(Path(__file__).resolve().parent),
                           params={"times": times})
    path = folder / f"use_case_{max_samples or 'all'}_{times or 1}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def cpu_seconds() -> float:
    """CPU seconds of this process (every thread), of its children waited for, and of its live children: the
    ephemeral Prefect server runs in a child process, and its work is the flow's cost too."""
    import psutil

    me = psutil.Process()
    own = me.cpu_times()
    live = 0.0
    for child in me.children(recursive=True):
        try:
            t = child.cpu_times()
            live += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return own.user + own.system + own.children_user + own.children_system + live


@dataclasses.dataclass
class Timing:
    wall: float
    cpu: float


@contextlib.contextmanager
def timed(into: list):
    w, c = time.perf_counter(), cpu_seconds()
    yield
    into.append(Timing(time.perf_counter() - w, cpu_seconds() - c))


def direct(path: Path, out: Path, record: Path) -> None:
    """The assessment's work without the flow: the model loaded once, the data fingerprint, every check shard, the
    verdicts, and the render of the report (with its pack) of the flow's record: the same outcomes, so the same
    figures, plots and pages."""
    from trustcase import reports
    from trustcase.checks import Context, Unsupported, build
    from trustcase.data.content import content_hash
    from trustcase.data.streaming import DataSource
    from trustcase.schemas import Assessment, load_use_case
    from trustcase.tasks import task_of
    from trustcase.verdicts import judge

    uc = load_use_case(path)
    model = task_of(uc).load_model(uc.model)
    content_hash(DataSource(uc.data, uc.plan.seed, uc.model))
    outcomes = []
    for spec in uc.plan.checks:
        for check in build(spec).shards():
            ctx = Context(use_case=uc, model=model, data=DataSource(uc.data, uc.plan.seed, uc.model),
                          seed=uc.plan.seed, workdir=out / "checks" / check.name)
            try:
                outcomes.append(check(ctx))
            except Unsupported:  # said "not run" by the flow, before any work: no evidence to judge
                pass
    judge(uc.requirements, outcomes)
    reports.render(Assessment.model_validate_json(record.read_text()), out / "report")


def assess_ratio(max_samples: int | None, repeats: int) -> None:
    """Flow against direct calls, `repeats` pairs in alternating order (flow first, then direct first: whatever
    the first of a pair warms, the page cache of the images, allocator arenas, is shared out evenly). Every flow
    run gets a fresh result store (TRUSTCASE_CACHE), so no check is served from a cache. The figure is the ratio
    of CPU seconds (wall time is printed too, but on a shared machine it measures the neighbours)."""
    from trustcase.flows.assess import assess

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        path = use_case_file(tmp, max_samples)
        uri = f"sqlite:///{tmp / 'mlflow.db'}"
        first: list[Timing] = []
        os.environ["TRUSTCASE_CACHE"] = str(tmp / "cache0")
        with timed(first):  # a first flow on two items per split: starts the Prefect server, imports all
            assess(str(use_case_file(tmp, 2)), str(tmp / "flow0"), None, uri)
        flows: list[Timing] = []
        directs: list[Timing] = []

        def flow_run(k: int) -> None:
            os.environ["TRUSTCASE_CACHE"] = str(tmp / f"cache{k}")
            with timed(flows):
                result = assess(str(path), str(tmp / f"flow{k}"), None, uri)
            if not result.complete:
                sys.exit(f"bench: the flow did not complete: {result.errors}")

        for k in range(1, repeats + 1):
            if k % 2:
                flow_run(k)
            with timed(directs):
                direct(path, tmp / f"direct{k}", tmp / f"flow{k - (k % 2 == 0)}" / "assessment.json")
            if not k % 2:
                flow_run(k)
    split = f"splits capped at {max_samples}" if max_samples else "whole splits"
    load = os.getloadavg()[0]

    def runs(ts: list[Timing], key: str) -> str:
        return ", ".join(f"{getattr(t, key):.1f}" for t in ts)

    cpu = sum(t.cpu for t in flows) / sum(t.cpu for t in directs)
    wall = sum(t.wall for t in flows) / sum(t.wall for t in directs)
    print(f"\nfull assessment ({split}; {repeats} pairs, alternating; load at the end {load:.1f}):\n"
          f"  flow    CPU s {runs(flows, 'cpu')}; wall s {runs(flows, 'wall')}\n"
          f"  direct  CPU s {runs(directs, 'cpu')}; wall s {runs(directs, 'wall')}\n"
          f"  a first flow on two items per split, starting Prefect: CPU {first[0].cpu:.1f} s, wall "
          f"{first[0].wall:.1f} s (not counted)\n"
          f"  ratio of CPU seconds {cpu:.3f} (target <= 1.15: {'ok' if cpu <= 1.15 else 'ABOVE'}); of wall seconds "
          f"{wall:.3f}")


def sweep_child(times: int) -> None:
    """One sweep in this fresh process; prints its images, seconds and memory as JSON."""
    from trustcase.checks import Context, build
    from trustcase.data.streaming import DataSource
    from trustcase.schemas import CheckSpec, load_use_case
    from trustcase.tasks import task_of

    with tempfile.TemporaryDirectory() as tmp:
        uc = load_use_case(use_case_file(Path(tmp), times=times))
        model = task_of(uc).load_model(uc.model)
        check = build(CheckSpec(check="perturbation_sweep", params={
            "split": "test", "perturbations": {"gaussian_blur": [0.5, 1.0, 2.0]}, "strip": False}))
        base = high_water_mb()
        t0 = time.perf_counter()
        out = check(Context(use_case=uc, model=model, data=DataSource(uc.data, uc.plan.seed, uc.model),
                            seed=uc.plan.seed, workdir=Path(tmp) / "checks" / check.name))
        seconds = time.perf_counter() - t0
    print(json.dumps({"n": out.summary["gaussian_blur"]["n"], "seconds": seconds, "base_mb": base,
                      "peak_mb": high_water_mb()}))


def high_water_mb() -> float:
    """This process's peak resident memory since its exec (VmHWM), in MB. Not ru_maxrss: Linux carries the forking
    parent's resident size over fork and exec into it, so a child of a larger parent would report the parent."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def memory_ratio(times: int = 10) -> None:
    runs = {}
    for k in (1, times):
        p = subprocess.run([sys.executable, __file__, "--sweep-child", str(k)], capture_output=True, text=True,
                           check=True)
        runs[k] = json.loads(p.stdout.strip().splitlines()[-1])
    print("\nperturbation sweep (gaussian_blur, 4 amplitudes), one fresh process each:")
    for r in runs.values():
        print(f"  {r['n']:5d} images: {r['seconds']:7.1f} s, peak RSS {r['peak_mb']:7.1f} MB "
              f"(before the sweep {r['base_mb']:.1f} MB)")
    ratio = runs[times]["peak_mb"] / runs[1]["peak_mb"]
    print(f"peak memory ratio {times}x / 1x: {ratio:.3f} (target <= 1.2: {'ok' if ratio <= 1.2 else 'ABOVE'})")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--train", action="store_true", help="train the bundled detector first (train.py defaults)")
    ap.add_argument("--assess", action="store_true", help="the full assessment against its checks called directly")
    ap.add_argument("--max-samples", type=int, default=None, help="--assess: cap every split at this many items")
    ap.add_argument("--repeats", type=int, default=2, help="--assess: flow and direct runs, alternating")
    ap.add_argument("--memory", action="store_true", help="the sweep's peak memory at 10x the images")
    ap.add_argument("--model", type=Path, default=STEEL / "artefacts" / "steel_detector.pt",
                    help="the detector to evaluate (default: the use case's)")
    ap.add_argument("--sweep-child", type=int, default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    torch.set_num_threads(1)
    if a.sweep_child:
        return sweep_child(a.sweep_child)
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; torch threads 1")
    path = a.model
    if a.assess or a.memory:
        if not path.is_file():
            sys.exit("bench: train the bundled detector first (--train, or use_cases/steel_defects/train.py)")
        if a.assess:
            assess_ratio(a.max_samples, a.repeats)
        if a.memory:
            memory_ratio()
        return
    if a.train:
        result = train(out=path)
        print(f"training: {result['train_seconds']:.0f} s; test mAP@0.5 {result['map50']:.3f} "
              f"(95% interval {result['map50_interval'][0]:.3f}-{result['map50_interval'][1]:.3f})")
    if path.is_file():
        model = torch.jit.load(str(path))
        r = evaluate(model)
        print(f"bundled detector, test split: mAP@0.5 {r['map50']:.3f} (95% interval {r['map50_interval'][0]:.3f}-"
              f"{r['map50_interval'][1]:.3f}), mAP@[0.5:0.95] {r['map']:.3f}, recall of indications "
              f"{r['indication_recall']:.3f}, false indications per image {r['false_indications_per_image']:.2f}")
    else:
        torch.manual_seed(0)
        model = torch.jit.script(CenterNet().eval())
        print("no trained detector: comparing on a seeded untrained network's detections")
    images, boxes, names = read("test", 0)
    dets = detections(model, images)
    n = sum(len(d) for d in dets)
    t_coco, coco50, coco_all = coco(dets, boxes)
    t_ours, ours50, ours_all = ours(dets, boxes, names, 1)
    t_boot, _, _ = ours(dets, boxes, names, 1000)
    print(f"{len(images)} images, {n} detections, {sum(len(b) for b in boxes)} true boxes")
    print(f"mAP@0.5 ours {ours50:.6f} pycocotools {coco50:.6f}; mAP@[0.5:0.95] ours {ours_all:.6f} pycocotools "
          f"{coco_all:.6f}; largest difference {max(abs(ours50 - coco50), abs(ours_all - coco_all)):.1e}")
    print(f"evaluation time: ours {t_ours:.2f} s, pycocotools {t_coco:.2f} s, ratio {t_ours / t_coco:.2f}; "
          f"with the 1000-replicate bootstrap intervals {t_boot:.2f} s ({t_boot / t_coco:.1f}x pycocotools)")


if __name__ == "__main__":
    main()

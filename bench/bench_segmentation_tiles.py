"""Tiles (`fit: tiles`, `trustcase.tasks.segmentation_tiles`): what cutting, batching and stitching cost against the
bare forward passes of the same tiles; what the assessment's tiled path costs (the `performance` check on a
`TiledSegmenter`, as `trustcase assess` runs it, whole images streamed in runs of one size) against the tiler's direct
calls (`evaluate` and the same figures computed) on the same images, and that both give the same evidence; the memory
of each at 1x and 10x the images (streaming: the ratios should stay near 1).

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_segmentation_tiles.py [--images 24] [--overlap 32] [--batch 16]

The magnetic-tile test split at its own resolution (about 100 to 600 pixels a side) under the bundled U-Net's
192x192 input (use_cases/magnetic_tiles: train.py first). Figures are CPU seconds (process time) of this process,
paired rounds, the median ratio; the machine's load is printed with them.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CASE = ROOT / "use_cases" / "magnetic_tiles"
sys.path.insert(0, str(CASE))


def setup(images: int, overlap: int):
    from tiles import load_split

    from trustcase.schemas import load_use_case
    from trustcase.tasks import task_of

    uc = load_use_case(CASE / "use_case.yaml")
    model = task_of(uc).load_model(uc.model)
    split = load_split("test", size=tuple(uc.model.input_shape[1:]), fit="tiles", overlap=(overlap, overlap))
    return uc, model, split, min(images, len(split))


class Repeated:
    """The first `n` items of a split, `times` times over (each copy its own id): 10x the images, same pixels."""

    def __init__(self, split, n: int, times: int):
        self.split, self.n, self.times, self.tiling = split, n, times, split.tiling

    def __len__(self) -> int:
        return self.n * self.times

    def name(self, i: int) -> str:
        return f"{self.split.name(i % self.n)}#{i // self.n}"

    def __getitem__(self, i: int):
        item = self.split[i % self.n]
        return type(item)(image=item.image, label=item.label, id=self.name(i), meta=item.meta)


def high_water() -> int:
    """This process's peak resident memory in KiB (VmHWM: not ru_maxrss, which a child inherits from its parent)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise OSError("no VmHWM in /proc/self/status")


def direct(uc, model, split, batch: int) -> list:
    """The tiler's direct calls: `evaluate`, then the figures the performance check reports (per defect type too)."""
    from trustcase.measurement import BOOTSTRAP_REPLICATES
    from trustcase.tasks.segmentation_tiles import evaluate

    tally, _ = evaluate(model, split, split.tiling, uc.model.defect_pixels, seed=uc.plan.seed, batch=batch,
                        subgroups=["defect"])
    return tally.compute("test", uc.plan.confidence, BOOTSTRAP_REPLICATES)


def assessed(uc, model, split, batch: int, workdir: Path) -> list:
    """The `performance` check as the assessment runs it under `fit: tiles`: the tiled model (`tiled`, one tile per
    forward pass), the split streamed in batches of `batch` images (runs of one size)."""
    from trustcase.checks import Context, build
    from trustcase.data.streaming import DataSource, SplitStream
    from trustcase.schemas import CheckSpec
    from trustcase.tasks.segmentation_tiles import tiled

    o = list(split.tiling.overlap)
    data_spec = uc.data.model_copy(update={"params": {**uc.data.params, "fit": "tiles", "overlap": o},
                                           "batch_size": batch})
    uc = uc.model_copy(update={"data": data_spec})
    data = DataSource(uc.data, uc.plan.seed, uc.model)
    data._streams["test"] = SplitStream(split, "test", None, uc.plan.seed, batch, 0, data.expected, data.n_classes)
    ctx = Context(use_case=uc, model=tiled(model, split.tiling), data=data, seed=uc.plan.seed, workdir=workdir)
    return build(CheckSpec(check="performance", params={"split": "test"}))(ctx).measurements


def memory_child(images: int, times: int, overlap: int, batch: int, how: str) -> None:
    import tempfile

    uc, model, split, n = setup(images, overlap)
    many = Repeated(split, n, times)
    with tempfile.TemporaryDirectory() as tmp:
        ms = direct(uc, model, many, batch) if how == "direct" else assessed(uc, model, many, batch, Path(tmp))
    print(next(m.n for m in ms if m.metric == "iou:defect" and not m.scope.subgroup), high_water())


def peak(images: int, times: int, overlap: int, batch: int, how: str = "direct") -> tuple[int, int]:
    r = subprocess.run([sys.executable, __file__, "--memory-child", str(times), "--images", str(images),
                        "--overlap", str(overlap), "--batch", str(batch), "--how", how], capture_output=True,
                       text=True, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    n, kib = r.stdout.split()[-2:]
    return int(n), int(kib)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=24, help="the first this many test images")
    ap.add_argument("--overlap", type=int, default=32)
    ap.add_argument("--batch", type=int, default=16, help="tiles per forward pass")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--memory-child", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--how", default="direct", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.memory_child:
        memory_child(a.images, a.memory_child, a.overlap, a.batch, a.how)
        return
    import torch

    from trustcase.tasks.segmentation_tiles import tiled_logits

    torch.set_num_threads(1)
    print("load before:", os.getloadavg())
    uc, model, split, n = setup(a.images, a.overlap)
    tiling = split.tiling
    images = [(split.name(i), split[i].image[..., None].astype(np.float32)) for i in range(n)]
    th, tw = tiling.tile
    tiles = []
    for _, img in images:
        padded = tiling.padded(img)
        tiles += [padded[y:y + th, x:x + tw] for y, x in tiling.windows(*padded.shape[:2])]
    print(f"{n} images ({min(i.shape[0] for _, i in images)}-{max(i.shape[0] for _, i in images)} px high), "
          f"{len(tiles)} tiles of {th}x{tw}, overlap {a.overlap}, {a.batch} tiles per pass")
    ratios = []
    for r in range(a.rounds):
        c0 = time.process_time()
        for s in range(0, len(tiles), a.batch):  # the bare forward passes of the same tiles
            with torch.inference_mode():
                model.forward(model.to_input(np.stack(tiles[s:s + a.batch])))
        bare = time.process_time() - c0
        c0 = time.process_time()
        for _ in tiled_logits(model, iter(images), tiling, a.batch):
            pass
        tiled = time.process_time() - c0
        ratios.append(tiled / bare)
        print(f"round {r + 1}: tiled {tiled:.2f} s CPU, bare forward passes {bare:.2f} s CPU, ratio {tiled / bare:.3f}")
    print(f"tiled evaluation / bare forward passes (median of {a.rounds}): {statistics.median(ratios):.3f}")
    import tempfile

    first = Repeated(split, n, 1)
    ratios = []
    for r in range(a.rounds):  # alternating, so a change of load hits both sides
        c0 = time.process_time()
        ours = direct(uc, model, first, a.batch)
        by_tiler = time.process_time() - c0
        with tempfile.TemporaryDirectory() as tmp:
            c0 = time.process_time()
            theirs = assessed(uc, model, first, a.batch, Path(tmp))
            by_check = time.process_time() - c0
        same = [m.model_dump() for m in ours] == [m.model_dump() for m in theirs]
        ratios.append(by_check / by_tiler)
        print(f"round {r + 1}: the performance check on the tiled model {by_check:.2f} s CPU, the tiler's direct "
              f"calls {by_tiler:.2f} s CPU, ratio {by_check / by_tiler:.3f}; the same {len(ours)} measurements: {same}")
    print(f"tiled assessment (performance) / the tiler's direct calls (median of {a.rounds}): "
          f"{statistics.median(ratios):.3f}")
    for how, what in (("direct", "the tiled evaluation"), ("check", "the performance check on the tiled model")):
        (n1, k1), (n10, k10) = peak(n, 1, a.overlap, a.batch, how), peak(n, 10, a.overlap, a.batch, how)
        print(f"peak memory (VmHWM) of {what}: {n1} images {k1 / 1024:.0f} MiB, {n10} images "
              f"{k10 / 1024:.0f} MiB, ratio {k10 / k1:.2f}")
    print("load after:", os.getloadavg())


if __name__ == "__main__":
    main()

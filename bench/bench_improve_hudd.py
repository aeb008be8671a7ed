"""HUDD's retraining of a bundled detector or segmenter, without `trustcase improve`'s three assessments: the parent's
selection (`flows.improve.select_unsafe`, as improve makes it), the improved version and the random baseline through
the case's own `train.py:retrain` (fine-tuned from the parent, the same seed), each model's figure per root-cause
cluster on the held-out test items within its reach (`cluster_accuracy`, Clopper-Pearson) and the script's own test
figures; CPU seconds of this process.

    OMP_NUM_THREADS=1 python bench/bench_improve_hudd.py steel_defects --epochs 2 --budget 100
    OMP_NUM_THREADS=1 python bench/bench_improve_hudd.py magnetic_tiles --epochs 1 --budget 100
"""

from __future__ import annotations

import argparse
import importlib.util
import tempfile
import time
from pathlib import Path

import torch

from trustcase.flows import improve as imp
from trustcase.flows.preflight import import_paths
from trustcase.schemas import TrainingRequest, load_use_case

ROOT = Path(__file__).resolve().parents[1]


def figure(m: dict) -> str:
    if m["value"] is None:
        return "undefined"
    return f"{m['value']:.3f} ({m['interval']['lower']:.3f}-{m['interval']['upper']:.3f}, n {m['n']})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("case")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--budget", type=int, default=100)
    ap.add_argument("--quick", type=int, default=None, help="a smoke run: this many test and pool items, and train "
                                                              "items (the scripts' `limit`)")
    a = ap.parse_args()
    torch.set_num_threads(1)
    folder = ROOT / "use_cases" / a.case
    path = folder / "use_case.yaml"
    uc = load_use_case(path)
    import_paths(uc, path)
    settings = imp.method_settings(uc, "hudd")
    if a.quick:
        caps = {"test": a.quick, settings["pool"]: a.quick}
        uc = uc.model_copy(update={"data": uc.data.model_copy(update={"max_samples": caps})})
    spec = importlib.util.spec_from_file_location(f"{a.case}_train", folder / "train.py")  # its own name: two train.py
    train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train)
    parent = Path(uc.model.path)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        c0 = time.process_time()
        sel = imp.select_unsafe.fn(uc, parent, settings["pool"], settings["root_causes"], a.budget, uc.plan.seed,
                                   out / "root_causes")
        print(f"selection {time.process_time() - c0:.1f} s CPU: k {sel['k']} at {sel['layer']}, errors per cluster "
              f"{sel['cluster_sizes']}, pool within reach {sel['pool_within_reach']} of {sel['pool_items']}, "
              f"held-out test items per cluster {[len(v) for v in sel['heldout'].values()]}", flush=True)
        models = {"parent": parent}
        for role in ("improved", "baseline"):
            c0 = time.process_time()
            r = train.retrain(TrainingRequest(out=out / f"{role}.pt", use_case=path, init=parent, epochs=a.epochs,
                                              extra=sel[role], seed=uc.plan.seed,
                                              params={"limit": a.quick} if a.quick else {}))
            models[role] = Path(r.model)
            print(f"{role}: {time.process_time() - c0:.1f} s CPU ({r.log['params']['extra_copies']} extra copies)",
                  flush=True)
        per = imp.cluster_accuracy.fn(uc, models, sel["heldout"], uc.plan.confidence, uc.plan.seed,
                                      settings["root_causes"].get("min_iou", 0.0))
        for c in range(sel["k"]):
            print(f"cluster {c} {sel['figure']}: " + " / ".join(f"{n} {figure(per[n][c])}" for n in models))
        for name, p in models.items():
            print(f"{name} test: {train.evaluate(torch.jit.load(str(p)))}", flush=True)


if __name__ == "__main__":
    main()

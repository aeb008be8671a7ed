"""Does `trustcase improve` make the solar-cell model better, and better than the baseline the literature
compares with? Parent vs improved vs baseline, with intervals, and the wall time of each stage.

    .venv/bin/python bench/bench_improve.py [--methods hudd noise adversarial lipschitz] [--budget 100] [--epochs 8]

The bundled use case runs with a reduced plan so that each of the five assessments (parent, then improved and
baseline per method) takes minutes, not a quarter of an hour: performance (accuracy, defective recall, per
cell type), root causes (HUDD clusters, unsafe set) and randomized smoothing on 100 test cells (the certified
figures). A fresh MLflow store: the parent is version 1. HUDD's claim to reproduce: the unsafe-set retraining
beats the random baseline on the root-cause clusters' held-out items. `lipschitz` adds the Lipschitz check and
claim C1; both its versions train from scratch (the baseline in the parent's architecture, read from the
parent's training log), and the bench prints each version's certified bound, gradient-ascent lower bound and
their ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

import yaml  # noqa: E402

import trustcase  # noqa: E402,F401
from trustcase.flows import improve  # noqa: E402

BUNDLED = ROOT / "use_cases" / "solar_cells" / "use_case.yaml"
PERFORMANCE = ("accuracy", "recall", "precision", "false_negative_rate", "ece", "cost")
# what a method is judged on beyond performance: the check it needs in the plan and the metric of its claims
BY_METHOD = {
    "adversarial": ({"check": "adversarial", "params": {"attacks": ["auto_linf"], "linf": [1.0], "max_items": 128}},
                    "adversarial_accuracy"),
    "lipschitz": ({"check": "lipschitz", "params": {"ascent_points": 32, "ascent_steps": 50}},
                  "lipschitz_certified_accuracy"),
}
LIPSCHITZ = ("upper_bound", "lower_bound", "tightness")


def use_case_file(tmp: Path, methods: list[str] = ()) -> Path:
    raw = yaml.safe_load(BUNDLED.read_text())
    raw["model"]["path"] = str((BUNDLED.parent / raw["model"]["path"]).resolve())
    raw["data"]["path"] = str(BUNDLED.parent)
    raw["plan"]["checks"] = [
        {"check": "performance"},
        {"check": "root_causes", "params": {"noun": "cells", "improvement_split": "validation"}},
        {"check": "randomized_smoothing", "params": {"sigma": 0.12, "n0": 32, "n": 200, "alpha": 0.001,
                                                     "max_items": 100}},
    ]
    extra = [BY_METHOD[m] for m in methods if m in BY_METHOD]
    raw["plan"]["checks"] += [check for check, _ in extra]

    def kept(r: dict) -> bool:
        pert = (r.get("scope") or {}).get("perturbation")
        if r["metric"].startswith("smoothing_") or any(r["metric"] == metric for _, metric in extra):
            return True
        return r["metric"].split(":")[0] in PERFORMANCE and pert is None

    raw["requirements"] = [r for r in raw["requirements"] if kept(r)]
    if "lipschitz" in methods:  # from scratch, the baseline is trained in the parent's architecture
        log = Path(raw["model"]["path"]).with_suffix(".json")
        parent = json.loads(log.read_text()).get("params", {}) if log.is_file() else {}
        raw["training"]["params"].update(arch=parent.get("arch", "pooled"), ibp_eps=parent.get("ibp_eps", 0.0))
    path = tmp / "use_case.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def fmt(v: dict | None) -> str:
    if v is None or v.get("value") is None:
        return "n/a"
    iv = v.get("interval")
    if isinstance(iv, dict):
        iv = [iv["lower"], iv["upper"]]
    return f"{v['value']:.3f} [{iv[0]:.3f}, {iv[1]:.3f}]" if iv else f"{v['value']:.3f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", nargs="+", default=["hudd", "noise"])
    ap.add_argument("--budget", type=int, default=100)
    ap.add_argument("--epochs", type=int, default=None)
    ap.add_argument("--out", type=Path, default=None, help="keep the run here (default: a temporary folder)")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-improve-") as tmp:
        tmp = a.out.resolve() if a.out else Path(tmp)
        if a.out:
            shutil.rmtree(tmp, ignore_errors=True)  # a fresh MLflow store: the parent is version 1
            tmp.mkdir(parents=True)
        case = use_case_file(tmp, a.methods)
        uri = f"sqlite:///{tmp / 'mlflow.db'}"
        for method in a.methods:
            t0 = time.perf_counter()
            s = improve.run(str(case), method, a.budget, str(tmp / "out"), uri, epochs=a.epochs)
            total = time.perf_counter() - t0
            print(f"\n== {method}: parent v{s['parent']}, improved v{s['versions']['improved']}, baseline "
                  f"v{s['versions']['baseline']}, qualified: {s['qualified'] or 'none'}  ({total:.0f} s in all)")
            print("stage times (s): " + ", ".join(f"{k} {v}" for k, v in s["seconds"].items()))
            print(f"{'claim':34s} {'parent':24s} {'improved':24s} {'baseline':24s} change")
            for r in s["claims"]:
                change = "REGRESSION" if r["regression"] else ("improved" if r["improvement"] else "")
                print(f"{r['claim'][:34]:34s} {fmt(r['parent']):24s} {fmt(r['improved']):24s} "
                      f"{fmt(r['baseline']):24s} {change}")
            c = s.get("clusters")
            if c:
                print(f"root-cause clusters: k = {c['k']} at {c['layer']}; pool within reach {c['pool_within_reach']}"
                      f"/{c['pool_items']}; unsafe set {c['selected']} copies {c['selected_clusters']} of "
                      f"{c['distinct_per_cluster']} distinct items per cluster")
                wins = 0
                for i in range(c["k"]):
                    row = [c["accuracy"][m][i] for m in ("parent", "improved", "baseline")]
                    better = (row[1]["value"] or 0) > (row[2]["value"] or 0)
                    wins += better
                    print(f"  cluster {i} (held-out n = {c['heldout'][str(i)]}): parent {fmt(row[0])}, "
                          f"improved {fmt(row[1])}, baseline {fmt(row[2])}")
                print(f"unsafe-set retraining above the random baseline on {wins} of {c['k']} clusters "
                      "(point estimates; overlapping intervals do not show a difference)")
            if method == "lipschitz":
                from mlflow.tracking import MlflowClient

                client = MlflowClient(tracking_uri=uri)
                for role, run in s["runs"].items():
                    m = client.get_run(run).data.metrics
                    print(f"lipschitz {role:9s}: " + ", ".join(
                        f"{k} {m.get(f'lipschitz/test/lipschitz_{k}', float('nan')):.4g}" for k in LIPSCHITZ))
            print(json.dumps({"method": method, "seconds": s["seconds"], "total_s": round(total, 1)}))


if __name__ == "__main__":
    sys.exit(main())

"""VNN-COMP 2021 benchmarks scored as the competition scores them, on this machine.

    .venv/bin/python bench/bench_vnncomp.py [--quick] [--budget S] [--only mnistfc,eran] [--csv out.csv]
                                            [--match REGEX] [--clock cpu]

For mnistfc, verivital, eran and oval21 (../shared/vnncomp2021, see its README) and ACAS Xu
(../shared/acasxu/instances.csv, the instance list of bench_verification): each instance is read and decided
by `competition.load / read_property / solve`, the path of `trustcase check-property` and of
`vnncomp/run_instance.sh`, with the competition's own per-instance timeout from each `*_instances.csv`, capped
by `--budget`; the time of an instance includes reading the network and the property (an internal error is
counted, shown, and the run goes on). Per benchmark: solved
(holds + violated), unknown, WRONG against `published_results.csv` (a verdict contradicting the verifiers
that agreed; ACAS Xu has no per-instance list there: its counterexamples are confirmed by onnxruntime like
every other, its counts compare with nnenum's 47 violated / 139 hold), total and median seconds.
`--quick`: a fixed sample (every benchmark's instances at evenly spaced rows, 4 each; ACAS Xu properties 1-4
on N_1,1 and N_2,1) at a 30 s cap, a few minutes. The published solved counts of alpha-beta-CROWN (2021, GPU)
are context, not a measured ratio.
`--match`: a fixed subset (a regular expression on "network property"), to measure a change before and after;
`--clock cpu`: budgets and times in CPU seconds of this process (all its threads: run it with OMP_NUM_THREADS=1)
instead of wall seconds, so that a figure measured on a machine shared with other jobs means what a dedicated core
would give; only the deadlines' clock changes (`trustcase.clock`), no other timer of the process.
"""

from __future__ import annotations

import argparse
import csv
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from trustcase import clock  # noqa: E402
from trustcase.certification.competition import load, read_property, solve  # noqa: E402
from trustcase.certification.properties import acasxu_root  # noqa: E402

VNNCOMP = Path(os.environ.get("TRUSTCASE_VNNCOMP") or ROOT.parent / "shared" / "vnncomp2021")
BENCHMARKS = ("mnistfc", "verivital", "eran", "oval21")
ABCROWN_2021 = {"mnistfc": "70 of 90", "verivital": "60 of 62", "eran": "64 of 72", "oval21": "15 of 30",
                "acasxu": "186 of 186 (nnenum: 47 violated, 139 hold)"}
QUICK_PER_BENCHMARK = 4
QUICK_BUDGET = 30.0


def instances(name: str, quick: bool) -> list[tuple[Path, Path, float]]:
    """(network, property, competition timeout) of one benchmark."""
    if name == "acasxu":
        root = acasxu_root()
        rows = list(csv.reader((root / "instances.csv").read_text().splitlines()))
        if quick:
            rows = [r for r in rows if any(f"_{n}_batch" in r[0] for n in ("1_1", "2_1"))
                    and r[1] in {f"prop_{i}.vnnlib" for i in range(1, 5)}]
        return [(root / "onnx" / n, root / "vnnlib" / p, float(t)) for n, p, t in rows]
    folder = VNNCOMP / name
    rows = [r for r in csv.reader((folder / f"{name}_instances.csv").read_text().splitlines()) if r]
    if quick:
        step = len(rows) // QUICK_PER_BENCHMARK
        rows = rows[step // 2::step][:QUICK_PER_BENCHMARK]
    return [(folder / n.strip(), folder / p.strip(), float(t)) for n, p, t in rows]


def published() -> dict[tuple[str, str, str], str]:
    """(benchmark, network file name, property file name) -> holds / violated, where the verifiers agreed."""
    out = {}
    with open(VNNCOMP / "published_results.csv") as f:
        for r in csv.DictReader(f):
            out[(r["benchmark"], Path(r["network"]).name, Path(r["property"]).name)] = r["verdict"]
    return out


def run(name: str, quick: bool, budget: float | None, truth: dict, rows_out: list, match: str = "") -> dict:
    items = [it for it in instances(name, quick) if re.search(match, f"{it[0].name} {it[1].name}")]
    counts = {"holds": 0, "violated": 0, "unknown": 0, "error": 0, "wrong": 0}
    times = []
    caps = set()
    print(f"\n{name}: {len(items)} instances", flush=True)
    for net_path, prop_path, limit in items:
        cap = min(limit, budget) if budget else limit
        caps.add(cap)
        t = clock.now()
        try:
            net = load(net_path)
            prop = read_property(prop_path, net)
            r = solve(net, prop, max(0.1, cap - (clock.now() - t)), seed=0)
        except Exception as e:  # noqa: BLE001 - an internal error is counted and shown, the others still run
            r = {"verdict": "error", "method": "", "reason": f"{type(e).__name__}: {str(e)[:200]}"}
            print(f"   ERROR on {net_path.name} {prop_path.name}: {r['reason']}", flush=True)
        seconds = clock.now() - t
        times.append(seconds)
        want = truth.get((name, net_path.name, prop_path.name))
        wrong = want is not None and r["verdict"] in ("holds", "violated") and r["verdict"] != want
        counts[r["verdict"]] += 1
        counts["wrong"] += wrong
        rows_out.append({"benchmark": name, "network": net_path.name, "property": prop_path.name,
                         "budget_s": cap, "verdict": r["verdict"], "published": want or "", "wrong": int(wrong),
                         "seconds": round(seconds, 2), "method": r["method"], "reason": r["reason"]})
        print(f"   {net_path.name:<32}{prop_path.name[:46]:<48}{r['verdict']:<9}{want or '-':<9}"
              f"{'WRONG ' if wrong else ''}{seconds:7.2f} s", flush=True)
    return {"name": name, "n": len(items), "budget": caps, "times": times, **counts}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help=f"{QUICK_PER_BENCHMARK} instances per benchmark, "
                                                         f"{QUICK_BUDGET:g} s cap")
    ap.add_argument("--budget", type=float, default=None, help="cap of the per-instance timeout, seconds")
    ap.add_argument("--only", default=",".join((*BENCHMARKS, "acasxu")), help="benchmarks, comma-separated")
    ap.add_argument("--csv", type=Path, default=None, help="per-instance results to this CSV file")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="cpu: budgets and times in CPU seconds of this (single-threaded) process, what a dedicated "
                         "core would give on a loaded shared machine")
    ap.add_argument("--match", default="", help="only the instances whose 'network property' file names match "
                                                "this regular expression (a fixed subset)")
    a = ap.parse_args()
    budget = min(a.budget or QUICK_BUDGET, QUICK_BUDGET) if a.quick else a.budget
    if a.clock == "cpu":  # every deadline of the attacks and the verifiers now counts this process's CPU seconds
        clock.use(time.process_time)
    load_before = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    print(f"machine: {os.cpu_count()} cores; {load_before}")
    print(f"per-instance budget: the competition's timeout{f', capped at {budget:g} s' if budget else ''}"
          f"{' (CPU seconds of all threads of this process)' if a.clock == 'cpu' else ''}")
    truth = published()
    rows: list[dict] = []
    results = [run(n.strip(), a.quick, budget, truth, rows, a.match) for n in a.only.split(",") if n.strip()]
    print(f"\nload after: {subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()}")
    head = f"{'benchmark':<11}{'inst.':>6}{'budget s':>10}{'holds':>7}{'viol.':>7}{'solved':>8}{'unknown':>9}" \
           f"{'WRONG':>7}{'errors':>8}{'total s':>9}{'median s':>10}   alpha-beta-CROWN 2021 (GPU, context)"
    print(head)
    for r in results:
        caps = "/".join(f"{c:g}" for c in sorted(r["budget"]))
        print(f"{r['name']:<11}{r['n']:>6}{caps:>10}{r['holds']:>7}{r['violated']:>7}"
              f"{r['holds'] + r['violated']:>8}{r['unknown']:>9}{r['wrong']:>7}{r['error']:>8}{sum(r['times']):>9.0f}"
              f"{statistics.median(r['times']) if r['times'] else 0:>10.2f}   {ABCROWN_2021.get(r['name'], '')}")
    if a.csv:
        with open(a.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    if any(r["wrong"] or r["error"] for r in results):
        sys.exit(1)


if __name__ == "__main__":
    main()

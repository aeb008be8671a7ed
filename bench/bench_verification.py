"""Verification benchmark: formal verdicts on ACAS Xu, local robustness of the solar-cell CNN, attack strength.

    .venv/bin/python bench/bench_verification.py [--quick] [--acas] [--timeout 116] [--cells 100]

1. ACAS Xu: verdict counts (violated / holds / unknown) and time per instance. Default: a sample of 6
   instances with a 10 s budget; `--acas`: all 186 instances of instances.csv with `--timeout` per instance,
   and the ratio of the total to the published 99 s of nnenum (other hardware: context, not a measured ratio).
2. Local robustness on ACAS Xu N_1,1 around sampled situations: what `local_robustness` decides (CROWN +
   input splitting + falsification) against plain interval bound propagation (IBP) at the same radii.
3. Solar-cell CNN, test cells at L-inf 1 grey level, an ablation: cells verified by IBP, CROWN and
   alpha-CROWN alone (median seconds each), and the full decision (IBP, APGD, CROWN, alpha-CROWN, then ReLU
   branch and bound when at most 2,000 ReLUs are unstable, within the budget): verified / falsified / unknown
   and median seconds per cell. `--model PATH`: another TorchScript model of the same contract (parts 3, 4).
4. Attack strength on the solar-cell CNN: accuracy under FGSM, PGD, APGD and the attack engine (`auto`) at 1
   grey level on the same cells; the engine's must be at most the others', item by item.
5. `--mnistfc SECONDS` (opt-in): VNN-COMP 2021 mnistfc instances (784 inputs): alpha-CROWN alone against the
   full decision (falsification, then ReLU splitting with beta-CROWN), with the published verdicts.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from trustcase.data.streaming import DataSource  # noqa: E402
from trustcase.models.loading import load_classifier  # noqa: E402
from trustcase.schemas import load_use_case  # noqa: E402

SOLAR = ROOT / "use_cases" / "solar_cells" / "use_case.yaml"
NNENUM_TOTAL = 99.0  # seconds, all 186 instances decided (VNN-COMP 2021 results, other hardware)


def bench_acas(all_instances: bool, timeout: float) -> None:
    from trustcase.certification.nnet import load_network
    from trustcase.certification.properties import acasxu_root, check_property
    from trustcase.certification.vnnlib import read_vnnlib

    root = acasxu_root()
    if not (root / "instances.csv").is_file():
        print(f"\n1. ACAS Xu: skipped, no data at {root} (set TRUSTCASE_ACASXU)")
        return
    rows = list(csv.reader((root / "instances.csv").read_text().splitlines()))
    if not all_instances:
        picks = [("1_1", "prop_1"), ("2_1", "prop_2"), ("1_1", "prop_4"), ("3_3", "prop_9"), ("4_5", "prop_10"),
                 ("2_9", "prop_8")]
        rows = [r for r in rows if any(f"_{a}_batch" in r[0] and r[1] == f"{b}.vnnlib" for a, b in picks)]
        timeout = min(timeout, 10.0)
    import onnxruntime as ort

    counts = {"violated": 0, "holds": 0, "unknown": 0}
    times, confirmed = [], 0
    print(f"\n1. ACAS Xu: {len(rows)} instances, budget {timeout:g} s each")
    for net, prop, _ in rows:
        p = read_vnnlib(root / "vnnlib" / prop)
        t = time.perf_counter()
        r = check_property(load_network(root / "onnx" / net), p, timeout, seed=0)
        times.append(time.perf_counter() - t)
        counts[r["verdict"]] += 1
        if r["verdict"] == "violated":  # an independent engine on the original file agrees
            x = np.array(r["counterexample"]["x"], np.float32)
            y = ort.InferenceSession(str(root / "onnx" / net), providers=["CPUExecutionProvider"]).run(
                None, {"input": x.reshape(1, 1, 1, -1)})[0]
            confirmed += bool(p.violated_by(x[None].astype(np.float64), y.astype(np.float64))[0])
        print(f"   {net:<36}{prop:<16}{r['verdict']:<10}{times[-1]:7.2f} s {r['boxes']:>9} boxes", flush=True)
    t = np.array(times)
    print(f"   violated {counts['violated']}  holds {counts['holds']}  unknown {counts['unknown']}"
          + ("  (nnenum, published: 47 violated, 139 hold)" if all_instances else ""))
    print(f"   counterexamples confirmed by onnxruntime on the .onnx file: {confirmed} of {counts['violated']}")
    print(f"   time per instance: mean {t.mean():.2f} s, median {np.median(t):.2f} s, max {t.max():.2f} s, "
          f"total {t.sum():.0f} s")
    if all_instances:
        print(f"   total / nnenum's published {NNENUM_TOTAL:g} s: {t.sum() / NNENUM_TOTAL:.1f} (other hardware)")


def bench_local(quick: bool) -> None:
    import importlib.util

    from trustcase.certification import graph as G
    from trustcase.certification import propagation as P
    from trustcase.certification.bab import allowance
    from trustcase.certification.local_robustness import decide
    from trustcase.certification.properties import acasxu_root, single_thread

    if not (acasxu_root() / "nnet").is_dir():
        print(f"\n2. Local robustness: skipped, no ACAS Xu data at {acasxu_root()} (set TRUSTCASE_ACASXU)")
        return
    spec = importlib.util.spec_from_file_location("acas_bench", ROOT / "use_cases" / "acas_xu" / "acas.py")
    acas = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(acas)
    net = acas.negated("1_1")  # arg-max = the advisory
    g = G.from_model(net, (5,))
    points = acas.Samples("test").x[: 30 if quick else 100].astype(np.float64)
    radii = [0.0005, 0.001, 0.002, 0.005, 0.01]  # L-inf, input scaled to [0, 1] (the value range is [-1, 1])
    with torch.no_grad():
        preds = net(torch.from_numpy(points).float()).argmax(1).numpy()

    def rows(c):  # y_c - y_j for every j != c
        C = torch.zeros(4, 5, dtype=torch.float64)
        C[:, c] = 1.0
        C[torch.arange(4), [j for j in range(5) if j != c]] = -1.0
        return C

    def ibp(x, eps, c):
        lo, hi = torch.from_numpy(x - eps)[None], torch.from_numpy(x + eps)[None]
        return bool((P.lower_bound(g, lo, hi, rows(c), "ibp").lower > allowance(g, lo, hi, rows(c))).all())

    def ours(x, eps, c):
        t = [torch.from_numpy(v)[None] for v in (x, x - eps, x + eps)]
        return decide(g, net, *t, c, 2.0)["verdict"]

    x1 = torch.from_numpy(points[:1]).float()
    with torch.no_grad():
        t = time.perf_counter()
        for _ in range(200):
            net(x1)
    forward = (time.perf_counter() - t) / 200
    print(f"\n2. Local robustness, ACAS Xu N_1,1, {len(points)} sampled situations (verified / falsified / unknown)")
    print(f"{'radius':>8} {'trustcase':>16} {'ms/ball':>8} {'IBP verified':>13} {'ms/ball':>8} "
          f"{'forward passes/ball':>20}")
    with single_thread():
        for r in radii:
            eps = 2 * r
            t = time.perf_counter()
            verdicts = [ours(x, eps, int(c)) for x, c in zip(points, preds, strict=True)]
            mine = (time.perf_counter() - t) / len(points)
            t = time.perf_counter()
            ref = sum(ibp(x, eps, int(c)) for x, c in zip(points, preds, strict=True))
            ib = (time.perf_counter() - t) / len(points)
            v, f = verdicts.count("verified"), verdicts.count("falsified")
            print(f"{r:>8g} {f'{v} / {f} / {len(points) - v - f}':>16} {mine * 1e3:>8.2f} {ref:>13} {ib * 1e3:>8.2f} "
                  f"{mine / forward:>20.0f}")
    print("   IBP never verifies more (it is looser); a falsified ball has a re-checked counterexample")


def solar_cells(n: int, model: Path | None = None):
    """The first n test cells of the solar-cell use case, the classifier (the use case's, or the TorchScript
    file `model` under the same contract) and its layer graph."""
    from trustcase.certification import graph as G

    uc = load_use_case(SOLAR)
    if model is not None:
        uc = uc.model_copy(update={"model": uc.model.model_copy(update={"path": Path(model).resolve()})})
    clf = load_classifier(uc.model)
    images, labels = [], []
    for batch in DataSource(uc.data, 0, uc.model).stream("test").batches(64):
        images.append(batch.images)
        labels.append(batch.labels)
        if sum(map(len, images)) >= n:
            break
    x = np.concatenate(images)[:n].astype(np.float32)
    y = np.concatenate(labels)[:n]
    return uc, clf, G.from_model(clf.module, clf.spec.input_shape), x, y


def bench_solar(n: int, timeout: float, model: Path | None = None, radius: float = 1.0) -> None:
    from trustcase.certification import propagation as P
    from trustcase.certification.bab import allowance
    from trustcase.certification.local_robustness import decide
    from trustcase.certification.properties import single_thread

    uc, clf, g, x, _ = solar_cells(n, model)
    lo_v, hi_v = uc.model.value_range
    preds = clf.logits(x).argmax(1)
    print(f"\n3. Solar-cell CNN, {n} test cells, L-inf {radius:g} grey level(s), budget {timeout:g} s per cell "
          f"({len(g.relus)} ReLU layers, {sum(int(np.prod(g.nodes[r].shape)) for r in g.relus)} ReLUs)")
    print(f"{'method':<14}{'verified':>9}{'falsified':>10}{'unknown':>9}{'median s':>10}")
    with single_thread():
        for method in P.METHODS:
            verified, secs = 0, []
            for img, c in zip(x, preds, strict=True):
                lo, hi = (clf.to_input(np.clip(img + d, lo_v, hi_v)[None]).double() for d in (-radius, radius))
                C = torch.zeros(1, 2, dtype=torch.float64)
                C[0, c], C[0, 1 - c] = 1.0, -1.0
                t = time.perf_counter()
                r = P.lower_bound(g, lo, hi, C, method, deadline=t + timeout, target=0.0,
                                  rhs=allowance(g, lo, hi, C))
                secs.append(time.perf_counter() - t)
                verified += bool((r.lower > 0).all())
            print(f"{method:<14}{verified:>9}{'-':>10}{n - verified:>9}{statistics.median(secs):>10.2f}")
        out, secs = [], []
        for i, (img, c) in enumerate(zip(x, preds, strict=True)):
            box = [clf.to_input(np.clip(img + d, lo_v, hi_v)[None]).double() for d in (0.0, -radius, radius)]
            r = decide(g, clf.module, *box, int(c), timeout, item_seed=i)
            out.append(r["verdict"])
            secs.append(r["seconds"])
        v, f = out.count("verified"), out.count("falsified")
        print(f"{'full':<14}{v:>9}{f:>10}{n - v - f:>9}{statistics.median(secs):>10.2f}")
    print("   full = IBP, the attack engine, CROWN, alpha-CROWN (CROWN refines every unstable neuron until the budget),"
          " ReLU branch and bound if <= 2000 unstable; unknown counts as not verified")


def bench_attacks(n: int, model: Path | None = None) -> None:
    from trustcase.robustness.attacks import Budget, attack
    from trustcase.seeding import item_seeds
    from trustcase.testing import black_box_of

    uc, clf, _, x, y = solar_cells(n, model)
    vr = tuple(map(float, uc.model.value_range))
    xt, yt = torch.from_numpy(x), torch.from_numpy(y).long()
    grey = (1.0, 2.0)  # L-inf radii in grey levels; the figure is at 1
    print(f"\n4. Attack strength, solar-cell CNN, {n} test cells, L-inf (accuracy under attack; clean "
          f"{float((clf.logits(x).argmax(1) == y).mean()):.3f})")
    print(f"{'attack':<36}" + "".join(f"{f'{g:g} grey':>10}{'seconds':>9}" for g in grey))
    fooled = {}
    # PGD 10 steps x 2 runs is the check's default (today's); the engine (auto) = FGSM, then that PGD, then APGD
    for kind, steps, restarts, apgd_steps in (("fgsm", 1, 1, 0), ("pgd", 10, 2, 0), ("apgd", 0, 2, 10),
                                              ("apgd", 0, 2, 100), ("auto", 10, 2, 100), ("auto", 10, 5, 100),
                                              ("square", 0, 1, 0)):
        name = {"fgsm": "FGSM", "pgd": f"PGD {steps} steps x {restarts}", "square": "Square 1000 queries (black box)",
                "apgd": f"APGD {apgd_steps} steps x {restarts}",
                "auto": f"engine (PGD {steps}x{restarts}, APGD {apgd_steps}x{restarts})"}[kind]
        row = f"{name:<36}"
        for g in grey:
            t = time.perf_counter()
            model = black_box_of(clf) if kind == "square" else clf  # Square through the real black-box wrapper
            adv, fooled[name, g] = attack(kind, model, xt, yt, torch.full((n,), g), "linf", vr,
                                          Budget(steps, 2.5, restarts, apgd_steps, queries=1000),
                                          item_seeds(0, "bench", range(n), kind))
            acc = float((clf.logits(adv.numpy()).argmax(1) == y).mean())  # the plain forward pass decides
            row += f"{acc:>10.3f}{time.perf_counter() - t:>9.1f}"
        print(row, flush=True)
    missed = [int(((fooled["FGSM", g] | fooled["PGD 10 steps x 2", g]) & ~fooled[
        "engine (PGD 10x2, APGD 100x2)", g]).sum()) for g in grey]
    print(f"   items FGSM or PGD fools and the engine (PGD 10x2, APGD 100x2) does not: {missed} (must be 0)")


MNISTFC = [("256x2", "prop_0_0.03"), ("256x2", "prop_1_0.03"), ("256x2", "prop_0_0.05"), ("256x2", "prop_3_0.03"),
           ("256x4", "prop_0_0.03")]


def bench_mnistfc(timeout: float) -> None:
    """High-dimensional properties (784 inputs): check_property (falsification, then ReLU splitting with
    beta-CROWN) against alpha-CROWN alone on the same box, with the published verdicts."""
    from trustcase.certification import graph as G
    from trustcase.certification import propagation as P
    from trustcase.certification.bab import allowance
    from trustcase.certification.nnet import load_network
    from trustcase.certification.properties import check_property, single_thread
    from trustcase.certification.vnnlib import read_vnnlib

    root = ROOT.parent / "shared" / "vnncomp2021"
    if not (root / "mnistfc").is_dir():
        print(f"\n5. mnistfc: skipped, no data at {root}")
        return
    published = {(r[1], r[2]): r[3] for r in csv.reader((root / "published_results.csv").read_text().splitlines())}
    print(f"\n5. VNN-COMP 2021 mnistfc, budget {timeout:g} s each (published: the competition's verdicts)")
    print(f"{'network':<22}{'property':<20}{'alpha-CROWN':>12}{'trustcase':>11}{'seconds':>9}{'domains':>9}"
          f"{'published':>11}")
    for net, name in MNISTFC:
        path = root / "mnistfc" / f"mnist-net_{net}.onnx"
        module, prop = load_network(path), read_vnnlib(root / "mnistfc" / f"{name}.vnnlib")
        region = prop.regions[0]
        g = G.from_model(module, (784,))
        with single_thread():
            lo, hi = (torch.from_numpy(v).double()[None] for v in (region.lower, region.upper))
            alpha = all(bool((P.lower_bound(g, lo, hi, torch.from_numpy(c.A), "alpha-crown").lower[0]
                              - torch.from_numpy(c.b) > allowance(g, lo, hi, torch.from_numpy(c.A))).any())
                        for c in region.outputs)
        t = time.perf_counter()
        r = check_property(module, prop, timeout)
        print(f"{path.name:<22}{name:<20}{'holds' if alpha else 'open':>12}{r['verdict']:>11}"
              f"{time.perf_counter() - t:>9.1f}{r['boxes']:>9}{published.get((path.name, name + '.vnnlib'), '-'):>11}",
              flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--acas", action="store_true", help="all 186 ACAS Xu instances (long)")
    ap.add_argument("--timeout", type=float, default=116.0, help="ACAS Xu budget per instance, seconds")
    ap.add_argument("--cells", type=int, default=100, help="solar cells for parts 3 and 4")
    ap.add_argument("--cell-timeout", type=float, default=10.0, help="budget per solar cell, seconds")
    ap.add_argument("--radius", type=float, default=1.0, help="L-inf radius of part 3, grey levels")
    ap.add_argument("--skip", default="", help="comma-separated parts to skip (1,2,3,4)")
    ap.add_argument("--mnistfc", type=float, default=0, metavar="SECONDS",
                    help="part 5: VNN-COMP mnistfc instances with this budget each (ReLU splitting)")
    ap.add_argument("--model", type=Path, default=None, help="parts 3 and 4: this TorchScript solar-cell model "
                    "instead of the use case's (same input contract)")
    a = ap.parse_args()
    skip = set(a.skip.split(","))
    cells = 10 if a.quick else a.cells
    print(f"torch threads: {torch.get_num_threads()}")
    if "1" not in skip:
        bench_acas(a.acas, a.timeout)
    if "2" not in skip:
        bench_local(a.quick)
    if "3" not in skip:
        bench_solar(cells, 2.0 if a.quick else a.cell_timeout, a.model, a.radius)
    if "4" not in skip:
        bench_attacks(cells, a.model)
    if a.mnistfc:
        bench_mnistfc(a.mnistfc)


if __name__ == "__main__":
    main()

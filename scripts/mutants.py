"""`make mutants`: mutation testing (mutmut 3) of the certification, verification, perturbation, statistics/verdict
and performance code.

Each chunk runs in its own scratch copy of the repository (the working tree is never touched: no
`mutants/` folder beside other people's work), mutating only its modules and running only the fast tests
that cover them (mutmut runs, for each mutant, the tests that reach the mutated function). Two workers
per chunk, one chunk at a time: it fits 2 cores. Results: build/mutants/<chunk>.json (mutmut's stats and
every surviving mutant's diff) and a table on stdout (the scores docs/testing.md reports).

    .venv/bin/python scripts/mutants.py [chunk ...]     # chunks: statistics, performance, certification,
                                                        #         verification, perturbations
    .venv/bin/python scripts/mutants.py --sample 300 --seed 0 certification

`--sample N` tests a seeded random sample of N of the chunk's mutants instead of all of them (a full chunk takes
most of an hour on a shared machine): the killed share is then an estimate, reported with its exact
(Clopper-Pearson, 95%) interval over the sampled mutants that a test reaches. Results:
build/mutants/<chunk>-sample<N>-seed<S>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MUTMUT = ROOT / ".venv" / "bin" / "mutmut"
OUT = ROOT / "build" / "mutants"
FAST = "-p no:cacheprovider -q -m 'not slow' -k 'not tiny_solar and not acasxu and not check_on'"
CHUNKS = {  # name: (modules to mutate, tests that cover them)
    "statistics": (["trustcase/measurement.py", "trustcase/verdicts.py"],
                   ["tests/test_exact_measurement.py", "tests/test_exact_verdicts.py",
                    "tests/test_exact_certification.py", "tests/test_exact_metrics.py", "tests/test_performance.py",
                    "tests/test_bad_input_verdicts.py"]),
    "performance": (["trustcase/performance.py"], ["tests/test_performance.py", "tests/test_exact_metrics.py"]),
    "certification": (["trustcase/certification/lipschitz.py", "trustcase/models/lipschitz_layers.py",
                       "trustcase/certification/smoothing.py", "trustcase/certification/rounding.py"],
                      ["tests/test_exact_certification.py", "tests/test_lipschitz.py", "tests/test_lipschitz_layers.py",
                       "tests/test_smoothing.py", "tests/test_certification_mutants.py",
                       # a segmenter's votes (smoothing.sample_counts per pixel)
                       "tests/test_segmentation_certify.py"]),
    # the one layer graph and what runs on it: IBP / CROWN / alpha-CROWN, branch and bound (exact tests against
    # scipy's MILP)
    "verification": (["trustcase/certification/graph.py", "trustcase/certification/propagation.py",
                      "trustcase/certification/bab.py"],
                     ["tests/test_verification.py", "tests/test_exact_certification.py", "tests/test_onnx_graph.py"]),
    # every perturbation's physical parameter (exact tests on constructed images)
    "perturbations": (["trustcase/robustness/perturbations.py"], ["tests/test_perturbations.py"]),
}
SKIP = {".venv", ".git", "mutants", "__pycache__", "mlruns", "node_modules", "build"}


def copy_tree(dst: Path) -> None:
    def keep(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
        parts = Path(info.name).parts
        return None if any(p in SKIP for p in parts) or info.name.endswith(".db") else info

    shutil.rmtree(dst, ignore_errors=True)
    dst.mkdir(parents=True)
    tmp = dst.parent / f"{dst.name}.tar"
    with tarfile.open(tmp, "w") as t:
        t.add(ROOT, arcname=".", filter=keep)
    with tarfile.open(tmp) as t:
        t.extractall(dst, filter="data")
    tmp.unlink()


def run_chunk(name: str, sample: int | None = None, seed: int = 0) -> dict:
    modules, tests = CHUNKS[name]
    work = Path(os.environ.get("TRUSTCASE_MUTANTS_DIR", "/tmp/trustcase-mutants")) / name
    copy_tree(work)
    (work / "setup.cfg").write_text(
        "[mutmut]\nsource_paths = trustcase\nalso_copy =\n    use_cases\n"
        + "only_mutate =\n" + "".join(f"    {m}\n" for m in modules)
        + "pytest_add_cli_args_test_selection =\n" + "".join(f"    {t}\n" for t in tests)
        + "pytest_add_cli_args =\n" + "".join(f"    {a}\n" for a in _split(FAST)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    mutmut = [str(MUTMUT), "run", "--max-children", "2"]
    with open(work / "mutmut.log", "w") as log:
        if sample is not None:  # generate every mutant and the test map (a pattern matching no mutant stops
            # mutmut right after), then test the sample only
            subprocess.run([*mutmut, "no-mutant-has-this-name"], cwd=work, env=env, stdout=log,
                           stderr=subprocess.STDOUT, check=False)
            population = sorted(_exit_codes(work))
            if not population:
                raise SystemExit(f"mutmut generated no mutants for {name}: see {work / 'mutmut.log'}")
            chosen = sorted(random.Random(seed).sample(population, min(sample, len(population))))
            subprocess.run([*mutmut, *chosen], cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT, check=False)
        else:
            subprocess.run(mutmut, cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT, check=False)
    codes = _exit_codes(work)
    if sample is not None:
        codes = {m: codes[m] for m in chosen}
    stats = _tally(codes.values())
    stats["total"] = len(population) if sample is not None else len(codes)
    survivors = {m: f"cd {work} && {MUTMUT} show {m}" for m, c in codes.items() if c == 0}
    tested = stats["killed"] + stats["survived"] + stats["timeout"] + stats["suspicious"]
    result = {"chunk": name, "modules": modules, "tests": tests, "stats": stats,
              "score_tested": round(stats["killed"] / tested, 4) if tested else None,
              "score_all": round(stats["killed"] / stats["total"], 4) if stats["total"] and sample is None else None,
              "minutes": round((time.perf_counter() - t0) / 60, 1), "survivors": survivors}
    if sample is not None:
        sys.path.insert(0, str(ROOT))
        from trustcase.measurement import clopper_pearson

        ci = clopper_pearson(stats["killed"], tested, 0.95)
        result["sample"] = {"seed": seed, "size": len(chosen), "of": len(population),
                            "killed_share_95": [round(ci.lower, 4), round(ci.upper, 4)]}
    OUT.mkdir(parents=True, exist_ok=True)
    suffix = f"-sample{sample}-seed{seed}" if sample is not None else ""
    (OUT / f"{name}{suffix}.json").write_text(json.dumps(result, indent=1))
    return result


def _exit_codes(work: Path) -> dict[str, int | None]:
    """Every generated mutant's exit code (mutmut's .meta files): 1 or 3 killed, 0 survived, 33 or 5 no test
    reaches it, None not run."""
    codes = {}
    for meta in (work / "mutants").rglob("*.meta"):
        codes.update(json.loads(meta.read_text())["exit_code_by_key"])
    return codes


def _tally(codes) -> dict[str, int]:
    from mutmut.stats import status_by_exit_code

    names = {"killed": "killed", "survived": "survived", "no tests": "no_tests", "timeout": "timeout",
             "not checked": "not_checked", "skipped": "skipped"}
    stats = dict.fromkeys([*names.values(), "suspicious"], 0)
    for c in codes:
        stats[names.get(status_by_exit_code[c], "suspicious")] += 1
    return stats


def _split(args: str) -> list[str]:
    import shlex

    return shlex.split(args)


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(description="mutation testing by chunk (mutmut 3)")
    ap.add_argument("chunks", nargs="*", metavar="chunk", help=f"default: all ({', '.join(CHUNKS)})")
    ap.add_argument("--sample", type=int, default=None, help="test a seeded random sample of N mutants per chunk")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    if unknown := sorted(set(a.chunks) - set(CHUNKS)):
        ap.error(f"unknown chunk {', '.join(unknown)} (one of {', '.join(CHUNKS)})")
    print(f"{'chunk':<14}{'mutants':>8}{'killed':>8}{'survived':>9}{'no test':>8}{'timeout':>8}"
          f"{'killed/tested':>14}{'min':>6}")
    for name in a.chunks or list(CHUNKS):
        r = run_chunk(name, a.sample, a.seed)
        s = r["stats"]
        line = (f"{name:<14}{s['total']:>8}{s['killed']:>8}{s['survived']:>9}{s['no_tests']:>8}{s['timeout']:>8}"
                f"{r['score_tested'] or 0:>14.1%}{r['minutes']:>6}")
        if "sample" in r:
            lo, hi = r["sample"]["killed_share_95"]
            line += f"  (sample of {r['sample']['size']}, seed {a.seed}: 95% interval [{lo:.1%}, {hi:.1%}])"
        print(line, flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])

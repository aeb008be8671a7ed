"""`make mutants`: mutation testing (mutmut 3) of the certification, verification, perturbation, statistics/verdict
and performance code.

Each chunk runs in its own scratch copy of the repository (the working tree is never touched: no
`mutants/` folder beside other people's work), mutating only its modules and running only the fast tests
that cover them (mutmut runs, for each mutant, the tests that reach the mutated function). Two workers
per chunk, one chunk at a time: it fits 2 cores. Results: build/mutants/<chunk>.json (mutmut's stats and
every surviving mutant's diff) and a table on stdout (the scores docs/testing.md reports).

    .venv/bin/python scripts/mutants.py [chunk ...]     # chunks: statistics, performance, certification,
                                                        #         verification, perturbations
"""

from __future__ import annotations

import json
import os
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
                       "tests/test_smoothing.py"]),
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


def run_chunk(name: str) -> dict:
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
    with open(work / "mutmut.log", "w") as log:
        subprocess.run([str(MUTMUT), "run", "--max-children", "2"], cwd=work, env=env, stdout=log,
                       stderr=subprocess.STDOUT, check=False)
    subprocess.run([str(MUTMUT), "export-cicd-stats"], cwd=work, env=env, capture_output=True, check=False)
    stats = json.loads((work / "mutants" / "mutmut-cicd-stats.json").read_text())
    listing = subprocess.run([str(MUTMUT), "results"], cwd=work, env=env, capture_output=True, text=True).stdout
    survivors = {}
    for line in listing.splitlines():
        mutant, _, status = line.strip().rpartition(": ")
        if status == "survived":  # `mutmut show <name>` in the chunk's folder gives the diff (seconds each)
            survivors[mutant] = f"cd {work} && {MUTMUT} show {mutant}"
    tested = stats["killed"] + stats["survived"] + stats["timeout"] + stats["suspicious"]
    result = {"chunk": name, "modules": modules, "tests": tests, "stats": stats,
              "score_tested": round(stats["killed"] / tested, 4) if tested else None,
              "score_all": round(stats["killed"] / stats["total"], 4) if stats["total"] else None,
              "minutes": round((time.perf_counter() - t0) / 60, 1), "survivors": survivors}
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"{name}.json").write_text(json.dumps(result, indent=1))
    return result


def _split(args: str) -> list[str]:
    import shlex

    return shlex.split(args)


def main(names: list[str]) -> None:
    print(f"{'chunk':<14}{'mutants':>8}{'killed':>8}{'survived':>9}{'no test':>8}{'timeout':>8}"
          f"{'killed/tested':>14}{'min':>6}")
    for name in names or list(CHUNKS):
        r = run_chunk(name)
        s = r["stats"]
        print(f"{name:<14}{s['total']:>8}{s['killed']:>8}{s['survived']:>9}{s['no_tests']:>8}{s['timeout']:>8}"
              f"{r['score_tested'] or 0:>14.1%}{r['minutes']:>6}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])

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
    .venv/bin/python scripts/mutants.py amplitudes      # each perturbation's amplitude halved, by hand

`amplitudes` is a chunk of planted mutants, not mutmut's: issue 23 found that halving the occlusion patch's side
passed the whole suite, so each built-in perturbation's amplitude is halved in turn at the top of its `perturb`
(in a scratch copy) and tests/test_perturbations.py must fail every time.

`--sample N` tests a seeded random sample of N of the chunk's mutants instead of all of them (a full chunk takes
most of an hour on a shared machine): the killed share is then an estimate, reported with its exact
(Clopper-Pearson, 95%) interval over the sampled mutants that a test reaches, less the equivalent ones. Results:
build/mutants/<chunk>-sample<N>-seed<S>.json.

`--only-survivors` (with the `--sample` and `--seed` of a stored sample) re-tests only that sample's survivors
against the tests as they are now (a new test cannot revive a killed mutant). Each survivor is applied to a
scratch copy (`mutmut apply`) and the tests mutmut maps to its function run in a fresh pytest process: a mutmut
re-run once reported kills that the patched copy does not show (rounding.fft_error's constants), so a kill is
only what a patched copy shows. It refuses a sample drawn from other sources (the modules' SHA-256). Once per
sample it also re-checks CONFIRM of the first pass's kills, drawn by the seed, the same way, and records how many a
patched copy confirms.

Equivalent mutants (the program's behaviour provably unchanged) leave the denominator, as is standard: they are
the list items of docs/testing.md that start with a mutant's name in backquotes, each with its one-line argument.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import queue
import random
import re
import shutil
import subprocess
import sys
import tarfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MUTMUT = ROOT / ".venv" / "bin" / "mutmut"
PYTHON = ROOT / ".venv" / "bin" / "python"
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
                       "tests/test_mutants_certification.py",
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
PLANTED = {"amplitudes": (["trustcase/robustness/perturbations.py"], ["tests/test_perturbations.py"])}
SKIP = {".venv", ".git", "mutants", "__pycache__", "mlruns", "node_modules", "build"}
DOCS = ROOT / "docs" / "testing.md"  # the equivalent mutants, each with its argument
CONFIRM = 20  # stored kills re-checked in a patched copy by --only-survivors
RETEST_SECONDS = 1800  # a patched copy's tests running longer than this count as a timeout (an endless loop)


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


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}


def scratch(name: str) -> Path:
    """A scratch copy of the repository set up for mutmut on the chunk's modules and tests."""
    modules, tests = CHUNKS[name]
    work = Path(os.environ.get("TRUSTCASE_MUTANTS_DIR", "/tmp/trustcase-mutants")) / name
    copy_tree(work)
    (work / "setup.cfg").write_text(
        "[mutmut]\nsource_paths = trustcase\nalso_copy =\n    use_cases\n"
        + "only_mutate =\n" + "".join(f"    {m}\n" for m in modules)
        + "pytest_add_cli_args_test_selection =\n" + "".join(f"    {t}\n" for t in tests)
        + "pytest_add_cli_args =\n" + "".join(f"    {a}\n" for a in _split(FAST)))
    return work


def generate(work: Path, log) -> list[str]:
    """Every mutant of the chunk and mutmut's map of the tests reaching each function (a pattern matching no
    mutant stops mutmut right after), sorted: the population a seeded sample is drawn from."""
    subprocess.run([str(MUTMUT), "run", "--max-children", "2", "no-mutant-has-this-name"], cwd=work, env=ENV,
                   stdout=log, stderr=subprocess.STDOUT, check=False)
    population = sorted(_exit_codes(work))
    if not population:
        raise SystemExit(f"mutmut generated no mutants in {work}: see {work / 'mutmut.log'}")
    return population


def sources(modules: list[str]) -> dict[str, str]:
    return {m: hashlib.sha256((ROOT / m).read_bytes()).hexdigest() for m in modules}


def run_chunk(name: str, sample: int | None = None, seed: int = 0) -> dict:
    modules, tests = CHUNKS[name]
    work = scratch(name)
    t0 = time.perf_counter()
    mutmut = [str(MUTMUT), "run", "--max-children", "2"]
    with open(work / "mutmut.log", "w") as log:
        if sample is not None:  # every mutant and the test map, then test the sample only
            population = generate(work, log)
            chosen = sorted(random.Random(seed).sample(population, min(sample, len(population))))
            subprocess.run([*mutmut, *chosen], cwd=work, env=ENV, stdout=log, stderr=subprocess.STDOUT, check=False)
        else:
            subprocess.run(mutmut, cwd=work, env=ENV, stdout=log, stderr=subprocess.STDOUT, check=False)
    codes = _exit_codes(work)
    if sample is not None:
        codes = {m: codes[m] for m in chosen}
    stats = _tally(codes.values())
    stats["total"] = len(population) if sample is not None else len(codes)
    survivors = {m: f"cd {work} && {MUTMUT} show {m}" for m, c in codes.items() if c == 0}
    result = {"chunk": name, "modules": modules, "sources": sources(modules), "tests": tests, "stats": stats,
              "minutes": round((time.perf_counter() - t0) / 60, 1), "survivors": survivors}
    if sample is not None:
        result["sample"] = {"seed": seed, "size": len(chosen), "of": len(population), "sampled": chosen}
    return save(name, sample, seed, score(result))


def save(name: str, sample: int | None, seed: int, result: dict) -> dict:
    OUT.mkdir(parents=True, exist_ok=True)
    suffix = f"-sample{sample}-seed{seed}" if sample is not None else ""
    (OUT / f"{name}{suffix}.json").write_text(json.dumps(result, indent=1, ensure_ascii=False))
    return result


def equivalent_mutants(docs: Path = DOCS) -> dict[str, str]:
    """The equivalent mutants docs/testing.md lists ("- `name`: why"), with their one-line arguments."""
    return dict(re.findall(r"^- `([\w.ǁ]+__mutmut_\d+)`:? (.+)$", docs.read_text(), re.M))


def score(result: dict) -> dict:
    """killed / (tested - equivalent): a mutant no test reaches is not tested; an equivalent one is a survivor
    that no test can kill. A sample's share gets its exact 95% interval."""
    stats = result["stats"]
    equivalent = sorted(set(result["survivors"]) & set(equivalent_mutants()))
    tested = stats["killed"] + stats["survived"] + stats["timeout"] + stats["suspicious"] - len(equivalent)
    result["equivalent"] = equivalent
    result["score_tested"] = round(stats["killed"] / tested, 4) if tested else None
    result["score_all"] = (round(stats["killed"] / (stats["total"] - len(equivalent)), 4)
                           if stats["total"] and "sample" not in result else None)
    if "sample" in result and tested:
        sys.path.insert(0, str(ROOT))
        from trustcase.measurement import clopper_pearson

        ci = clopper_pearson(stats["killed"], tested, 0.95)
        result["sample"]["killed_share_95"] = [round(ci.lower, 4), round(ci.upper, 4)]
    return result


def retest_survivors(name: str, sample: int, seed: int) -> dict:
    """Re-test a stored sample's survivors against the tests as they are now, each in a patched copy."""
    path = OUT / f"{name}-sample{sample}-seed{seed}.json"
    if not path.exists():
        raise SystemExit(f"no stored sample {path}: run --sample {sample} --seed {seed} {name} first")
    result = json.loads(path.read_text())
    modules = result["modules"]
    if "sources" in result and result["sources"] != sources(modules):
        changed = [m for m in modules if result["sources"][m] != sources([m])[m]]
        raise SystemExit(f"{', '.join(changed)} changed since the sample was drawn: its mutants are other "
                         f"mutants now; draw a new sample (--sample {sample} --seed <new seed> {name})")
    work = scratch(name)
    t0 = time.perf_counter()
    with open(work / "mutmut.log", "w") as log:
        population = generate(work, log)
    chosen = sorted(random.Random(seed).sample(population, min(sample, len(population))))
    if len(population) != result["sample"]["of"] or chosen != result["sample"].get("sampled", chosen) \
            or not set(result["survivors"]) <= set(chosen):
        raise SystemExit(f"the sources of {name} changed since the sample was drawn ({len(population)} mutants, "
                         f"{result['sample']['of']} then): draw a new sample")
    result["sample"]["sampled"] = chosen
    result.setdefault("sources", sources(modules))
    copies: queue.Queue[Path] = queue.Queue()
    for i in range(2):  # two workers, each with its own copy to patch (mutmut apply reads mutants/ beside it)
        copy = work.parent / f"{name}-patched{i}"
        shutil.rmtree(copy, ignore_errors=True)
        shutil.copytree(work, copy, symlinks=True, ignore=shutil.ignore_patterns("mutants"))
        (copy / "mutants").symlink_to(work / "mutants")
        copies.put(copy)

    def pytest(copy: Path, tests: list[str]) -> int:
        return subprocess.run([str(PYTHON), "-m", "pytest", "-x", *_split(FAST), *tests],
                              cwd=copy, env=ENV, capture_output=True, timeout=RETEST_SECONDS).returncode

    clean = copies.get()  # a kill means something only if the unpatched copy passes the same tests
    if pytest(clean, CHUNKS[name][1]) != 0:
        raise SystemExit(f"the chunk's tests fail without any mutant in {clean}: fix them first")
    copies.put(clean)

    def retest(mutant: str) -> tuple[str, str]:
        tests = subprocess.run([str(MUTMUT), "tests-for-mutant", mutant], cwd=work, env=ENV, capture_output=True,
                               text=True, check=True).stdout.splitlines()  # ids may hold spaces
        if not tests:
            return mutant, "survived"  # no test reaches it now either
        copy = copies.get()
        try:
            subprocess.run([str(MUTMUT), "apply", mutant], cwd=copy, env=ENV, check=True, capture_output=True)
            try:
                rc = pytest(copy, tests)
            except subprocess.TimeoutExpired:
                return mutant, "timeout"
            if rc not in (0, 1, 2, 5):  # 0 passed, 1 failed, 2 a collection error (an import the mutant breaks)
                raise SystemExit(f"pytest exited {rc} on {mutant} in {copy}: not a verdict")
            return mutant, "survived" if rc in (0, 5) else "killed"  # 5: no test collected
        finally:
            for m in modules:
                shutil.copy2(work / m, copy / m)
            copies.put(copy)

    killed = sorted(set(chosen) - set(result["survivors"]) - set(result.get("killed_by_retest", []))
                    - {m for m, c in _exit_codes(work).items() if m in chosen and c in (5, 33)})  # reached by no test
    spot = ([] if "first_pass_kills_rechecked" in result  # the same seed would draw the same ones again
            else sorted(random.Random(seed).sample(killed, min(CONFIRM, len(killed)))))
    with ThreadPoolExecutor(2) as pool:
        outcome = dict(pool.map(retest, sorted(result["survivors"])))
        confirmed = dict(pool.map(retest, spot))
    if spot:
        result["first_pass_kills_rechecked"] = {
            "checked": len(spot), "confirmed": sum(v == "killed" for v in confirmed.values()),
            "not_confirmed": sorted(m for m, v in confirmed.items() if v != "killed")}
    stats = result["stats"]
    result.setdefault("first_pass", dict(stats))
    for status in ("killed", "timeout"):
        moved = [m for m, s in outcome.items() if s == status]
        stats[status] += len(moved)
        stats["survived"] -= len(moved)
        result.setdefault(f"{status}_by_retest", [])
        result[f"{status}_by_retest"] = sorted({*result[f"{status}_by_retest"], *moved})
    result["survivors"] = {m: f"cd {work} && {MUTMUT} show {m}" for m, s in outcome.items() if s == "survived"}
    result["retest_minutes"] = round((time.perf_counter() - t0) / 60, 1)
    return save(name, sample, seed, score(result))


def halved_amplitudes(name: str = "amplitudes") -> dict:
    """Each built-in perturbation with its amplitude halved (inserted as the first line of the `perturb` it runs,
    so dead_rows, which inherits dead_columns', gets its own), against the perturbation tests, in a scratch copy."""
    import inspect

    sys.path.insert(0, str(ROOT))
    from trustcase.robustness.perturbations import PERTURBATIONS

    (module,), tests = PLANTED[name]
    work = Path(os.environ.get("TRUSTCASE_MUTANTS_DIR", "/tmp/trustcase-mutants")) / name
    copy_tree(work)
    source = (ROOT / module).read_text().splitlines(keepends=True)
    t0, outcome = time.perf_counter(), {}
    for pert, cls in sorted(PERTURBATIONS.items()):
        lines, start = inspect.getsourcelines(cls.perturb)
        if inspect.getsourcefile(cls.perturb) != str(ROOT / module):
            continue  # a partner's
        body = start + next(i for i, line in enumerate(lines) if line.rstrip().endswith(":")) + 1  # after `def`
        indent = source[body - 1][:len(source[body - 1]) - len(source[body - 1].lstrip())]
        planted = f"{indent}amplitude = amplitude / 2 if self.name == {pert!r} else amplitude  # planted\n"
        (work / module).write_text("".join([*source[:body - 1], planted, *source[body - 1:]]))
        rc = subprocess.run([str(PYTHON), "-m", "pytest", "-x", *_split(FAST), *tests],
                            cwd=work, env=ENV, capture_output=True).returncode
        outcome[pert] = "killed" if rc in (1, 2) else "survived" if rc == 0 else f"pytest exit {rc}"
    (work / module).write_text("".join(source))
    clean = subprocess.run([str(PYTHON), "-m", "pytest", *_split(FAST), *tests], cwd=work,
                           env=ENV, capture_output=True).returncode
    if clean != 0:
        raise SystemExit(f"{', '.join(tests)} fail without any planted mutant in {work}")
    killed = sum(v == "killed" for v in outcome.values())
    stats = dict.fromkeys(["killed", "survived", "no_tests", "timeout", "not_checked", "skipped", "suspicious"], 0)
    stats.update(killed=killed, survived=len(outcome) - killed, total=len(outcome))
    result = {"chunk": name, "modules": [module], "tests": tests, "stats": stats, "planted": outcome,
              "minutes": round((time.perf_counter() - t0) / 60, 1),
              "survivors": {m: "its amplitude halved" for m, v in outcome.items() if v != "killed"}}
    return save(name, None, 0, score(result))


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
    ap.add_argument("chunks", nargs="*", metavar="chunk", help=f"default: all ({', '.join([*CHUNKS, *PLANTED])})")
    ap.add_argument("--sample", type=int, default=None, help="test a seeded random sample of N mutants per chunk")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only-survivors", action="store_true",
                    help="re-test the survivors of the stored sample (--sample N --seed S) against today's tests")
    a = ap.parse_args(argv)
    if unknown := sorted(set(a.chunks) - set(CHUNKS) - set(PLANTED)):
        ap.error(f"unknown chunk {', '.join(unknown)} (one of {', '.join([*CHUNKS, *PLANTED])})")
    if a.only_survivors and a.sample is None:
        ap.error("--only-survivors re-tests a stored sample: give its --sample N and --seed S")
    print(f"{'chunk':<14}{'mutants':>8}{'killed':>8}{'survived':>9}{'equiv.':>7}{'no test':>8}{'timeout':>8}"
          f"{'killed/tested':>14}{'min':>6}")
    for name in a.chunks or [*CHUNKS, *PLANTED]:
        r = (halved_amplitudes(name) if name in PLANTED else retest_survivors(name, a.sample, a.seed)
             if a.only_survivors else run_chunk(name, a.sample, a.seed))
        s = r["stats"]
        line = (f"{name:<14}{s['total']:>8}{s['killed']:>8}{s['survived']:>9}{len(r['equivalent']):>7}"
                f"{s['no_tests']:>8}{s['timeout']:>8}{r['score_tested'] or 0:>14.1%}"
                f"{r.get('retest_minutes', r['minutes']):>6}")
        if "sample" in r:
            lo, hi = r["sample"]["killed_share_95"]
            line += f"  (sample of {r['sample']['size']}, seed {a.seed}: 95% interval [{lo:.1%}, {hi:.1%}])"
        print(line, flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])

"""The `trustcase` command line. Exit codes: 0 every claim passes, 3 assessment completed with a FAIL
or INCONCLUSIVE claim, 2 invalid input (located message, no traceback), 1 internal error."""

from __future__ import annotations

import os
import sys
import traceback
from pathlib import Path
from typing import NoReturn

import typer
from rich.console import Console

import trustcase  # noqa: F401  (telemetry off before anything else is imported)

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
console = Console(stderr=True, soft_wrap=True)  # no hard wraps: messages stay greppable
out_console = Console(soft_wrap=True)

ROOT = Path(__file__).resolve().parent.parent
BUNDLED = ROOT / "use_cases" / "solar_cells" / "use_case.yaml"
DEMOS = ("solar_cells", "steel_defects")  # `trustcase demo [CASE]`
EXIT_PASS, EXIT_INTERNAL, EXIT_INVALID, EXIT_NOT_ALL_PASS = 0, 1, 2, 3


def _fail(e: BaseException) -> NoReturn:
    """A user error (`errors.UserError`), or work this model cannot do (`Unsupported`): its message, exit 2; a
    use-case file's problems one per line. Anything else is internal: a short message and a log, exit 1."""
    from trustcase.errors import Unsupported, UserError
    from trustcase.schemas import UseCaseError

    if isinstance(e, UseCaseError):
        _invalid(e)
    if isinstance(e, UserError | Unsupported):
        console.print(f"[bold red]error:[/] {_escape(str(e))}", highlight=False)
        raise typer.Exit(EXIT_INVALID) from None
    log = Path(".trustcase") / "last-error.log"
    log.parent.mkdir(exist_ok=True)
    log.write_text("".join(traceback.format_exception(e)))
    console.print(f"[bold red]internal error:[/] {type(e).__name__}: {_escape(str(e))}\n(traceback in {log})")
    raise typer.Exit(EXIT_INTERNAL) from None


def _escape(text: str) -> str:
    """Every message the CLI prints: plain values, no colour codes of its own, no markup of ours."""
    from rich.markup import escape

    from trustcase.errors import plain

    return escape(plain(text))


@app.command()
def validate(
    path: Path = typer.Argument(..., help="use-case YAML file"),
    seed: int = typer.Option(None, "--seed", help="overrides plan.seed (the capped subset of each split)"),
) -> None:
    """Check a use case as `assess` will before any work: the file, its plan and claims, the model, the loaders
    and the first item of each split; print every problem with its line."""
    from trustcase.flows.preflight import preflight

    try:
        with console.status("Checking the use case, model and data…"):
            uc = preflight(path, seed)
    except Exception as e:  # noqa: BLE001
        _fail(e)
    out_console.print(f"[green]valid[/]: {uc.id} ({len(uc.requirements)} requirements, {len(uc.plan.checks)} checks)")


def _invalid(e) -> NoReturn:
    """Every problem of a use case (`UseCaseError`), one plain line each, exit 2."""
    console.print(f"[bold red]{_escape(str(e.path))} is invalid[/] ({len(e.problems)} problem(s)):", highlight=False)
    for p in e.problems:
        console.print(f"  {_escape(str(p))}", highlight=False)
    raise typer.Exit(EXIT_INVALID)


def run_assessment(path: Path, out: Path | None, tracking_uri: str | None, seed: int | None,
                   runner: str = "thread", dask_address: str | None = None) -> int:
    from trustcase.flows.preflight import preflight
    from trustcase.flows.runners import run, task_runner

    try:
        with console.status("Checking the use case, model and data…"):
            uc = preflight(path, seed)  # the same checks as `trustcase validate`
            task_runner(runner, dask_address)  # a Dask scheduler that does not answer fails before any work
    except Exception as e:  # noqa: BLE001
        _fail(e)
    out = out or Path("trustcase-out") / uc.id
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from trustcase.flows import assess as flow

    with Progress(TextColumn(f"Assessing [b]{uc.id}[/]"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("{task.description}"), TimeElapsedColumn(), console=console) as bar:
        job = bar.add_task("starting the Prefect flow", total=None)

        def listener(label: str, done: int, total: int) -> None:
            bar.update(job, completed=done, total=total, description=f"{label} done")

        flow.progress_listeners.append(listener)
        try:
            result = run(str(path), str(out), seed, tracking_uri, runner, dask_address)
        except Exception as e:  # noqa: BLE001
            _fail(e)
        finally:
            flow.progress_listeners.remove(listener)
    colour = {"PASS": "green", "FAIL": "red", "INCONCLUSIVE": "yellow"}[result.verdict.value]
    out_console.print(f"verdict: [bold {colour}]{result.verdict.value}[/]"
                      + ("" if result.complete else " [bold red](INCOMPLETE: some checks failed)[/]"))
    for e in result.errors:
        console.print(f"  [red]{_escape(e.splitlines()[0])}[/]")
    out_console.print(f"report:      {result.files.get('html')}")
    if "pdf" in result.files:
        out_console.print(f"report (PDF): {result.files['pdf']}")
    if "pack" in result.files:
        out_console.print(f"evidence pack: {result.files['pack']}  (check it with `trustcase verify`)")
    if result.manifest_sha256:
        out_console.print(f"pack manifest SHA-256: {result.manifest_sha256}  (keep it: `trustcase verify --digest` "
                          f"proves a pack is this one; also the run's pack.manifest_sha256 tag)", highlight=False)
    out_console.print(f"MLflow run:  {result.run_id}  (tracking URI {result.tracking_uri})")
    if not result.complete:
        return EXIT_INVALID if result.user_error else EXIT_INTERNAL
    return EXIT_PASS if result.verdict.value == "PASS" else EXIT_NOT_ALL_PASS


@app.command()
def assess(
    path: Path = typer.Argument(..., help="use-case YAML file"),
    out: Path = typer.Option(None, "--out", help="output folder (default trustcase-out/<use case id>)"),
    tracking_uri: str = typer.Option(None, "--tracking-uri", help="MLflow store (default: SQLite under .trustcase/)"),
    seed: int = typer.Option(None, "--seed", help="overrides plan.seed"),
    runner: str = typer.Option("thread", "--runner", help="where checks run: thread (here) or dask"),
    dask_address: str = typer.Option(None, "--dask-address", help="Dask scheduler (default: a local cluster)"),
) -> None:
    """Assess a model against its use case, end to end."""
    raise typer.Exit(run_assessment(path, out, tracking_uri, seed, runner, dask_address))


@app.command()
def demo(
    case: str = typer.Argument("solar_cells", help="bundled use case: solar_cells (a classifier, the default) or "
                               "steel_defects (a detector of indications on NEU-DET)"),
    out: Path = typer.Option(None, "--out", help="output folder"),
    tracking_uri: str = typer.Option(None, "--tracking-uri"),
) -> None:
    """A bundled use case end to end: train its model if needed, register it, assess it, its checks on a
    local Dask cluster of two worker processes (`--runner dask`: both cores busy, the same evidence)."""
    from trustcase.errors import UserError
    from trustcase.flows.training import ensure_bundled_model

    if case not in DEMOS:
        _fail(UserError(f"no bundled use case {case!r}: one of {', '.join(DEMOS)}"))
    path = ROOT / "use_cases" / case / "use_case.yaml"
    try:
        ensure_bundled_model(path, tracking_uri, console)
    except Exception as e:  # noqa: BLE001
        _fail(e)
    raise typer.Exit(run_assessment(path, out, tracking_uri, None, runner="dask"))


@app.command()
def report(
    run_id: str = typer.Argument(..., help="MLflow run id of an assessment"),
    out: Path = typer.Option(None, "--out", help="output folder (default trustcase-out/report-<run id>)"),
    tracking_uri: str = typer.Option(None, "--tracking-uri"),
    previous: str = typer.Option(None, "--previous", help="run id of the version to compare with "
                                 "(default: the qualified registered version)"),
) -> None:
    """Re-render the report (HTML, PDF, argument, pack) of an assessment from what MLflow holds."""
    from trustcase.flows.rerender import rerender

    try:
        files = rerender(run_id, out or Path("trustcase-out") / f"report-{run_id}", tracking_uri, previous)
    except Exception as e:  # noqa: BLE001
        _fail(e)
    out_console.print(f"report: {files['html']}")
    for key, label in (("pdf", "report (PDF)"), ("argument_yaml", "argument (gsn2x)"), ("pack", "evidence pack")):
        if key in files:
            out_console.print(f"{label}: {files[key]}")


@app.command()
def watch(
    path: Path = typer.Argument(..., help="use-case YAML file"),
    cron: str = typer.Option("0 2 * * *", "--cron", help="schedule of the served deployment"),
    once: bool = typer.Option(False, "--once", help="one pass, then exit (cron, CI)"),
    out: Path = typer.Option(Path("trustcase-out"), "--out", help="output root (one folder per version)"),
    tracking_uri: str = typer.Option(None, "--tracking-uri", help="MLflow store and model registry"),
    alias: str = typer.Option("qualified", "--alias", help="alias given to versions that pass"),
    runner: str = typer.Option("thread", "--runner", help="where checks run: thread (here) or dask"),
    dask_address: str = typer.Option(None, "--dask-address", help="Dask scheduler (default: a local cluster)"),
    batches: Path = typer.Option(None, "--batches", help="folder whose sub-folders are batches of production "
                                 "inputs: each new one gets the feature-drift test against the validation split"),
) -> None:
    """Assess every registered model version never assessed; tag it and qualify it when it passes. With --batches,
    judge every new batch for drift: exit 3 when one drifted, 2 when one could not be judged (as `drift`)."""
    from trustcase.flows import watch as w

    try:
        if not once:
            out_console.print(f"serving the watch of {_escape(str(path))} on schedule {cron!r} (Ctrl-C stops)")
            w.serve(path, cron, out_root=out, tracking_uri=tracking_uri, alias=alias, runner=runner,
                    dask_address=dask_address, batches=batches)
            return
        with console.status("Looking for model versions never assessed…"):
            outcomes = w.once(path, out, tracking_uri, alias, runner, dask_address, batches)
    except Exception as e:  # noqa: BLE001
        _fail(e)
    if not outcomes:
        out_console.print("nothing new to assess")
    for o in outcomes:
        if "batch" in o:
            verdict = f"not judged: {_escape(o['error'])}" if o["error"] else (
                f"{'drift' if o['drift'] else 'no drift'}: p-value {o['pvalue']:.3g} (level {w.DRIFT_LEVEL}), MMD "
                f"{o['mmd']:.3f}, model {o['model']}  record {o['record']}")
            out_console.print(f"batch {_escape(o['batch'])}: {verdict}", highlight=False)
            continue
        if o["error"]:
            console.print(f"version {o['version']}: [red]not assessed[/]: {_escape(o['error'])}", highlight=False)
            continue
        extra = " [green](qualified)[/]" if o["qualified"] else ""
        if o["regressions"]:
            extra += f"; regressions vs version {o['compared_with']}: {', '.join(o['regressions'])}"
        out_console.print(f"version {o['version']}: {o['verdict']}{extra}  run {o['run_id']}  report {o['report']}",
                          highlight=False)
    drifted = any(o.get("drift") for o in outcomes)
    raise typer.Exit(EXIT_INVALID if any(o["error"] for o in outcomes) else EXIT_NOT_ALL_PASS if drifted else EXIT_PASS)


@app.command()
def improve(
    path: Path = typer.Argument(..., help="use-case YAML file (with a 'training' section)"),
    method: str = typer.Option(..., "--method", help="hudd, noise, adversarial or lipschitz"),
    budget: int = typer.Option(100, "--budget", help="hudd: copies in the unsafe set, an equal share per cluster"),
    out: Path = typer.Option(Path("trustcase-out"), "--out", help="output root"),
    tracking_uri: str = typer.Option(None, "--tracking-uri", help="MLflow store and model registry"),
    seed: int = typer.Option(None, "--seed", help="default: the plan's seed"),
    epochs: int = typer.Option(None, "--epochs", help="training epochs (default: the training script's)"),
) -> None:
    """Train an improved version and its baseline from the evidence, register and assess both, and report
    whether the improvement is real (parent vs improved vs baseline, with intervals)."""
    from trustcase.flows import improve as imp

    try:
        with console.status(f"Improving the model ({method}): selection, training, assessments…"):
            s = imp.run(str(path), method, budget, str(out), tracking_uri, seed, epochs)
    except Exception as e:  # noqa: BLE001
        _fail(e)
    reg = [r["claim"] for r in s["claims"] if r["regression"]]
    out_console.print(f"parent {s['parent']} -> improved {s['versions']['improved']}, baseline "
                      f"{s['versions']['baseline']}; qualified: {s['qualified'] or 'none'}"
                      + (f"; regressions: {', '.join(reg)}" if reg else ""), highlight=False)
    out_console.print(f"improvement report: {s['report']}", highlight=False)
    raise typer.Exit(EXIT_PASS)


@app.command()
def monitor(
    monitor_file: Path = typer.Argument(..., metavar="MONITOR", help="fitted monitor file (monitor.safetensors)"),
    inputs: list[Path] = typer.Argument(..., metavar="INPUTS...", help="image or .npy files, or folders of them"),
    jsonl: bool = typer.Option(False, "--jsonl", help="one JSON object per input"),
    model: Path = typer.Option(None, "--model", help="the model file the monitor was fitted for (hash-checked)"),
    meta: list[str] = typer.Option([], "--meta", help="metadata descriptor value, KEY=VALUE (repeatable)"),
    resize: bool = typer.Option(False, "--resize", help="resample images to the model's input size"),
) -> None:
    """Classify inputs against the operational design domain: IN, NEAR (alert) or OUT (stop), with reasons."""
    import json

    from trustcase.odd import Monitor, MonitorError, evaluate_files

    not_judged = 0
    try:
        pairs = [m.split("=", 1) for m in meta]
        if any(len(p) != 2 or not p[0] for p in pairs):
            raise MonitorError(f"--meta takes KEY=VALUE, got {[m for m in meta if '=' not in m]}")
        mon = Monitor.load(monitor_file, model)
        colour = {"IN": "green", "NEAR": "yellow", "OUT": "bold red"}
        for name, rec in evaluate_files(mon, inputs, dict(pairs), resize):
            not_judged += "error" in rec
            if jsonl:
                print(json.dumps({"input": name, **rec}), flush=True)
            else:
                pred = f"  prediction {rec['prediction']}" if "prediction" in rec else ""
                why = f"  {'; '.join(rec['reasons'])}" if rec["reasons"] else ""
                out_console.print(f"[{colour[rec['state']]}]{rec['state']:<4}[/] {_escape(name)}{pred}{_escape(why)}",
                                  highlight=False)
    except Exception as e:  # noqa: BLE001
        _fail(e)
    if not_judged:  # every other input was judged; these could not be, and a user must look at them
        console.print(f"[bold red]error:[/] {not_judged} input file(s) could not be judged (OUT, reason above)",
                      highlight=False)
        raise typer.Exit(EXIT_INVALID)


@app.command()
def drift(
    use_case: Path = typer.Argument(..., metavar="USE_CASE", help="use-case file (its model and reference split)"),
    batch: list[Path] = typer.Argument(..., metavar="BATCH...", help="image or .npy files, or folders of them"),
    reference: str = typer.Option("validation", "--reference", help="the split the batch is compared with"),
    alpha: float = typer.Option(0.05, "--alpha", min=0.0, max=1.0, help="level of the test"),
    permutations: int = typer.Option(200, "--permutations", min=19, max=10000),
    max_items: int = typer.Option(500, "--max-items", min=10, max=5000, help="seeded sample per side"),
    seed: int = typer.Option(0, "--seed"),
    resize: bool = typer.Option(False, "--resize", help="resample images to the model's input size"),
    as_json: bool = typer.Option(False, "--json", help="the whole result as one JSON object"),
) -> None:
    """Has a batch of production inputs drifted from the reference split in the model's feature space? MMD test:
    exit 0 no drift, 3 drift (p-value < alpha), 2 a batch the test cannot judge."""
    import json

    from trustcase.data.drift import batch_drift
    from trustcase.models.loading import load_classifier
    from trustcase.schemas import load_use_case

    try:
        uc = load_use_case(use_case)
        r = batch_drift(uc, load_classifier(uc.model), batch, reference, resize, max_items, permutations, seed)
    except Exception as e:  # noqa: BLE001
        _fail(e)
    drifted = r["pvalue"] < alpha
    if as_json:
        print(json.dumps({"drift": drifted, "alpha": alpha, **r}))
    else:
        top = ", ".join(f"{m['descriptor']} (median {m['median_reference']:.3g} -> {m['median_other']:.3g}, KS "
                        f"{m['ks']:.2f})" for m in r["moved"])
        out_console.print(f"{'drift' if drifted else 'no drift'}: p-value {r['pvalue']:.3g} (level {alpha}), MMD "
                          f"{r['mmd']:.3f} on {r['features']} features; {r['n_other']} of {r['seen_other']} batch "
                          f"inputs against {r['n_reference']} {reference} items" + (f"; moved most: {top}" if top
                                                                                      else ""), highlight=False)
    if drifted:
        raise typer.Exit(EXIT_NOT_ALL_PASS)


@app.command()
def pack(
    run_id: str = typer.Argument(..., help="MLflow run id of an assessment"),
    out: Path = typer.Option(None, "-o", "--out", help="pack file (default trustcase-out/pack-<run id>.zip)"),
    tracking_uri: str = typer.Option(None, "--tracking-uri"),
) -> None:
    """Build the evidence pack of an assessment from the run's artefacts in MLflow (zip + SHA-256 manifest)."""
    from trustcase.flows.rerender import pack_run

    try:
        path, manifest = pack_run(run_id, out or Path("trustcase-out") / f"pack-{run_id}.zip", tracking_uri)
    except Exception as e:  # noqa: BLE001
        _fail(e)
    out_console.print(f"evidence pack: {path} ({len(manifest['files'])} files"
                      + (f", {len(manifest['withheld'])} withheld: confidential" if manifest["withheld"] else "") + ")")
    out_console.print(f"manifest SHA-256: {manifest['manifest_sha256']}  (record it to detect any later change)")


@app.command()
def verify(
    pack_file: Path = typer.Argument(..., metavar="PACK.zip", help="evidence pack"),
    run: str = typer.Option(None, "--run", help="anchor: the MLflow run of the assessment (its pack digest tag)"),
    digest: str = typer.Option(None, "--digest", help="anchor: the manifest SHA-256 printed by assess"),
    public_key: Path = typer.Option(None, "--public-key", help="anchor: the assessing site's Ed25519 public key (PEM)"),
    tracking_uri: str = typer.Option(None, "--tracking-uri", help="MLflow store of --run"),
) -> None:
    """Re-hash every file of an evidence pack against its manifest, cross-check its records, and check the
    manifest against an anchor held outside the pack. Exit 0 consistent (and anchored when one is given), 3
    changed, added or removed files or contradicting records (each named), 2 not a readable pack or no such run."""
    from trustcase.flows.rerender import verify as verify_pack

    try:
        v = verify_pack(pack_file, run_id=run, digest=digest, public_key=public_key, tracking_uri=tracking_uri)
    except Exception as e:  # noqa: BLE001
        _fail(e)
    m = v.manifest
    if v.ok:
        what = (f"{v.checked} files match the manifest of {_escape(str(pack_file))} (use case {m.get('use_case_id')}, "
                f"run {m.get('mlflow_run_id')}, verdict {m.get('verdict')}; manifest SHA-256 {v.manifest_sha256})")
        if v.anchored:
            out_console.print(f"[green]intact[/], anchored by {_escape(v.anchored)}: {what}", highlight=False)
        else:
            out_console.print(f"[yellow]internally consistent, not anchored[/]: {what}. Anyone able to rewrite the "
                              "pack could have rewritten its manifest: check it with --run, --digest or --public-key",
                              highlight=False)
        raise typer.Exit(EXIT_PASS)
    console.print(f"[bold red]{_escape(str(pack_file))} fails verification[/]:", highlight=False)
    for line in v.lines():
        console.print(f"  {_escape(line)}", highlight=False)
    raise typer.Exit(EXIT_NOT_ALL_PASS)


@app.command()
def export(
    source: str = typer.Argument(..., metavar="RUN_ID|ASSESSMENT.json", help="MLflow run id of an assessment, or "
                                 "an assessment.json"),
    fmt: str = typer.Option("tea", "--format", help="tea: the Trustworthy and Ethical Assurance platform's case "
                            "JSON; gsn: the GSN community standard's element and relation types"),
    out: Path = typer.Option(None, "-o", "--out", help="file to write (default: standard output)"),
    tracking_uri: str = typer.Option(None, "--tracking-uri", help="MLflow store of RUN_ID"),
) -> None:
    """Export the assurance case (the GSN argument and the claims' verdicts) for an assurance-case tool, checked
    against the format's JSON Schema before it is written."""
    import json

    from pydantic import ValidationError

    from trustcase.errors import UserError
    from trustcase.reports import tea
    from trustcase.schemas import Assessment

    try:
        if fmt not in tea.FILES:
            raise UserError(f"--format {fmt!r}: expected one of {', '.join(sorted(tea.FILES))}")
        if source.endswith(".json") or Path(source).is_file():
            try:
                a = Assessment.model_validate_json(Path(source).read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, ValidationError) as e:
                raise UserError(f"{source}: not a readable assessment record ({str(e).splitlines()[0]})") from None
        else:
            from trustcase.flows.rerender import fetch_assessment

            a = fetch_assessment(source, tracking_uri)
        doc = tea.case(a, fmt)
        text = json.dumps(doc, indent=1, ensure_ascii=False)
        if out is None:
            print(text)
        else:
            out.write_text(text + "\n", encoding="utf-8")
            out_console.print(f"{fmt} case: {_escape(str(out))}", highlight=False)
    except Exception as e:  # noqa: BLE001
        _fail(e)


@app.command("check-property")
def check_property_command(
    model: Path = typer.Argument(..., help="network: .nnet, .onnx or TorchScript .pt (normalised inputs)"),
    prop: Path = typer.Argument(..., metavar="PROPERTY.vnnlib", help="VNN-LIB property (describes the unsafe set)"),
    timeout: float = typer.Option(60.0, "--timeout", help="budget in seconds"),
    seed: int = typer.Option(0, "--seed"),
    input_shape: str = typer.Option(None, "--input-shape", metavar="C,H,W",
                                    help="a TorchScript model's input shape (default: from its first layer)"),
    result_file: Path = typer.Option(None, "--result-file", help="also write the VNN-COMP result file there "
                                     "(sat + counterexample, unsat, unknown, timeout)"),
) -> None:
    """Falsify or prove one VNN-LIB property: one JSON line, verdict violated / holds / unknown."""
    import json

    from trustcase.certification.competition import load, read_property, result_text, solve
    from trustcase.errors import UserError

    try:
        if timeout <= 0:
            raise UserError(f"--timeout must be > 0 seconds, got {timeout}")
        try:
            shape = tuple(int(v) for v in input_shape.split(",")) if input_shape else None
        except ValueError:
            raise UserError(f"--input-shape {input_shape!r}: expected sizes separated by commas, e.g. 1,28,28") \
                from None
        network = load(model, shape)
        result = solve(network, read_property(prop, network), timeout=timeout, seed=seed)
        if result_file is not None:
            result_file.write_text(result_text(result, timeout))
    except Exception as e:  # noqa: BLE001
        _fail(e)
    print(json.dumps({"model": str(model), **result}))


@app.command()
def explore(
    path: Path = typer.Argument(None, help="use-case YAML file (omit: runs only, no lab)"),
    port: int = typer.Option(8765, "--port", help="TCP port"),
    host: str = typer.Option("127.0.0.1", "--host", help="bind address; anything but loopback needs --token"),
    token: str = typer.Option(None, "--token", help="secret every request must carry (required off loopback)"),
    tracking_uri: str = typer.Option(None, "--tracking-uri", help="MLflow store (default: SQLite under .trustcase/)"),
) -> None:
    """A local web lab: the assessments of the MLflow store, and the use case's model to play with."""
    import socket

    from trustcase.errors import UserError
    from trustcase.explore import build, is_loopback

    try:
        if not is_loopback(host) and not token:
            raise UserError(f"--host {host} exposes the lab beyond this machine: give --token SECRET too")
        if not 0 < port < 65536:
            raise UserError(f"--port {port}: expected 1..65535")
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
            try:
                s.bind((host, port))
            except OSError as e:
                raise UserError(f"cannot listen on {host}:{port}: {e.strerror}") from None
        with console.status("Loading the model and the store…"):
            web, note = build(path, tracking_uri, token, host=host)
    except Exception as e:  # noqa: BLE001
        _fail(e)
    import uvicorn

    url = f"http://{'[' + host + ']' if ':' in host else host}:{port}/" + (f"?token={token}" if token else "")
    out_console.print(f"trustcase explore: {url}  (Ctrl-C stops)" + (f"\n{note}" if note else ""), highlight=False)
    uvicorn.run(web, host=host, port=port, log_level="warning")


def main() -> None:
    import warnings

    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    # third-party chatter a user cannot act on (captum reading .grad of non-leaf tensors, MLflow's DB set-up)
    warnings.filterwarnings("ignore", message="The .grad attribute of a Tensor that is not a leaf")
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    sys.exit(app())


if __name__ == "__main__":
    main()

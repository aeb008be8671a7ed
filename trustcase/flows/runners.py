"""Where the checks of an assessment run: threads in this process (default), or a Dask cluster.

The flow's check shards (`run_check.map`) are plain Prefect tasks; Prefect's Dask task runner
(prefect-dask) sends them to a Dask cluster instead of a thread: an existing scheduler given by
address (`--runner dask --dask-address tcp://host:8786`), or a local cluster of worker processes
started for the run and closed after it. Results, caching and MLflow logging are unchanged: the
flow itself still runs here.

A local cluster's workers run torch on one thread each (two workers on two cores, never four threads fighting for
them), and this process records that count in the provenance while they work; the same checks on the thread
runner with one torch thread give the same evidence bit for bit. Each worker imports the checks' modules while
the cluster starts, and writes its own output (third-party warnings, a dying worker's traceback) to
`.trustcase/dask-workers.log`, not to the terminal: a check that fails is reported by the flow, as on threads.
"""

from __future__ import annotations

import logging
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

from prefect.task_runners import ThreadPoolTaskRunner

from trustcase.errors import UserError
from trustcase.flows.assess import Result, assess
from trustcase.flows.prefect_db import ensure_local_database
from trustcase.seeding import torch_threads

Runner = Literal["thread", "dask"]
RUNNERS = ("thread", "dask")
WORKER_THREADS = 1  # torch threads of a local worker: workers, not threads, share the cores
WORKER_LOG = Path(".trustcase") / "dask-workers.log"
# Dask's defaults for a local worker's environment that we unset (None: not set, so the worker inherits this
# process's own): distributed puts MALLOC_TRIM_THRESHOLD_=65536 in it, which turns off glibc's dynamic mmap
# threshold, so every large torch tensor is mmap'd and unmapped again (page faults, system CPU).
WORKER_ENVIRON: dict[str, None] = {"MALLOC_TRIM_THRESHOLD_": None}


class RunnerError(UserError):
    """A user error about where to run: an unknown runner, a Prefect server or a Dask scheduler that does not
    answer."""


def probe(address: str, timeout: float = 5.0) -> int:
    """Number of workers of the scheduler at `address`; a clear error when it does not answer or has none."""
    from distributed import Client

    try:
        with Client(address, timeout=timeout, set_as_default=False) as client:
            workers = len(client.scheduler_info()["workers"])
    except (OSError, TimeoutError, ValueError) as e:
        raise RunnerError(
            f"the Dask scheduler at {address!r} did not answer within {timeout:g} s ({type(e).__name__}: "
            f"{str(e)[:200]}); start one (`dask scheduler` and `dask worker {address}`) or omit --dask-address "
            "for a local cluster"
        ) from None
    if workers == 0:
        raise RunnerError(f"the Dask scheduler at {address!r} has no workers: the checks would wait forever")
    return workers


def probe_prefect(timeout: float = 5.0) -> None:
    """With PREFECT_API_URL set, the Prefect server must answer its health check: else a clear error now,
    instead of the Prefect client's retries and a traceback once the flow starts."""
    import httpx
    import prefect.settings

    url = prefect.settings.get_current_settings().api.url
    if not url:
        return  # no server: each process starts a temporary one on the local database
    try:
        httpx.get(f"{url.rstrip('/')}/health", timeout=timeout).raise_for_status()
    except httpx.HTTPError as e:
        raise RunnerError(
            f"the Prefect server at PREFECT_API_URL={url} did not answer within {timeout:g} s "
            f"({type(e).__name__}: {str(e)[:200]}); start it (`prefect server start`) or unset PREFECT_API_URL "
            "to run with a temporary local server"
        ) from None


def task_runner(kind: str = "thread", dask_address: str | None = None, workers: int = 2,
                prefect_api: str | None = None):
    """The Prefect task runner for `kind`. The Prefect server (PREFECT_API_URL) and a Dask address are probed
    first: where the assessment runs is checked before any work starts. `prefect_api`: the API a local
    cluster's workers report their task runs to (this process's, `local_prefect_api()`)."""
    if kind not in RUNNERS:
        raise RunnerError(f"unknown runner {kind!r}; choose one of {list(RUNNERS)}")
    probe_prefect()
    if kind == "thread":
        if dask_address:
            raise RunnerError("--dask-address needs --runner dask")
        return ThreadPoolTaskRunner(max_workers=1)
    from prefect_dask import DaskTaskRunner

    if dask_address:
        probe(dask_address)
        return DaskTaskRunner(address=dask_address)
    if workers < 1:
        raise RunnerError("a local Dask cluster needs at least one worker")
    # the scheduler and nannies live in this process: their start-up and shutdown chatter is not the user's news
    logging.getLogger("distributed").setLevel(logging.ERROR)
    # worker processes (not threads): torch and numpy then run truly in parallel; loopback only, no dashboard (the
    # scheduler's few HTTP routes on a free port: the default 8787 warns when another cluster holds it); each
    # worker runs dask_setup below as it starts
    return DaskTaskRunner(cluster_class="distributed.LocalCluster", cluster_kwargs={
        "n_workers": workers, "threads_per_worker": 1, "processes": True,
        "host": "127.0.0.1", "dashboard_address": None, "scheduler_kwargs": {"dashboard_address": "127.0.0.1:0"},
        "preload": [__name__], "env": {"PREFECT_API_URL": prefect_api} if prefect_api else {}})


def local_prefect_api() -> str:
    """The Prefect API this process's flow reports to: PREFECT_API_URL, else the temporary local server, started
    now. A local cluster's workers are given it: without it each worker would start a temporary server of its
    own on the same database (measured: two more servers, 5-6 s of CPU each to start, and every task run's
    records written through them)."""
    import prefect.settings

    if url := prefect.settings.get_current_settings().api.url:
        return url
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()  # the one Prefect's client of this process starts and finds (per process)
    server.start()
    return server.api_url


def dask_setup(worker) -> None:
    """Run by each worker process of a local cluster as it starts (Dask's preload hook; importing this module
    already imported the flow, the checks and torch, so the first check does not wait for them): one torch
    thread, and its output to the workers' log."""
    import torch

    torch.set_num_threads(WORKER_THREADS)  # for the worker's life: nothing to restore
    WORKER_LOG.parent.mkdir(parents=True, exist_ok=True)
    log = open(WORKER_LOG, "a", buffering=1)  # noqa: SIM115  (the worker's stderr for the rest of its life)
    log.write(f"--- worker {worker.name} (pid {os.getpid()})\n")
    os.dup2(log.fileno(), 2)  # C-level output too (torch's warnings are printed from C++)
    sys.stderr = log


@contextmanager
def _worker_environ(local: bool):
    """For a local cluster started by this run: Dask's worker environment without WORKER_ENVIRON's variables (the
    nannies read it as they spawn their workers, inside the flow)."""
    if not local:
        yield
        return
    import dask
    import distributed  # noqa: F401  (its config defaults first: a key set before they load would be dropped whole on exit)

    with dask.config.set({f"distributed.nanny.pre-spawn-environ.{k}": v for k, v in WORKER_ENVIRON.items()}):
        yield


def run(use_case_path: str, out_dir: str, seed: int | None = None, tracking_uri: str | None = None,
        runner: str = "thread", dask_address: str | None = None, previous_run_id: str | None = None,
        workers: int = 2) -> Result:
    """The assessment flow on the chosen task runner."""
    ensure_local_database()
    local = runner == "dask" and not dask_address
    # this process's torch threads as the workers' for the run, so that the provenance records the count they ran with
    with torch_threads(WORKER_THREADS if local else None), _worker_environ(local):
        return assess(use_case_path, out_dir, seed, tracking_uri, previous_run_id,
                      task_runner=task_runner(runner, dask_address, workers, local_prefect_api() if local else None))

"""Where the checks of an assessment run: threads in this process (default), or a Dask cluster.

The flow's check shards (`run_check.map`) are plain Prefect tasks; Prefect's Dask task runner
(prefect-dask) sends them to a Dask cluster instead of a thread: an existing scheduler given by
address (`--runner dask --dask-address tcp://host:8786`), or a local cluster of worker processes
started for the run and closed after it. Results, caching and MLflow logging are unchanged: the
flow itself still runs here.
"""

from __future__ import annotations

from typing import Literal

from prefect.task_runners import ThreadPoolTaskRunner

from trustcase.errors import UserError
from trustcase.flows.assess import Result, assess
from trustcase.flows.prefect_db import ensure_local_database

Runner = Literal["thread", "dask"]
RUNNERS = ("thread", "dask")


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


def task_runner(kind: str = "thread", dask_address: str | None = None, workers: int = 2):
    """The Prefect task runner for `kind`. The Prefect server (PREFECT_API_URL) and a Dask address are probed
    first: where the assessment runs is checked before any work starts."""
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
    # worker processes (not threads): torch and numpy then run truly in parallel; loopback only, no dashboard
    return DaskTaskRunner(cluster_class="distributed.LocalCluster", cluster_kwargs={
        "n_workers": workers, "threads_per_worker": 1, "processes": True,
        "host": "127.0.0.1", "dashboard_address": None})


def run(use_case_path: str, out_dir: str, seed: int | None = None, tracking_uri: str | None = None,
        runner: str = "thread", dask_address: str | None = None, previous_run_id: str | None = None,
        workers: int = 2) -> Result:
    """The assessment flow on the chosen task runner."""
    ensure_local_database()
    return assess(use_case_path, out_dir, seed, tracking_uri, previous_run_id,
                  task_runner=task_runner(runner, dask_address, workers))

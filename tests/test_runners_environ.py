"""A local Dask cluster's workers start without distributed's MALLOC_TRIM_THRESHOLD_ (review4 R19: it turns off
glibc's dynamic mmap threshold, and torch's tensors are then mmap'd and unmapped on every allocation); Dask's
other worker settings stay. A real LocalCluster of one worker process."""

from __future__ import annotations

import os

import pytest

from trustcase.flows import runners


def _environ() -> dict:
    keys = ("MALLOC_TRIM_THRESHOLD_", "OMP_NUM_THREADS")
    return {k: os.environ.get(k) for k in keys}


@pytest.mark.parametrize("local", [True, pytest.param(False, marks=pytest.mark.slow)])  # False: the test can fail
def test_a_local_clusters_workers_start_without_the_trim_threshold(local, monkeypatch):
    from distributed import Client, LocalCluster

    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_", raising=False)
    with runners._worker_environ(local), LocalCluster(n_workers=1, threads_per_worker=1, processes=True,
                                                      host="127.0.0.1", dashboard_address=None) as cluster, \
            Client(cluster) as client:
        (worker,) = client.run(_environ).values()
    assert worker["MALLOC_TRIM_THRESHOLD_"] == (None if local else "65536")  # Dask's default when not ours
    assert worker["OMP_NUM_THREADS"] == "1"  # Dask's other settings kept
    if local:
        assert "MALLOC_TRIM_THRESHOLD_" not in os.environ  # a nanny copies its workers' settings into this process


def test_dasks_own_settings_survive_the_run_in_a_fresh_process():
    """The run sets one key of distributed's config before distributed is imported (it is imported as the cluster
    starts): its defaults must be loaded first, or leaving the run drops them whole and the next run fails."""
    import subprocess
    import sys

    code = ("import dask\nfrom trustcase.flows import runners\nwith runners._worker_environ(True):\n    pass\n"
            "print(dask.config.get('distributed.comm.timeouts.connect'), "
            "dask.config.get('distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_'))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["30s", "65536"]  # distributed's defaults, restored after the run

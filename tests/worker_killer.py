"""A perturbation ('worker_killer:BlurThatKillsItsWorker' in a sweep) that kills the Dask worker process
running it, once: a worker lost in the middle of a sweep. Outside a Dask worker, and after the kill, it is
a plain Gaussian blur, so the evidence must be that of the run where nothing was killed."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

from trustcase.robustness.perturbations import GaussianBlur, Options


class KillOptions(Options):
    marker: str  # written just before the kill: the next worker to run this shard does not kill itself


class BlurThatKillsItsWorker(GaussianBlur):
    name = "blur_that_kills_its_worker"
    Options = KillOptions

    def perturb(self, u, amplitude, seeds):
        marker = Path(self.options.marker)
        if _in_dask_worker() and not marker.exists():
            marker.write_text(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)
        return super().perturb(u, amplitude, seeds)


def _in_dask_worker() -> bool:
    """This process is a Dask worker (the sweep perturbs in its own threads, so `get_worker()` cannot tell)."""
    worker = sys.modules.get("distributed.worker")
    return bool(worker and worker.Worker._instances)

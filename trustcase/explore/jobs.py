"""Long computations of the lab as jobs: a bounded pool of worker threads, a job id to poll, progress, and
cooperative cancellation (the work calls `Job.step` between batches / steps, which raises `Cancelled`)."""

from __future__ import annotations

import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from trustcase.errors import Unsupported, UserError


class Cancelled(Exception):
    """Raised inside the work at its next step once the job has been cancelled."""


class Job:
    def __init__(self, kind: str, total: float | None = None):
        self.id = uuid.uuid4().hex[:16]
        self.kind, self.total = kind, total
        self.done = 0.0
        self.state = "queued"  # queued, running, done, failed, cancelled
        self.result: Any = None
        self.error: str | None = None
        self.started = self.finished = None
        self._cancel = threading.Event()

    def step(self, amount: float = 1.0) -> None:
        """Progress by `amount`; the cancellation point of the work."""
        if self._cancel.is_set():
            raise Cancelled()
        self.done += amount

    def cancel(self) -> None:
        self._cancel.set()
        if self.state == "queued":
            self.state = "cancelled"

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def view(self) -> dict:
        elapsed = None if self.started is None else round((self.finished or time.perf_counter()) - self.started, 3)
        fraction = None
        if self.state == "done":
            fraction = 1.0
        elif self.total:
            fraction = min(self.done / self.total, 0.99)
        out = {"id": self.id, "kind": self.kind, "state": self.state, "done": self.done, "total": self.total,
               "fraction": fraction, "seconds": elapsed}
        if self.state == "done":
            out["result"] = self.result
        if self.error:
            out["error"] = self.error
        return out


class Jobs:
    """At most `workers` jobs run at once; the last `keep` jobs are remembered for polling."""

    def __init__(self, workers: int = 2, keep: int = 64):
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="explore-job")
        self.keep = keep
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._lock = threading.Lock()

    def submit(self, kind: str, work: Callable[[Job], Any], total: float | None = None) -> Job:
        job = Job(kind, total)

        def run() -> None:
            if job.cancelled:
                return
            job.state, job.started = "running", time.perf_counter()
            try:
                job.result = work(job)
                job.state = "done"
            except Cancelled:
                job.state = "cancelled"
            except (UserError, Unsupported) as e:  # the request or the model cannot do it: said, not crashed
                job.state, job.error = "failed", str(e)
            except Exception as e:  # noqa: BLE001  (the server keeps serving; the job says what broke)
                job.state, job.error = "failed", f"{type(e).__name__}: {e}"
            finally:
                job.finished = time.perf_counter()

        with self._lock:
            self._jobs[job.id] = job
            while len(self._jobs) > self.keep:
                old_id, old = next(iter(self._jobs.items()))
                if old.state in ("queued", "running"):
                    break
                del self._jobs[old_id]
        self.pool.submit(run)
        return job

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            return self._jobs.get(job_id)

    def shutdown(self) -> None:
        with self._lock:
            for job in self._jobs.values():
                job.cancel()
        self.pool.shutdown(wait=False, cancel_futures=True)

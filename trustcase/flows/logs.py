"""Prefect's log of a check that declines or fails, in trustcase's words.

Prefect logs every failed task with its full traceback, then once more as "Finished in state Failed(...)". For
an expected skip (`Unsupported`: gradients of a black box) or a user error inside a check, that is noise that
hides the one line a user can act on. `install()` makes each such record one plain trustcase line; a real
internal error keeps its traceback, written to a log file the line names.
"""

from __future__ import annotations

import logging
import re
import traceback
from pathlib import Path

from trustcase.checks import CheckError, Unsupported
from trustcase.data.streaming import DataError
from trustcase.errors import plain
from trustcase.models.classifier import ModelError
from trustcase.schemas import UseCaseError

USER_ERRORS = (ModelError, DataError, CheckError, Unsupported, UseCaseError)
LOG = Path(".trustcase") / "check-errors.log"
_USER_NAMES = "|".join(c.__name__ for c in USER_ERRORS)
_FAILED = re.compile(rf"^Finished in state Failed\(.*exception ({_USER_NAMES})\b", re.S)


class OneLine(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is None:  # the second report of a user error: its one line was already written
            return not _FAILED.match(record.getMessage())
        text = plain(str(exc))  # Prefect's format already names the task run
        if isinstance(exc, Unsupported):
            record.levelno, record.levelname = logging.WARNING, "WARNING"
            record.msg = f"not run: {text}"
        elif isinstance(exc, USER_ERRORS):
            record.msg = f"{type(exc).__name__}: {text}"
        else:
            LOG.parent.mkdir(exist_ok=True)
            with LOG.open("a") as f:
                f.write(f"--- {getattr(record, 'task_run_name', record.name)}\n"
                        + "".join(traceback.format_exception(exc)))
            record.msg = f"internal error: {type(exc).__name__}: {text} (traceback in {LOG})"
        record.args, record.exc_info, record.exc_text = (), None, None
        return True


def install() -> None:
    """Once per process, on the loggers Prefect reports task and flow runs with."""
    for name in ("prefect.task_runs", "prefect.flow_runs"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, OneLine) for f in logger.filters):
            logger.addFilter(OneLine())

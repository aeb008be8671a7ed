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

from trustcase.errors import Unsupported, UserError, plain

LOG = Path(".trustcase") / "check-errors.log"
_FAILED = re.compile(r"^Finished in state Failed\(.*?exception (\w+)\b", re.S)


def _said(name: str) -> bool:
    """Whether an exception class of this name already had its one line: a user error or a decline (a
    partner's subclass included)."""
    todo, seen = [UserError, Unsupported], set()
    while todo:
        cls = todo.pop()
        seen.add(cls.__name__)
        todo.extend(cls.__subclasses__())
    return name in seen


class OneLine(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is None:  # the second report of a user error: its one line was already written
            failed = _FAILED.match(record.getMessage())
            return not (failed and _said(failed.group(1)))
        text = plain(str(exc))  # Prefect's format already names the task run
        if isinstance(exc, Unsupported):
            record.levelno, record.levelname = logging.WARNING, "WARNING"
            record.msg = f"not run: {text}"
        elif isinstance(exc, UserError):
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

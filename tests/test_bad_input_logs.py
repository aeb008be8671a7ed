"""Prefect's log of checks that decline or fail: one trustcase line each, plain values, a traceback only for a real
internal error and only in the log file (it printed full tracebacks for every skipped gradient check)."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from conftest import tiny_use_case, write_yaml
from prefect import flow, task

from trustcase.flows.assess import assess

PARTNER = '''
import numpy as np
from trustcase.checks import Check, CheckError, Unsupported

class Skip(Check):
    name = "skip"
    def run(self, ctx):
        raise Unsupported("skip needs gradients; the model is a black box")

class Wrong(Check):
    name = "wrong"
    def run(self, ctx):
        raise CheckError(f"layer {np.int64(0)!r} has no weights")

class Boom(Check):
    name = "boom"
    def run(self, ctx):
        return 1 / 0
'''


class Records(logging.Handler):
    def __init__(self):
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)


def _capture(fn):
    handler = Records()
    logging.getLogger("prefect.task_runs").addHandler(handler)
    try:
        return fn(), handler.records
    finally:
        logging.getLogger("prefect.task_runs").removeHandler(handler)


@task
def _raises(kind: str) -> int:
    from trustcase.checks import CheckError, Unsupported

    if kind == "skip":
        raise Unsupported("skip needs gradients; the model is a black box")
    if kind == "wrong":
        raise CheckError(f"layer {np.int64(0)!r} has no weights")
    return 1 // 0


@flow
def _three() -> list:
    futures = [_raises.submit(k) for k in ("skip", "wrong", "boom")]
    return [type(f.result(raise_on_failure=False)).__name__ for f in futures]


@pytest.mark.usefixtures("prefect_harness")
def test_prefect_task_failures_are_one_plain_line(tmp_path, monkeypatch):
    """Real Prefect task runs raising the three kinds of exception, with the assessment's log filter installed."""
    import trustcase.flows.assess  # noqa: F401  (installs the filter, as any process running the flow does)

    monkeypatch.chdir(tmp_path)
    kinds, records = _capture(_three)
    assert kinds == ["Unsupported", "CheckError", "ZeroDivisionError"]
    lines = sorted(x.getMessage() for x in records if x.levelno >= logging.WARNING)
    # one line each; the internal error is also "Finished in state Failed(...)", the user errors are not repeated
    assert lines[0] == "CheckError: layer 0 has no weights" and lines[1].startswith("Finished in state Failed(")
    assert lines[2].startswith("internal error: ZeroDivisionError: integer division or modulo by zero (traceback in")
    assert lines[3:] == ["not run: skip needs gradients; the model is a black box"]
    assert all(x.exc_info is None for x in records)
    assert "Traceback" in (tmp_path / ".trustcase" / "check-errors.log").read_text()


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_harness")
def test_skips_and_user_errors_are_one_plain_line(tmp_path, tiny_model, tracking_uri, monkeypatch):
    (tmp_path / "tiny_partner_logs.py").write_text(PARTNER)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    raw = tiny_use_case(tmp_path, tiny_model)
    raw["data"]["max_samples"] = {"train": 20, "validation": 20, "test": 20}
    raw["requirements"] = raw["requirements"][:1]
    raw["plan"]["checks"] = [{"check": "data_quality"}] + [
        {"check": f"tiny_partner_logs:{c}"} for c in ("Skip", "Wrong", "Boom")]
    r, records = _capture(lambda: assess(str(write_yaml(tmp_path / "uc.yaml", raw)), str(tmp_path / "out"), None,
                                         tracking_uri))
    about = {c: [x for x in records if x.levelno >= logging.WARNING and getattr(x, "task_run_name", "") == c]
             for c in ("skip", "wrong", "boom")}
    [skip], [wrong], [boom, _] = about["skip"], about["wrong"], about["boom"]
    assert skip.levelno == logging.WARNING and skip.getMessage() == (
        "not run: skip needs gradients; the model is a black box")
    assert wrong.getMessage() == "CheckError: layer 0 has no weights"
    assert "internal error: ZeroDivisionError: division by zero (traceback in" in boom.getMessage()
    assert all(x.exc_info is None for x in records)
    assert "Traceback" in (tmp_path / ".trustcase" / "check-errors.log").read_text()
    assert not r.complete and any("ZeroDivisionError" in e for e in r.errors)

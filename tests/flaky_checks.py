"""Partner-style checks referenced as 'module:Class' from a test plan, to exercise resume."""

from __future__ import annotations

from pathlib import Path

from trustcase.checks import Check, Context, Params
from trustcase.schemas import CheckOutcome, Measurement


class CounterParams(Params):
    counter: str


class Counting(Check):
    """Counts its executions in a file: a cached re-run leaves the count unchanged."""

    name = "counting"
    Params = CounterParams

    def run(self, ctx: Context) -> CheckOutcome:
        f = Path(self.params.counter)
        n = int(f.read_text()) + 1 if f.exists() else 1
        f.write_text(str(n))
        return CheckOutcome(check=self.name, measurements=[Measurement(check=self.name, metric="runs", value=1)])


class MarkerParams(Params):
    marker: str


class FailOnce(Check):
    """Fails while its marker file is absent (a crash), then succeeds."""

    name = "fail_once"
    Params = MarkerParams

    def run(self, ctx: Context) -> CheckOutcome:
        f = Path(self.params.marker)
        if not f.exists():
            f.write_text("crashed once")
            raise RuntimeError("simulated crash in the middle of the assessment")
        return CheckOutcome(check=self.name)

"""A partner-style check ('run_spy:RunSpy' in a test plan) that looks at the MLflow store while the
assessment is still running and writes what it sees to a JSON file."""

from __future__ import annotations

import json
import time
from pathlib import Path

from mlflow.tracking import MlflowClient

from trustcase.checks import Check, Context, Params
from trustcase.schemas import CheckOutcome


class SpyParams(Params):
    tracking_uri: str
    record: str


class RunSpy(Check):
    name = "run_spy"
    Params = SpyParams

    def run(self, ctx: Context) -> CheckOutcome:
        client = MlflowClient(self.params.tracking_uri)
        # the flow logs a finished check from its own thread, which may not have done so yet when this next
        # check starts: look until the earlier checks' metrics are there (the assessment waits for this check)
        deadline = time.monotonic() + 60
        while True:
            ids = [e.experiment_id for e in client.search_experiments()]
            runs = client.search_runs(ids)
            if any(k.startswith("performance/") for r in runs for k in r.data.metrics) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        seen = [{"status": r.info.status, "tags": {k: v for k, v in r.data.tags.items() if not k.startswith("mlflow.")},
                 "metrics": sorted(r.data.metrics), "artefacts": [a.path for a in client.list_artifacts(r.info.run_id)]}
                for r in runs]
        Path(self.params.record).write_text(json.dumps(seen))
        return CheckOutcome(check=self.name)

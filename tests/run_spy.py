"""A partner-style check ('run_spy:RunSpy' in a test plan) that looks at the MLflow store while the
assessment is still running and writes what it sees to a JSON file."""

from __future__ import annotations

import json
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
        ids = [e.experiment_id for e in client.search_experiments()]
        seen = [{"status": r.info.status, "tags": {k: v for k, v in r.data.tags.items() if not k.startswith("mlflow.")},
                 "metrics": sorted(r.data.metrics), "artefacts": [a.path for a in client.list_artifacts(r.info.run_id)]}
                for r in client.search_runs(ids)]
        Path(self.params.record).write_text(json.dumps(seen))
        return CheckOutcome(check=self.name)

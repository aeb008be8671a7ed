"""The assessments of the MLflow store, read-only: runs with their tags, the assessment record of a run, and its
artefacts fetched on demand into a cache under the working directory (never a system temporary folder: a
confidential use case's files stay where the user works)."""

from __future__ import annotations

import csv
import threading
from collections import OrderedDict
from pathlib import Path, PurePosixPath

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from trustcase.errors import UserError
from trustcase.explore.lab import Runtime
from trustcase.flows import tracking
from trustcase.schemas import Assessment


class StoreError(UserError):
    def __init__(self, message: str, status: int = 404):
        super().__init__(message)
        self.status = status


class Store:
    def __init__(self, tracking_uri: str | None, cache: Path):
        self.uri = tracking.configure(tracking_uri)
        self.client = MlflowClient(self.uri, self.uri)
        self.cache = cache
        self._records: OrderedDict[str, Assessment] = OrderedDict()
        self._lock = threading.Lock()

    def assessments(self, use_case_id: str | None = None, limit: int = 200) -> list[dict]:
        """Newest first: every run of a trustcase experiment that has a verdict."""
        try:
            exps = [e for e in self.client.search_experiments() if e.name.startswith("trustcase/")]
            if not exps:
                return []
            runs = self.client.search_runs([e.experiment_id for e in exps], order_by=["attributes.start_time DESC"],
                                           max_results=limit)
        except MlflowException as e:
            raise StoreError(f"cannot read the MLflow store {self.uri}: {e}", 503) from None
        out = []
        for r in runs:
            tags = r.data.tags
            if "verdict" not in tags or (use_case_id and tags.get("use_case") != use_case_id):
                continue
            out.append({"run_id": r.info.run_id, "use_case": tags.get("use_case", "?"),
                        "model_version": tags.get("model_version", "?"), "verdict": tags["verdict"],
                        "complete": tags.get("complete") == "True", "status": r.info.status,
                        "started": r.info.start_time, "confidential": tags.get("confidentiality") == "confidential"})
        return out

    def last(self, use_case_id: str) -> str | None:
        """The newest complete assessment of the use case."""
        runs = [r for r in self.assessments(use_case_id) if r["complete"]]
        return runs[0]["run_id"] if runs else None

    def assessment(self, run_id: str) -> Assessment:
        with self._lock:
            if run_id in self._records:
                return self._records[run_id]
        a = Assessment.model_validate_json(self.file(run_id, "assessment.json").read_text())
        with self._lock:
            self._records[run_id] = a
            while len(self._records) > 16:
                self._records.popitem(last=False)
        return a

    def file(self, run_id: str, path: str) -> Path:
        """One artefact of a run, downloaded once into the cache."""
        rel = PurePosixPath(path)
        if not path or rel.is_absolute() or ".." in rel.parts or not all(c.isalnum() or c in "-_" for c in run_id):
            raise StoreError(f"invalid artefact path {path!r} of run {run_id!r}", 400)
        local = self.cache / run_id / rel
        if not local.is_file():
            try:
                self.client.get_run(run_id)
            except MlflowException:
                raise StoreError(f"no MLflow run {run_id!r} in {self.uri}") from None
            try:  # one file lands in the folder given, under its own name
                local.parent.mkdir(parents=True, exist_ok=True)
                got = Path(self.client.download_artifacts(run_id, str(rel), str(local.parent)))
            except (MlflowException, OSError):
                raise StoreError(f"run {run_id} has no artefact {path!r}") from None
            if not got.is_file():
                raise StoreError(f"{path!r} of run {run_id} is a folder, not a file")
            local = got
        return local

    def runtime_files(self, run_id: str) -> Runtime:
        """What an assessment fitted and validated for the lab: the ODD monitor file, the HUDD clusters (item id
        -> cluster), and per attribution method the options it was assessed with and its ranking."""
        a = self.assessment(run_id)
        rt = Runtime(run_id)
        for o in a.outcomes:  # by the outcomes' typed parts, whichever check wrote them
            for art in o.artefacts:
                if art.kind == "monitor" and rt.monitor is None:
                    rt.monitor = self.file(run_id, f"checks/{art.path}")
                elif art.kind == "clusters" and not rt.clusters:
                    with open(self.file(run_id, f"checks/{art.path}"), newline="") as f:
                        rt.clusters = {row["id"]: int(row["cluster"]) for row in csv.DictReader(f)}
            for m in o.methods:
                rt.methods.setdefault(m.method, {"status": m.status, "reasons": m.reasons, "options": m.options})
        return rt


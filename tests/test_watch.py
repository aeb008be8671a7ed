"""Scheduled assessment of registered model versions: tags, the qualified alias, the regression list,
bad registry states, and what a confidential use case leaves in MLflow. Real MLflow, real Prefect."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import tiny_use_case, write_yaml
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from trustcase.cli import app
from trustcase.data.streaming import DataSource
from trustcase.flows import tracking, watch
from trustcase.measurement import clopper_pearson
from trustcase.models.classifier import sha256_file
from trustcase.models.loading import load_classifier
from trustcase.performance import Tally
from trustcase.schemas import load_use_case

NAME = "solar_cells"  # registered_name of the bundled use case, inherited by the tiny one


def _zeroed(src: Path, dst: Path) -> Path:
    """The broken version: every weight zeroed, so every logit is 0 and every cell is called functional."""
    m = torch.jit.load(str(src))
    with torch.no_grad():
        for p in m.parameters():
            p.zero_()
    m.save(str(dst))
    return dst


def _recall_threshold(case: Path) -> float:
    """A recall:defective threshold the tiny model passes on its interval and the zeroed model fails."""
    uc = load_use_case(case)
    tally = Tally(uc)
    clf = load_classifier(uc.model)
    for b in DataSource(uc.data, 0).stream("test").batches():
        tally.update(clf.logits(b.images), b.labels, b.meta)
    ci = uc.critical_index
    iv = clopper_pearson(int(tally.cm[ci, ci]), int(tally.cm[ci].sum()))
    assert iv.lower > 0.1, "precondition: the tiny model must flag some defective cells"
    return round(min(0.5, iv.lower - 0.02), 3)


def _register(raw: dict, folder: Path, model: Path, uri: str) -> str:
    case = write_yaml(folder / f"register-{model.stem}.yaml", {**raw, "model": {**raw["model"], "path": str(model)}})
    tracking.configure(uri)
    return tracking.register_model(load_use_case(case), model, sha256_file(model), {})


@pytest.fixture
def versions(tmp_path, tiny_model, tracking_uri):
    """Two registered versions (1: the tiny model, 2: zeroed) and a confidential use case judging them."""
    raw = tiny_use_case(tmp_path, tiny_model, confidentiality="confidential")
    raw["plan"]["checks"] = [{"check": "data_quality"}, {"check": "performance"}]
    probe = write_yaml(tmp_path / "probe.yaml", raw)
    raw["requirements"] = [
        {"id": "R-recall", "text": "Defective cells are flagged.", "metric": "recall:defective",
         "comparator": ">=", "threshold": _recall_threshold(probe)},
        {"id": "R-acc", "text": "Informative only.", "metric": "accuracy", "comparator": ">=", "threshold": 0.0,
         "mandatory": False},
    ]
    case = write_yaml(tmp_path / "use_case.yaml", raw)
    assert _register(raw, tmp_path, tiny_model, tracking_uri) == "1"
    assert _register(raw, tmp_path, _zeroed(tiny_model, tmp_path / "zeroed.pt"), tracking_uri) == "2"
    return case


class Recorder(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def test_watch_once_assesses_tags_qualifies_and_lists_regressions(prefect_harness, versions, tracking_uri, tmp_path,
                                                                  tiny_model):
    rec = Recorder()
    prefect_logger = logging.getLogger("prefect")
    prefect_logger.addHandler(rec)
    old = prefect_logger.level
    prefect_logger.setLevel(logging.INFO)
    try:
        outcomes = watch.once(versions, tmp_path / "out", tracking_uri)
    finally:
        prefect_logger.removeHandler(rec)
        prefect_logger.setLevel(old)
    assert [o["version"] for o in outcomes] == ["1", "2"]
    assert [o["error"] for o in outcomes] == [None, None]
    good, bad = outcomes
    assert (good["verdict"], good["qualified"], good["compared_with"]) == ("PASS", True, None)
    assert (bad["verdict"], bad["qualified"], bad["compared_with"]) == ("FAIL", False, "1")
    assert bad["regressions"] == ["R-recall"]

    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    v1, v2 = (client.get_model_version(NAME, v) for v in ("1", "2"))
    assert v1.tags["trustcase.verdict"] == "PASS" and v2.tags["trustcase.verdict"] == "FAIL"
    assert v2.tags["trustcase.regressions"] == "R-recall" and v2.tags["trustcase.compared_with"] == "1"
    assert v1.tags["trustcase.run_id"] == good["run_id"] and v2.tags["trustcase.run_id"] == bad["run_id"]
    assert Path(v2.tags["trustcase.report"]).is_file() and v2.tags["trustcase.report_uri"].endswith("report.html")
    # the failing version never gets the alias; the qualified one keeps it
    assert str(client.get_model_version_by_alias(NAME, "qualified").version) == "1"

    # the regression list leads the comparison, which the run keeps
    comparison = json.loads((tmp_path / "out" / "solar_cells-v2" / "comparison.json").read_text())
    assert comparison["compared_with"] == "1"
    first = comparison["claims"][0]
    assert (first["claim"], first["previous_verdict"], first["verdict"], first["regression"]) == \
        ("R-recall", "PASS", "FAIL", True)
    assert first["value"] == 0.0 and first["worse"]
    run = client.get_run(bad["run_id"])
    assert run.data.tags["registered_version"] == f"{NAME}/2"
    assert run.data.tags["model_version"] == "2"

    # confidential: the runs hold no weights and no raw inputs; the logs name no data location
    model_bytes = {Path(p).read_bytes() for p in (tmp_path / "zeroed.pt", tiny_model)}
    data_dir = str(load_use_case(versions).data.path)
    for o in outcomes:
        root = Path(client.download_artifacts(o["run_id"], "", str(tmp_path / f"artefacts-{o['version']}")))
        files = [p for p in root.rglob("*") if p.is_file()]
        assert {"assessment.json", "comparison.json", "report.html"} <= {p.name for p in files}
        assert not [p for p in files if p.suffix in {".pt", ".onnx", ".npy", ".npz", ".pth", ".safetensors"}]
        assert not [p for p in files if p.read_bytes() in model_bytes]
        assert not [p for p in files if "checks" in p.parts and p.suffix in {".png", ".jpg", ".jpeg"}]
    assert any("version(s) to assess" in line for line in rec.lines)
    assert not [line for line in rec.lines if data_dir in line]

    # nothing new: the next pass returns at once and writes nothing
    assert watch.once(versions, tmp_path / "out", tracking_uri) == []
    assert client.get_model_version(NAME, "2").tags == v2.tags

    # the drift step judges batches with the qualified version's model
    (judged,) = watch.once(versions, tmp_path / "out", tracking_uri, batches=_batches(versions, tmp_path / "b", 1))
    assert judged["model"] == "version 1 (qualified)" and judged["error"] is None


def _batches(case: Path, folder: Path, kinds: int = 3) -> Path:
    """Batch folders of real validation cells as PNG files: 'same' (30 cells as they are), 'dark' (the same at half
    the exposure) and 'few' (3 cells: too few for the test)."""
    import cv2

    uc = load_use_case(case)
    cells = np.concatenate([b.images for b in DataSource(uc.data, 0, uc.model).stream("validation").batches()])[:30]
    for name, images in list({"same": cells, "dark": cells * 0.5, "few": cells[:3]}.items())[:kinds]:
        (folder / name).mkdir(parents=True)
        for i, x in enumerate(images):
            cv2.imwrite(str(folder / name / f"cell{i:02d}.png"), np.clip(x[..., 0], 0, 255).astype(np.uint8))
    return folder


def test_the_drift_step_judges_each_new_batch_once_records_it_and_exits_like_drift(tiny_case, tiny_model, tmp_path,
                                                                                   tracking_uri, prefect_harness):
    raw = yaml.safe_load(tiny_case.read_text())
    _register(raw, tmp_path, tiny_model, tracking_uri)
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    client.set_model_version_tag(NAME, "1", "trustcase.verdict", "PASS")  # assessed: only batches are new
    batches = _batches(tiny_case, tmp_path / "batches")
    out = tmp_path / "out"
    outcomes = {o["batch"]: o for o in watch.once(tiny_case, out, tracking_uri, batches=batches)}
    assert set(outcomes) == {"same", "dark", "few"}
    same, dark, few = outcomes["same"], outcomes["dark"], outcomes["few"]
    assert same["drift"] is False and same["pvalue"] >= 0.05 and same["model"] == "the use case's model"
    assert dark["drift"] is True and dark["pvalue"] < 0.05
    assert few["drift"] is None and "needs at least 10" in few["error"]
    record = json.loads((out / "solar_cells-batches" / "dark" / "drift.json").read_text())
    assert record["drift"] is True and record["reference"] == "validation" and record["n_other"] == 30
    run = client.get_run(dark["run_id"])
    assert run.data.tags["trustcase.kind"] == "drift" and run.data.tags["trustcase.drift"] == "true"
    assert run.data.metrics["drift_pvalue"] == dark["pvalue"]

    # judged batches are not judged again; the one that could not be judged is an error again: exit 2
    result = CliRunner().invoke(app, ["watch", str(tiny_case), "--once", "--tracking-uri", tracking_uri,
                                      "--out", str(out), "--batches", str(batches)])
    assert result.exit_code == 2, result.output
    assert "batch few: not judged" in result.output and "batch dark" not in result.output
    # a new batch that drifted: exit 3, as `trustcase drift`
    shutil.rmtree(batches / "few")
    shutil.copytree(batches / "dark", batches / "dark2")
    result = CliRunner().invoke(app, ["watch", str(tiny_case), "--once", "--tracking-uri", tracking_uri,
                                      "--out", str(out), "--batches", str(batches)])
    assert result.exit_code == 3, result.output
    assert "batch dark2: drift" in result.output
    result = CliRunner().invoke(app, ["watch", str(tiny_case), "--once", "--tracking-uri", tracking_uri,
                                      "--out", str(out), "--batches", str(tmp_path / "nowhere")])
    assert result.exit_code == 2 and "no such folder" in result.output


def test_a_registered_model_that_does_not_exist_is_a_clear_error(tiny_case, tracking_uri, tmp_path):
    raw = tiny_use_case(tmp_path, Path("unused.pt"))
    raw["model"]["registered_name"] = "no_such_model"
    case = write_yaml(tmp_path / "missing.yaml", raw)
    with pytest.raises(watch.WatchError, match="no registered model 'no_such_model'"):
        watch.once(case, tmp_path / "out", tracking_uri)
    result = CliRunner().invoke(app, ["watch", str(case), "--once", "--tracking-uri", tracking_uri])
    assert result.exit_code == 2
    assert "no registered model 'no_such_model'" in result.output


def test_an_alias_on_a_never_assessed_version_fails_before_any_tag(tmp_path, tiny_model, tracking_uri):
    raw = tiny_use_case(tmp_path, tiny_model)
    case = write_yaml(tmp_path / "use_case.yaml", raw)
    _register(raw, tmp_path, tiny_model, tracking_uri)
    _register(raw, tmp_path, _zeroed(tiny_model, tmp_path / "zeroed.pt"), tracking_uri)
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    client.set_registered_model_alias(NAME, "qualified", "2")  # set by hand: never assessed
    with pytest.raises(watch.WatchError, match="points to version 2, which trustcase never assessed"):
        watch.once(case, tmp_path / "out", tracking_uri)
    for v in ("1", "2"):
        assert not [k for k in client.get_model_version(NAME, v).tags if k.startswith("trustcase.")]


def test_compare_orders_regressions_then_worse_values():
    from trustcase.schemas import Assessment, Evidence, Verdict

    def assessment(values: dict[str, tuple[float, Verdict]]) -> Assessment:
        ev = [Evidence(claim_id=k, check="performance", metric="accuracy", value=v, threshold=0.5, comparator=">=",
                       verdict=verdict, rationale="-") for k, (v, verdict) in values.items()]
        return Assessment.model_construct(evidence=ev)

    before = assessment({"A": (0.9, Verdict.PASS), "B": (0.8, Verdict.PASS), "C": (0.6, Verdict.INCONCLUSIVE)})
    after = assessment({"A": (0.95, Verdict.PASS), "B": (0.7, Verdict.PASS), "C": (0.4, Verdict.FAIL),
                        "D": (0.9, Verdict.PASS)})
    rows = watch.compare(before, after)
    assert [r["claim"] for r in rows] == ["C", "B", "A", "D"]
    assert [r["regression"] for r in rows] == [True, False, False, False]
    assert [r["worse"] for r in rows] == [True, True, False, False]
    assert rows[3]["previous_verdict"] is None
    assert rows[1]["delta"] == pytest.approx(-0.1)


def test_served_deployment_has_the_cron_schedule(tiny_case, tracking_uri, tmp_path):
    dep = watch.deployment(tiny_case, "0 2 * * *", out_root=tmp_path / "out", tracking_uri=tracking_uri,
                           alias="qualified", runner="thread", dask_address=None)
    assert dep.name == "watch-solar_cells"
    assert [s.schedule.cron for s in dep.schedules] == ["0 2 * * *"]
    assert dep.parameters["tracking_uri"] == tracking_uri
    assert dep.parameters["use_case_path"] == str(tiny_case.resolve())
    with pytest.raises(watch.WatchError, match="invalid cron expression"):
        watch.validate_cron("every night")


@pytest.mark.slow
def test_two_versions_assessed_at_the_same_time_do_not_interfere(versions, tracking_uri, tmp_path, tiny_model):
    """Two `trustcase assess` processes at once, one per version, on one MLflow store and one Prefect
    database (as on a shared machine): both complete, each with its own run, report and pack, and each
    gives the evidence a run alone gives."""
    raw = yaml.safe_load(versions.read_text())
    cases = {v: write_yaml(tmp_path / f"v{v}.yaml", {**raw, "model": {**raw["model"], "path": str(m)}})
             for v, m in (("1", tiny_model), ("2", tmp_path / "zeroed.pt"))}
    exe = str(Path(sys.executable).with_name("trustcase"))
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home")}
    env.pop("PREFECT_API_URL", None)  # each process starts its own ephemeral server on the shared database

    def assess(v: str, out: Path) -> subprocess.Popen:
        return subprocess.Popen([exe, "assess", str(cases[v]), "--out", str(out), "--tracking-uri", tracking_uri],
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    procs = {v: assess(v, tmp_path / f"out-{v}") for v in cases}  # started together
    results = {v: (p.wait(timeout=900), p.stdout.read(), p.stderr.read()) for v, p in procs.items()}
    for v, (code, _, err) in results.items():
        assert "Traceback" not in err, err
        assert code == {"1": 0, "2": 3}[v], (v, code, err)

    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name(f"trustcase/{raw['id']}").experiment_id])
    runs = [r for r in runs if r.data.tags.get("kind") != "training"]
    assert sorted((r.data.tags["model_version"], r.data.tags["verdict"], r.info.status) for r in runs) == \
        [("1", "PASS", "FINISHED"), ("2", "FAIL", "FINISHED")]

    def evidence(out: Path) -> list:
        doc = json.loads((out / "evidence.json").read_text())
        return [(e["claim_id"], e["value"], e["verdict"]) for e in doc]

    runner = CliRunner()
    for v in cases:
        assert runner.invoke(app, ["verify", str(tmp_path / f"out-{v}" / "pack.zip")]).exit_code == 0
    solo = assess("2", tmp_path / "solo-2")
    assert solo.wait(timeout=900) == 3, solo.stderr.read()
    assert evidence(tmp_path / "out-2") == evidence(tmp_path / "solo-2")


def test_the_local_prefect_database_is_migrated_once_under_a_lock(tmp_path):
    import sqlite3

    import prefect
    from prefect.settings import PREFECT_API_DATABASE_CONNECTION_URL, PREFECT_API_URL, temporary_settings

    from trustcase.flows import prefect_db

    db = tmp_path / "home" / "prefect.db"
    with temporary_settings(updates={PREFECT_API_URL: None,
                                     PREFECT_API_DATABASE_CONNECTION_URL: f"sqlite+aiosqlite:///{db}"}):
        assert prefect_db.sqlite_path() == db
        prefect_db.ensure_local_database()
        prefect_db.ensure_local_database()  # up to date: nothing to do, no error
    assert db.with_name("prefect.db.trustcase-lock").is_file()
    assert db.with_name("prefect.db.trustcase-migrated").read_text() == prefect.__version__
    with sqlite3.connect(db) as con:
        assert con.execute("select count(*) from alembic_version").fetchone()[0] == 1
    with temporary_settings(updates={PREFECT_API_URL: "http://127.0.0.1:4200/api"}):
        assert prefect_db.sqlite_path() is None  # a Prefect server migrates its own database

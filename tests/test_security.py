"""Issue 16: evidence that cannot be stale, forged or leaked. One test per reproduction of the issue, on real
Prefect runs, a real MLflow store and the real ELPV images.

Items 6a and 6c (YAML aliases, image pixel limit) are tested with the schema loader and the data loaders;
6b (zip entries streamed with a limit) is in tests/test_pack.py."""

from __future__ import annotations

import csv
import json
import re
import shutil
import zipfile
from datetime import UTC, datetime
from pathlib import Path

import mlflow
import numpy as np
import pytest
import yaml
from conftest import SOLAR, tiny_use_case, write_yaml
from test_monitor_cli import monitor_file  # noqa: F401  (fixture: a fitted monitor and its TorchScript model)

from trustcase.flows.assess import OutputFolderError, assess
from trustcase.schemas import Assessment

flow = pytest.mark.usefixtures("prefect_harness")

# a partner's loader: the ELPV cells, relabelled from an index CSV; its fingerprint hashes the image files only
# (as the partner guide's example does), not the labels
RELABELLED = '''
import csv, sys
from dataclasses import replace
sys.path.insert(0, {solar!r})
from elpv import load_split as _elpv


class Relabelled:
    def __init__(self, inner, labels):
        self.inner, self.labels = inner, labels

    def __len__(self):
        return len(self.inner)

    def __getitem__(self, i):
        item = self.inner[i]
        return replace(item, label=self.labels.get(item.id, item.label))

    def name(self, i):
        return self.inner.name(i)

    def fingerprint(self):
        return self.inner.fingerprint()


def load_split(split, index, size=32, threshold=0.5):
    with open(index) as f:
        labels = {{row["id"]: int(row["label"]) for row in csv.DictReader(f)}}
    return Relabelled(_elpv(split, size=size, threshold=threshold), labels)
'''


def relabelled_case(folder: Path, model: Path, flip: bool) -> Path:
    import sys

    sys.path.insert(0, str(SOLAR))
    from elpv import load_split

    (folder / "relabel_loader.py").write_text(RELABELLED.format(solar=str(SOLAR)))
    with open(folder / "index.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "label"])
        for split in ("train", "validation", "test"):
            s = load_split(split, size=32)
            for name, prob, _ in s.rows:
                label = int(prob >= 0.5)
                w.writerow([Path(name).name, 1 - label if flip else label])
    raw = tiny_use_case(folder, model)
    raw["data"].update(loader="relabel_loader:load_split", path=str(folder),
                       params={"index": str(folder / "index.csv"), "size": 32})
    raw["data"]["max_samples"] = {"train": 40, "validation": 20, "test": 100}
    raw["requirements"] = [{"id": "R1", "text": "accuracy", "metric": "accuracy", "comparator": ">=",
                            "threshold": 0.5}]
    raw["plan"]["checks"] = [{"check": "data_quality"}, {"check": "performance"}]
    return write_yaml(folder / "use_case.yaml", raw)


def small_case(folder: Path, model: Path, name: str = "use_case.yaml", **overrides) -> Path:
    """The tiny case with checks that declare artefacts (per-item CSV of smoothing), kept to seconds."""
    raw = tiny_use_case(folder, model, **overrides)
    raw["data"]["max_samples"] = {"train": 40, "validation": 20, "test": 40}
    raw["requirements"] = [{"id": "R1", "text": "accuracy", "metric": "accuracy", "comparator": ">=", "threshold": 0.5}]
    raw["plan"]["checks"] = [
        {"check": "data_quality"}, {"check": "performance"},
        {"check": "randomized_smoothing", "params": {"sigma": 0.12, "n0": 8, "n": 16, "max_items": 8}},
    ]
    return write_yaml(folder / name, raw)


def claim(out: Path, claim_id: str = "R1") -> dict:
    ev = json.loads((out / "evidence.json").read_text())
    return next(e for e in ev if e["claim_id"] == claim_id)


@flow
def test_1_relabelled_data_is_never_served_from_the_cache(tmp_path, tiny_model, tracking_uri):
    """Why 1: flip every label of a partner use case, re-run into the same folder: the cached PASS came back."""
    out = tmp_path / "out"
    path = relabelled_case(tmp_path, tiny_model, flip=True)  # the tiny model mostly answers "defective"
    assess(str(path), str(out), None, tracking_uri)
    before = claim(out)
    assert before["verdict"] == "PASS", before
    relabelled_case(tmp_path, tiny_model, flip=False)
    assess(str(path), str(out), None, tracking_uri)
    after = claim(out)
    assert after["verdict"] == "FAIL", after
    assert after["value"] == pytest.approx(1 - before["value"])
    # the folder holds this use case's assessment: another one is refused before any work (Why 4, in short)
    other = write_yaml(tmp_path / "other.yaml", {**yaml.safe_load(path.read_text()), "id": "another_case"})
    with pytest.raises(OutputFolderError, match="holds the assessment of use case 'solar_cells'"):
        assess(str(other), str(out), None, tracking_uri)


@flow
@pytest.mark.slow
def test_7_a_cached_outcome_comes_back_only_with_its_artefacts(tmp_path, tiny_model, tracking_uri):
    """Why 7: delete the output folder and re-run: the cached outcomes declared artefacts that no longer existed."""
    out = tmp_path / "out"
    tiny_case = small_case(tmp_path, tiny_model)
    assess(str(tiny_case), str(out), None, tracking_uri)
    a = Assessment.model_validate_json((out / "assessment.json").read_text())
    declared = {art.path: art.sha256 for o in a.outcomes for art in o.artefacts}
    assert declared, "smoothing declares its per-item table"
    shutil.rmtree(out)
    assess(str(tiny_case), str(out), None, tracking_uri)
    a = Assessment.model_validate_json((out / "assessment.json").read_text())
    from trustcase.models.classifier import sha256_file

    for o in a.outcomes:
        for art in o.artefacts:
            assert sha256_file(out / "checks" / art.path) == art.sha256, art.path
    names = set(zipfile.ZipFile(out / "pack.zip").namelist())
    assert {f"checks/{p}" for p in declared} <= names
    # the results themselves: JSON in the project's store, never a pickle
    from trustcase.flows.assess import cache_root

    results = [p.read_bytes() for p in (cache_root() / "results").iterdir()]
    assert results and all(json.loads(r) and b"pickle" not in r for r in results)
    # a cached outcome whose artefact went missing from the store runs again instead of being trusted
    for sha in {art.sha256 for o in a.outcomes for art in o.artefacts}:
        (cache_root() / "artefacts" / sha).unlink()
    shutil.rmtree(out)
    assess(str(tiny_case), str(out), None, tracking_uri)
    a = Assessment.model_validate_json((out / "assessment.json").read_text())
    assert all((out / "checks" / art.path).is_file() for o in a.outcomes for art in o.artefacts)


@flow
@pytest.mark.slow
def test_4_an_output_folder_holds_one_assessment(tmp_path, tiny_model, tracking_uri):
    """Why 4: a second use case assessed into the same folder packed the first one's files."""
    out = tmp_path / "out"
    tiny_case = small_case(tmp_path, tiny_model)
    assess(str(tiny_case), str(out), None, tracking_uri)
    (out / "checks" / "leftover").mkdir(parents=True)
    (out / "checks" / "leftover" / "clusters.csv").write_text("item_id\nsecret_cell.png\n")
    other_path = small_case(tmp_path, tiny_model, "other.yaml", id="another_case")
    with pytest.raises(OutputFolderError, match="solar_cells"):
        assess(str(other_path), str(out), None, tracking_uri)
    # the same use case again: what the pack and MLflow receive is what this run wrote, nothing left over
    r = assess(str(tiny_case), str(out), None, tracking_uri)
    names = zipfile.ZipFile(out / "pack.zip").namelist()
    assert not any("leftover" in n for n in names)
    logged = mlflow.MlflowClient(tracking_uri).list_artifacts(r.run_id, "checks")
    assert "checks/leftover" not in {f.path for f in logged}


# --- 2: forged packs -------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def failed_pack(tmp_path_factory) -> Path:
    """The pack of an assessment whose mandatory claim F-cert FAILED."""
    from test_argument import assessment
    from test_report import with_check_output

    from trustcase.reports import render

    folder = tmp_path_factory.mktemp("failed")
    a = with_check_output(assessment({"F-cert": "FAIL"}), folder)
    return Path(render(a, folder, pdf=False)["pack"])


def forge(src: Path, dst: Path, change: dict[str, bytes], manifest_edit=None, remove=()) -> Path:
    """What a forger does: rewrite files (drop those in `remove`), put their hashes in the manifest, rewrite
    MANIFEST.sha256."""
    from trustcase.reports.pack import MANIFEST, MANIFEST_DIGEST, sha256_bytes

    with zipfile.ZipFile(src) as z:
        files = {n: z.read(n) for n in z.namelist() if n not in remove}
    files.update(change)
    m = json.loads(files[MANIFEST])
    m["files"] = [f for f in m["files"] if f["path"] not in remove]
    for f in m["files"]:
        if f["path"] in change:
            f.update(sha256=sha256_bytes(change[f["path"]]), bytes=len(change[f["path"]]))
    if manifest_edit:
        manifest_edit(m)
    files[MANIFEST] = json.dumps(m, indent=1, sort_keys=True).encode()
    files[MANIFEST_DIGEST] = f"{sha256_bytes(files[MANIFEST])}  {MANIFEST}\n".encode()
    with zipfile.ZipFile(dst, "w") as z:
        for n, data in files.items():
            z.writestr(n, data)
    return dst


def test_2_a_forged_pack_is_never_intact(failed_pack, tmp_path, tracking_uri):
    """Why 2: a rewritten file with a rewritten manifest passed as "intact ... verdict PASS"; so did a manifest
    whose verdict alone was changed, while provenance.json and assessment.json still said FAIL."""
    from typer.testing import CliRunner

    from trustcase.cli import app
    from trustcase.reports import verify_pack
    from trustcase.reports.pack import digest, sha256_bytes

    original = digest(failed_pack)
    runner = CliRunner()
    # a changed verdict in the manifest alone: the records contradict it, anchored or not
    flipped = forge(failed_pack, tmp_path / "flipped.zip", {}, lambda m: m.update(verdict="PASS"))
    v = verify_pack(flipped)
    assert not v.ok and any("provenance.json states verdict = 'FAIL'" in p for p in v.problems)
    assert any("assessment.json states verdict = 'FAIL'" in p for p in v.problems)
    # every record rewritten consistently to PASS: internally consistent, but the anchor refuses it
    a = json.loads(zipfile.ZipFile(failed_pack).read("assessment.json"))
    a["verdict"] = "PASS"
    for e in a["evidence"]:
        e["verdict"] = "PASS"
    prov = json.loads(zipfile.ZipFile(failed_pack).read("provenance.json"))
    prov["verdict"] = "PASS"
    ev = json.dumps(a["evidence"], indent=1).encode()
    records = {"assessment.json": json.dumps(a).encode(), "evidence.json": ev,
               "provenance.json": json.dumps(prov).encode()}
    from trustcase.reports.compliance import FILES as COMPLIANCE  # a consistent forger drops the matrix too

    half = forge(failed_pack, tmp_path / "half.zip", records, lambda m: m.update(verdict="PASS"), COMPLIANCE)
    assert any("report.html does not state the SHA-256" in p for p in verify_pack(half).problems)
    # ... and the report's digest of the record too
    old, new = (sha256_bytes(zipfile.ZipFile(failed_pack).read("assessment.json")),
                sha256_bytes(records["assessment.json"]))
    report = zipfile.ZipFile(failed_pack).read("report.html").replace(old.encode(), new.encode())
    forged = forge(failed_pack, tmp_path / "forged.zip", {**records, "report.html": report},
                   lambda m: m.update(verdict="PASS"), COMPLIANCE)
    out = runner.invoke(app, ["verify", str(forged)])
    assert out.exit_code == 0 and "not anchored" in out.output and "intact" not in out.output
    out = runner.invoke(app, ["verify", str(forged), "--digest", original])
    assert out.exit_code == 3 and "not the one that was assessed" in out.output
    assert runner.invoke(app, ["verify", str(failed_pack), "--digest", original]).exit_code == 0
    # the MLflow run of the assessment anchors it too: its digest tag, its verdict, its id in the records
    from test_argument import assessment
    from test_report import with_check_output

    from trustcase.reports import render

    mlflow.set_tracking_uri(tracking_uri)
    exp = mlflow.create_experiment("anchors", artifact_location=(tmp_path / "art").as_uri())
    with mlflow.start_run(experiment_id=exp) as run:
        folder = tmp_path / "run"
        a = with_check_output(assessment({"F-cert": "FAIL"}, mlflow_run_id=run.info.run_id), folder)
        pack = Path(render(a, folder, pdf=False)["pack"])
        mlflow.set_tags({"pack.manifest_sha256": digest(pack), "verdict": "FAIL"})
    ok = runner.invoke(app, ["verify", str(pack), "--run", run.info.run_id, "--tracking-uri", tracking_uri])
    assert ok.exit_code == 0 and f"anchored by MLflow run {run.info.run_id}" in ok.output, ok.output
    for fake in (forged, failed_pack):  # a forged pack; the pack of another run
        bad = runner.invoke(app, ["verify", str(fake), "--run", run.info.run_id, "--tracking-uri", tracking_uri])
        assert bad.exit_code == 3 and "not the one that was assessed" in bad.output


def test_2_a_signed_pack_proves_its_site(tmp_path, monkeypatch):
    """Optional Ed25519 signature of the manifest by the assessing site (key path in TRUSTCASE_SIGNING_KEY)."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat
    from test_argument import assessment
    from test_report import with_check_output
    from typer.testing import CliRunner

    from trustcase.cli import app
    from trustcase.reports import render

    key = Ed25519PrivateKey.generate()
    (tmp_path / "site.pem").write_bytes(key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()))
    (tmp_path / "site.pub").write_bytes(key.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo))
    other = Ed25519PrivateKey.generate().public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    (tmp_path / "other.pub").write_bytes(other)
    monkeypatch.setenv("TRUSTCASE_SIGNING_KEY", str(tmp_path / "site.pem"))
    folder = tmp_path / "run"
    pack = Path(render(with_check_output(assessment({"F-cert": "FAIL"}), folder), folder, pdf=False)["pack"])
    runner = CliRunner()
    ok = runner.invoke(app, ["verify", str(pack), "--public-key", str(tmp_path / "site.pub")])
    assert ok.exit_code == 0 and "intact, anchored by the key" in ok.output, ok.output
    wrong = runner.invoke(app, ["verify", str(pack), "--public-key", str(tmp_path / "other.pub")])
    assert wrong.exit_code == 3 and "not a signature of the manifest" in wrong.output
    forged = forge(pack, tmp_path / "forged.zip", {}, lambda m: m.update(assessed_at="2020-01-01"))
    bad = runner.invoke(app, ["verify", str(forged), "--public-key", str(tmp_path / "site.pub")])
    assert bad.exit_code == 3 and "not a signature of the manifest" in bad.output


# --- 5: confidential means confidential ------------------------------------------------------------------------

ITEM = re.compile(rb"cell\d{4}\.png")  # every ELPV item id has this form


def everything(root: Path):
    """(where, bytes) of every file under root, zip archives opened (a pack hides nothing from this walk)."""
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        data = f.read_bytes()
        yield str(f), data
        if zipfile.is_zipfile(f):
            with zipfile.ZipFile(f) as z:
                for n in z.namelist():
                    yield f"{f}!{n}", z.read(n)


@flow
def test_5_a_confidential_assessment_leaves_no_item_id_or_data_path(tmp_path, tiny_model, monkeypatch, caplog):
    """Why 5: cluster members, per-item tables, absolute paths and the monitor file of a confidential case reached
    the pack, the report, MLflow and the result cache. Walk every output and grep for every id and data path."""
    import sys

    from trustcase.data.streaming import DataSource
    from trustcase.flows.confidential import item_ids
    from trustcase.schemas import load_use_case

    sys.path.insert(0, str(SOLAR))
    from elpv import dataset_root

    monkeypatch.setenv("TRUSTCASE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("TRUSTCASE_SALT", "a secret of the site")
    raw = tiny_use_case(tmp_path, tiny_model, confidentiality="confidential")
    raw["data"]["max_samples"] = {"train": 60, "validation": 30, "test": 40}
    raw["requirements"] = [{"id": "R1", "text": "accuracy", "metric": "accuracy", "comparator": ">=",
                            "threshold": 0.5}]
    raw["plan"]["checks"] = [
        {"check": "data_quality"}, {"check": "performance"},
        {"check": "randomized_smoothing", "params": {"sigma": 0.12, "n0": 8, "n": 16, "max_items": 8}},
        {"check": "root_causes", "params": {"k": 2, "noun": "cells"}},
        {"check": "odd_monitor", "params": {"perturbations": {"gaussian_blur": [2.0]}}},
    ]
    path = write_yaml(tmp_path / "use_case.yaml", raw)
    uc = load_use_case(path)
    ids = item_ids(DataSource(uc.data, uc.plan.seed, uc.model))
    assert len(ids) == 130
    store = tmp_path / "mlflow"
    started = datetime.now(UTC)
    r = assess(str(path), str(tmp_path / "out"), None, f"sqlite:///{store / 'mlflow.db'}")
    assert r.complete, r.errors
    a = Assessment.model_validate_json((tmp_path / "out" / "assessment.json").read_text())
    assert {o.check for o in a.outcomes} >= {"root_causes", "odd_monitor", "randomized_smoothing"}
    assert (tmp_path / "out" / "checks" / "odd_monitor" / "monitor.safetensors").is_file()  # the user's own copy
    secrets = [str(SOLAR).encode(), str(dataset_root()).encode(), str(dataset_root().parent).encode()]
    walked = 0
    for root in (tmp_path / "out", store, tmp_path / "cache"):
        for where, data in everything(root):
            walked += 1
            assert not ITEM.search(data), (where, ITEM.search(data).group(0))
            for s in secrets:
                assert s not in data, (where, s)
    assert walked > 40
    logs = caplog.text.encode()
    assert not ITEM.search(logs) and not any(s in logs for s in secrets)
    # Prefect's own records (issue 24, Why 5), and no hash of an id anyone could compute without the site's secret
    rows = prefect_rows(started, failed=False).encode()
    assert not ITEM.search(rows) and not any(s in rows for s in secrets)
    public = recomputable(ids, uc.id, a.provenance.data_sha256)
    for root in (tmp_path / "out", store, tmp_path / "cache"):
        for where, data in everything(root):
            assert not any(h in data for h in public), where
    logged = {f.path for f in mlflow.MlflowClient(f"sqlite:///{store / 'mlflow.db'}").list_artifacts(
        r.run_id, "checks/odd_monitor")}
    assert logged == set(), "no monitor file in MLflow for a confidential use case"
    assert not list((tmp_path / "cache").rglob("results/*")), "confidential outcomes are never cached"
    assert re.search(rb"item-[0-9a-f]{16}", (tmp_path / "out" / "checks" / "root_causes" / "clusters.csv").read_bytes())
    # the pack is anchored by the run, and the pack rebuilt from MLflow (no monitor there) verifies too
    from trustcase.flows.rerender import pack_run, verify
    from trustcase.reports.pack import digest

    uri = f"sqlite:///{store / 'mlflow.db'}"
    assert r.manifest_sha256 == digest(tmp_path / "out" / "pack.zip")
    v = verify(tmp_path / "out" / "pack.zip", run_id=r.run_id, tracking_uri=uri)
    assert v.ok and v.anchored == f"MLflow run {r.run_id}", v.lines()
    again, _ = pack_run(r.run_id, tmp_path / "again.zip", uri)
    v = verify(again)
    assert v.ok, v.lines()
    assert "checks/odd_monitor/monitor.safetensors" in {w["path"] for w in v.manifest["withheld"]}


# --- 3: a monitor file is data ----------------------------------------------------------------------------------

def test_3_a_monitor_file_never_runs_code(monitor_file, tmp_path):  # noqa: F811
    """Why 3: a header naming `factory: subprocess:getoutput` ran its command in `trustcase monitor` and in
    Monitor.load, before any hash check; `allow_pickle: true` unpickled."""
    from PIL import Image
    from safetensors import safe_open
    from safetensors.numpy import save_file
    from typer.testing import CliRunner

    from trustcase import odd
    from trustcase.cli import app

    with safe_open(str(monitor_file), framework="np") as f:
        head, arrays = json.loads(f.metadata()["trustcase_monitor"]), {k: f.get_tensor(k) for k in f.keys()}
    assert set(head["model"]) <= {"format", "input_shape", "value_range", "normalisation", "class_names",
                                  "critical_class", "input_dtype"}  # what we write names no file and no code
    model = monitor_file.with_name("m.pt")
    marker = tmp_path / "pwned"
    image = tmp_path / "cell.png"
    Image.fromarray(np.full((8, 8), 120, np.uint8)).save(image)
    attacks = {
        "factory": {"format": "state_dict", "path": str(model), "factory": "subprocess:getoutput",
                    "factory_args": {"cmd": f"touch {marker}"}},
        "pickle": {"format": "state_dict", "path": str(model), "allow_pickle": True, "factory": "builtins:dict"},
    }
    for name, evil in attacks.items():
        path = tmp_path / f"{name}.safetensors"
        save_file(arrays, str(path), metadata={"trustcase_monitor": json.dumps({**head, "model": {**head["model"],
                                                                                                 **evil}})})
        r = CliRunner().invoke(app, ["monitor", str(path), str(image)])
        assert r.exit_code == 2 and "never says how to load or build a model" in r.output, r.output
        for given in (None, model):
            with pytest.raises(odd.MonitorError, match="a monitor file is data"):
                odd.Monitor.load(path, given)
        assert not marker.exists()
    # the real file: the caller supplies the model, hash-checked before it is loaded
    with pytest.raises(odd.MonitorError, match="give the model it was fitted for"):
        odd.Monitor.load(monitor_file)
    other = tmp_path / "other.pt"
    other.write_bytes(model.read_bytes() + b"\0")
    with pytest.raises(odd.MonitorError, match="fitted for model sha256"):
        odd.Monitor.load(monitor_file, other)
    assert odd.Monitor.load(monitor_file, model).evaluate(np.full((8, 8), 120.0)).state.shape == (1,)


# --- issue 24: ids with spaces and digits, a secret folder, Prefect's records, recomputable hashes ----------------

SECRET_LOADER = '''
import sys
from dataclasses import replace
sys.path.insert(0, {solar!r})
from elpv import load_split as _elpv


def rename(split, i):
    """Partner ids: a lot folder with a space in it, and bare numbers (the train split)."""
    return str(i) if split == "train" else f"lot {{8 if split == 'test' else 9}}/cell_{{i:05d}}.png"


class Renamed:
    def __init__(self, inner, split):
        self.inner, self.split = inner, split

    def __len__(self):
        return len(self.inner)

    def __getitem__(self, i):
        return replace(self.inner[i], id=rename(self.split, i))

    def name(self, i):
        return rename(self.split, i)

    def fingerprint(self):
        return self.inner.fingerprint()


def load_split(split, size=32):
    return Renamed(_elpv(split, size=size), split)
'''

LEAKY_CHECK = '''
from trustcase.checks import Check, Params
from trustcase.errors import CheckError


class Leaky(Check):
    """A partner check that fails naming the items it could not screen (as a careless one would)."""

    name = "leaky"
    Params = Params

    @classmethod
    def produces(cls, params, use_case):
        return []

    def run(self, ctx):
        ids = [i for b in ctx.batches("test") for i in b.ids][:3]
        raise CheckError(f"items {', '.join(ids)} failed the screening under {ctx.use_case.data.path}")
'''


def recomputable(ids: set[str], use_case_id: str, data_sha256: str) -> list[bytes]:
    """Every hash of an id anyone could compute from what is public: the pack's data hash as salt, the improve
    tag's use-case salt, no salt at all."""
    import hashlib

    improve = hashlib.sha256(f"trustcase-improve:{use_case_id}".encode()).hexdigest()
    out = []
    for i in ids:
        for text in (f"{data_sha256}:{i}", f"{improve}:{i}", i, f":{i}", f"{use_case_id}:{i}"):
            out.append(hashlib.sha256(text.encode()).hexdigest()[:16].encode())
    return out


def prefect_rows(since, failed: bool = True) -> str:
    """Every row Prefect's database (the harness's SQLite file, WAL included) gained since `since` (UTC), as
    text, once the task run states and logs sent by this process have landed (`failed`: a failed task run's
    state among them). Rows of earlier tests of the session are left out: they are not this run's."""
    import sqlite3
    import time

    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker
    from prefect.settings import PREFECT_SERVER_DATABASE_CONNECTION_URL

    def when(value) -> datetime:
        t = datetime.fromisoformat(str(value).replace(" ", "T"))
        return t if t.tzinfo else t.replace(tzinfo=UTC)

    APILogWorker.drain_all(timeout=10)
    EventsWorker.drain_all(timeout=10)
    db = PREFECT_SERVER_DATABASE_CONNECTION_URL.value().split(":///", 1)[1]
    deadline, seen = time.monotonic() + 60, -1
    while True:
        con = sqlite3.connect(db)
        try:
            rows = []
            for (table,) in con.execute("select name from sqlite_master where type = 'table'").fetchall():
                cols = [c[1] for c in con.execute(f"pragma table_info('{table}')")]
                if "created" in cols:
                    at = cols.index("created")
                    rows += [(table, r) for r in con.execute(f"select * from '{table}'") if when(r[at]) >= since]
        finally:
            con.close()
        states = any(t == "task_run_state" and "FAILED" in r for t, r in rows)
        logged = any(t == "log" for t, _ in rows)
        settled = len(rows) == seen  # the server writes states from events, a little later: until nothing changes
        if ((states and logged) or not failed) and settled or time.monotonic() > deadline:
            return "\n".join(f"{t}: {r!r}" for t, r in rows)
        seen = len(rows)
        time.sleep(1.0)


@flow
@pytest.mark.slow
def test_24_2_3_5_a_confidential_partner_case_leaves_no_id_path_or_recomputable_hash(tmp_path, tiny_model,
                                                                                      monkeypatch):
    """Issue 24, Why 2, 3, 5: ids with spaces (`lot 8/cell_00009.png`) and a data folder `ACME Corp secret/` were
    not redacted (split into tokens); numeric ids broke the record (`35` hashed inside `12:59:35`); the other ids
    were hashed with the public data hash; a failing check's message put ids in Prefect's task_run_state and log
    rows, and the flow run's parameters held the use case's path. Walk every output, the MLflow store (registry
    included), the result cache and Prefect's database rows for every raw id, the folder and every hash of an id
    computable without the site's secret."""
    from trustcase.data.streaming import DataSource
    from trustcase.flows.confidential import item_ids
    from trustcase.schemas import load_use_case

    secret_dir = tmp_path / "ACME Corp secret"
    secret_dir.mkdir()
    (secret_dir / "secret_loader.py").write_text(SECRET_LOADER.format(solar=str(SOLAR)))
    (secret_dir / "leaky_check.py").write_text(LEAKY_CHECK)
    monkeypatch.setenv("TRUSTCASE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("TRUSTCASE_SALT", "a secret of the site")
    raw = tiny_use_case(secret_dir, tiny_model, confidentiality="confidential")
    raw["data"].update(loader="secret_loader:load_split", path=".", params={"size": 32},
                       max_samples={"train": 60, "validation": 30, "test": 40})
    raw["requirements"] = [{"id": "R1", "text": "accuracy", "metric": "accuracy", "comparator": ">=",
                            "threshold": 0.5}]
    raw["plan"]["checks"] = [
        {"check": "data_quality"}, {"check": "performance"},
        {"check": "randomized_smoothing", "params": {"sigma": 0.12, "n0": 8, "n": 16, "max_items": 8}},
        {"check": "root_causes", "params": {"k": 2, "noun": "cells"}},
        {"check": "leaky_check:Leaky"},
    ]
    path = write_yaml(secret_dir / "use_case.yaml", raw)
    uc = load_use_case(path)
    ids = item_ids(DataSource(uc.data, uc.plan.seed, uc.model))
    spaced = {i for i in ids if " " in i}
    assert len(spaced) == 70 and sum(i.isdigit() for i in ids) == 60  # 30 + 40 ids with a space, 60 numbers
    store = tmp_path / "mlflow"
    uri = f"sqlite:///{store / 'mlflow.db'}"
    started = datetime.now(UTC)
    r = assess(str(path), str(tmp_path / "out"), None, uri)
    # the leaky check failed (its message redacted), every other check ran and the record validates
    assert not r.complete and len(r.errors) == 1 and r.errors[0].startswith("leaky: CheckError: items item-"), r.errors
    a = Assessment.model_validate_json((tmp_path / "out" / "assessment.json").read_text())
    assert {o.check for o in a.outcomes} >= {"performance", "root_causes", "randomized_smoothing"}
    assert a.provenance.started_at.year > 2000  # the timestamps are the times (no id hashed inside them)
    assert re.search(rb"item-[0-9a-f]{16}", (tmp_path / "out" / "checks" / "root_causes" / "clusters.csv").read_bytes())
    secrets = [b"ACME Corp secret", str(secret_dir).encode(), str(SOLAR).encode()]
    secrets += [i.encode() for i in spaced] + [i.split("/")[-1].encode() for i in spaced]
    secrets += recomputable(ids, uc.id, a.provenance.data_sha256)
    walked = 0
    from prefect.settings import PREFECT_LOCAL_STORAGE_PATH

    for root in (tmp_path / "out", store, tmp_path / "cache", Path(PREFECT_LOCAL_STORAGE_PATH.value())):
        for where, data in everything(root):
            walked += 1
            for s in secrets:
                assert s not in data, (where, s)
    assert walked > 40
    rows = prefect_rows(started).encode()
    assert b"failed the screening" in rows, "the failed task's state and log rows are in Prefect's database"
    assert b"confidential use case" in rows  # the flow run's parameters: a handle, not the path
    for s in secrets:
        assert s not in rows, s


SIMPLE_CHECK = '''
from trustcase.checks import Check, Params
from trustcase.schemas import CheckOutcome


class Simple(Check):
    """A partner check whose figure comes from a module it imports when it runs."""

    name = "simple"
    Params = Params

    @classmethod
    def produces(cls, params, use_case):
        return []

    def run(self, ctx):
        from mylogic import VALUE

        return CheckOutcome(check=self.name, summary={"value": VALUE})
'''


@flow
@pytest.mark.slow
def test_24_1_a_cached_result_follows_the_code_and_the_weights_it_depends_on(tmp_path, tiny_model, tracking_uri,
                                                                             monkeypatch):
    """Issue 24, Why 1: the cache keyed on the model file and the factory's own module: a changed module the
    factory imports (netparts.py) gave back the cached accuracy; so did a partner check whose imported logic
    changed; an ONNX model whose external weights were negated kept its model_sha256 and its cached result.
    Each assessment here stands for a new `trustcase assess` process (modules imported afresh)."""
    import sys

    import torch
    from test_hostile_probe import NETDEF, NETPARTS, negate_weights, onnx_with_external_weights

    from trustcase.flows import assess as flow_module

    def new_process():
        for m in ("netdef", "netparts", "mychecks", "mylogic"):
            sys.modules.pop(m, None)
        flow_module._classifier.cache_clear()

    def outcome(out: Path, check: str) -> dict:
        a = Assessment.model_validate_json((out / "assessment.json").read_text())
        return next(o for o in a.outcomes if o.check == check).summary

    folder = tmp_path / "partner"
    folder.mkdir()
    monkeypatch.syspath_prepend(str(folder))
    (folder / "netdef.py").write_text(NETDEF)
    (folder / "netparts.py").write_text(NETPARTS.format(sign=1))
    (folder / "mychecks.py").write_text(SIMPLE_CHECK)
    (folder / "mylogic.py").write_text("VALUE = 1\n")
    torch.manual_seed(0)
    import netdef

    torch.save(netdef.build().state_dict(), folder / "net.pt")
    raw = tiny_use_case(folder, folder / "net.pt")
    raw["model"].update(format="state_dict", factory="netdef:build", factory_args={"size": 32})
    raw["data"]["max_samples"] = {"train": 40, "validation": 20, "test": 60}
    raw["requirements"] = [{"id": "R1", "text": "accuracy", "metric": "accuracy", "comparator": ">=",
                            "threshold": 0.5}]
    raw["plan"]["checks"] = [{"check": "performance"}, {"check": "mychecks:Simple"}]
    path = write_yaml(folder / "use_case.yaml", raw)
    out = tmp_path / "out"
    new_process()
    assess(str(path), str(out), None, tracking_uri)
    before = claim(out)["value"]
    assert outcome(out, "simple") == {"value": 1}
    (folder / "netparts.py").write_text(NETPARTS.format(sign=-1))  # the factory's import: logits negated
    new_process()
    assess(str(path), str(out), None, tracking_uri)
    assert claim(out)["value"] == pytest.approx(1 - before) and before != pytest.approx(0.5)
    (folder / "mylogic.py").write_text("VALUE = 2\n")  # the partner check's import
    new_process()
    assess(str(path), str(out), None, tracking_uri)
    assert outcome(out, "simple") == {"value": 2}
    # an ONNX model whose weights live beside it
    onnx_dir = tmp_path / "onnx"
    onnx_dir.mkdir()
    model = onnx_with_external_weights(onnx_dir, np.random.default_rng(1).normal(size=(2, 32 * 32)))
    raw = tiny_use_case(onnx_dir, model)
    raw["model"]["format"] = "onnx"
    raw["data"]["max_samples"] = {"train": 40, "validation": 20, "test": 60}
    raw["requirements"] = [{"id": "R1", "text": "accuracy", "metric": "accuracy", "comparator": ">=",
                            "threshold": 0.5}]
    raw["plan"]["checks"] = [{"check": "performance"}]
    path = write_yaml(onnx_dir / "use_case.yaml", raw)
    out = tmp_path / "out-onnx"
    assess(str(path), str(out), None, tracking_uri)
    first = Assessment.model_validate_json((out / "assessment.json").read_text())
    negate_weights(onnx_dir / "model.weights")
    assess(str(path), str(out), None, tracking_uri)
    second = Assessment.model_validate_json((out / "assessment.json").read_text())
    assert second.provenance.model_sha256 != first.provenance.model_sha256
    assert claim(out)["value"] == pytest.approx(1 - next(e.value for e in first.evidence if e.claim_id == "R1"))

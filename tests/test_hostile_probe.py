"""Issue 24: the twelve defects of the second hostile probe, and the smaller ones beside them, each reproduced
as it was seen. Flow-level reproductions (cache keys, confidential redaction, Prefect's records) are in
tests/test_security.py; the pack's (zip bomb, malformed manifests) in tests/test_pack.py."""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import SOLAR, context_for, folder_use_case, save_png, tiny_use_case, write_yaml
from test_monitor_cli import monitor_file  # noqa: F401  (fixture: a fitted monitor and its TorchScript model)
from typer.testing import CliRunner

from trustcase.checks.data_quality import DataQuality, DataQualityParams
from trustcase.cli import app
from trustcase.data.streaming import DataSource
from trustcase.flows.preflight import preflight
from trustcase.schemas import UseCase, UseCaseError, load_use_case


def problems_of(path) -> list[str]:
    with pytest.raises(UseCaseError) as e:
        load_use_case(path)
    return [str(p) for p in e.value.problems]


# --- 9: duplicate keys --------------------------------------------------------------------------------------

def test_9_a_duplicate_key_is_an_error_naming_both_lines(tmp_path):
    """Why 9: `threshold: 0.99` then `threshold: 0.01`, and `confidentiality: confidential` then `public`,
    validated: the last one won, silently (the second ran a confidential case as public)."""
    lines = yaml.safe_dump(yaml.safe_load((SOLAR / "use_case.yaml").read_text()), sort_keys=False).splitlines()
    at = next(i for i, s in enumerate(lines) if s.strip().startswith("threshold:") and i > lines.index("requirements:"))
    lines.insert(at, lines[at].split("threshold:")[0] + "threshold: 0.99")
    lines[1:1] = ["confidentiality: confidential", "confidentiality: public"]
    line = at + 3  # 1-based, after the two lines inserted above it
    path = tmp_path / "uc.yaml"
    path.write_text("\n".join(lines) + "\n")
    found = problems_of(path)
    assert any("duplicate key 'confidentiality'" in p and "line 2 and again on line 3" in p for p in found), found
    want = f"requirements[0].threshold: duplicate key 'threshold': given on line {line} and again on line {line + 1}"
    assert any(want in p for p in found), found


# --- 10: relative data.params paths -------------------------------------------------------------------------

def test_10_relative_data_params_are_relative_to_the_use_case_file(tmp_path, monkeypatch):
    """Why 10: `root: imgs` followed the working directory: PASS from the use case's folder, FAIL from a folder
    holding an imgs/ of its own, both records saying `root: imgs`."""
    case = tmp_path / "case"
    raw = folder_use_case(case)
    raw["data"]["params"]["root"] = "imgs"
    save_png(case / "imgs" / "test" / "ok" / "a.png", np.zeros((16, 16), np.uint8))
    path = write_yaml(case / "uc.yaml", raw)
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "imgs").mkdir(parents=True)
    monkeypatch.chdir(elsewhere)
    uc = load_use_case(path)
    assert uc.data.params["root"] == str((case / "imgs").resolve())  # the record holds the resolved path
    # a relative path that exists only under the working directory would make the result depend on it
    raw["data"]["params"]["root"] = "only_here"
    (elsewhere / "only_here").mkdir()
    found = problems_of(write_yaml(case / "uc2.yaml", raw))
    assert any("data.params.root" in p and "relative to the file's folder" in p for p in found), found
    # a string that names nothing is left alone (it need not be a path)
    raw["data"]["params"]["root"] = "imgs"
    raw["data"]["params"]["kind"] = "grey"
    assert load_use_case(write_yaml(case / "uc3.yaml", raw)).data.params["kind"] == "grey"


# --- smaller: seeds, impossible claims, absurd inputs ---------------------------------------------------------

@pytest.mark.parametrize("seed", [-1, 2**70])
def test_a_seed_out_of_range_is_a_located_error(tmp_path, tiny_model, seed):
    """Seed -1 or 2**70 ended in an internal error instead of exit 2, in the file and as --seed."""
    raw = tiny_use_case(tmp_path, tiny_model)
    raw["plan"]["seed"] = seed
    found = problems_of(write_yaml(tmp_path / "uc.yaml", raw))
    assert any("plan.seed" in p for p in found), found
    raw["plan"]["seed"] = 0
    path = write_yaml(tmp_path / "ok.yaml", raw)
    with pytest.raises(UseCaseError, match="not a seed"):
        preflight(path, seed)
    r = CliRunner().invoke(app, ["validate", str(path), "--seed", str(seed)])
    assert r.exit_code == 2 and "not a seed" in r.output, r.output


@pytest.mark.parametrize("comparator, threshold", [(">=", 1.5), (">", 1.0), ("<=", -0.1), ("<", 0.0)])
def test_a_claim_on_a_proportion_that_can_never_pass_is_refused(tmp_path, comparator, threshold):
    raw = yaml.safe_load((SOLAR / "use_case.yaml").read_text())
    raw["requirements"][0].update(metric="accuracy", comparator=comparator, threshold=threshold)
    found = problems_of(write_yaml(tmp_path / "uc.yaml", raw))
    assert any("requirements[0]" in p and "can never pass" in p for p in found), found


def test_an_absurd_input_shape_is_refused_before_allocating(tmp_path):
    raw = yaml.safe_load((SOLAR / "use_case.yaml").read_text())
    raw["model"]["input_shape"] = [1, 60000, 60000]
    found = problems_of(write_yaml(tmp_path / "uc.yaml", raw))
    assert any("model.input_shape" in p and "3,600,000,000 values" in p for p in found), found


# --- 7 and 8: labels that are not class indices --------------------------------------------------------------

LABELS = """
import numpy as np
from trustcase.data.streaming import Item


class Split:
    def __init__(self, labels): self.labels = labels
    def __len__(self): return len(self.labels)
    def __getitem__(self, i):
        return Item(image=np.full((8, 8), 10.0 * i, np.float32), label=self.labels[i], id=f"cell{i}")
    def name(self, i): return f"cell{i}"


def load(split, kind):
    labels = {"fraction": [0.9, 0.1] * 5, "negative": [0, 1, 0, -1, 1, 0, 1, 0, 1, 0],
              "fine": [True, False, np.int64(1), np.uint8(0), 1.0, 0, 1, 0, 1, 0]}[kind]
    return Split(labels)
"""


def labels_case(tmp_path, kind) -> UseCase:
    (tmp_path / "labels_loader.py").write_text(textwrap.dedent(LABELS))
    raw = folder_use_case(tmp_path, size=8)
    raw["data"] = {"loader": "labels_loader:load", "path": str(tmp_path), "params": {"kind": kind},
                   "splits": {"train": "train", "test": "test"}, "batch_size": 4}
    return UseCase.model_validate(raw)


def test_7_fractional_labels_are_refused_per_item_never_truncated(tmp_path):
    """Why 7: labels 0.9 / 0.1 became 0 / 0; the test split counted 60 functional, 0 defective, and PASSED."""
    uc = labels_case(tmp_path, "fraction")
    stream = DataSource(uc.data, 0, uc.model).stream("test")
    assert sum(len(b) for b in stream.batches()) == 0
    assert len(stream.unreadable) == 10 and all(u.kind == "label" for u in stream.unreadable)
    assert "label 0.9 is not a class index" in stream.unreadable[0].error
    fine = labels_case(tmp_path, "fine")
    labels = [int(x) for b in DataSource(fine.data, 0, fine.model).stream("test").batches() for x in b.labels]
    assert labels == [1, 0, 1, 0, 1, 0, 1, 0, 1, 0]  # bools, numpy integers and 1.0 are class indices


def test_7_the_preflight_refuses_a_label_that_is_not_a_class_index(tmp_path):
    path = write_yaml(tmp_path / "uc.yaml", labels_case(tmp_path, "fraction").model_dump(mode="json"))
    found = problems_of_preflight(path)
    assert any("data.splits.test" in p and "label 0.9 is not a class index" in p for p in found), found


def problems_of_preflight(path) -> list[str]:
    with pytest.raises(UseCaseError) as e:
        preflight(path)
    return [str(p) for p in e.value.problems]


def test_8_a_negative_label_is_named_and_excluded_and_data_quality_completes(tmp_path):
    """Why 8: label -1 on one item gave OverflowError in data quality: INCOMPLETE, exit 1."""
    uc = labels_case(tmp_path, "negative")
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 2))
    out = DataQuality(DataQualityParams())(context_for(uc, net, tmp_path / "w"))
    got = {(m.metric, m.scope.split): m.value for m in out.measurements}
    assert got[("items", "test")] == 9 and got[("unreadable", "test")] == 1
    assert any(line.startswith("cell3: label -1 is not a class index") for line in out.summary["unreadable"]["test"])


# --- 6: the lab's Host header -------------------------------------------------------------------------------

def test_6_explore_answers_only_to_the_names_it_was_started_for(tmp_path):
    """Why 6: requests with `Host: evil.example.com` were served, the precondition of DNS rebinding on a loopback
    server (a page of evil.example.com, its name rebound to 127.0.0.1, reads the lab as its own origin)."""
    from fastapi.testclient import TestClient

    from trustcase.explore import build

    web, _ = build(None, f"sqlite:///{tmp_path / 'mlflow.db'}", cache=tmp_path / "cache")
    with TestClient(web, base_url="http://127.0.0.1:8765") as c:
        assert c.get("/").status_code == 200
        for host in ("localhost:8765", "[::1]:8765", "LOCALHOST"):
            assert c.get("/", headers={"host": host}).status_code == 200, host
        for host in ("evil.example.com", "evil.example.com:8765", "127.0.0.1.evil.example.com", ""):
            r = c.get("/", headers={"host": host})
            assert r.status_code == 400 and "unknown Host header" in r.text, host
    # started for another address: that one only
    web, _ = build(None, f"sqlite:///{tmp_path / 'mlflow.db'}", token="s3cret", cache=tmp_path / "cache",
                   host="10.0.0.5")
    with TestClient(web, base_url="http://10.0.0.5:8765") as c:
        assert c.get("/?token=s3cret").status_code == 200
        assert c.get("/?token=s3cret", headers={"host": "evil.example.com"}).status_code == 400


# --- 11: a tampered MLflow record ---------------------------------------------------------------------------

def test_11_report_refuses_a_record_that_contradicts_its_run(tmp_path, tracking_uri):
    """Why 11: assessment.json edited in the MLflow store from FAIL to PASS rendered a PASS report, exit 0, though
    the run's own `verdict` and `pack.manifest_sha256` tags contradict it."""
    import json

    import mlflow
    from test_argument import assessment
    from test_report import with_check_output

    from trustcase.reports import pack_digest, render

    mlflow.set_tracking_uri(tracking_uri)
    exp = mlflow.create_experiment("tampered", artifact_location=(tmp_path / "art").as_uri())
    with mlflow.start_run(experiment_id=exp) as run:
        folder = tmp_path / "run"
        a = with_check_output(assessment({"F-cert": "FAIL"}, mlflow_run_id=run.info.run_id), folder)
        (folder / "assessment.json").write_text(a.model_dump_json(indent=1))
        files = render(a, folder, pdf=False)
        mlflow.log_artifacts(str(folder))
        mlflow.set_tags({"pack.manifest_sha256": pack_digest(Path(files["pack"])), "verdict": "FAIL"})
    runner = CliRunner()
    args = ["report", run.info.run_id, "--tracking-uri", tracking_uri]
    ok = runner.invoke(app, [*args, "--out", str(tmp_path / "ok")])
    assert ok.exit_code == 0, ok.output
    forged = json.loads((folder / "assessment.json").read_text())
    forged["verdict"] = "PASS"
    for e in forged["evidence"]:
        e["verdict"] = "PASS"
    edited = tmp_path / "edit" / "assessment.json"
    edited.parent.mkdir()
    edited.write_text(json.dumps(forged, indent=1))
    client = mlflow.MlflowClient(tracking_uri)
    client.log_artifact(run.info.run_id, str(edited))
    bad = runner.invoke(app, [*args, "--out", str(tmp_path / "bad")])
    assert bad.exit_code == 2 and "contradicts the run" in bad.output, bad.output
    assert "verdict PASS, the run's verdict tag FAIL" in bad.output
    assert not (tmp_path / "bad" / "report.html").exists()
    # the verdict tag removed too: the pack its digest anchors still tells
    client.delete_tag(run.info.run_id, "verdict")
    bad = runner.invoke(app, [*args, "--out", str(tmp_path / "bad2")])
    assert bad.exit_code == 2 and "differs from the one in the pack" in bad.output, bad.output
    # the pack rebuilt from the run is refused the same way
    res = runner.invoke(app, ["pack", run.info.run_id, "-o", str(tmp_path / "p.zip"), "--tracking-uri", tracking_uri])
    assert res.exit_code == 2 and "contradicts the run" in res.output, res.output


# --- 1: what a cached result depends on --------------------------------------------------------------------

NETDEF = """
import torch
import netparts


def build(size=32):
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(size * size, 2), netparts.Head())
"""

NETPARTS = """
import torch

SIGN = {sign}


class Head(torch.nn.Module):
    def forward(self, x):
        return SIGN * x
"""


def onnx_with_external_weights(folder, weights: np.ndarray):
    """A Flatten + Gemm ONNX model whose weights live in model.weights beside model.onnx."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(weights.astype(np.float32), "W")
    b = numpy_helper.from_array(np.zeros(2, np.float32), "B")
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["x"], ["f"]), helper.make_node("Gemm", ["f", "W", "B"], ["y"], transB=1)],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 32, 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])], [w, b])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    onnx.save_model(model, str(folder / "model.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="model.weights", size_threshold=0)
    return folder / "model.onnx"


def negate_weights(path):
    """What the probe did: the weights file rewritten in place, every value negated; model.onnx untouched."""
    path.write_bytes((-np.frombuffer(path.read_bytes(), np.float32)).tobytes())


def test_1_model_sha256_identifies_weights_kept_outside_the_onnx_file(tmp_path):
    """Why 1: an ONNX model with its weights in model.weights had them negated: same recorded model_sha256."""
    from trustcase.flows.provenance import model_sha256
    from trustcase.models.classifier import sha256_file
    from trustcase.schemas import ModelSpec

    w = np.random.default_rng(0).normal(size=(2, 32 * 32))
    path = onnx_with_external_weights(tmp_path, w)
    spec = ModelSpec(format="onnx", path=path, input_shape=[1, 32, 32], class_names=["ok", "bad"],
                     critical_class="bad")
    before, file_before = model_sha256(spec), sha256_file(path)
    negate_weights(tmp_path / "model.weights")
    assert sha256_file(path) == file_before  # the .onnx file itself did not change
    assert model_sha256(spec) != before


def test_1_the_code_key_covers_what_the_factory_and_partner_checks_import(tmp_path, monkeypatch):
    """Why 1: a module the factory imports (netdef.py importing netparts.py) changed, the cached result came back;
    so did a partner check's changed result. The key covers the import closure of partner code."""
    import importlib
    import sys

    from trustcase.flows.provenance import Uncacheable, code_closure

    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "netdef.py").write_text(NETDEF)
    (tmp_path / "netparts.py").write_text(NETPARTS.format(sign=1))
    (tmp_path / "mychecks.py").write_text("def helper():\n    from mylogic import VALUE\n    return VALUE\n")
    (tmp_path / "mylogic.py").write_text("VALUE = 1\n")
    for m in ("netdef", "netparts", "mychecks", "mylogic"):
        sys.modules.pop(m, None)
    importlib.import_module("netdef")
    importlib.import_module("mychecks")
    first = code_closure(["netdef", "mychecks"])
    assert {k.split(":")[0] for k in first} == {"netdef", "netparts", "mychecks", "mylogic"}  # not torch, not stdlib
    (tmp_path / "netparts.py").write_text(NETPARTS.format(sign=-1))
    second = code_closure(["netdef", "mychecks"])
    (tmp_path / "mylogic.py").write_text("VALUE = 2\n")
    third = code_closure(["netdef", "mychecks"])
    assert first != second != third
    # partner code without a source to hash cannot key a result: said, not guessed
    (tmp_path / "compiled.cpython-311-x86_64-linux-gnu.so").write_bytes(b"\0")
    (tmp_path / "usescompiled.py").write_text("import compiled\n")
    with pytest.raises(Uncacheable, match="compiled"):
        code_closure(["usescompiled"])
    for m in ("netdef", "netparts", "mychecks", "mylogic"):
        sys.modules.pop(m, None)


# --- smaller: monitor headers ---------------------------------------------------------------------------------

def _rewritten(source, tmp_path, name, edit):
    import json

    from safetensors import safe_open
    from safetensors.numpy import save_file

    with safe_open(str(source), framework="np") as f:
        head, arrays = json.loads(f.metadata()["trustcase_monitor"]), {k: f.get_tensor(k) for k in f.keys()}
    edit(head)
    path = tmp_path / f"{name}.safetensors"
    save_file(arrays, str(path), metadata={"trustcase_monitor": json.dumps(head)})
    return path


@pytest.mark.parametrize("name, edit, fragment", [
    ("no_specification", lambda h: h.pop("specification"), "no specification limits"),
    ("no_limit_name", lambda h: h["specification"]["limits"][0].pop("name"), "limit 0 has no name"),
    ("nan_near", lambda h: h["learned"].update(near=float("nan")), "learned thresholds near nan"),
    ("inf_out", lambda h: h["learned"].update(out=float("inf")), "learned thresholds"),
    ("nan_limit", lambda h: h["specification"]["limits"][1].update(max=float("nan")), "must be finite numbers"),
    ("no_scale", lambda h: h["learned"].pop("scale"), "learned scale"),
    ("bad_sha", lambda h: h.update(model_sha256="x"), "model_sha256 is not a SHA-256"),
])
def test_a_malformed_monitor_header_is_refused(monitor_file, tmp_path, name, edit, fragment):  # noqa: F811
    """Issue 24 (smaller): monitor headers with missing fields or NaN thresholds were accepted or crashed."""
    from test_monitor_cli import _png, monitor

    from trustcase import odd

    path = _rewritten(monitor_file, tmp_path, name, edit)
    model = monitor_file.with_name("m.pt")
    with pytest.raises(odd.MonitorError, match="monitor header is malformed"):
        odd.Monitor.load(path, model)
    r = CliRunner().invoke(app, [*monitor(path)[:2], str(_png(tmp_path / "x.png", 120)), *monitor(monitor_file)[2:]])
    assert r.exit_code == 2 and fragment in r.output, r.output
    assert odd.Monitor.load(monitor_file, model) is not None  # the genuine header loads


def test_a_meta_key_the_monitor_does_not_know_is_refused(monitor_file, tmp_path):  # noqa: F811
    """Issue 24 (smaller): `--meta colour=red` was silently ignored."""
    from test_monitor_cli import _png, monitor

    image = str(_png(tmp_path / "x.png", 120))
    bad = CliRunner().invoke(app, [*monitor(monitor_file), image, "--meta", "colour=red"])
    assert bad.exit_code == 2 and "metadata 'colour': not a metadata descriptor" in bad.output, bad.output
    assert "cell_type" in bad.output
    ok = CliRunner().invoke(app, [*monitor(monitor_file), image, "--meta", "cell_type=mono"])
    assert ok.exit_code == 0, ok.output


def test_an_output_folder_that_is_a_file_is_a_user_error(tmp_path):
    """Issue 24 (smaller): `--out` an existing file ended in an internal error."""
    from trustcase.flows.assess import OutputFolderError, claim_folder

    (tmp_path / "taken").write_text("x")
    with pytest.raises(OutputFolderError, match="is a file, not a folder"):
        claim_folder(tmp_path / "taken", "solar_cells")


def test_a_tracking_uri_mlflow_cannot_open_is_a_user_error():
    """Issue 24 (smaller): `--tracking-uri garbage://x` ended in an internal error."""
    from trustcase.errors import UserError
    from trustcase.flows.tracking import configure

    with pytest.raises(UserError, match="no store for scheme 'garbage'"):
        configure("garbage://x")


# --- 2, 3, 4: the redactor (the flow-level walk is tests/test_security.py) --------------------------------------

def test_2_3_ids_and_paths_are_redacted_whole_and_by_field(monkeypatch):
    """Why 2: `lot 8/cell_00009.png` stayed raw and `ACME Corp secret/` became `<path withheld> Corp secret` (text
    split into tokens). Why 3: a numeric id `35` was hashed inside the timestamp `12:59:35`."""
    from trustcase.flows.confidential import Redactor, hash_id

    r = Redactor({"lot 8/cell_00009.png", "35", "7"}, "site secret", ["/data/ACME Corp secret"])
    h = hash_id("lot 8/cell_00009.png", "site secret")
    record = {"started_at": "2026-12-07T12:59:35.7+00:00", "model_sha256": "35" * 32, "ids": ["35", "7"],
              "limitations": ["lot 8/cell_00009.png: unreadable", "/data/ACME Corp secret/lot 8/cell_00009.png: NaN",
                              "35 of 7 items (n = 35)", "read /data/ACME Corp secret/imgs and /etc/other/file"]}
    out = r.json(record)
    assert out["started_at"] == record["started_at"] and out["model_sha256"] == record["model_sha256"]
    assert out["ids"] == [hash_id("35", "site secret"), hash_id("7", "site secret")]
    assert out["limitations"][0] == f"{h}: unreadable"
    assert out["limitations"][1] == f"{r.path('/data/ACME Corp secret')}/{h}: NaN"
    assert out["limitations"][2].startswith(hash_id("35", "site secret") + " of " + hash_id("7", "site secret"))
    assert "Corp secret" not in out["limitations"][3] and "<path withheld>" in out["limitations"][3]
    assert r.text("12:59:35 and 1.35 and v35") == "12:59:35 and 1.35 and v35"  # never inside another token


def test_4_every_hash_of_an_id_uses_the_site_secret(tmp_path, monkeypatch):
    """Why 4: improve hashed the ids of a confidential selection with sha256("trustcase-improve:" + use case id):
    recoverable from the public id. One secret per-site salt for every hash of an id."""
    import hashlib

    from trustcase.flows import confidential, improve, tracking

    monkeypatch.delenv("TRUSTCASE_SALT", raising=False)
    monkeypatch.setattr(tracking, "HOME", tmp_path / "home")
    from trustcase.schemas import Confidentiality

    uc = load_use_case(SOLAR / "use_case.yaml").model_copy(update={"confidentiality": Confidentiality.confidential})
    salt = confidential.salt(tracking.HOME)
    assert (tracking.HOME / "secrets" / "site.salt").stat().st_mode & 0o777 == 0o600
    assert confidential.salt(tmp_path / "home") == salt  # one per site, whatever the use case
    got = improve._ids(uc, ["cell0001.png"])
    assert got == [confidential.hash_id("cell0001.png", salt)]
    public = hashlib.sha256(f"trustcase-improve:{uc.id}".encode()).hexdigest()
    assert hashlib.sha256(f"{public}:cell0001.png".encode()).hexdigest()[:16] not in got[0]


def test_a_split_of_absurd_length_is_a_user_error_not_a_memory_error(tmp_path):
    """Issue 24 (smaller): a loader whose __len__ is 10**11 ended in MemoryError; with a cap it streams."""
    from trustcase.data.streaming import DataError

    (tmp_path / "huge_loader.py").write_text(textwrap.dedent("""
        import numpy as np
        from trustcase.data.streaming import Item

        class Huge:
            def __len__(self): return 10**11
            def __getitem__(self, i): return Item(image=np.zeros((8, 8), np.float32), label=0, id=f"x{i}")

        def load(split): return Huge()
    """))
    raw = folder_use_case(tmp_path, size=8)
    raw["data"] = {"loader": "huge_loader:load", "path": str(tmp_path), "splits": {"train": "train", "test": "test"}}
    uc = UseCase.model_validate(raw)
    with pytest.raises(DataError, match="100,000,000,000 items.*set data.max_samples.test"):
        DataSource(uc.data, 0, uc.model).stream("test")
    capped = UseCase.model_validate({**raw, "data": {**raw["data"], "max_samples": {"test": 5}}})
    assert len(DataSource(capped.data, 0, capped.model).stream("test")) == 5


def test_a_large_npy_goes_through_the_monitor_in_batches(monitor_file, tmp_path):  # noqa: F811
    """Issue 24 (smaller): a monitor .npy of 4,000 items went through the model in one pass."""
    from trustcase import odd

    mon = odd.Monitor.load(monitor_file, monitor_file.with_name("m.pt"))
    sizes = []
    real = mon.evaluate
    mon.evaluate = lambda x, meta=None: (sizes.append(len(x)), real(x, meta))[1]
    np.save(tmp_path / "many.npy", np.full((600, 8, 8), 120.0, np.float32))
    names = [n for n, _ in odd.evaluate_files(mon, [tmp_path / "many.npy"])]
    assert sizes == [256, 256, 88] and names[-1].endswith("many.npy[599]") and len(names) == 600


def test_the_lab_never_parses_a_huge_json_body(tmp_path):
    """Issue 24 (smaller): the lab parsed a 90 MB JSON body."""
    from fastapi.testclient import TestClient

    from trustcase.explore import build
    from trustcase.explore.app import MAX_JSON_BYTES

    web, _ = build(None, f"sqlite:///{tmp_path / 'mlflow.db'}", cache=tmp_path / "cache")
    with TestClient(web, base_url="http://127.0.0.1:8765") as c:
        body = b'{"src": "' + b"x" * (MAX_JSON_BYTES + 1) + b'"}'
        r = c.post("/api/perturb", content=body, headers={"content-type": "application/json"})
        assert r.status_code == 413 and "at most" in r.text
        chunked = c.post("/api/perturb", content=iter([body[:10], body[10:20]]),
                         headers={"content-type": "application/json"})
        assert chunked.status_code == 413
        assert c.post("/api/jobs/0000/cancel").status_code == 404  # a body-less POST goes through

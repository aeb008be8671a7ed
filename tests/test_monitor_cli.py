"""`trustcase monitor MONITOR INPUTS...`: per-input state and reasons, JSON lines, user errors exit 2."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from typer.testing import CliRunner

from trustcase.cli import app
from trustcase.data.streaming import Batch
from trustcase.models.classifier import sha256_file
from trustcase.models.loading import load_classifier
from trustcase.odd import monitor as odd
from trustcase.schemas import Descriptor, ModelSpec


def _batches(rng, n, size=40):
    for i in range(0, n, size):
        imgs = np.clip(rng.normal(120, 20, (size, 8, 8, 1)), 0, 255).astype(np.uint8)
        yield Batch(images=imgs, labels=(imgs.mean(axis=(1, 2, 3)) > 120).astype(np.int64),
                    ids=[str(j) for j in range(size)], meta={"cell_type": ["mono"] * size},
                    index=np.arange(i, i + size))


@pytest.fixture(scope="module")
def monitor_file(tmp_path_factory):
    folder = tmp_path_factory.mktemp("monitor")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.ReLU(), nn.Linear(8, 2)).eval()
    torch.jit.trace(model, torch.zeros(1, 1, 8, 8)).save(str(folder / "m.pt"))
    spec = ModelSpec(format="torchscript", path=folder / "m.pt", input_shape=[1, 8, 8], class_names=["ok", "bad"],
                     critical_class="bad")
    clf = load_classifier(spec)
    desc = [Descriptor(name="cell_type", source="metadata", values=["mono", "poly"]),
            Descriptor(name="brightness", unit="grey level", min=40, max=220, margin=15)]
    rng = np.random.default_rng(0)
    mon = odd.fit(clf, sha256_file(spec.path), odd.SpecificationMonitor.from_odd(desc), _batches(rng, 400),
                  _batches(rng, 400), rank=None)
    return mon.save(folder / "monitor.safetensors")


def monitor(monitor_file):
    """The command with the model the monitor was fitted for: a monitor file never names the model to load."""
    return ["monitor", str(monitor_file), "--model", str(monitor_file.with_name("m.pt"))]


def _png(path, value, side=8):
    rng = np.random.default_rng(int(value))
    Image.fromarray(np.clip(rng.normal(value, 5, (side, side)), 0, 255).astype(np.uint8)).save(path)
    return path


def test_classifies_a_folder_with_reasons(monitor_file, tmp_path):
    folder = tmp_path / "inputs"
    folder.mkdir()
    _png(folder / "a_dark.png", 20)
    _png(folder / "b_dim.png", 48)
    _png(folder / "c_fine.png", 120)
    np.save(folder / "d_batch.npy", np.full((2, 8, 8, 1), 120, np.uint8))
    r = CliRunner().invoke(app, [*monitor(monitor_file), str(folder), "--jsonl", "--meta", "cell_type=mono"])
    assert r.exit_code == 0, r.output
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert [row["input"].rsplit("/", 1)[-1] for row in rows] == ["a_dark.png", "b_dim.png", "c_fine.png",
                                                                 "d_batch.npy[0]", "d_batch.npy[1]"]
    assert rows[0]["state"] == "OUT" and any(x.startswith("brightness = ") and "< min 40" in x
                                             for x in rows[0]["reasons"])
    assert rows[1]["state"] in ("NEAR", "OUT") and any("within 15 of min 40" in x for x in rows[1]["reasons"])
    assert rows[2]["prediction"] in ("ok", "bad") and set(rows[2]["scores"]) == {"mahalanobis", "energy"}
    # the same decisions as the API
    mon = odd.Monitor.load(monitor_file, monitor_file.with_name("m.pt"))
    x = np.asarray(Image.open(folder / "a_dark.png"))
    assert mon.evaluate(x, {"cell_type": ["mono"]}).record(0)["state"] == "OUT"
    # plain output: one line per input with its state; without metadata the cell type cannot be checked
    r = CliRunner().invoke(app, [*monitor(monitor_file), str(folder / "c_fine.png")])
    assert r.exit_code == 0 and "c_fine.png" in r.stdout and "cell_type not given" in r.stdout


def test_user_errors_exit_2(monitor_file, tmp_path):
    runner = CliRunner()
    big = _png(tmp_path / "big.png", 120, side=16)
    r = runner.invoke(app, [*monitor(monitor_file), str(big)])
    assert r.exit_code == 2 and "16x16 px, the model takes 8x8" in r.output and "--resize" in r.output
    r = runner.invoke(app, [*monitor(monitor_file), str(big), "--resize", "--jsonl"])
    assert r.exit_code == 0 and json.loads(r.stdout)["state"]
    np.save(tmp_path / "wrong.npy", np.zeros((3, 5)))
    r = runner.invoke(app, [*monitor(monitor_file), str(tmp_path / "wrong.npy")])
    assert r.exit_code == 2 and "wrong.npy" in r.output and "does not fit" in r.output
    r = runner.invoke(app, [*monitor(monitor_file), str(tmp_path / "missing.png")])
    assert r.exit_code == 2 and "input not found" in r.output
    r = runner.invoke(app, ["monitor", str(big), str(big)])
    assert r.exit_code == 2 and "not a trustcase monitor file" in r.output
    r = runner.invoke(app, [*monitor(monitor_file), str(big), "--meta", "cell_type"])
    assert r.exit_code == 2 and "KEY=VALUE" in r.output


def test_a_nan_input_is_out_and_the_rest_of_the_folder_goes_on(monitor_file, tmp_path):
    """It was "model produced NaN/inf logits", exit 2, file not named, and nothing after it judged."""
    folder = tmp_path / "inputs"
    folder.mkdir()
    nan = np.full((8, 8, 1), 120.0, np.float32)
    nan[3, 3] = np.nan
    np.save(folder / "a_nan.npy", nan)
    _png(folder / "b_fine.png", 120)
    np.save(folder / "c_empty.npy", np.zeros((0, 8, 8, 1), np.float32))
    np.save(folder / "d_objects.npy", np.array([{"x": 1}], dtype=object), allow_pickle=True)
    np.save(folder / "e_strings.npy", np.full((8, 8), "grey"))
    _png(folder / "f_fine.png", 130)
    r = CliRunner().invoke(app, [*monitor(monitor_file), str(folder), "--jsonl", "--meta", "cell_type=mono"])
    rows = {json.loads(line)["input"].rsplit("/", 1)[-1]: json.loads(line) for line in r.stdout.splitlines()}
    assert list(rows) == ["a_nan.npy", "b_fine.png", "c_empty.npy", "d_objects.npy", "e_strings.npy", "f_fine.png"]
    assert rows["a_nan.npy"]["state"] == "OUT" and "1 NaN/inf value" in rows["a_nan.npy"]["reasons"][0]
    assert "error" not in rows["a_nan.npy"] and "prediction" not in rows["a_nan.npy"]
    assert rows["b_fine.png"]["prediction"] in ("ok", "bad") and rows["f_fine.png"]["prediction"] in ("ok", "bad")
    assert "holds no value" in rows["c_empty.npy"]["error"]
    assert "allow_pickle" in rows["d_objects.npy"]["error"] or "Object arrays" in rows["d_objects.npy"]["error"]
    assert "expected numbers" in rows["e_strings.npy"]["error"]
    assert r.exit_code == 2 and "3 input file(s) could not be judged" in r.output and "Traceback" not in r.output


def test_the_api_keeps_every_decision_of_a_batch_with_a_nan_item(monitor_file):
    mon = odd.Monitor.load(monitor_file, monitor_file.with_name("m.pt"))
    rng = np.random.default_rng(1)
    x = np.clip(rng.normal(120, 20, (4, 8, 8, 1)), 0, 255).astype(np.float32)
    alone = [mon.evaluate(x[i], {"cell_type": ["mono"]}).record(i * 0) for i in range(4)]
    x[2, 0, 0, 0] = np.inf
    d = mon.evaluate(x, {"cell_type": ["mono"] * 4})
    assert d.record(2)["state"] == "OUT" and "NaN/inf" in d.record(2)["reasons"][0]
    for i in (0, 1, 3):  # the same decisions as each input alone (scores up to float rounding across batch sizes)
        got, ref = d.record(i), alone[i]
        assert {k: got[k] for k in ("state", "reasons", "prediction")} == {k: ref[k] for k in ("state", "reasons",
                                                                                                "prediction")}
        assert got["scores"] == pytest.approx(ref["scores"], rel=1e-4)
    with pytest.raises(odd.MonitorError, match=r"meta\['cell_type'\] must hold one value per input \(4\), got 3"):
        mon.evaluate(x, {"cell_type": ["mono"] * 3})

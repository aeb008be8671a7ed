"""`trustcase monitor` with a detector's ODD monitor, end to end: a tiny detection case on image files (grey strips
with one bright square each, Pascal VOC boxes), a real TorchScript detector exporting its backbone's features, the
monitor fitted by the `odd_monitor` check, then the command on image files: IN for the case's own images, OUT with
the reasons for images brighter than the ODD, and the documented exit codes (0 every input judged, 2 a user error
or an input that could not be judged)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from trustcase.checks import Context, build
from trustcase.cli import app
from trustcase.data.streaming import DataSource
from trustcase.schemas import CheckSpec, UseCase
from trustcase.tasks import task_of
from trustcase.testing import SquareDetector

SIDE, SQUARE = 32, 9  # images, and the defect square's side in pixels

LOADER = '''
from pathlib import Path
from trustcase.data.annotations import VOCDetection

def load(split, root):
    return VOCDetection(Path(root) / split / "images", Path(root) / split / "annotations", ["spot", "scratch"])
'''


def _strip(rng: np.random.Generator, background: float) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """A grey strip of about `background` grey levels with one square of 200 at a random place, and its box."""
    image = np.clip(rng.normal(background, 3.0, (SIDE, SIDE)), 0, 255)
    x, y = (int(v) for v in rng.integers(0, SIDE - SQUARE, 2))
    image[y:y + SQUARE, x:x + SQUARE] = 200.0
    return image.round().astype(np.uint8), (x, y, x + SQUARE, y + SQUARE)


def _split(root, split: str, n: int, rng: np.random.Generator) -> None:
    images, ann = root / split / "images", root / split / "annotations"
    images.mkdir(parents=True)
    ann.mkdir()
    for k in range(n):
        image, (a, b, c, d) = _strip(rng, rng.normal(100.0, 4.0))
        Image.fromarray(image).save(images / f"spot_{k}.png")
        (ann / f"spot_{k}.xml").write_text(
            f"<annotation><size><width>{SIDE}</width><height>{SIDE}</height></size><object><name>spot</name>"
            f"<bndbox><xmin>{a}</xmin><ymin>{b}</ymin><xmax>{c}</xmax><ymax>{d}</ymax></bndbox></object>"
            "</annotation>")


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """(folder, detector file, monitor file): the odd_monitor check's monitor of a box-filter detector (a Conv2d
    whose window is the square's side; its features: the filtered map's mean and max) on the tiny case."""
    folder = tmp_path_factory.mktemp("detmon")
    rng = np.random.default_rng(0)
    for split, n in (("train", 48), ("validation", 48), ("test", 12)):
        _split(folder / "data", split, n, rng)
    (folder / "spotloader.py").write_text(LOADER)
    torch.jit.script(SquareDetector(3 * SQUARE).eval()).save(str(folder / "det.pt"))
    uc = UseCase.model_validate({
        "id": "spots", "title": "Spots", "owner": "o", "criticality": "low", "intended_function": "find spots",
        "task": "detection",
        "model": {"format": "torchscript", "path": str(folder / "det.pt"), "input_shape": [1, SIDE, SIDE],
                  "value_range": [0, 255], "class_names": ["spot", "scratch"], "critical_class": "spot",
                  "score_threshold": 0.5},
        "data": {"loader": "spotloader:load", "path": str(folder), "params": {"root": str(folder / "data")},
                 "splits": {"train": "train", "validation": "validation", "test": "test"}},
        "odd": {"descriptors": [{"name": "brightness", "unit": "grey level", "min": 60, "max": 160, "margin": 5}]},
        "requirements": [{"id": "M1", "text": "t", "metric": "false_alarm_rate", "comparator": "<=",
                          "threshold": 0.5}],
        "plan": {"checks": [{"check": "odd_monitor"}]}})
    model = task_of(uc).load_model(uc.model)
    found = model.detect(np.stack([_strip(np.random.default_rng(1), 100.0)[0][..., None]]), ["probe"])[0]
    assert len(found) and found[0, 4] > 0.5  # the detector finds the square: a working detector, not a stub
    check = build(CheckSpec(check="odd_monitor", params={"perturbations": {"brightness": [0.3]},
                                                         "boundary": {"brightness": 0.1}}))
    out = check(Context(use_case=uc, model=model, data=DataSource(uc.data, 0, uc.model), seed=0,
                        workdir=folder / "checks" / "odd_monitor"))
    assert out.summary["feature_mode"] == "backbone"
    [art] = [a for a in out.artefacts if a.path.endswith("monitor.safetensors")]
    return folder, folder / "det.pt", folder / "checks" / art.path


def _inputs(folder, fitted_folder, brighter: int = 0) -> list:
    """The case's test images as they are, and as many copies `brighter` grey levels brighter."""
    folder.mkdir(exist_ok=True)
    out = []
    for path in sorted((fitted_folder / "data" / "test" / "images").glob("*.png")):
        image = np.asarray(Image.open(path)).astype(np.int64)
        target = folder / f"{'bright_' if brighter else ''}{path.name}"
        Image.fromarray(np.clip(image + brighter, 0, 255).astype(np.uint8)).save(target)
        out.append(target)
    return out


def _run(*args) -> tuple[int, list[dict], str]:
    r = CliRunner().invoke(app, ["monitor", *map(str, args), "--jsonl"])
    lines = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    return r.exit_code, lines, r.output


def test_the_monitor_lets_the_case_images_in_and_stops_brighter_ones(fitted, tmp_path):
    folder, det, mon = fitted
    clean = _inputs(tmp_path / "in", folder)
    bright = _inputs(tmp_path / "in", folder, brighter=90)  # a mean of about 190 grey levels: past 160 + 5
    code, records, output = _run(mon, tmp_path / "in", "--model", det)
    assert code == 0, output
    by = {r["input"]: r for r in records}
    assert set(by) == {str(p) for p in clean + bright}
    for p in clean:  # in the ODD; the learned NEAR threshold flags 5% of in-ODD images by design (an alert)
        r = by[str(p)]
        assert 60 <= r["descriptors"]["brightness"] <= 160
        assert r["state"] == "IN" and r["reasons"] == [] or r["state"] == "NEAR" and len(r["reasons"]) == 1 and \
            r["reasons"][0].startswith("learned: mahalanobis") and r["reasons"][0].endswith("(NEAR)"), r
    assert sum(by[str(p)]["state"] == "IN" for p in clean) >= 0.75 * len(clean)
    for p in bright:
        r = by[str(p)]
        assert r["state"] == "OUT", r
        assert any(w.startswith("brightness") for w in r["reasons"]), r["reasons"]  # the specification's reason
        assert any(w.startswith("learned: mahalanobis") and "(OUT)" in w for w in r["reasons"]), r["reasons"]
        assert r["scores"]["mahalanobis"] > by[str(clean[0])]["scores"]["mahalanobis"]


def test_the_monitor_without_json_prints_a_line_per_image(fitted, tmp_path):
    folder, det, mon = fitted
    [first, *_] = _inputs(tmp_path / "in", folder, brighter=90)
    r = CliRunner().invoke(app, ["monitor", str(mon), str(first), "--model", str(det)])
    assert r.exit_code == 0 and r.output.startswith("OUT ") and str(first.name) in r.output


def test_an_image_that_cannot_be_judged_is_out_and_exits_2_after_the_others(fitted, tmp_path):
    folder, det, mon = fitted
    clean = _inputs(tmp_path / "in", folder)
    (tmp_path / "in" / "broken.png").write_bytes(b"not an image")
    Image.fromarray(np.full((SIDE + 8, SIDE), 100, np.uint8)).save(tmp_path / "in" / "too_tall.png")
    code, records, output = _run(mon, tmp_path / "in", "--model", det)
    assert code == 2 and "2 input file(s) could not be judged" in output
    by = {r["input"]: r for r in records}
    assert all(by[str(p)]["state"] in ("IN", "NEAR") for p in clean)
    for name in ("broken.png", "too_tall.png"):
        r = by[str(tmp_path / "in" / name)]
        assert r["state"] == "OUT" and "error" in r and r["reasons"][0].startswith("not judged:")


def test_the_monitor_refuses_another_detector_or_none(fitted, tmp_path):
    folder, det, mon = fitted
    image = _inputs(tmp_path / "in", folder)[0]
    other = tmp_path / "other.pt"
    torch.jit.script(SquareDetector(3 * SQUARE + 3).eval()).save(str(other))  # another window: other weights
    code, records, output = _run(mon, image, "--model", other)
    assert code == 2 and not records and "refit the monitor for this model" in output
    code, records, output = _run(mon, image)
    assert code == 2 and not records and "give the model it was fitted for" in output

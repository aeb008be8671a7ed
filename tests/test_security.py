"""Issue 16: evidence that cannot be stale, forged or leaked. One test per reproduction of the issue, on real
Prefect runs, a real MLflow store and the real ELPV images.

Items 6a and 6c (YAML aliases, image pixel limit) are tested with the schema loader and the data loaders;
6b (zip entries streamed with a limit) is in tests/test_pack.py."""

from __future__ import annotations

import csv
import json
import shutil
import zipfile
from pathlib import Path

import mlflow
import pytest
from conftest import SOLAR, tiny_use_case, write_yaml

from trustcase.flows.assess import OutputFolderError, assess
from trustcase.schemas import Assessment

pytestmark = pytest.mark.usefixtures("prefect_harness")

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

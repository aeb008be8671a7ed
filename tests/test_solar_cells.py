"""The bundled use case's data contract: splits that do not leak the same cell, and a model that knows
which split rule it was trained under."""

from __future__ import annotations

import json
from collections import defaultdict

import pytest
from conftest import load_train_module

pytest.importorskip("elpv_dataset", reason="the demo's data package (extra `demo`) is not installed")
train = load_train_module()
elpv = train.elpv


def test_splits_partition_the_dataset_and_keep_each_group_whole():
    rows = elpv.read_labels(elpv.dataset_root())
    splits = {s: {r[0] for r in elpv.ElpvSplit(s).rows} for s in elpv.SPLITS}
    assert sum(map(len, splits.values())) == len(rows) == len(set().union(*splits.values()))
    where = {name: s for s, names in splits.items() for name in names}
    members = defaultdict(set)
    for name, group in elpv.read_groups().items():
        members[group].add(name)
    assert len(members) > 50  # ELPV does hold re-imaged cells
    for group, names in members.items():
        assert group in names and len({where[n] for n in names}) == 1, group


def test_committed_grouping_is_what_the_images_give():
    """The manifest is derived data: recomputed from the installed images, it must come out the same."""
    assert elpv.near_duplicate_groups(elpv.dataset_root()) == elpv.read_groups()


def test_a_model_trained_under_another_split_rule_is_stale(tmp_path):
    model = tmp_path / "m.pt"
    model.write_bytes(b"weights")
    assert "unrecorded" in train.stale(model)  # no training log: cannot tell what it saw
    log = {"params": {"splits": "0123456789abcdef"}}
    model.with_suffix(".json").write_text(json.dumps(log))
    assert "another split rule" in train.stale(model)
    log["params"] = {"splits": elpv.splits_id(), "epochs": train.EPOCHS["certified"],
                     "width": train.WIDTH["certified"], "critical_weight": train.CRITICAL_WEIGHT["certified"],
                     "threads": train.THREADS}
    model.with_suffix(".json").write_text(json.dumps(log))
    assert train.stale(model) is None


def test_a_bundled_model_trained_by_another_default_recipe_is_stale(tmp_path):
    """The README quotes the default recipe's model: one trained before the recipe changed (width 16, critical
    weight 1.25, or on another thread count, which sums in another order) is trained again by the demo."""
    model = tmp_path / "m.pt"
    model.write_bytes(b"weights")
    recipe = {"splits": elpv.splits_id(), "epochs": 60, "width": train.WIDTH["certified"],
              "critical_weight": train.CRITICAL_WEIGHT["certified"], "threads": train.THREADS}
    for key, old in (("width", 16), ("critical_weight", 1.25), ("threads", 2), ("epochs", 24)):
        model.with_suffix(".json").write_text(json.dumps({"params": {**recipe, key: old}}))
        assert "another recipe" in train.stale(model) and f"{key} {old} ->" in train.stale(model)

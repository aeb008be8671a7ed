"""feature_leakage: exact nearest-neighbour similarities, and a split that is the training split seen again is
leaked item for item, a group-aware split is not."""

from __future__ import annotations

import numpy as np
import yaml

from trustcase.checks import Context
from trustcase.checks.feature_leakage import FeatureLeakage
from trustcase.data.leakage import NearestReference
from trustcase.data.streaming import DataSource
from trustcase.models.loading import load_classifier
from trustcase.schemas import load_use_case


def test_nearest_reference_by_hand():
    index = NearestReference()  # mean of the reference (1, 1): centred rows (1, -1), (-1, 1), (1, 1), (-1, -1)
    index.add(["a", "b"], np.array([[2.0, 0.0], [0.0, 2.0]]))
    index.add(["c", "d"], np.array([[2.0, 2.0], [0.0, 0.0]]))
    sim, ids = index.nearest(np.array([[4.0, -2.0], [3.0, 3.2], [1.0, 1.0]]))
    assert ids[:2] == ["a", "c"]
    assert np.isclose(sim[0], 1.0, rtol=0, atol=1e-15)
    assert np.isclose(sim[1], (2 + 2.2) / (np.sqrt(2) * np.hypot(2, 2.2)), rtol=1e-12)  # (2, 2.2) vs (1, 1)
    assert sim[2] == 0.0  # the reference's mean is like nothing


def run(case, tmp_path, **splits):
    raw = yaml.safe_load(case.read_text())
    raw["data"]["splits"].update(splits)
    case.write_text(yaml.safe_dump(raw, sort_keys=False))
    uc = load_use_case(case)
    ctx = Context(uc, load_classifier(uc.model), DataSource(uc.data, model=uc.model), 0, tmp_path / "feature_leakage")
    ids = {r: {i for b in ctx.batches(r) for i in b.ids} for r in ctx.data.roles}
    # the tiny model (4 channels, 2 epochs) has few features: only the same image is this close
    return FeatureLeakage(FeatureLeakage.Params(threshold=0.99999))(ctx), ids


def test_the_training_split_seen_again_is_leaked_item_for_item(tiny_case, tmp_path):
    out, ids = run(tiny_case, tmp_path, validation="train")  # each role its own seeded subset of the train split
    got = {m.scope.split: m for m in out.measurements}
    again = ids["validation"] & ids["train"]
    assert got["validation"].value == len(again) > 0
    pairs = out.summary["validation"]
    assert all(p.split(" ~ train ")[0] == p.split(" ~ train ")[1].split(" (")[0] for p in pairs)
    assert got["test"].value == 0  # ELPV's splits keep every imaged cell in one split

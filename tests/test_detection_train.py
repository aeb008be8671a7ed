"""The bundled steel detector's training script: deterministic for its seed, and its recipe recorded so that a model
trained otherwise is trained again by `trustcase demo steel_defects` (real NEU-DET images, real torch training of a
few steps on a dozen images)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

TRAIN = Path(__file__).resolve().parents[1] / "use_cases" / "steel_defects" / "train.py"


def _train_module():
    """steel_defects/train.py under its own name (every bundled case has a `train` module)."""
    spec = importlib.util.spec_from_file_location("steel_defects_train", TRAIN)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


train = _train_module()
pytestmark = pytest.mark.skipif(train.missing_data() is not None, reason=str(train.missing_data()))


@pytest.fixture(scope="module")
def tiny():
    images, boxes, _ = train.read("train", 0, limit=12)  # two of each class: the split goes class by class
    return images, boxes


def _weights(images, boxes, seed: int) -> dict[str, torch.Tensor]:
    model, history = train.fit(images, boxes, seed=seed, epochs=2, batch=4, log=lambda _: None)  # 6 steps
    assert len(history) == 2 and all(h["loss"] == h["loss"] for h in history)
    return model.state_dict()


def test_the_same_seed_gives_the_same_weights_and_another_seed_other_weights(tiny):
    threads, strict = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    a, b, c = (_weights(*tiny, seed) for seed in (0, 0, 1))
    assert list(a) == list(b) == list(c)
    assert all(torch.equal(a[k], b[k]) for k in a)  # bit for bit: batch norm's running statistics included
    moved = [k for k in a if a[k].is_floating_point() and not torch.equal(a[k], c[k])]
    assert any(k.endswith("weight") for k in moved) and "heat.weight" in moved
    assert (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()) == (threads, strict)  # restored


def test_the_weights_move_from_their_seeded_start(tiny):
    """fit trains: the weights after six steps are not the initial ones of the same seed."""
    torch.manual_seed(0)
    start = train.CenterNet().state_dict()
    after = _weights(*tiny, 0)
    assert not torch.equal(start["heat.weight"], after["heat.weight"])


@pytest.mark.slow  # the real train(): it evaluates the model on the validation and test splits with 1000 replicates
def test_a_short_training_records_its_recipe_and_is_stale(tmp_path):
    out = tmp_path / "steel_detector.pt"
    result = train.train(out, epochs=1, batch=6, limit=12, log=lambda _: None)
    log = json.loads(out.with_suffix(".json").read_text())
    assert log["params"] == {**train.recipe(), "epochs": 1, "batch": 6, "train_items": 12}
    assert result["map50"] == result["map50"] and 0.0 <= result["map50"] <= 1.0
    assert torch.jit.load(str(out)).features(torch.zeros(1, 1, 200, 200)).shape == (1, 112)  # the monitor's hook
    why = train.stale(out)
    assert why.startswith("steel_detector.pt was trained by another recipe (")
    assert "epochs 1 -> 24" in why and "batch 6 -> 16" in why and "train_items 12 -> 1260" in why
    assert "seed" not in why.replace("split_seed", "") and "width" not in why


def test_a_model_is_stale_unless_its_log_records_the_default_recipe(tmp_path):
    model = tmp_path / "m.pt"
    model.write_bytes(b"weights")
    assert "no training log" in train.stale(model)
    recipe = train.recipe()
    assert recipe["train_items"] == 1260 and len(recipe["splits"]) == 16
    model.with_suffix(".json").write_text(json.dumps({"params": recipe}))
    assert train.stale(model) is None
    for key, other in (("seed", 1), ("width", 24), ("threads", 2), ("splits", "0123456789abcdef"), ("lr", 1e-3)):
        model.with_suffix(".json").write_text(json.dumps({"params": {**recipe, key: other}}))
        assert f"({key} {other} -> {recipe[key]})" in train.stale(model)
    del recipe["splits"]  # a log of before the split rule was recorded
    model.with_suffix(".json").write_text(json.dumps({"params": recipe}))
    assert "splits unrecorded ->" in train.stale(model)


def test_the_split_rule_id_follows_the_split_seed():
    assert train.splits_id(0) == train.splits_id(0) != train.splits_id(1)

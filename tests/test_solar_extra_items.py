"""The solar training script honours `ExtraItem.label` None: the item's own label in its split (review4 R17)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

from trustcase.schemas import ExtraItem, load_use_case

SOLAR = Path(__file__).resolve().parent.parent / "use_cases" / "solar_cells"


def solar_train():
    spec = importlib.util.spec_from_file_location("solar_train_extra", SOLAR / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_an_extra_item_without_a_label_takes_its_own_and_a_given_label_overrides_it():
    train = solar_train()
    uc = load_use_case(SOLAR / "use_case.yaml")
    split = train.load(uc, "validation", 64)
    defective = next(i for i in range(len(split)) if split[i].label == 1)
    extra = [ExtraItem(role="validation", index=defective, copies=2),
             ExtraItem(role="validation", index=defective, label=0)]
    x, y = train.read_extra(extra, 64, uc)
    assert x.shape == (3, 64, 64, 1) and y.dtype.kind == "i" and y.tolist() == [1, 1, 0]
    assert np.array_equal(x[0, ..., 0], split[defective].image)

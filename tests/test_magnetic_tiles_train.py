"""The bundled magnetic-tiles `train.py` reads the data its TrainingRequest's use case names, through that use
case's `data.loader` and `data.params` (review4 R16), and its loss on logits decided by hand. Needs neither
the magnetic-tile images nor the bundled artefact: the use case here is the planted one of the root-causes tests."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_yaml
from test_root_causes_segmentation import SIDE, SPLITS, PlantedMasks, use_case

from trustcase.schemas import ExtraItem, TrainingRequest, load_use_case

ROOT = Path(__file__).resolve().parents[1]


def bundled_train():
    # loaded under a name of its own: a bare `import train` would leave this case's train.py as sys.modules["train"]
    spec = importlib.util.spec_from_file_location("magnetic_tiles_train_r16", ROOT / "use_cases" / "magnetic_tiles"
                                                  / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_retrain_reads_the_requests_use_case_through_its_loader(tmp_path):
    train = bundled_train()
    uc = use_case(tmp_path)
    raw = uc.model_dump(mode="json", exclude_none=True)
    raw["data"]["params"] = {"seed": 3}  # passed to the loader as the use case says
    yaml_path = write_yaml(tmp_path / "use_case.yaml", raw)
    request = TrainingRequest(out=tmp_path / "retrained.pt", use_case=yaml_path, epochs=1,
                              extra=[ExtraItem(role="train", index=5, copies=3)])
    result = train.retrain(request)
    pool = sum(SPLITS["pool"].values())  # the role train's split, "pool" (40 tiles), not the 553 magnetic-tile ones
    assert result.log["params"]["train_items"] == pool + 3 and result.log["params"]["data_params"] == {"seed": 3}
    model = torch.jit.load(str(result.model))
    x = torch.from_numpy(PlantedMasks("pool", 3)[5].image.astype(np.float32))[None, None]
    assert model(x).shape == (1, 2, SIDE, SIDE) and model.features(x).shape == (1, 64)
    images, _, ids, kinds = train.read("pool", load_use_case(yaml_path))
    assert images.shape == (pool, SIDE, SIDE) and ids[0] == PlantedMasks("pool", 3)[0].id and kinds[0] is None
    assert np.array_equal(images[5], PlantedMasks("pool", 3)[5].image)  # the seed reached the loader


def test_the_loss_on_known_logits():
    train = bundled_train()
    masks = torch.tensor([[[1, 0], [0, 0]], [[0, 0], [0, 0]]])
    # confident and right everywhere: cross-entropy and Dice near 0
    right = torch.where(masks[:, None] == torch.arange(2)[None, :, None, None], 30.0, -30.0)
    assert train.loss_of(right, masks).item() == pytest.approx(0.0, abs=1e-6)
    # undecided everywhere (p = 1/2): cross-entropy log 2; the Dice over the batch 1 - (2 * 0.5 + 1) / (4 + 1 + 1)
    flat = torch.zeros(2, 2, 2, 2)
    assert train.loss_of(flat, masks).item() == pytest.approx(np.log(2) + 2 / 3, rel=1e-5)

"""The bundled magnetic-tiles `train.py` reads the data its TrainingRequest's use case names, through that use
case's `data.loader` and `data.params` (review4 R16), and its crops and loss on cases decided by hand. Needs neither
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


def test_crops_hold_a_defect_pixel_half_the_time_and_never_leave_the_image():
    train = bundled_train()
    x = torch.arange(2 * 32 * 32, dtype=torch.float32).reshape(2, 1, 32, 32)
    y = torch.zeros(2, 32, 32, dtype=torch.int64)
    y[0, 30, 1] = 1  # one defect pixel, in a corner
    where = [np.argwhere(m.numpy()) for m in y]
    rng = np.random.default_rng(0)
    held = []
    for _ in range(400):
        cx, cy = train.crops(x, y, where, 8, rng)
        assert cx.shape == (2, 1, 8, 8) and cy.shape == (2, 8, 8)
        # each crop is a window of its own image: its top-left value locates it, the rest follows
        for j in range(2):
            r0, c0 = divmod(int(cx[j, 0, 0, 0]) - j * 1024, 32)
            assert torch.equal(cx[j, 0], x[j, 0, r0:r0 + 8, c0:c0 + 8])
            assert torch.equal(cy[j], y[j, r0:r0 + 8, c0:c0 + 8])
        assert cy[1].sum() == 0
        held.append(int(cy[0].sum()))
    # focused half the time (always holding it: the window is clipped into the image) plus the share of random windows
    # that hold (30, 1): top-left rows 23-24 of 0-24 and columns 0-1 of 0-24, 4 / 625
    p = 0.5 + 0.5 * 4 / 625
    assert np.mean(held) == pytest.approx(p, abs=4 * np.sqrt(p * (1 - p) / 400))


def test_the_loss_on_known_logits():
    train = bundled_train()
    masks = torch.tensor([[[1, 0], [0, 0]], [[0, 0], [0, 0]]])
    # confident and right everywhere: cross-entropy near 0, Dice 0 on the first image, 0 on the empty second
    right = torch.where(masks[:, None] == torch.arange(2)[None, :, None, None], 30.0, -30.0)
    assert train.loss_of(right, masks).item() == pytest.approx(0.0, abs=1e-6)
    # undecided everywhere (p = 1/2): CE log 2 (weighted mean: the weights cancel when every term is equal); Dice per
    # image 1 - (2 * 0.5 + 1) / (2 + 1 + 1) = 0.5 on the first, 1 - 1 / (2 + 1) = 2/3 on the second
    flat = torch.zeros(2, 2, 2, 2)
    want = np.log(2) + (0.5 + 2 / 3) / 2
    assert train.loss_of(flat, masks, pos_weight=3.0).item() == pytest.approx(want, rel=1e-5)

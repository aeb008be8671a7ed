"""The segmentation task: the model's output contract, mask files (encodings, fitting to the model's size) and their
bad input, and the checks taught segmentation on a tiny synthetic use case with a real TorchScript segmenter."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from trustcase.data.masks import MaskError, MaskSplit, decode, fit, pair_files
from trustcase.data.streaming import Mask, Rejected, SplitStream, judge_mask
from trustcase.models.classifier import ModelError, NonFiniteOutput
from trustcase.schemas import ModelSpec
from trustcase.tasks.segmentation import Segmentation, judge_output

CLASSES = ["background", "defect"]


class Bright(torch.nn.Module):
    """A pixel is a defect when it is brighter than mid-grey (input scaled to [0, 1]): logits (B, 2, H, W)."""

    def forward(self, x):
        return torch.cat([0.5 - x, x - 0.5], dim=1)


class Shaped(torch.nn.Module):
    """Logits of a fixed shape whatever the input: a segmenter breaking the contract."""

    def __init__(self, k: int, h: int, w: int, fill: float = 0.0):
        super().__init__()
        self.k, self.h, self.w, self.fill = k, h, w, fill

    def forward(self, x):
        return torch.full((x.shape[0], self.k, self.h, self.w), self.fill)


def _spec(tmp_path, module, name="seg.pt", size=16, **extra):
    path = tmp_path / name
    torch.jit.script(module).save(str(path))
    return ModelSpec(format="torchscript", path=path, input_shape=[1, size, size], class_names=CLASSES,
                     critical_class="defect", normalisation={"mean": [0.0], "std": [1.0]}, **extra)


def test_a_segmenter_meeting_the_contract_segments(tmp_path):
    seg = Segmentation().load_model(_spec(tmp_path, Bright()))
    x = np.zeros((2, 16, 16, 1), np.float32)
    x[1, 2:5, 3:9] = 200
    pred = seg.segment(x, ["a", "b"])
    assert pred.shape == (2, 16, 16) and pred[0].sum() == 0 and pred[1].sum() == 18 and pred[1, 2:5, 3:9].all()


@pytest.mark.parametrize("module, words", [
    (Shaped(3, 16, 16), "3 classes"),
    (Shaped(2, 8, 16), "16x8 px"),
    (Shaped(2, 16, 16, float("nan")), "NaN/inf"),
])
def test_the_probe_refuses_a_segmenter_breaking_the_contract(tmp_path, module, words):
    with pytest.raises(ModelError, match=words):
        Segmentation().load_model(_spec(tmp_path, module))


def test_a_wrong_structure_and_the_items_are_named():
    with pytest.raises(ModelError, match=r"expected one tensor of per-pixel logits \(batch, 2, 4, 4\)"):
        judge_output(torch.zeros(2, 2), 2, (4, 4))
    out = torch.zeros(3, 2, 4, 4)
    out[1, 0, 2, 2] = float("inf")
    with pytest.raises(NonFiniteOutput, match=r"1 input\(s\), e.g. items \['b'\]"):
        judge_output(out, 2, (4, 4), ["a", "b", "c"])


def test_a_classifier_is_not_a_segmenter(tmp_path):
    class Logits(torch.nn.Module):
        def forward(self, x):
            return x.flatten(1)[:, :2]

    with pytest.raises(ModelError, match="segmenter output is"):
        Segmentation().load_model(_spec(tmp_path, Logits()))


def test_bad_masks_are_rejected_with_what_is_wrong():
    assert judge_mask(Mask(np.zeros((4, 5), np.uint8)), 2, (4, 5)).shape == (4, 5)
    with pytest.raises(Rejected, match="mask of 5x4 px, its image is 4x4"):
        judge_mask(Mask(np.zeros((4, 5), np.uint8)), 2, (4, 4))
    with pytest.raises(Rejected, match=r"mask value\(s\) \[2\] are no class index"):
        judge_mask(Mask(np.full((4, 4), 2, np.uint8)), 2, (4, 4))
    with pytest.raises(Rejected, match="not the item's mask"):
        Segmentation().judge_label(1, 2, (4, 4))
    with pytest.raises(Rejected, match="expected \\(H, W\\) class indices"):
        judge_mask(Mask(np.zeros((4, 4), np.float32)), 2, (4, 4))


def test_the_three_encodings():
    assert decode(np.array([[0, 127, 128, 255]], np.uint8), "binary", 2, None, "m.png").tolist() == [[0, 0, 1, 1]]
    assert decode(np.array([[0, 2, 1]], np.uint8), "index", 3, None, "m.png").tolist() == [[0, 2, 1]]
    with pytest.raises(Rejected, match=r"m.png: mask value\(s\) \[3, 7\] are no class index \(0..2\), 2 pixel"):
        decode(np.array([[0, 3, 7]], np.uint8), "index", 3, None, "m.png")
    rgb = np.array([[[0, 0, 0], [255, 0, 0], [0, 255, 0]]], np.uint8)
    palette = [[0, 0, 0], [0, 255, 0], [255, 0, 0]]
    assert decode(rgb, "palette", 3, palette, "m.png").tolist() == [[0, 2, 1]]
    with pytest.raises(Rejected, match=r"colour\(s\) \[\[255, 0, 0\]\] are in no class's palette entry"):
        decode(rgb, "palette", 2, palette[:2], "m.png")


def test_the_mask_follows_the_image_exactly():
    image = np.arange(6 * 4, dtype=np.uint8).reshape(6, 4) * 10
    mask = np.zeros((6, 4), np.uint8)
    mask[:3, :2] = 1  # the top-left quarter
    img, m = fit(image, mask, (12, 8), "resize")
    assert img.shape == (12, 8) and m.shape == (12, 8)
    assert m.tolist() == (np.kron(mask, np.ones((2, 2), np.uint8))).tolist()  # nearest neighbour: no blend
    img, m = fit(image, mask, (8, 5), "pad", pad_value=7)
    assert img[:6, :4].tolist() == image.tolist() and (img[6:] == 7).all() and (img[:, 4:] == 7).all()
    assert m[:6, :4].tolist() == mask.tolist() and m.sum() == mask.sum()
    assert fit(image, mask, (3, 3), "none")[0] is image


def _tiles(folder, pictures, size=(16, 16)):
    """Grey images and 0/255 masks: `pictures` maps a stem to the defect rectangle (y0, y1, x0, x1) or None."""
    folder.mkdir(parents=True, exist_ok=True)
    for stem, rect in pictures.items():
        image = np.full(size, 40, np.uint8)
        mask = np.zeros(size, np.uint8)
        if rect is not None:
            y0, y1, x0, x1 = rect
            image[y0:y1, x0:x1] = 220
            mask[y0:y1, x0:x1] = 255
        Image.fromarray(image).save(folder / f"{stem}.jpg", quality=100)
        Image.fromarray(mask).save(folder / f"{stem}.png")


def test_pairing_and_sizes_are_checked_up_front_naming_the_file(tmp_path):
    _tiles(tmp_path / "a", {"t1": (2, 5, 2, 5), "t2": None})
    pairs = pair_files(tmp_path / "a", image_suffixes=(".jpg",))
    assert [(i.name, m.name) for i, m in pairs] == [("t1.jpg", "t1.png"), ("t2.jpg", "t2.png")]
    (tmp_path / "a" / "t2.png").unlink()
    with pytest.raises(MaskError, match=r"image .*t2.jpg has no mask t2.png"):
        pair_files(tmp_path / "a", image_suffixes=(".jpg",))
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(tmp_path / "a" / "t2.png")
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(tmp_path / "a" / "t3.png")
    with pytest.raises(MaskError, match=r"mask .*t3.png has no image t3"):
        pair_files(tmp_path / "a", image_suffixes=(".jpg",))
    (tmp_path / "a" / "t3.png").unlink()
    Image.fromarray(np.zeros((16, 12), np.uint8)).save(tmp_path / "a" / "t2.png")
    with pytest.raises(MaskError, match=r"mask .*t2.png is 12x16 px, its image .*t2.jpg is 16x16"):
        MaskSplit(pair_files(tmp_path / "a", image_suffixes=(".jpg",)), CLASSES, (16, 16))
    with pytest.raises(MaskError, match=r"t1.jpg is 16x16 px, larger than the 8x8 it is padded to"):
        MaskSplit(pair_files(tmp_path / "a", image_suffixes=(".jpg",))[:1], CLASSES, (8, 8), fit="pad")


def test_a_mask_value_of_no_class_is_counted_and_excluded_naming_the_file(tmp_path):
    _tiles(tmp_path / "a", {"t1": (2, 5, 2, 5), "t2": None, "t3": None})
    for stem in ("t1", "t3"):  # index masks: 0 and 1
        Image.fromarray((np.asarray(Image.open(tmp_path / "a" / f"{stem}.png")) > 0).astype(np.uint8)).save(
            tmp_path / "a" / f"{stem}.png")
    Image.fromarray(np.full((16, 16), 5, np.uint8)).save(tmp_path / "a" / "t2.png")  # index 5: no class
    split = MaskSplit(pair_files(tmp_path / "a", image_suffixes=(".jpg",)), CLASSES, (8, 8), encoding="index",
                      root=tmp_path)
    stream = SplitStream(split, "test", None, 0, 2, 0, (8, 8, 1), 2)
    batches = list(stream.batches())
    assert [i for b in batches for i in b.ids] == ["a/t1.jpg", "a/t3.jpg"]
    assert batches[0].labels[0].shape == (8, 8)
    assert [(u.id, u.kind) for u in stream.unreadable] == [("a/t2.jpg", "label")]
    assert "t2.png: mask value(s) [5] are no class index" in stream.unreadable[0].error

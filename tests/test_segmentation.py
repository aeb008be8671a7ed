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


def test_an_onnx_segmenter_runs_in_onnxruntime(tmp_path):
    path = tmp_path / "seg.onnx"
    torch.onnx.export(Bright(), torch.zeros(1, 1, 16, 16), str(path), input_names=["x"], output_names=["y"],
                      dynamic_axes={"x": {0: "b"}, "y": {0: "b"}}, dynamo=False)
    spec = _spec(tmp_path, Bright()).model_copy(update={"format": "onnx", "path": path})
    seg = Segmentation().load_model(spec)
    x = np.zeros((3, 16, 16, 1), np.float32)
    x[2, 4:6, 4:9] = 250
    assert seg.session is not None and seg.segment(x).sum() == 10 and seg.segment(x)[2, 4:6, 4:9].all()


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


LOADER = '''
from pathlib import Path
from trustcase.data.masks import MaskSplit, pair_files

def load(split, root, classes, size=(16, 16), fit="resize"):
    pairs = pair_files(Path(root) / split / "images", Path(root) / split / "masks")
    meta = [{"defect": "free" if "free" in i.stem else "spot"} for i, _ in pairs]
    return MaskSplit(pairs, classes, tuple(size), fit=fit, encoding="index", meta=meta, root=Path(root) / split)
'''


def _picture(folder, stem, size=(16, 16), bright=None, dim=None, defect=None, mask_value=1):
    """An index-encoded PNG pair: background grey 40, `bright` rectangles at 220, `dim` at 100 (y0, y1, x0, x1);
    the mask marks `defect` rectangles with `mask_value`."""
    image = np.full(size, 40, np.uint8)
    mask = np.zeros(size, np.uint8)
    for rects, value, target in ((bright, 220, image), (dim, 100, image), (defect, mask_value, mask)):
        for y0, y1, x0, x1 in rects or []:
            target[y0:y1, x0:x1] = value
    for sub, array in (("images", image), ("masks", mask)):
        (folder / sub).mkdir(parents=True, exist_ok=True)
        Image.fromarray(array).save(folder / sub / f"{stem}.png")


@pytest.fixture
def segmentation_case(tmp_path):
    """A segmentation use case on tiny PNG splits, with a TorchScript segmenter marking pixels brighter than grey 127.
    Test split: t1 a bright 3x4 defect (found whole), t2_free a bright 2x2 spot the mask does not mark (4 false
    pixels), t3 a dim 2x2 defect (missed), t4 a mask value 3 that is no class (excluded)."""
    from trustcase.schemas import UseCase

    data = tmp_path / "data"
    _picture(data / "train", "a", bright=[(2, 5, 2, 6)], defect=[(2, 5, 2, 6)])
    _picture(data / "train", "b_free")
    _picture(data / "train", "c", size=(32, 32), bright=[(4, 10, 4, 12)], defect=[(4, 10, 4, 12)])  # resized
    _picture(data / "test", "t1", bright=[(2, 5, 2, 6)], defect=[(2, 5, 2, 6)])
    _picture(data / "test", "t2_free", bright=[(8, 10, 8, 10)])
    _picture(data / "test", "t3", dim=[(10, 12, 3, 5)], defect=[(10, 12, 3, 5)])
    _picture(data / "test", "t4", bright=[(2, 5, 2, 6)], defect=[(2, 5, 2, 6)], mask_value=3)
    (tmp_path / "segloader.py").write_text(LOADER)
    spec = _spec(tmp_path, Bright(), defect_pixels=4)
    uc = UseCase.model_validate({
        "id": "seg", "title": "t", "owner": "o", "criticality": "low", "intended_function": "f",
        "task": "segmentation", "model": spec.model_dump(mode="json"),
        "data": {"loader": "segloader:load", "path": str(tmp_path),
                 "params": {"root": str(data), "classes": CLASSES}, "splits": {"train": "train", "test": "test"}},
        "odd": {"descriptors": [{"name": "defect", "source": "metadata", "values": ["spot", "free"]}]},
        "requirements": [{"id": "R1", "text": "t", "metric": "iou:defect", "comparator": ">=", "threshold": 0.5}],
        "plan": {"checks": [{"check": "performance"}]}})
    return uc, tmp_path


def _context(uc, tmp_path, name):
    from trustcase.checks import Context
    from trustcase.data.streaming import DataSource
    from trustcase.tasks import task_of

    return Context(use_case=uc, model=task_of(uc).load_model(uc.model), data=DataSource(uc.data, 0, uc.model),
                   seed=0, workdir=tmp_path / "checks" / name)


def test_performance_measures_a_segmenter_with_its_examples(segmentation_case):
    from trustcase.checks import build
    from trustcase.schemas import CheckSpec

    uc, tmp_path = segmentation_case
    out = build(CheckSpec(check="performance"))(_context(uc, tmp_path, "p"))
    perf = {(m.metric, tuple(m.scope.subgroup.items())): m for m in out.measurements}
    # defect pixels: t1 12 found; t2_free 4 false; t3 4 missed: IoU 12 / 20, Dice 24 / 32
    assert perf[("iou:defect", ())].value == pytest.approx(12 / 20, abs=1e-15)
    assert perf[("dice:defect", ())].value == pytest.approx(24 / 32, abs=1e-15)
    assert perf[("iou:defect", ())].n == 3  # t4 excluded
    # at least 4 pixels: t1 set aside (true), t2_free set aside (false alarm), t3 missed
    assert perf[("image_recall", ())].value == 1 / 2 and perf[("image_false_alarm_rate", ())].value == 1
    assert perf[("image_false_alarm_rate", (("defect", "free"),))].value == 1
    assert perf[("image_recall", (("defect", "spot"),))].value == 1 / 2
    pixels, images = out.figures  # confusion matrices, rows true; the test split's 768 pixels and 3 images
    assert pixels.counts == [[748, 4], [4, 12]] and "iou" in pixels.illustrates
    assert images.counts == [[0, 1], [1, 1]] and "image_recall" in images.illustrates
    assert [a.kind for a in out.artefacts] == ["image"]  # the overlays of t3 (Dice 0) and t1 (Dice 1)
    assert (tmp_path / "checks" / out.artefacts[0].path).is_file()


def test_no_example_image_for_a_confidential_use_case(segmentation_case):
    from trustcase.checks import build
    from trustcase.schemas import CheckSpec, Confidentiality

    uc, tmp_path = segmentation_case
    uc = uc.model_copy(update={"confidentiality": Confidentiality.confidential})
    assert build(CheckSpec(check="performance"))(_context(uc, tmp_path, "c")).artefacts == []


def test_data_quality_counts_masks(segmentation_case):
    from trustcase.checks import build
    from trustcase.schemas import CheckSpec

    uc, tmp_path = segmentation_case
    dq = build(CheckSpec(check="data_quality"))(_context(uc, tmp_path, "d")).measurements
    by = {(m.metric, m.scope.split): m for m in dq}
    assert by[("bad_masks", "test")].value == 1 and by[("items", "test")].value == 3
    assert by[("empty_masks", "test")].value == 1 and by[("empty_masks", "train")].value == 1
    assert by[("full_masks", "test")].value == 0
    # defect pixels of the test split: 12 + 0 + 4 of 3 x 256
    assert by[("class_share:defect", "test")].value == pytest.approx(16 / 768, abs=1e-15)
    assert by[("mean:defect_share", "test")].value == pytest.approx((12 / 256 + 4 / 256) / 3, abs=1e-15)


def test_a_perturbation_sweep_scores_a_segmenter_by_its_metrics(segmentation_case):
    from trustcase.checks import build
    from trustcase.schemas import CheckSpec

    uc, tmp_path = segmentation_case
    brighter = {"perturbation": "brightness", "grid": [0.3], "options": {"direction": "up"}}
    check = build(CheckSpec(check="perturbation_sweep", params={"perturbations": {"brighter": brighter}}))
    at = {(m.metric, m.amplitude): m for m in check(_context(uc, tmp_path, "sweep")).measurements
          if not m.scope.subgroup}
    # +0.3 of the range: t3's dim defect (100 + 76.5) is found, t2_free's background (40 + 76.5) stays below 127.5
    assert at[("image_recall", 0.3)].value == 1 and at[("iou:defect", 0.3)].value == pytest.approx(16 / 20, abs=1e-15)
    assert at[("flip_rate", 0.3)].value == pytest.approx(1 / 3)


def test_a_check_not_taught_segmentation_says_so(segmentation_case):
    from trustcase.checks import build
    from trustcase.errors import Unsupported
    from trustcase.schemas import CheckSpec

    uc, tmp_path = segmentation_case
    with pytest.raises(Unsupported, match="not taught the segmentation task"):
        build(CheckSpec(check="label_issues"))(_context(uc, tmp_path, "l"))


def test_validate_names_a_mask_of_another_size_before_any_work(segmentation_case):
    import yaml
    from typer.testing import CliRunner

    from trustcase.cli import app

    uc, tmp_path = segmentation_case
    Image.fromarray(np.zeros((16, 12), np.uint8)).save(tmp_path / "data" / "test" / "masks" / "t3.png")
    raw = uc.model_dump(mode="json", exclude_defaults=True)
    (tmp_path / "uc.yaml").write_text(yaml.safe_dump(raw))
    r = CliRunner().invoke(app, ["validate", str(tmp_path / "uc.yaml")])
    assert r.exit_code == 2, r.output
    assert "mask" in r.output and "t3.png is 12x16 px, its image" in " ".join(r.output.split())


BLACK_BOX = '''
import numpy as np

class Component:
    """Per-pixel probabilities of a grey-level threshold: a pixel brighter than 127 is a defect."""

    def __init__(self, shape=None):
        self.shape = shape

    def predict(self, images):
        p = (images[..., 0] > 127).astype(np.float64)
        out = np.stack([1 - p, p], axis=1)
        return out if self.shape is None else out.reshape(self.shape)

def flat():
    return Component(shape=(-1, 2))
'''


def test_a_black_box_segmenter_answers_per_pixel(tmp_path):
    (tmp_path / "box").mkdir()
    (tmp_path / "box" / "component.py").write_text(BLACK_BOX)
    spec = ModelSpec(format="python", path=tmp_path / "box", entry="component:Component", input_shape=[1, 8, 8],
                     class_names=CLASSES, critical_class="defect")
    seg = Segmentation().load_model(spec)
    x = np.full((2, 8, 8, 1), 40, np.float32)
    x[1, :2, :3] = 200
    assert seg.segment(x).sum() == 6 and seg.segment(x)[1, :2, :3].all()
    with pytest.raises(ModelError, match=r"probabilities have shape \(128, 2\), expected \(2, 2, 8, 8\): per pixel"):
        Segmentation().load_model(spec.model_copy(update={"entry": "component:flat"}))

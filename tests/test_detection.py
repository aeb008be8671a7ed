"""The detection task: the model's output contract, annotation loaders (VOC, COCO) and their bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from trustcase.data.annotations import AnnotationError, COCODetection, VOCDetection
from trustcase.data.streaming import Boxes, Rejected, SplitStream, judge_boxes
from trustcase.models.classifier import ModelError
from trustcase.schemas import ModelSpec
from trustcase.tasks.detection import Detection, judge_output

CLASSES = ["crazing", "scratches"]


class _Fixed(torch.nn.Module):
    """A TorchScript detector returning fixed rows (B, 2, 6): one detection, one padding row."""

    def __init__(self, row):
        super().__init__()
        self.register_buffer("row", torch.tensor(row, dtype=torch.float32))

    def forward(self, x):
        pad = torch.tensor([0.0, 0.0, 0.0, 0.0, -1.0, 0.0])
        return torch.stack([self.row, pad]).expand(x.shape[0], 2, 6)


def _spec(tmp_path, row, name="det.pt"):
    path = tmp_path / name
    torch.jit.script(_Fixed(row)).save(str(path))
    return ModelSpec(format="torchscript", path=path, input_shape=[1, 32, 32], class_names=CLASSES,
                     critical_class="crazing")


def test_a_detector_meeting_the_contract_detects(tmp_path):
    det = Detection().load_model(_spec(tmp_path, [2, 3, 10, 12, 0.7, 1]))
    out = det.detect(np.zeros((3, 32, 32, 1), np.float32), ["a", "b", "c"])
    assert len(out) == 3 and out[0].shape == (1, 6)  # the padding row is gone
    assert out[0][0].tolist() == pytest.approx([2, 3, 10, 12, 0.7, 1])


@pytest.mark.parametrize("row, words", [
    ([10, 3, 2, 12, 0.7, 1], "x2 < x1"),
    ([2, 3, 10, 12, float("nan"), 1], "NaN"),
    ([2, 3, 10, 12, 0.7, 5], "not an index"),
    ([2, 3, 10, 12, 0.7, 0.5], "not an index"),
])
def test_the_probe_refuses_a_detector_breaking_the_contract(tmp_path, row, words):
    with pytest.raises(ModelError, match=words):
        Detection().load_model(_spec(tmp_path, row))


def test_a_wrong_structure_is_named():
    with pytest.raises(ModelError, match=r"\(batch, detections, 6\)"):
        judge_output(torch.zeros(2, 5), 2, (32, 32))
    with pytest.raises(ModelError, match="item b, detection 0"):
        judge_output(torch.tensor([[[0, 0, 1, 1, 0.5, 0]], [[3, 0, 1, 1, 0.5, 0]]]), 2, (32, 32), ["a", "b"])


def test_a_classifier_output_is_not_a_detection(tmp_path):
    class Logits(torch.nn.Module):
        def forward(self, x):
            return x.flatten(1)[:, :2]

    path = tmp_path / "clf.pt"
    torch.jit.script(Logits()).save(str(path))
    spec = ModelSpec(format="torchscript", path=path, input_shape=[1, 8, 8], class_names=CLASSES,
                     critical_class="crazing")
    with pytest.raises(ModelError, match="detector output"):
        Detection().load_model(spec)


@pytest.mark.parametrize("rows, words", [
    ([[5, 5, 2, 9, 0]], "degenerate"),
    ([[0, 0, 40, 9, 0]], "outside the 32x32 image"),
    ([[0, 0, 4, 9, 7]], "not a class index"),
    ([[0, 0, 4, 9]], r"\(K, 5\)"),
])
def test_bad_true_boxes_are_rejected_with_the_box(rows, words):
    with pytest.raises(Rejected, match=words):
        judge_boxes(Boxes(rows), 2, (32, 32))
    assert judge_boxes(Boxes([]), 2, (32, 32)).shape == (0, 5)
    with pytest.raises(Rejected, match="not the item's boxes"):
        Detection().judge_label(1, 2, (32, 32))


def _voc(folder, stem, objects, size=(32, 32)):
    body = "".join(f"<object><name>{n}</name><bndbox><xmin>{a}</xmin><ymin>{b}</ymin><xmax>{c}</xmax>"
                   f"<ymax>{d}</ymax></bndbox></object>" for n, a, b, c, d in objects)
    (folder / f"{stem}.xml").write_text(f"<annotation><size><width>{size[0]}</width><height>{size[1]}</height>"
                                        f"</size>{body}</annotation>")


@pytest.fixture
def voc(tmp_path):
    images, ann = tmp_path / "images", tmp_path / "annotations"
    images.mkdir()
    ann.mkdir()
    for stem in ("crazing_1", "crazing_2", "scratches_1", "scratches_2"):
        Image.fromarray(np.full((32, 32), 100, np.uint8)).save(images / f"{stem}.jpg")
    _voc(ann, "crazing_1", [("crazing", 1, 2, 10, 12), ("crazing", 5, 5, 30, 30)])
    _voc(ann, "crazing_2", [("crazing", 10, 2, 3, 12)])  # x2 < x1
    _voc(ann, "scratches_1", [("rust", 1, 2, 10, 12)])  # unknown class
    _voc(ann, "scratches_2", [("scratches", 1, 2, 40, 12)])  # outside the image
    return images, ann


def test_voc_items_stream_and_bad_files_are_counted_and_excluded(voc):
    split = VOCDetection(*voc, CLASSES)
    stream = SplitStream(split, "test", None, 0, 2, 0, (32, 32, 1), 2)
    batches = list(stream.batches())
    assert [b.ids for b in batches] == [["crazing_1.jpg"]]
    assert batches[0].labels[0].tolist() == [[1, 2, 10, 12, 0], [5, 5, 30, 30, 0]]
    assert batches[0].meta["class"] == ["crazing"]
    bad = {u.id: u.error for u in stream.unreadable}
    assert "crazing_2.xml" in bad["crazing_2.jpg"] and "degenerate" in bad["crazing_2.jpg"]
    assert "'rust'" in bad["scratches_1.jpg"]
    assert "outside the 32x32 image" in bad["scratches_2.jpg"]


def test_an_annotation_without_image_is_refused_up_front(voc):
    images, ann = voc
    _voc(ann, "patches_9", [("crazing", 1, 2, 10, 12)])
    with pytest.raises(AnnotationError, match=r"patches_9\.xml has no image"):
        VOCDetection(images, ann, CLASSES)


def _coco(path, annotations, images=({"id": 1, "file_name": "crazing_1.jpg", "width": 32, "height": 32},)):
    path.write_text(json.dumps({"images": list(images), "annotations": annotations,
                                "categories": [{"id": 1, "name": "crazing"}, {"id": 2, "name": "rust"}]}))
    return path


def test_coco_boxes_become_corners(voc, tmp_path):
    images, _ = voc
    file = _coco(tmp_path / "coco.json", [{"id": 7, "image_id": 1, "category_id": 1, "bbox": [1, 2, 9, 10]}])
    split = COCODetection(images, file, CLASSES)
    assert len(split) == 1 and split[0].label.rows.tolist() == [[1, 2, 10, 12, 0]]


@pytest.mark.parametrize("annotation, images, words", [
    ({"id": 7, "image_id": 1, "category_id": 2, "bbox": [1, 2, 9, 10]}, None, "annotation 7 has category 'rust'"),
    ({"id": 7, "image_id": 3, "category_id": 1, "bbox": [1, 2, 9, 10]}, None, "image_id 3"),
    ({"id": 7, "image_id": 1, "category_id": 1, "bbox": [1, 2, 40, 10]}, None, "outside the 32x32 image"),
    ({"id": 7, "image_id": 1, "category_id": 1, "bbox": [1, 2, -3, 10]}, None, "degenerate"),
    ({"id": 7, "image_id": 1, "category_id": 1, "bbox": [1, 2, 3, 4]},
     [{"id": 1, "file_name": "gone.jpg", "width": 32, "height": 32}], "'gone.jpg' is not in"),
])
def test_bad_coco_annotations_are_refused_up_front_with_the_file(voc, tmp_path, annotation, images, words):
    file = _coco(tmp_path / "coco.json", [annotation], *([images] if images else []))
    with pytest.raises(AnnotationError, match=words) as e:
        COCODetection(voc[0], file, CLASSES)
    assert "coco.json" in str(e.value)

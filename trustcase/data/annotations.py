"""Detection splits from the two annotation formats teams have: Pascal VOC XML (one file per image) and COCO JSON
(one file per split). Each gives a map-style split like `streaming.ImageFolder`: items read lazily, the label an
item's true boxes (`streaming.Boxes`, pixels, x2 > x1).

Bad annotations are named with their file. What is found by listing or by the one COCO file (an annotation file
or record for a missing image, an unknown class name, a COCO box outside its image) is an `AnnotationError` when the
split is built, before any work; what a VOC file holds is read with its image, so a bad box there (x2 < x1, outside
the image, an unknown class) makes that item `Rejected`: counted and excluded by the stream, its file named.
"""

from __future__ import annotations

import hashlib
import json
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from trustcase.data.streaming import Boxes, DataError, Item, Rejected, read_image

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")


class AnnotationError(DataError):
    """An annotation that cannot be used (its file named), found when the split is built."""


def read_voc(path: Path, class_names: Sequence[str]) -> np.ndarray:
    """The boxes of one Pascal VOC file as (K, 5) rows (x1, y1, x2, y2, class index), or `Rejected` naming the
    file and the object. VOC's pixel coordinates are used as written (no 1-based shift)."""
    where = Path(path).name
    try:
        root = ET.parse(path).getroot()
    except (ET.ParseError, OSError) as e:
        raise Rejected("label", f"{where}: not a readable VOC file ({e})") from None
    size = root.find("size")
    wh = None
    if size is not None and size.findtext("width") and size.findtext("height"):
        wh = (float(size.findtext("width")), float(size.findtext("height")))
    rows = []
    for k, obj in enumerate(root.iter("object")):
        name = (obj.findtext("name") or "").strip()
        if name not in class_names:
            raise Rejected("label", f"{where}: object {k} has class {name!r}, not one of {list(class_names)}")
        box = obj.find("bndbox")
        try:
            x1, y1, x2, y2 = (float(box.findtext(t)) for t in ("xmin", "ymin", "xmax", "ymax"))
        except (AttributeError, TypeError, ValueError):
            raise Rejected("label", f"{where}: object {k} ({name}) has no numeric bndbox xmin ymin xmax ymax") from None
        _judge(where, f"object {k} ({name})", (x1, y1, x2, y2), wh)
        rows.append((x1, y1, x2, y2, class_names.index(name)))
    return np.asarray(rows, np.float64).reshape(-1, 5)


def _judge(where: str, what: str, box: tuple[float, float, float, float], wh: tuple[float, float] | None) -> None:
    x1, y1, x2, y2 = box
    if not np.isfinite(box).all() or x2 <= x1 or y2 <= y1:
        raise Rejected("label", f"{where}: {what} box {list(box)} is degenerate (x2 <= x1 or y2 <= y1)")
    if wh is not None and (x1 < 0 or y1 < 0 or x2 > wh[0] or y2 > wh[1]):
        raise Rejected("label", f"{where}: {what} box {list(box)} is outside the {wh[0]:g}x{wh[1]:g} image")


class VOCDetection:
    """images/<stem>.<ext> with annotations/<stem>.xml; `stems` picks the split's items (default: every annotated
    image, sorted). An image without annotation file holds no box."""

    def __init__(self, images: str | Path, annotations: str | Path, class_names: Sequence[str],
                 stems: Sequence[str] | None = None, grey: bool = True):
        self.images, self.annotations = Path(images), Path(annotations)
        self.class_names, self.grey = list(class_names), grey
        for folder in (self.images, self.annotations):
            if not folder.is_dir():
                raise AnnotationError(f"no folder {folder}")
        pictures = {p.stem: p for p in self.images.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES}
        for xml in sorted(self.annotations.glob("*.xml")):  # listing only: no file is read here
            if xml.stem not in pictures:
                raise AnnotationError(f"annotation file {xml} has no image {xml.stem}.* in {self.images}")
        stems = sorted(p.stem for p in self.annotations.glob("*.xml")) if stems is None else list(stems)
        missing = [s for s in stems if s not in pictures]
        if missing:
            raise AnnotationError(f"no image for item {missing[0]!r} in {self.images} ({len(missing)} missing)")
        self.files = [pictures[s] for s in stems]

    def __len__(self) -> int:
        return len(self.files)

    def name(self, i: int) -> str:
        return self.files[i].name

    def __getitem__(self, i: int) -> Item:
        path = self.files[i]
        xml = self.annotations / f"{path.stem}.xml"
        rows = read_voc(xml, self.class_names) if xml.is_file() else np.zeros((0, 5))
        return Item(image=read_image(path, self.name(i), self.grey), label=Boxes(rows), id=self.name(i),
                    meta={"class": self.class_of(rows)})

    def class_of(self, rows: np.ndarray) -> str:
        """The image's defect class for subgroups: its boxes' class when they agree, 'mixed' or 'none' else."""
        classes = {self.class_names[int(c)] for c in rows[:, 4]}
        return classes.pop() if len(classes) == 1 else ("none" if not classes else "mixed")

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for path in self.files:
            xml = self.annotations / f"{path.stem}.xml"
            h.update(path.name.encode() + b"\0" + path.read_bytes() + (xml.read_bytes() if xml.is_file() else b""))
        return h.hexdigest()


def read_coco(path: str | Path, class_names: Sequence[str]) -> dict[str, np.ndarray]:
    """Boxes by image file name from one COCO file (bbox [x, y, width, height] becomes x1 y1 x2 y2), or an
    `AnnotationError` naming the file and the record: a category not in `class_names`, an annotation of an image
    the file does not list, a degenerate box or one outside its image."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        images = {im["id"]: im for im in doc["images"]}
        categories = {c["id"]: c["name"] for c in doc["categories"]}
        annotations = doc.get("annotations", [])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise AnnotationError(f"{path}: not a COCO detection file ({type(e).__name__}: {e})") from None
    boxes: dict[str, list] = {im["file_name"]: [] for im in images.values()}
    for a in annotations:
        what = f"annotation {a.get('id', '?')}"
        im = images.get(a.get("image_id"))
        if im is None:
            raise AnnotationError(f"{path}: {what} is of image_id {a.get('image_id')!r}, which 'images' does not list")
        name = categories.get(a.get("category_id"))
        if name not in class_names:
            raise AnnotationError(f"{path}: {what} has category {name or a.get('category_id')!r}, not one of "
                                  f"{list(class_names)}")
        x, y, w, h = (float(v) for v in a["bbox"])
        wh = (float(im["width"]), float(im["height"])) if "width" in im and "height" in im else None
        try:
            _judge(str(path), f"{what} ({im['file_name']})", (x, y, x + w, y + h), wh)
        except Rejected as e:
            raise AnnotationError(str(e)) from None
        boxes[im["file_name"]].append((x, y, x + w, y + h, class_names.index(name)))
    return {k: np.asarray(v, np.float64).reshape(-1, 5) for k, v in boxes.items()}


class COCODetection:
    """A split from one COCO file and its image folder (every image the file lists, sorted by file name)."""

    def __init__(self, images: str | Path, annotations: str | Path, class_names: Sequence[str], grey: bool = True):
        self.images, self.grey = Path(images), grey
        self.boxes = read_coco(annotations, list(class_names))
        self.class_names = list(class_names)
        self.names = sorted(self.boxes)
        missing = [n for n in self.names if not (self.images / n).is_file()]
        if missing:
            raise AnnotationError(f"{annotations}: image {missing[0]!r} is not in {self.images} "
                                  f"({len(missing)} missing)")

    def __len__(self) -> int:
        return len(self.names)

    def name(self, i: int) -> str:
        return self.names[i]

    def __getitem__(self, i: int) -> Item:
        rows = self.boxes[self.names[i]]
        return Item(image=read_image(self.images / self.names[i], self.names[i], self.grey), label=Boxes(rows),
                    id=self.names[i])

"""Items judged one by one: a bad item is named and excluded, its neighbours are untouched; loader errors
are user errors naming the loader and the call; NaN pixels are a data-quality finding, never a crash."""

from __future__ import annotations

import struct
import textwrap
import zlib

import numpy as np
import pytest
import torch
from conftest import context_for, folder_use_case, save_png

from trustcase.checks.data_quality import DataQuality, DataQualityParams
from trustcase.data import streaming
from trustcase.data.streaming import DataError, DataSource
from trustcase.schemas import UseCase


def png_header(path, width, height):
    """A PNG whose header declares width x height and whose pixel data is cut off: decoding it would fail, so
    only a check on the header can name its size."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))
    return path


def folder(tmp_path, first):
    rng = np.random.default_rng(0)
    root = tmp_path / "data"
    first(root / "test/ok/0000_first.png")
    for i in range(31):
        save_png(root / f"test/ok/{i + 1:04d}.png", rng.integers(0, 255, (16, 16), dtype=np.uint8))
    return UseCase.model_validate(folder_use_case(root))


@pytest.mark.parametrize("first, fragment", [
    (lambda p: save_png(p, np.zeros((1, 1), np.uint8)), "shape (1, 1, 1), the model takes (16, 16, 1)"),
    (lambda p: png_header(p, 12000, 12000), "12000x12000 px, over the limit"),
])
def test_a_bad_first_item_spoils_no_neighbour(tmp_path, first, fragment):
    uc = folder(tmp_path, first)
    stream = DataSource(uc.data, 0, uc.model).stream("test")
    ids = [i for b in stream.batches(32) for i in b.ids]
    assert len(ids) == 31 and "ok/0000_first.png" not in ids
    [bad] = stream.unreadable
    assert bad.id == "ok/0000_first.png" and fragment in bad.error, bad


def loader_module(tmp_path, name, body):
    (tmp_path / f"{name}.py").write_text("import numpy as np\nfrom trustcase.data.streaming import Item\n"
                                         + textwrap.dedent(body))


def module_use_case(tmp_path, loader, size=8, params=None):
    raw = folder_use_case(tmp_path, size=size)
    raw["data"] = {"loader": loader, "path": str(tmp_path), "params": params or {},
                   "splits": {"train": "train", "test": "test"}, "batch_size": 4}
    return UseCase.model_validate(raw)


ITEMS = """
class Split:
    def __init__(self, images): self.images = images
    def __len__(self): return len(self.images)
    def __getitem__(self, i): return Item(image=self.images[i], label=i % 2, id=f"cell{i}")
    def name(self, i): return f"cell{i}"

def load(split, kind="nan"):
    rng = np.random.default_rng(0 if split == "train" else 1)
    images = [rng.uniform(0, 255, (8, 8)).astype(np.float32) for _ in range(10)]
    if kind == "nan":
        images[3][2, 2] = np.nan
    elif kind == "str":
        images[3] = np.full((8, 8), "grey")
    return Split(images)
"""


def test_nan_pixels_are_a_finding_and_every_other_item_is_measured(tmp_path):
    loader_module(tmp_path, "nanloader", ITEMS)
    uc = module_use_case(tmp_path, "nanloader:load")
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 2))
    out = DataQuality(DataQualityParams())(context_for(uc, net, tmp_path / "w"))
    got = {(m.metric, m.scope.split): m.value for m in out.measurements}
    assert got[("non_finite", "test")] == 1 and got[("non_finite", "train")] == 1
    assert got[("items", "test")] == 9 and got[("unreadable", "test")] == 1
    assert any(line.startswith("cell3: 1 NaN") for line in out.summary["unreadable"]["test"])
    # without the model's contract, finiteness is still judged per item
    ctx = context_for(uc, net, tmp_path / "w2")
    ctx.data = DataSource(uc.data, 0)
    got = {(m.metric, m.scope.split): m.value for m in DataQuality(DataQualityParams())(ctx).measurements}
    assert got[("non_finite", "test")] == 1 and got[("items", "test")] == 9


def test_string_images_are_named_and_excluded(tmp_path):
    loader_module(tmp_path, "strloader", ITEMS)
    uc = module_use_case(tmp_path, "strloader:load", params={"kind": "str"})
    stream = DataSource(uc.data, 0, uc.model).stream("test")
    assert sum(len(b) for b in stream.batches()) == 9
    [bad] = stream.unreadable
    assert bad.id == "cell3" and bad.kind == "dtype" and "expected numbers" in bad.error


@pytest.mark.parametrize("name, body, fragment", [
    ("boom_import", "raise RuntimeError('licence server down')\ndef load(split): ...\n",
     "importing module 'boom_import' of 'boom_import:load' raised RuntimeError: licence server down"),
    ("boom_call", "def load(split, threshold=0.5):\n    raise RuntimeError('no such split')\n",
     "loader 'boom_call:load': load('test', threshold=0.3) raised RuntimeError: no such split"),
    ("boom_len", "class S:\n    def __len__(self): raise RuntimeError('index lost')\n"
                 "    def __getitem__(self, i): ...\ndef load(split, threshold=0.5): return S()\n",
     "load('test', threshold=0.3): len() of its split raised RuntimeError: index lost"),
    ("boom_type", "def load(split, threshold=0.5): return 42\n", "returned an object of type int, without __len__"),
])
def test_loader_exceptions_are_user_errors_naming_the_loader(tmp_path, name, body, fragment):
    loader_module(tmp_path, name, body)
    uc = module_use_case(tmp_path, f"{name}:load", params={"threshold": 0.3})
    with pytest.raises(DataError) as e:
        DataSource(uc.data, 0, uc.model).stream("test")
    assert fragment in str(e.value)


def test_pixel_limit_is_checked_before_decoding(tmp_path, monkeypatch):
    """A real image over a (lowered) limit: refused from its header, never decoded."""
    monkeypatch.setattr(streaming, "MAX_PIXELS", 100)
    uc = folder(tmp_path, lambda p: save_png(p, np.zeros((16, 16), np.uint8)))
    stream = DataSource(uc.data, 0, uc.model).stream("test")
    assert sum(len(b) for b in stream.batches()) == 0 and len(stream.unreadable) == 32
    assert all("over the limit of 100 pixels" in u.error for u in stream.unreadable)


def test_without_a_contract_the_usual_shape_of_the_batch_wins(tmp_path):
    uc = folder(tmp_path, lambda p: save_png(p, np.zeros((1, 1), np.uint8)))
    stream = DataSource(uc.data, 0).stream("test")  # no model: no declared input
    assert sum(len(b) for b in stream.batches(32)) == 31
    [bad] = stream.unreadable
    assert bad.id == "ok/0000_first.png" and bad.kind == "shape"

"""`fit: tiles` in the assessment: `trustcase validate` and `assess` on whole images of three sizes (PNG files), a real
TorchScript segmenter of 8x8 tiles stitched over each image (`tasks.segmentation_tiles.TiledSegmenter`), real Prefect
and MLflow. The performance evidence equals the tiler's own computation (`segmentation_tiles.evaluate`) exactly, at
two batch sizes; every check of the plan runs on whole images or says why it is not applicable."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from torch import nn

CLASSES = ["background", "defect"]
# read in name order: equal sizes side by side, so batches of 32 stack runs of two images and batches of 3 cut elsewhere
SIZES = {"a": (13, 21), "b": (13, 21), "c": (16, 16), "d_free": (16, 16), "e_free": (9, 30), "f": (6, 5)}

LOADER = '''
from pathlib import Path
from trustcase.data.masks import MaskSplit, pair_files

def load(split, root, classes, size=(8, 8), fit="tiles", overlap=(0, 0)):
    pairs = pair_files(Path(root) / split / "images", Path(root) / split / "masks")
    meta = [{"defect": "free" if "free" in i.stem else "spot"} for i, _ in pairs]
    return MaskSplit(pairs, classes, tuple(size), fit=fit, encoding="index", meta=meta, root=Path(root) / split,
                     overlap=tuple(overlap))
'''


class Blurred(nn.Module):
    """A defect where the 3x3 mean around a pixel (input scaled to [0, 1]) is above mid-grey: each pixel depends on
    its neighbours, so a tile's edge changes its logits and the stitching matters."""

    def forward(self, x):
        m = nn.functional.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)
        return torch.cat([0.5 - m, m - 0.5], dim=1) * 8


def _pair(folder, stem, image, mask):
    for sub, array in (("images", image), ("masks", mask)):
        (folder / sub).mkdir(parents=True, exist_ok=True)
        Image.fromarray(array).save(folder / sub / f"{stem}.png")


def write_case(root, overlap=(2, 2), batch_size=32, plan=None, seed=3):
    """Splits train and test of whole images of 13x21, 16x16, 9x30 and 6x5 px (smaller than a tile) with index
    masks; a rectangle of bright pixels, marked in the mask of the defective images (a bit off, so IoU < 1)."""
    rng = np.random.default_rng(seed)
    for split in ("train", "validation", "test"):
        for stem, (h, w) in SIZES.items():
            image = rng.integers(20, 90, size=(h, w)).astype(np.uint8)
            mask = np.zeros((h, w), np.uint8)
            y, x = int(rng.integers(0, h - 3)), int(rng.integers(0, w - 3))
            image[y:y + 3, x:x + 4] = rng.integers(180, 250, size=(3, min(4, w - x)))
            if "free" not in stem:
                mask[y:y + 3, x:x + 3] = 1
            _pair(root / "data" / split, stem, image, mask)
    (root / "tileloader.py").write_text(LOADER)
    model = root / "seg.pt"
    torch.jit.script(Blurred().eval()).save(str(model))
    raw = {
        "id": "tiled", "title": "tiles", "owner": "o", "criticality": "low", "intended_function": "mark defects",
        "task": "segmentation",
        "model": {"format": "torchscript", "path": str(model), "input_shape": [1, 8, 8], "class_names": CLASSES,
                  "critical_class": "defect", "normalisation": {"mean": [0.0], "std": [1.0]}, "defect_pixels": 3},
        "data": {"loader": "tileloader:load", "path": str(root),
                 "params": {"root": str(root / "data"), "classes": list(CLASSES), "size": [8, 8], "fit": "tiles",
                            "overlap": list(overlap)},
                 "splits": {"train": "train", "validation": "validation", "test": "test"}, "batch_size": batch_size},
        "odd": {"descriptors": [{"name": "defect", "source": "metadata", "values": ["spot", "free"]}]},
        "requirements": [{"id": "R1", "text": "IoU", "metric": "iou:defect", "comparator": ">=", "threshold": 0.1}],
        "plan": {"checks": plan or [{"check": "performance", "params": {"split": "test"}}]},
    }
    path = root / f"uc_{batch_size}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


PLAN = [
    {"check": "data_quality"},
    {"check": "performance", "params": {"split": "test"}},
    {"check": "perturbation_sweep", "params": {"split": "test", "perturbations": {
        "brighter": {"perturbation": "brightness", "grid": [0.1], "options": {"direction": "up"}}}}},
    {"check": "randomized_smoothing", "params": {"split": "test", "sigma": 0.12, "n0": 8, "n": 40, "alpha": 0.01,
                                                 "max_items": 3, "radii": [0.05], "batch_size": 16, "maps": 2}},
    {"check": "adversarial", "params": {"split": "test", "attacks": ["pgd_linf"], "linf": [2.0], "steps": 3,
                                        "restarts": 1, "max_items": 3, "distance": False, "batch_size": 4}},
    {"check": "odd_monitor"},
    {"check": "explainability", "params": {"split": "test", "items": 2}},
    {"check": "root_causes"},
]


def _validate(path):
    from typer.testing import CliRunner

    from trustcase.cli import app

    return CliRunner().invoke(app, ["validate", str(path)])


def test_validate_accepts_tiles(tmp_path):
    r = _validate(write_case(tmp_path, plan=PLAN))
    assert r.exit_code == 0, r.output


@pytest.mark.parametrize("edit, line, words", [
    (lambda raw: raw["data"]["params"].update(overlap=[2, 8]), "data.splits",
     "fit: tiles: tile width 8 with overlap 8: need a tile of >= 1 pixel and 0 <= overlap < tile"),
    (lambda raw: raw["model"].update(input_shape=[1, 8, 16]), "model.input_shape",
     "[1, 8, 16] is not one tile: the loader cuts tiles of 8x8 px"),
])
def test_validate_names_bad_tiles_on_their_line(tmp_path, edit, line, words):
    path = write_case(tmp_path)
    raw = yaml.safe_load(path.read_text())
    edit(raw)
    if raw["model"]["input_shape"] != [1, 8, 8]:  # a model of that input, so only the tile disagrees
        torch.jit.script(Blurred().eval()).save(raw["model"]["path"])
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    r = _validate(path)
    text = " ".join(r.output.split())
    assert r.exit_code == 2, r.output
    assert line in text and words in text and "Traceback" not in text


class Convolved(nn.Sequential):
    """Two seeded 3x3 convolutions: a network whose float32 output may depend on its pass's size."""

    def __init__(self):
        torch.manual_seed(0)
        super().__init__(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 2, 3, padding=1))


class Halving(nn.Module):
    """Logits at half the input's resolution: its output is not the tile's size."""

    def forward(self, x):
        m = nn.functional.avg_pool2d(x, 2)
        return torch.cat([0.5 - m, m - 0.5], dim=1)


def test_validate_names_a_model_whose_output_is_not_its_tile(tmp_path):
    path = write_case(tmp_path)
    torch.jit.script(Halving().eval()).save(str(tmp_path / "seg.pt"))
    r = _validate(path)
    text = " ".join(r.output.split())
    assert r.exit_code == 2 and "model.path" in text and "segmenter output is 4x4 px" in text, r.output


def _evidence(a):
    """Every check's measurements, keyed so that two assessments compare item by item."""
    return {(o.check, o.shard): [m.model_dump(mode="json") for m in o.measurements] for o in a.outcomes}


@pytest.mark.slow  # two assessments of eight checks: 150-220 s at a load of 15-20
@pytest.mark.usefixtures("prefect_harness")
def test_assess_reads_whole_images_by_tiles(tmp_path, tracking_uri):
    """`trustcase assess` of the tiled case at batch sizes 32 and 3: the performance evidence is the tiler's own
    (`segmentation_tiles.evaluate`, called directly on the same split) exactly, every figure the same at both batch
    sizes, and the checks that read model-sized inputs or inner layers say why they are not applicable."""
    import sys

    from typer.testing import CliRunner

    from trustcase.cli import app
    from trustcase.data.streaming import DataSource
    from trustcase.flows.preflight import preflight
    from trustcase.measurement import BOOTSTRAP_REPLICATES
    from trustcase.schemas import Assessment
    from trustcase.tasks import task_of
    from trustcase.tasks.segmentation_tiles import evaluate

    runs = {}
    for batch in (32, 3):
        path = write_case(tmp_path, batch_size=batch, plan=PLAN)
        out = tmp_path / f"out{batch}"
        r = CliRunner().invoke(app, ["assess", str(path), "--out", str(out), "--tracking-uri", tracking_uri])
        assert r.exit_code in (0, 3), r.output
        runs[batch] = Assessment.model_validate_json((out / "assessment.json").read_text())
    a = runs[32]
    assert _evidence(a) == _evidence(runs[3])
    by = {o.check: o for o in a.outcomes}
    for name in ("data_quality", "performance", "perturbation_sweep", "randomized_smoothing", "adversarial"):
        assert by[name].skipped is None and by[name].measurements, name
    for name, why in (("odd_monitor", "inputs of the model's input size"), ("explainability", "layer methods"),
                      ("root_causes", "inner layers")):
        assert by[name].skipped and "under fit: tiles" in by[name].skipped and why in by[name].skipped, name

    # the tiler called directly on the same whole images and masks
    sys.path.insert(0, str(tmp_path))
    uc = preflight(tmp_path / "uc_32.yaml")
    split = DataSource(uc.data, 0, uc.model).stream("test").split
    tally, rejected = evaluate(task_of(uc).load_model(uc.model), split, split.tiling, uc.model.defect_pixels,
                               seed=uc.plan.seed, batch=5, subgroups=["defect"])
    assert rejected == []
    direct = {(m.metric, tuple(m.scope.subgroup.items())): m.model_dump(mode="json", exclude={"scope"})
              for m in tally.compute("test", uc.plan.confidence, BOOTSTRAP_REPLICATES)}
    flow = {(m.metric, tuple(m.scope.subgroup.items())): m.model_dump(mode="json", exclude={"scope"})
            for m in by["performance"].measurements}
    assert flow == direct
    assert tally.pixels.sum() == sum(h * w for h, w in SIZES.values())  # whole images, padding never scored
    iou = flow[("iou:defect", ())]
    assert 0 < iou["value"] < 1 and iou["interval"] and iou["n"] == len(SIZES)
    assert "own size, on its whole mask" in " ".join(by["performance"].validity)


def test_the_tiled_model_is_the_tiler_bit_for_bit_and_differentiable(tmp_path):
    """`TiledSegmenter` on whole images (one size per batch, some smaller than the 8x8 tile) gives exactly the logits
    of `tiled_logits` (the same float64 sums in tile order) at the same tiles per pass, and with one tile per pass
    (the assessment's) the same logits for an image alone or in a batch; its gradient is the stitching's: for a
    per-pixel model (logit x - 0.5) every pixel's gradient of the summed defect logits is 1 (1/count from each of its
    count tiles; float32 of a float64 sum of at most 4 terms)."""
    from test_segmentation import Bright

    from trustcase.schemas import ModelSpec
    from trustcase.tasks.segmentation import Segmentation
    from trustcase.tasks.segmentation_tiles import TiledSegmenter, Tiling, tiled_logits

    rng = np.random.default_rng(0)
    for module in (Blurred(), Convolved(), Bright()):
        torch.jit.script(module.eval()).save(str(tmp_path / "m.pt"))
        spec = ModelSpec(format="torchscript", path=tmp_path / "m.pt", input_shape=[1, 8, 8], class_names=CLASSES,
                         critical_class="defect", normalisation={"mean": [0.0], "std": [1.0]})
        inner = Segmentation().load_model(spec)
        tiling = Tiling((8, 8), (3, 2), pad_value=255.0)
        for batch in (1, 5, 64):
            model = TiledSegmenter(inner, tiling, batch)
            for h, w in SIZES.values():
                images = rng.integers(0, 256, size=(2, h, w, 1)).astype(np.float32)
                ours = model.logits(images)
                theirs = [out for _, out in tiled_logits(inner, [(0, images[0]), (1, images[1])], tiling, batch)]
                assert ours.shape == (2, 2, h, w) and np.array_equal(ours, np.stack(theirs))
        one = TiledSegmenter(inner, tiling)  # the assessment's: one tile per pass, whatever the images per batch
        images = rng.integers(0, 256, size=(3, 13, 21, 1)).astype(np.float32)
        alone = np.concatenate([one.logits(images[i:i + 1]) for i in range(3)])
        assert np.array_equal(one.logits(images), alone)
        assert np.array_equal(alone, np.stack([o for _, o in tiled_logits(inner, enumerate(images), tiling, 1)]))
    x = model.to_input(rng.integers(0, 256, size=(3, 13, 21, 1)).astype(np.float32)).requires_grad_()
    model.forward(x)[:, 1].sum().backward()  # the last module: Bright
    assert torch.allclose(x.grad, torch.ones_like(x), rtol=0, atol=4 * 2.0 ** -24)


def _checks(tmp_path, batch_size):
    """The plan's checks that run on whole images, called directly on the tiled model (no Prefect)."""
    import sys

    from trustcase.checks import Context, build
    from trustcase.data.streaming import DataSource
    from trustcase.flows.preflight import preflight
    from trustcase.schemas import CheckSpec
    from trustcase.tasks import task_of
    from trustcase.tasks.segmentation_tiles import tiled

    path = write_case(tmp_path, batch_size=batch_size, plan=PLAN)
    sys.path.insert(0, str(tmp_path))
    uc = preflight(path)
    data = DataSource(uc.data, 0, uc.model)
    model = tiled(task_of(uc).load_model(uc.model), data.tiling())
    out = {}
    for spec in PLAN:
        ctx = Context(use_case=uc, model=model, data=data, seed=0, workdir=tmp_path / f"checks{batch_size}")
        try:
            out[spec["check"]] = build(CheckSpec.model_validate(spec))(ctx)
        except Exception as e:  # noqa: BLE001  (Unsupported: not applicable, its reason kept)
            out[spec["check"]] = e
    return uc, out


def test_the_checks_read_whole_images_the_same_at_any_batch_size(tmp_path):
    """Every check of the plan on the tiled case at batch sizes 32 and 3: the same measurements; performance equal
    to `segmentation_tiles.evaluate` exactly; the checks that cannot read whole images say why."""
    from trustcase.errors import Unsupported
    from trustcase.measurement import BOOTSTRAP_REPLICATES
    from trustcase.tasks.segmentation_tiles import evaluate

    uc, big = _checks(tmp_path, 32)
    _, small = _checks(tmp_path, 3)
    for name in ("data_quality", "performance", "perturbation_sweep", "randomized_smoothing", "adversarial"):
        assert [m.model_dump() for m in big[name].measurements] == [m.model_dump() for m in small[name].measurements]
        assert big[name].measurements, name
    for name in ("odd_monitor", "explainability", "root_causes"):
        assert isinstance(big[name], Unsupported) and "under fit: tiles" in str(big[name]), name
    from trustcase.data.streaming import DataSource
    from trustcase.tasks import task_of

    split = DataSource(uc.data, 0, uc.model).stream("test").split
    tally, _ = evaluate(task_of(uc).load_model(uc.model), split, split.tiling, uc.model.defect_pixels, batch=7,
                        subgroups=["defect"])
    direct = tally.compute("test", uc.plan.confidence, BOOTSTRAP_REPLICATES)
    assert [m.model_dump() for m in big["performance"].measurements] == [m.model_dump() for m in direct]
    pixels, _ = big["performance"].figures
    assert sum(map(sum, pixels.counts)) == sum(h * w for h, w in SIZES.values())


def test_overlays_of_images_of_several_sizes_keep_their_shape():
    """The performance check's examples under tiles are whole images of several sizes: each is drawn at its own
    scale on a white margin (padded to the largest), never stretched to the first one's size."""
    from trustcase.tasks.segmentation import overlays

    tall, wide = np.full((6, 3, 1), 0.0), np.full((4, 6, 1), 0.0)
    strip = overlays([tall, wide], [np.zeros((6, 3), np.uint8), np.zeros((4, 6), np.uint8)],
                     [np.zeros((6, 3), np.uint8), np.zeros((4, 6), np.uint8)], ["a", "b"], (0.0, 255.0))
    f = 16  # strip_image's scale: 96 px over the 6 px side of the padded panels
    assert strip.shape[:2] == (6 * f + 20, 2 * 6 * f + 4)
    assert (strip[:6 * f, :3 * f] == 0).all() and (strip[:6 * f, 3 * f:6 * f] == 255).all()  # tall: 3 px, then margin
    assert (strip[:4 * f, 6 * f + 4:] == 0).all() and (strip[4 * f:6 * f, 6 * f + 4:] == 255).all()  # wide: 4 rows

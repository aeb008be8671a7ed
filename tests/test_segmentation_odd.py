"""The ODD monitor of a segmenter: the specification's image descriptors, and the learned monitor on the segmenter's
backbone features (its exported `features(x)`; without it, its per-pixel logits pooled per class), against known
answers on tiny grey tiles."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_segmentation import CLASSES, LOADER, Bright, _context

from trustcase.odd.features import FeatureExtractor
from trustcase.tasks.segmentation import Segmentation


class BrightWithFeatures(Bright):
    """Bright (a pixel is a defect above mid-grey) whose backbone exports one feature: the image's mean grey level
    (scaled to [0, 1])."""

    @torch.jit.export
    def features(self, x):
        return x.mean(dim=(1, 2, 3))[:, None]


def _tiles(folder: Path, levels, rng) -> None:
    """Grey tiles of the given levels, every other one with a 2x2 defect at 220 marked in its mask."""
    for sub in ("images", "masks"):
        (folder / sub).mkdir(parents=True)
    for k, g in enumerate(levels):
        image, mask = np.full((16, 16), int(g), np.uint8), np.zeros((16, 16), np.uint8)
        if k % 2:
            y, x = rng.integers(0, 14, 2)
            image[y:y + 2, x:x + 2], mask[y:y + 2, x:x + 2] = 220, 1
        stem = f"t{k:02d}" if k % 2 else f"t{k:02d}_free"
        Image.fromarray(image).save(folder / "images" / f"{stem}.png")
        Image.fromarray(mask).save(folder / "masks" / f"{stem}.png")


def _case(tmp_path: Path, module: torch.nn.Module):
    from trustcase.schemas import UseCase

    rng = np.random.default_rng(0)
    for split, n in (("train", 40), ("validation", 40), ("test", 12)):
        _tiles(tmp_path / "data" / split, np.clip(rng.normal(100, 3, n), 90, 110), rng)
    (tmp_path / "segloader.py").write_text(LOADER)
    torch.jit.script(module).save(str(tmp_path / "seg.pt"))
    return UseCase.model_validate({
        "id": "seg", "title": "t", "owner": "o", "criticality": "low", "intended_function": "f",
        "task": "segmentation",
        "model": {"format": "torchscript", "path": str(tmp_path / "seg.pt"), "input_shape": [1, 16, 16],
                  "class_names": CLASSES, "critical_class": "defect", "defect_pixels": 2},
        "data": {"loader": "segloader:load", "path": str(tmp_path),
                 "params": {"root": str(tmp_path / "data"), "classes": CLASSES},
                 "splits": {"train": "train", "validation": "validation", "test": "test"}},
        "odd": {"descriptors": [{"name": "brightness", "min": 0, "max": 255},
                                {"name": "defect", "source": "metadata", "values": ["spot", "free"]}]},
        "requirements": [{"id": "R1", "text": "t", "metric": "false_alarm_rate", "comparator": "<=",
                          "threshold": 0.5}],
        "plan": {"checks": [{"check": "odd_monitor"}]}})


PARAMS = {"perturbations": {"brightness": [0.3]}, "boundary": {"brightness": 0.1}}


def _run(uc, tmp_path):
    from trustcase.checks import build
    from trustcase.schemas import CheckSpec

    out = build(CheckSpec(check="odd_monitor", params=PARAMS))(_context(uc, tmp_path, "odd"))
    by = {(m.metric, m.scope.perturbation.name if m.scope.perturbation else None, m.amplitude): m
          for m in out.measurements}
    return out, by


def test_the_monitor_of_a_segmenter_learns_its_backbone_features(tmp_path):
    """Fitted on tiles of grey level about 100 (its one feature, the mean grey level: a defect moves it by under 2
    levels): brightened by 30% of the range (about 76 grey levels, many standard deviations) every test tile is
    stopped, and no clean one is."""
    out, by = _run(_case(tmp_path, BrightWithFeatures()), tmp_path)
    assert out.summary["feature_mode"] == "backbone" and out.summary["calibration"]["scores"] == ["mahalanobis"]
    assert out.summary["calibration"]["info"]["feature_dim"] == 1 and out.summary["calibration"]["info"]["n_fit"] == 40
    assert by[("detection_rate", "brightness", 0.3)].value == 1 and by[("detection_rate", "brightness", 0.3)].n == 12
    assert by[("false_alarm_rate", None, None)].value == 0 and by[("false_alarm_rate", None, None)].n == 12
    assert by[("odd_share", None, None)].value == 1
    assert not any(m.metric.startswith("accuracy") for m in out.measurements)
    assert any("not applicable to a segmenter" in x for x in out.limitations)  # energy: no class logits
    assert any("image-level decision is not judged" in x for x in out.limitations)
    assert (tmp_path / "checks" / "odd" / "monitor.safetensors").is_file()


def test_the_saved_monitor_runs_beside_the_segmenter(tmp_path):
    """The monitor file, loaded with the use case's segmenter, gives the check's decisions: a tile at level 100 is
    IN, the same tile brightened by 76 grey levels OUT with the learned reason."""
    from trustcase.odd import monitor as odd

    uc = _case(tmp_path, BrightWithFeatures())
    _run(uc, tmp_path)
    seg = Segmentation().load_model(uc.model)
    mon = odd.Monitor.load(tmp_path / "checks" / "odd" / "monitor.safetensors", seg)
    d = mon.evaluate(np.stack([np.full((16, 16, 1), 100.0), np.full((16, 16, 1), 176.0)]).astype(np.float32),
                     {"defect": ["free", "free"]})
    assert d.state.tolist() == [odd.State.IN, odd.State.OUT]
    assert any(r.startswith("learned: mahalanobis") for r in d.reasons(1))


def test_without_features_the_pooled_logits_serve_and_say_so(tmp_path):
    """Bright's logits (0.5 - x, x - 0.5) per pixel: their mean per class moves with the grey level, so the pooled
    logits stop the brightened tiles too; the limitation names the weaker features."""
    out, by = _run(_case(tmp_path, Bright()), tmp_path)
    assert out.summary["feature_mode"] == "pooled_logits"
    assert out.summary["calibration"]["info"]["feature_dim"] == 4  # mean and max of each of the two classes
    assert by[("detection_rate", "brightness", 0.3)].value == 1
    assert any("weaker features" in x and "exports no features(x)" in x for x in out.limitations)


def test_a_black_box_segmenter_gets_its_pooled_logits(tmp_path):
    seg = Segmentation().load_model(_case(tmp_path, Bright()).model)
    box = type(seg)(type(seg._inner)(seg.spec))  # the same contract without a torch module
    box.forward = seg.forward
    ex = FeatureExtractor(box)
    assert ex.mode == "pooled_logits" and "black box" in ex.why
    feats, logits = ex(np.full((3, 16, 16, 1), 100.0, np.float32))
    assert logits is None and feats.shape == (3, 4)
    assert feats[:, 0] == pytest.approx(0.5 - 100 / 255, abs=1e-6)  # the background's mean logit


def test_the_bundled_unet_exports_its_bottleneck_features():
    """use_cases/magnetic_tiles/train.py's U-Net, scripted as train.py exports it: features(x) is the bottleneck
    averaged over the image, (B, 64), and the monitor reads it."""
    # loaded under a name of its own: a bare `import train` would leave this case's train.py as sys.modules["train"]
    # for every later test (the code hash of another case's `train:fit` then reads this file)
    spec = importlib.util.spec_from_file_location(
        "magnetic_tiles_train_odd", Path(__file__).resolve().parents[1] / "use_cases" / "magnetic_tiles" / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    UNet = module.UNet

    torch.manual_seed(0)
    net = torch.jit.script(UNet().eval())
    x = torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        f = net.features(x)
        bottom = net.bottom(torch.nn.functional.max_pool2d(
            net.enc[2](torch.nn.functional.max_pool2d(net.enc[1](torch.nn.functional.max_pool2d(net.enc[0](x), 2)), 2)),
            2))
    assert f.shape == (2, 64)
    assert torch.allclose(f, bottom.mean(dim=(2, 3)), rtol=0, atol=1e-6)


def test_the_monitor_file_loads_its_segmenter_from_the_model_file(tmp_path):
    """`trustcase monitor`'s way: the monitor file and the model FILE (hash-checked, then seen as a segmenter, as the
    monitor recorded): the same decisions as with the use case's loaded segmenter."""
    from trustcase.odd import monitor as odd

    uc = _case(tmp_path, BrightWithFeatures())
    _run(uc, tmp_path)
    mon = odd.Monitor.load(tmp_path / "checks" / "odd" / "monitor.safetensors", uc.model.path)
    assert mon.feature_mode == "backbone" and hasattr(mon.model, "segment")
    d = mon.evaluate(np.stack([np.full((16, 16), 100.0), np.full((16, 16), 176.0)]).astype(np.float32),
                     {"defect": ["free", "free"]})
    assert d.state.tolist() == [odd.State.IN, odd.State.OUT]

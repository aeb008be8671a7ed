"""HUDD for a segmenter: the errors are defective images whose defect the image-level rule misses, explained by the
Grad-CAM of the true defect region's logits; planted causes of misses must come out as clusters, named by the ODD,
and pull their own pool items.

The segmenter is built by hand so its behaviour is known: a pixel is a defect when the 3x3 mean of the image in
[0, 1] exceeds 0.6 (background logit 0, defect logit 20 (mean - 0.6)). The images are the detection test's: one
square at the centre; a dark marker over its top half leaves 4 defect pixels, fewer than the rule's 24, a dim square
none. Images with neither are found; defect-free images are no error (and belong to no cluster).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from test_root_causes_detection import SIDE, planted
from torch import nn

from trustcase.checks import Context, build
from trustcase.data.streaming import DataSource, Item, Mask
from trustcase.explain import root_causes as R
from trustcase.schemas import CheckSpec, UseCase
from trustcase.tasks import task_of

HERE = Path(__file__).resolve().parent
SPLITS = {"test": {"found": 12, "marker": 12, "dim": 12, "free": 8},
          "pool": {"found": 12, "marker": 10, "dim": 10, "free": 8}}
RULE = 24  # defect pixels for "defective": a found square gets 32 (IoU 0.89), a marked one 4 (IoU 0.11)


class PlantedMasks:
    def __init__(self, split: str, seed: int = 0):
        rng = np.random.default_rng([seed, len(split), 27])
        self.items = []
        for cause, n in SPLITS[split].items():
            for i in range(n):
                img, mask = planted(rng, cause)
                if cause == "free":
                    img, mask = np.clip(rng.normal(90, 6, (SIDE, SIDE)), 0, 255).astype(np.uint8), mask & False
                self.items.append(Item(image=img, label=Mask(mask.astype(np.uint8)), id=f"{cause}-{i}",
                                       meta={"cause": cause}))

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def load(split: str, seed: int = 0) -> PlantedMasks:
    return PlantedMasks(split, seed)


class MeanSegmenter(nn.Module):
    """A 1x1 convolution (the identity), a 3x3 mean, per-pixel logits (background 0, defect 20 (mean - 0.6))."""

    def __init__(self):
        super().__init__()
        self.pre = nn.Conv2d(1, 1, 1, bias=False)
        self.mean = nn.Conv2d(1, 1, 3, padding=1, bias=False)
        nn.init.constant_(self.pre.weight, 1.0)
        nn.init.constant_(self.mean.weight, 1.0 / 9)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.mean(self.pre(x))
        return torch.cat([torch.zeros_like(m), 20.0 * (m - 0.6)], dim=1)


def use_case(tmp_path: Path, training: dict | None = None, plan: list | None = None) -> UseCase:
    return UseCase.model_validate({
        "id": "planted_masks", "title": "planted misses", "owner": "tests", "criticality": "high",
        "intended_function": "set aside tiles with a bright defect", "task": "segmentation",
        "model": {"format": "torchscript", "path": str(tmp_path / "segmenter.pt"), "input_shape": [1, SIDE, SIDE],
                  "value_range": [0, 255], "class_names": ["background", "defect"], "critical_class": "defect",
                  "defect_pixels": RULE},
        "data": {"loader": "test_root_causes_segmentation:load", "path": str(HERE),
                 "splits": {"train": "pool", "test": "test"}, "batch_size": 16},
        "odd": {"descriptors": [{"name": "cause", "source": "metadata",
                                 "values": ["found", "marker", "dim", "free"]}]},
        "requirements": [], "plan": {"checks": plan or []}, **({"training": training} if training else {}),
    })


def segmenter(uc: UseCase):
    Path(uc.model.path).parent.mkdir(parents=True, exist_ok=True)
    torch.jit.script(MeanSegmenter().eval()).save(uc.model.path)
    return task_of(uc).load_model(uc.model)


def run(tmp_path: Path, **params):
    uc = use_case(tmp_path)
    ctx = Context(use_case=uc, model=segmenter(uc), data=DataSource(uc.data, 0, uc.model), seed=0,
                  workdir=tmp_path / "root_causes")
    return build(CheckSpec(check="root_causes", params={"noun": "tiles", **params}))(ctx)


def test_missed_defects_cluster_by_their_planted_cause(tmp_path):
    out = run(tmp_path, improvement_split="train", unsafe_budget=10)
    s = out.summary
    assert s["errors"] == SPLITS["test"]["marker"] + SPLITS["test"]["dim"] and s["relevance"] == "grad_cam"
    assert s["k"] == 2 and s["layer"] in ("conv1", "conv2")  # the TorchScript segmenter's convolutions, tapped
    by_cause = {}
    for c in s["clusters"]:
        causes = {m.split("-")[0] for m in c["members"]}
        assert len(causes) == 1, c["members"]  # the marked tiles, and only they, in one cluster
        by_cause[causes.pop()] = c
    assert set(by_cause) == {"marker", "dim"}
    for cause, c in by_cause.items():
        assert c["errors"] == {"missed defect": SPLITS["test"][cause]} and c["sizes"] == {"small defects": c["size"]}
        assert f"missed defect (small defects): {cause} tiles" in c["text"]
        picked = s["unsafe_set"][str(c["id"])]["ids"]
        assert len(picked) == 5 and all(i.split("-")[0] == cause for i in picked)
    # defect-free pool tiles have no defect region to explain: never in the unsafe set
    assert sum(v["candidates_within_radius"] for v in s["unsafe_set"].values()) <= 20
    assert "true defect region's score" in " ".join(out.validity)


def test_min_iou_counts_a_found_but_poorly_marked_defect(tmp_path):
    """At a rule of 4 pixels a marked square is found, with a defect IoU of 0.11: min_iou 0.5 makes those images
    errors too ("poorly marked"), and the found squares (IoU 0.89) stay out."""
    uc = use_case(tmp_path)
    uc = uc.model_copy(update={"model": uc.model.model_copy(update={"defect_pixels": 4})})
    model = segmenter(uc)
    reader = R.errors_of(model, min_iou=0.5)
    batch = next(DataSource(uc.data, 0, uc.model).stream("test").batches(64))
    e = reader.read(batch)
    kinds = dict(zip([batch.ids[i] for i in e.rows], e.kind, strict=True))
    assert {k.split("-")[0] for k in kinds} == {"marker", "dim"}
    assert {v for k, v in kinds.items() if k.startswith("marker")} == {"poorly marked defect"}
    assert {v for k, v in kinds.items() if k.startswith("dim")} == {"missed defect"}
    # the region score: the defect logits summed over the true region (one-hot target, background weight 0)
    x = model.to_input(batch.images[e.rows[:2]])
    expected = (MeanSegmenter()(x)[:, 1] * e.target[:2, 1]).sum(dim=(1, 2))
    assert torch.allclose(R.SegmentationErrors.score(MeanSegmenter()(x), e.target[:2]), expected)
    assert float(e.target[:, 0].abs().sum()) == 0.0

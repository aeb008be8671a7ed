"""HUDD for a detector: the errors are images with a missed true box, explained by the Grad-CAM of the missed box's
score; planted causes of misses must come out as clusters, named by the ODD, and pull their own pool items.

The detector is built by hand so its behaviour is known: a box filter of the square's side over the image in [0, 1],
whose peaks (3x3 max-pool suppression, the best four) are boxes of the square's side scoring sigmoid(20 (mean -
0.6)). Every image holds one bright square at the same place (an aligned view, as HUDD's face crops are). Two planted
causes make it miss the square at the threshold 0.5: a dark marker over the square's top half (the best window
slides down, its IoU with the square falls below 0.5, its score below the threshold) and a dim square. Items with
neither are found; so the errors are exactly the planted items, and each cause leaves its own relevance pattern.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from trustcase.checks import CheckError, Context, build
from trustcase.data.streaming import Boxes, DataSource, Item
from trustcase.explain import root_causes as R
from trustcase.schemas import CheckSpec, UseCase
from trustcase.tasks import task_of

HERE = Path(__file__).resolve().parent
SIDE, K = 24, 6  # image side, square side
SPLITS = {"test": {"found": 16, "marker": 14, "dim": 14},
          "pool": {"found": 20, "marker": 12, "dim": 12}}


def planted(rng: np.random.Generator, cause: str) -> tuple[np.ndarray, np.ndarray]:
    """A grey image in [0, 255] with one square at the centre and its (K, K) region mask; `cause` marker darkens
    the square's top half, dim makes the whole square faint."""
    img = rng.normal(90, 6, (SIDE, SIDE))
    r, c = 9, 9  # aligned, as HUDD's face crops: a Grad-CAM map moves with its object
    mask = np.zeros((SIDE, SIDE), bool)
    mask[r:r + K, c:c + K] = True
    img[mask] += 45 if cause == "dim" else 110
    if cause == "marker":
        img[r:r + K // 2 + 1, c:c + K] = rng.normal(40, 4, (K // 2 + 1, K))
    return np.clip(img, 0, 255).astype(np.uint8), mask


class PlantedBoxes:
    def __init__(self, split: str, seed: int = 0):
        rng = np.random.default_rng([seed, len(split)])
        self.items = []
        for cause, n in SPLITS[split].items():
            for i in range(n):
                img, mask = planted(rng, cause)
                ys, xs = np.nonzero(mask)
                box = np.array([[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1, 0]], np.float64)
                self.items.append(Item(image=img, label=Boxes(box), id=f"{cause}-{i}", meta={"cause": cause}))

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def load(split: str, seed: int = 0) -> PlantedBoxes:
    return PlantedBoxes(split, seed)


class PeakDetector(nn.Module):
    """A 1x1 convolution (the identity: a layer before the window), the square's box filter, its peaks."""

    def __init__(self, detections: int = 4):
        super().__init__()
        self.pre = nn.Conv2d(1, 1, 1, bias=False)
        self.window = nn.Conv2d(1, 1, K, bias=False)
        nn.init.constant_(self.pre.weight, 1.0)
        nn.init.constant_(self.window.weight, 1.0 / K ** 2)
        self.detections, self.side = detections, K

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        heat = torch.sigmoid(20.0 * (self.window(self.pre(x)) - 0.6))
        peaks = heat * (F.max_pool2d(heat, 3, 1, 1) == heat).to(heat.dtype)
        b, _, h, w = peaks.shape
        scores, at = peaks.reshape(b, -1).topk(self.detections)
        ys = torch.div(at, w, rounding_mode="floor").to(x.dtype)
        xs = (at - torch.div(at, w, rounding_mode="floor") * w).to(x.dtype)
        return torch.stack([xs, ys, xs + self.side, ys + self.side, scores, xs * 0], dim=-1)


def use_case(tmp_path: Path, plan: list | None = None, training: dict | None = None) -> UseCase:
    return UseCase.model_validate({
        "id": "planted_boxes", "title": "planted misses", "owner": "tests", "criticality": "high",
        "intended_function": "find bright squares", "task": "detection",
        "model": {"format": "torchscript", "path": str(tmp_path / "detector.pt"), "input_shape": [1, SIDE, SIDE],
                  "value_range": [0, 255], "class_names": ["square", "scratch"], "critical_class": "square",
                  "score_threshold": 0.5},
        "data": {"loader": "test_root_causes_detection:load", "path": str(HERE),
                 "splits": {"train": "pool", "test": "test"}, "batch_size": 16},
        "odd": {"descriptors": [{"name": "cause", "source": "metadata", "values": ["found", "marker", "dim"]}]},
        "requirements": [], "plan": {"checks": plan or []}, **({"training": training} if training else {}),
    })


def detector(uc: UseCase, scripted: bool):
    """The planted detector as the task loads it: from its TorchScript file (convolutions tapped from the graph), or
    eager (hooked)."""
    module = PeakDetector().eval()
    Path(uc.model.path).parent.mkdir(parents=True, exist_ok=True)
    torch.jit.script(module).save(uc.model.path)
    model = task_of(uc).load_model(uc.model)
    if not scripted:
        model.module = module
        model._inner.module = module
    return model


def run(tmp_path: Path, scripted: bool = False, **params):
    uc = use_case(tmp_path)
    ctx = Context(use_case=uc, model=detector(uc, scripted), data=DataSource(uc.data, 0), seed=0,
                  workdir=tmp_path / "root_causes")
    return build(CheckSpec(check="root_causes", params={"noun": "images", **params}))(ctx)


def cause_of(item: str) -> str:
    return item.split("-")[0]


@pytest.mark.parametrize("scripted", [False, True], ids=["eager", "torchscript"])
def test_missed_boxes_cluster_by_their_planted_cause(tmp_path, scripted):
    out = run(tmp_path, scripted, improvement_split="train", unsafe_budget=12)
    s = out.summary
    # the errors are exactly the images whose square is missed: the planted ones, and only those
    assert s["errors"] == SPLITS["test"]["marker"] + SPLITS["test"]["dim"] and s["relevance"] == "grad_cam"
    members = [m for c in s["clusters"] for m in c["members"]]
    assert sorted(members) == sorted(f"{c}-{i}" for c in ("marker", "dim") for i in range(SPLITS["test"][c]))
    assert s["k"] == 2
    by_cause = {}
    for c in s["clusters"]:
        causes = {cause_of(m) for m in c["members"]}
        assert len(causes) == 1, c["members"]  # each cluster holds one cause: the marker's items alone
        by_cause[causes.pop()] = c
    assert set(by_cause) == {"marker", "dim"}
    for cause, c in by_cause.items():
        assert c["errors"] == {"missed square": SPLITS["test"][cause]}
        assert c["sizes"] == {"small boxes": SPLITS["test"][cause]}  # 36 px: COCO's small
        assert cause in c["text"] and "missed square (small boxes)" in c["text"]  # named by the ODD's metadata
    m = {x.metric: x for x in out.measurements}
    assert m["errors"].value == 28 and m["errors"].n == sum(SPLITS["test"].values())
    assert m["root_cause_clusters"].value == 2
    # the unsafe set: an equal share per cluster, each pulling the pool images of its own cause
    assert m["unsafe_set_size"].value == 12
    for cause, c in by_cause.items():
        picked = s["unsafe_set"][str(c["id"])]["ids"]
        assert picked and all(cause_of(i) == cause for i in picked)
    assert any(a.path.endswith(".gif") for a in out.artefacts)
    assert "missed boxes' score" in " ".join(out.validity)


def test_the_same_evidence_whatever_the_batch_size(tmp_path):
    a = run(tmp_path / "a", batch_size=5).summary
    b = run(tmp_path / "b", batch_size=64).summary
    assert [c["members"] for c in a["clusters"]] == [c["members"] for c in b["clusters"]]
    assert a["layer"] == b["layer"]


def test_missed_box_score_is_its_overlap_times_its_score():
    """The explained score of a missed box is D-RISE's similarity: its best IoU x score among the detections of its
    class (padding boxes of class -1 add nothing)."""
    out = torch.tensor([[[0.0, 0, 6, 6, 0.3, 0], [3, 0, 9, 6, 0.4, 0], [0, 0, 6, 6, 0.9, 1]]])
    target = torch.tensor([[[0.0, 0, 6, 6, 0], [0, 0, 0, 0, -1]]])
    # IoU with the second detection: 18 / 54; with the first 1: max(0.3, 0.4 / 3)
    assert float(R.DetectionErrors.score(out, target)) == pytest.approx(0.3, abs=1e-6)


def test_a_layer_that_does_not_exist_is_named(tmp_path):
    with pytest.raises(CheckError, match="'conv9' does not exist; layers: conv1, conv2"):
        run(tmp_path, scripted=True, layers=["conv9"])
    with pytest.raises(CheckError, match="explains a class"):
        run(tmp_path, relevance="lrp")

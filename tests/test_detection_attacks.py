"""Attacks on a detector (vanishing, misclassification) through the one attack engine, against exact answers: a
detector whose box score is a known function of the mean grey level inside a region, so the smallest L-inf radius
that hides the box (or relabels it) is known in closed form. Below it no perturbation can succeed (recall stays
1); above it every attack of the engine must find one."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from trustcase.checks import Context
from trustcase.checks.adversarial import Adversarial
from trustcase.data.streaming import DataSource
from trustcase.robustness.attacks import Budget
from trustcase.robustness.detection_attacks import attack_boxes, found_boxes, recall_under_attack
from trustcase.schemas import ModelSpec, Requirement
from trustcase.schemas.loading import load_use_case
from trustcase.tasks import task_of
from trustcase.tasks.detection import Detection
from trustcase.tasks.detection_metrics import DetectionTally

CLASSES = ["crazing", "scratches"]
SIDE = 16
BOX = [4.0, 4.0, 12.0, 12.0]  # the detected box, also the true box
A, M0, M1, T = 40.0, 0.45, 0.40, 0.5  # score0 = sigmoid(A (m - M0)), score1 = sigmoid(A (M1 - m)); threshold T


class MeanDetector(torch.nn.Module):
    """Two detections of the same box: class 0 scoring sigmoid(A (m - M0)), class 1 sigmoid(A (M1 - m)), m the mean
    of the (normalised: pixels / 255) input inside rows 2..9, columns 3..10 (the planted cause); a padding row."""

    def __init__(self):
        super().__init__()
        self.register_buffer("box", torch.tensor(BOX))
        self.a, self.m0, self.m1 = A, M0, M1

    def forward(self, x):
        m = x[:, 0, 2:10, 3:11].mean(dim=(1, 2))
        box = self.box.expand(len(x), 4)
        s0, s1 = torch.sigmoid(self.a * (m - self.m0)), torch.sigmoid(self.a * (self.m1 - m))
        zero, one = torch.zeros_like(m), torch.ones_like(m)
        r0 = torch.cat([box, s0[:, None], zero[:, None]], 1)
        r1 = torch.cat([box, s1[:, None], one[:, None]], 1)
        pad = torch.cat([box * 0, -one[:, None], zero[:, None]], 1)
        return torch.stack([r0, r1, pad], 1)


@pytest.fixture(scope="module")
def detector(tmp_path_factory):
    path = tmp_path_factory.mktemp("det") / "mean.pt"
    torch.jit.script(MeanDetector()).save(str(path))
    spec = ModelSpec(format="torchscript", path=path, input_shape=[1, SIDE, SIDE], class_names=CLASSES,
                     critical_class="crazing", value_range=[0, 255], normalisation={"mean": [0.0], "std": [1.0]},
                     score_threshold=T)
    return Detection().load_model(spec)


def _images(n=3, seed=0):
    """Grey images with a mean of 140-160 and every pixel in 110-190: no clipping at 0 within the radii tested, so
    the closed form holds."""
    rng = np.random.default_rng(seed)
    return (rng.uniform(140, 160, (n, 1, 1, 1)) + rng.uniform(-30, 30, (n, SIDE, SIDE, 1))).astype(np.float32)


def _minimal_radius(images, objective):
    """The exact smallest L-inf radius (grey levels) that hides the box: every pixel of the region down by eps lowers
    its mean by eps, and nothing else moves the scores. Vanishing: score0 < T; misclassification: also score1 >= T."""
    m = images[:, 2:10, 3:11, 0].astype(np.float64).mean(axis=(1, 2))
    logit = math.log(T / (1 - T))
    bound = M0 + logit / A if objective == "vanishing" else min(M0 + logit / A, M1 - logit / A)
    return m - 255 * bound


TRUE = [np.array([[*BOX, 0.0]])]


@pytest.mark.parametrize("objective", ["vanishing", "misclassification"])
@pytest.mark.parametrize("kind", ["fgsm", "pgd", "apgd", "auto"])
def test_a_gradient_attack_finds_the_minimal_perturbation_and_never_more(detector, kind, objective):
    images = _images()
    r = _minimal_radius(images, objective)
    assert (r > 1).all() and (r < 70).all()
    ids = ["a", "b", "c"]
    boxes = TRUE * 3
    budget = Budget(steps=10, restarts=1, apgd_steps=20)
    for i in range(3):
        above = attack_boxes(kind, detector, images[i:i + 1], boxes[:1], ids[i:i + 1], r[i] * 1.02, "linf", (0, 255),
                             T, objective, budget, seed=0)
        below = attack_boxes(kind, detector, images[i:i + 1], boxes[:1], ids[i:i + 1], r[i] * 0.98, "linf", (0, 255),
                             T, objective, budget, seed=0)
        assert not above[0][0], f"{kind} missed the radius {r[i]:.3f} hiding image {i}"
        assert below[0][0], f"{kind} reported a success below the provable radius {r[i]:.3f}"


def test_the_query_attack_hides_the_box_of_a_black_box(detector):
    images = _images()
    r = _minimal_radius(images, "vanishing")
    found = attack_boxes("square", detector, images, TRUE * 3, ["a", "b", "c"], float(r.max()) * 1.5, "linf",
                         (0, 255), T, "vanishing", Budget(queries=300), seed=0)
    assert not any(f[0] for f in found)
    safe = attack_boxes("square", detector, images, TRUE * 3, ["a", "b", "c"], float(r.min()) * 0.98, "linf",
                        (0, 255), T, "vanishing", Budget(queries=300), seed=0)
    assert all(f[0] for f in safe)


def test_recall_under_attack_is_the_clean_recall_at_radius_zero_and_full_when_unattackable(detector):
    images = _images(4, seed=1)
    ids = ["a", "b", "c", "d"]
    boxes = [TRUE[0], TRUE[0], np.array([[*BOX, 0.0], [0.0, 0.0, 3.0, 3.0, 1.0]]), TRUE[0]]  # one box never found
    clean = [found_boxes(d, g, T) for d, g in zip(detector.detect(images, ids), boxes, strict=True)]
    tally = DetectionTally(CLASSES, T, "adversarial", 0)
    tally.update(detector.detect(images, ids), boxes, ids)
    expected = next(m for m in tally.compute("test", 0.95, 50) if m.metric == "indication_recall")
    safe = float(_minimal_radius(images, "vanishing").min()) * 0.98
    for eps in (0.0, safe):
        found = attack_boxes("auto", detector, images, boxes, ids, eps, "linf", (0, 255), T, "vanishing",
                             Budget(restarts=1, apgd_steps=20), seed=0)
        ms = {m.metric: m for m in recall_under_attack("adversarial", "auto_linf.vanishing", "test", ids, boxes, found,
                                                       clean, CLASSES, eps, T, 0.95, 0)}
        assert ms["indication_recall"].value == pytest.approx(expected.value) == 4 / 5
        assert ms["attack_success_rate"].value == 0
        assert ms["indication_recall"].interval.lower < 0.8 < ms["indication_recall"].interval.upper
    hidden = attack_boxes("pgd", detector, images, boxes, ids, float(_minimal_radius(images, "vanishing").max()) * 1.1,
                          "linf", (0, 255), T, "vanishing", Budget(restarts=1), seed=0)
    ms = {m.metric: m for m in recall_under_attack("adversarial", "pgd_linf.vanishing", "test", ids, boxes, hidden,
                                                   clean, CLASSES, 1.0, T, 0.95, 0)}
    assert ms["indication_recall"].value == 0 and ms["attack_success_rate"].value == 1


def test_found_boxes_counts_as_the_detection_metrics(rng=np.random.default_rng(3)):
    """The hit rule's matching is the recall's: on random detections, the boxes found sum to DetectionTally's."""
    for _ in range(30):
        g = rng.uniform(0, 30, (rng.integers(1, 5), 2))
        gts = np.column_stack([g, g + rng.uniform(3, 10, g.shape), rng.integers(0, 2, len(g))])
        pick = rng.integers(0, len(gts), 6)
        dets = np.column_stack([gts[pick, :4] + rng.normal(0, 2, (6, 4)), rng.uniform(0, 1, 6),
                                rng.integers(0, 2, 6)])
        dets[:, 2:4] = np.maximum(dets[:, 2:4], dets[:, :2])
        dets = dets[np.argsort(-dets[:, 4])]
        tally = DetectionTally(CLASSES, 0.4, "x", 0)
        tally.update([dets], [gts], ["i"])
        assert found_boxes(dets, gts, 0.4).sum() == tally.found_at_threshold[0].sum()


STEEL = Path(__file__).resolve().parents[1] / "use_cases" / "steel_defects"


def steel_context(tmp_path, check: str):
    """The bundled steel-defect case on its real NEU-DET images and trained detector (skipped without them)."""
    sys.path.insert(0, str(STEEL))
    from neu import dataset_root

    model = STEEL / "artefacts" / "steel_detector.pt"
    if not (dataset_root() / "images").is_dir() or not model.is_file():
        pytest.skip("NEU-DET or the trained steel detector is missing (train.py)")
    uc = load_use_case(STEEL / "use_case.yaml")
    uc = uc.model_copy(update={"data": uc.data.model_copy(update={"max_samples": {"test": 24}})})  # a seeded subset
    return Context(use_case=uc, model=task_of(uc).load_model(uc.model), data=DataSource(uc.data, 0, uc.model), seed=0,
                   workdir=tmp_path / check)


def test_the_adversarial_check_measures_a_detector_by_its_recall_under_attack(tmp_path):
    ctx = steel_context(tmp_path, "adversarial")
    params = {"attacks": ["pgd_linf"], "linf": [2.0], "steps": 3, "restarts": 1, "max_items": 3, "batch_size": 2}
    check = Adversarial(Adversarial.Params(**params))
    out = check(ctx)
    produced = Adversarial.produces(check.params, ctx.use_case)
    by = {(m.metric, m.scope.perturbation.name, m.amplitude): m for m in out.measurements}
    for m in out.measurements:  # every measurement is declared, so the preflight can route claims to it
        assert any(p.covers(Requirement(id="x", text="x", metric=m.metric, comparator=">=", threshold=0,
                                        scope=m.scope)) for p in produced), m.metric
    for o in ("vanishing", "misclassification"):
        clean, attacked = by[("indication_recall", f"pgd_linf.{o}", 0.0)], by[("indication_recall", f"pgd_linf.{o}",
                                                                                2.0)]
        assert attacked.value <= clean.value and attacked.n == clean.n > 0
        assert attacked.interval.lower <= attacked.value <= attacked.interval.upper
    again = check(ctx)  # reproducible: the same evidence from the same seed
    assert [m.value for m in again.measurements] == [m.value for m in out.measurements]

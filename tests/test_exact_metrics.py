"""Monitoring, drift and calibration figures against answers known exactly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import context_for, folder_use_case, save_png

from trustcase.checks.data_quality import DataQuality, DataQualityParams
from trustcase.measurement import auroc
from trustcase.odd.validation import roc
from trustcase.performance import Tally
from trustcase.robustness.attacks import quantile_interval
from trustcase.schemas import UseCase

# --- AUROC / FPR at 95% TPR -------------------------------------------------------------------------

RNG = np.random.default_rng(0)
LOW, HIGH = RNG.uniform(0, 1, 200), RNG.uniform(2, 3, 150)  # separable: every positive above every negative


def test_roc_of_separable_scores():
    a, fpr95, fpr, tpr = roc(LOW, HIGH)
    assert a == 1.0 and fpr95 == 0.0
    assert fpr[0] == tpr[0] == 0.0 and fpr[-1] == tpr[-1] == 1.0
    a, fpr95, _, _ = roc(HIGH, LOW)  # the monitor scoring in-ODD inputs higher: the worst ordering
    assert a == 0.0 and fpr95 == 1.0
    assert auroc(LOW, HIGH) == 1.0 and auroc(HIGH, LOW) == 0.0


def test_roc_of_identical_scores():
    same = RNG.normal(size=300)
    a, fpr95, _, _ = roc(same, same.copy())
    assert a == 0.5 and auroc(same, same.copy()) == 0.5
    assert fpr95 == pytest.approx(0.95, abs=1 / 300)  # the ROC curve is the diagonal
    constant = np.zeros(50)
    assert roc(constant, constant)[0] == 0.5 and auroc(constant, constant) == 0.5  # ties count half


def test_roc_by_hand():
    # negatives 1, 2, 3; positives 2.5, 3, 4: pairs won 2 + 2.5 + 3 = 7.5 of 9 (the tie at 3 counts half)
    neg, pos = np.array([1.0, 2.0, 3.0]), np.array([2.5, 3.0, 4.0])
    assert roc(neg, pos)[0] == pytest.approx(7.5 / 9) and auroc(neg, pos) == pytest.approx(7.5 / 9)
    # TPR >= 0.95 needs every positive (threshold 2.5): 1 of 3 negatives is above it
    assert roc(neg, pos)[1] == pytest.approx(1 / 3)


# --- drift: two-sided, both directions ---------------------------------------------------------------

def drift_case(tmp_path, test_level: int):
    rng = np.random.default_rng(1)
    root = tmp_path / f"data{test_level}"
    for split, level, n in (("train", 128, 20), ("test", test_level, 12)):
        for i in range(n):
            img = np.clip(rng.normal(level, 20, (16, 16)), 0, 255).astype(np.uint8)
            save_png(root / f"{split}/{'ok' if i % 2 else 'bad'}/{i}.png", img)
    uc = UseCase.model_validate(folder_use_case(root))
    module = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(256, 2))
    out = DataQuality(DataQualityParams())(context_for(uc, module, tmp_path / f"dq{test_level}"))
    return {m.metric: m for m in out.measurements if m.scope.split == "test"}


@pytest.mark.parametrize("level", [60, 200])
def test_drift_is_detected_darker_and_brighter(tmp_path, level):
    ms = drift_case(tmp_path, level)
    assert ms["drift_pvalue:brightness"].value < 1e-6
    assert ms["drift_pvalue:brightness"].details["ks_statistic"] == 1.0  # the two samples do not overlap


def test_no_drift_on_the_same_distribution(tmp_path):
    assert drift_case(tmp_path, 128)["drift_pvalue:brightness"].value > 0.05


# --- expected calibration error -------------------------------------------------------------------

def test_ece_weights_bins_by_their_counts():
    """10 bins; 3 items at confidence 0.95 (2 correct) and 1 at 0.65 (correct):
    ECE = 3/4 |2/3 - 0.95| + 1/4 |1 - 0.65| = 0.3 (the unweighted mean of the bins would be 0.3167)."""
    uc = UseCase.model_validate(folder_use_case(Path("/nonexistent")))
    t = Tally(uc, bins=10)
    conf = np.array([0.95, 0.95, 0.95, 0.65])
    logits = np.log(np.stack([conf, 1 - conf], 1))  # softmax gives back exactly (p, 1 - p): class 0 predicted
    t.update(logits, np.array([0, 0, 1, 0]))
    ece = next(m for m in t.compute("performance", "test", 0.95) if m.metric == "ece")
    assert ece.value == pytest.approx(0.3, abs=1e-12)
    assert ece.n == 4
    assert ece.details["count"] == [0, 0, 0, 0, 0, 0, 1, 0, 0, 3]
    assert ece.details["accuracy"][9] == pytest.approx(2 / 3) and ece.details["confidence"][6] == pytest.approx(0.65)


def test_ece_of_a_calibrated_stream_is_zero_and_batches_merge():
    """Confidence 0.8 with exactly 4 of 5 correct in one bin, 0.6 with 3 of 5 in another: ECE 0, in any batching."""
    uc = UseCase.model_validate(folder_use_case(Path("/nonexistent")))
    conf = np.array([0.8] * 5 + [0.6] * 5)
    logits = np.log(np.stack([conf, 1 - conf], 1))
    labels = np.array([0, 0, 0, 0, 1, 0, 0, 0, 1, 1])
    one, two = Tally(uc), Tally(uc)
    one.update(logits, labels)
    two.update(logits[:3], labels[:3])
    two.update(logits[3:], labels[3:])
    a, b = (next(m for m in t.compute("performance", "test", 0.95) if m.metric == "ece") for t in (one, two))
    assert a.value == pytest.approx(0.0, abs=1e-12) and a.value == b.value


# --- distribution-free quantile interval ------------------------------------------------------------

def test_median_interval_is_the_order_statistics_of_the_table():
    """n = 50, 95%: the classic distribution-free interval of the median is (x_(18), x_(33)) (binomial
    counts 17 and 32 at 2.5% and 97.5%), not [min, max]."""
    value, iv = quantile_interval(np.arange(1.0, 51.0)[::-1].copy(), 0.5, 0.95)
    assert (iv.lower, iv.upper, value) == (18.0, 33.0, 25.0)
    assert iv.confidence == 0.95 and iv.method == "order-statistic"
    # too few items for the level: the lower end falls back to 0 (no order statistic is low enough)
    assert quantile_interval(np.array([3.0, 5.0]), 0.5, 0.95)[1].lower == 0.0


# --- out of the declared value range ---------------------------------------------------------------

def test_out_of_range_counts_the_items_outside_the_value_range(tmp_path):
    rng = np.random.default_rng(2)
    root = tmp_path / "data"
    for i in range(6):
        img = np.clip(rng.normal(100, 10, (16, 16)), 0, 200).astype(np.uint8)
        if i < 2:
            img[0, 0] = 250  # above the declared maximum of 200
        save_png(root / f"test/{'ok' if i % 2 else 'bad'}/{i}.png", img)
        save_png(root / f"train/{'ok' if i % 2 else 'bad'}/{i}.png", np.full((16, 16), 90 + i, np.uint8))
    raw = folder_use_case(root)
    raw["model"]["value_range"] = [0, 200]
    uc = UseCase.model_validate(raw)
    module = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(256, 2))
    out = DataQuality(DataQualityParams())(context_for(uc, module, tmp_path / "dq"))
    got = {(m.metric, m.scope.split): m for m in out.measurements}
    assert got[("out_of_range", "test")].value == 2 and got[("out_of_range", "test")].n == 6
    assert got[("out_of_range", "train")].value == 0
    assert got[("constant_images", "train")].value == 6 and got[("constant_images", "test")].value == 0


# --- the tally's other outputs: cost, amplitude, subgroups, integer counts --------------------------

def test_tally_cost_amplitude_and_subgroups_by_hand():
    raw = folder_use_case(Path("/nonexistent"))
    raw["plan"]["cost_matrix"] = [[0, 1], [10, 0]]  # a missed "bad" costs 10, a false alarm 1
    raw["odd"] = {"descriptors": [{"name": "site", "source": "metadata", "values": ["a", "b"]},
                                  {"name": "temperature", "source": "metadata", "min": 0, "max": 50}]}
    uc = UseCase.model_validate(raw)
    t = Tally(uc)
    logits = np.log(np.array([[0.9, 0.1], [0.2, 0.8], [0.7, 0.3], [0.4, 0.6]]))
    labels = np.array([0, 1, 1, 0])  # one miss (true bad, predicted ok), one false alarm
    t.update(logits, labels, {"site": ["a", "a", "b", "b"], "temperature": ["10", "20", "30", "40"]})
    ms = t.compute("perturbation_sweep", "test", 0.95, perturbation="blur", amplitude=2.0)
    by = {(m.metric, tuple(m.scope.subgroup.items())): m for m in ms}
    cost = by[("cost", ())]
    assert (cost.value, cost.n, cost.unit, cost.amplitude) == ((10 + 1) / 4, 4, "per item", 2.0)
    assert cost.scope.perturbation.name == "blur" and cost.scope.perturbation.max_amplitude == 2.0
    acc = by[("accuracy", ())]
    assert acc.value == 0.5 and acc.amplitude == 2.0 and acc.scope.perturbation.name == "blur"
    assert acc.details["confusion"] == [[1, 1], [1, 1]]
    assert all(isinstance(v, int) for row in acc.details["confusion"] for v in row)  # counts, not floats
    assert by[("accuracy", (("site", "a"),))].value == 1.0 and by[("accuracy", (("site", "b"),))].value == 0.0
    assert by[("accuracy", (("site", "b"),))].amplitude == 2.0
    assert not any(k[1] and k[1][0][0] == "temperature" for k in by)  # a numeric descriptor is no subgroup
    ece = by[("ece", ())]
    assert ece.amplitude == 2.0 and all(isinstance(c, int) for c in ece.details["count"])

"""poisoning_screen: spectral signatures and activation clustering find a planted cluster exactly, stay quiet on
clean classes, and (slow) rank the items of a planted backdoor on real ELPV cells at the top."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from trustcase.data import poisoning as P

SOLAR = Path(__file__).resolve().parent.parent / "use_cases" / "solar_cells"


def test_a_planted_cluster_is_the_alarm_and_tops_the_spectral_ranking():
    rng = np.random.default_rng(0)
    f = rng.normal(size=(300, 16))
    planted = np.arange(0, 300, 20)  # 15 items, 5%
    f[planted] += 10.0 * np.eye(16)[3]  # 10 sd: no clean item of 300 reaches halfway
    r = P.screen(f, seed=0)
    assert r.alarm and np.array_equal(r.suspects, planted)
    assert set(np.argsort(-r.spectral)[:len(planted)]) == set(planted)
    assert P.precision_recall(r.suspects, planted) == (15, 15, 15)


def test_clean_classes_raise_no_alarm():
    rng = np.random.default_rng(1)
    alarms = sum(P.screen(rng.standard_t(df=5, size=(200, 16)), seed=s).alarm for s in range(30))
    assert alarms == 0


def test_too_few_items_are_refused():
    with pytest.raises(ValueError, match=f"at least {P.MIN_ITEMS}"):
        P.screen(np.zeros((5, 3)), seed=0)


def planted_backdoor(epochs: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """A 4x4 white patch on 5% of the training cells, labelled functional whatever they show; a small CNN trained
    on them (here: the use case's training contract reads its images from the data set itself, it cannot take
    patched ones). Returns the penultimate features of the functional class and the planted items among them
    (bench/bench_data.py reports the same figures)."""
    import torch

    sys.path.insert(0, str(SOLAR))
    import cnn
    import elpv

    split = elpv.ElpvSplit("train", size=32)
    x = np.stack([split[i].image for i in range(len(split))]).astype(np.float32)
    y = np.array([split[i].label for i in range(len(split))])
    rng = np.random.default_rng(0)
    planted = np.sort(rng.choice(np.flatnonzero(y == 1), int(0.05 * len(y)), replace=False))
    x[planted, -6:-2, -6:-2] = 255.0
    y[planted] = 0
    torch.manual_seed(0)
    model = cnn.build(width=8, size=32, arch="pooled")
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    xt = torch.from_numpy((x[:, None] / 255.0 - 0.6) / 0.16)
    yt = torch.from_numpy(y)
    for epoch in range(epochs):
        model.train()
        for i in torch.randperm(len(xt), generator=torch.Generator().manual_seed(epoch)).split(64):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(xt[i]), yt[i]).backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        feats = torch.nn.Sequential(*list(model.children())[:-1])(xt).flatten(1).numpy()
    functional = np.flatnonzero(y == 0)
    return feats[functional], np.flatnonzero(np.isin(functional, planted))


@pytest.mark.slow
def test_a_planted_backdoor_on_elpv_ranks_at_the_top():
    feats, planted_in = planted_backdoor()
    r = P.screen(feats, seed=0)
    top = np.argsort(-r.spectral)[:int(1.5 * len(planted_in))]  # Tran et al. remove 1.5 times the planted share
    found = len(set(top) & set(planted_in))
    assert found >= 0.8 * len(planted_in), (found, len(planted_in))
    hit, flagged, n = P.precision_recall(r.suspects, planted_in)
    assert r.alarm and hit >= 0.8 * n and hit >= 0.8 * flagged, (r, hit, flagged, n)

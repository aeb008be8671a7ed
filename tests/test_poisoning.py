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


def test_a_class_too_small_to_screen_leaves_the_alarm_count_undefined(tmp_path):
    """25 'ok' items are screened, 5 'bad' are not: 'poisoning_alarms <= 0' must not PASS on the 'ok' class
    alone (the poisoned cluster could be in the class never screened)."""
    import torch
    from conftest import context_for, folder_use_case, save_png

    from trustcase.checks.poisoning_screen import PoisoningScreen, PoisoningScreenParams
    from trustcase.schemas import Requirement, UseCase, Verdict
    from trustcase.verdicts import judge

    rng = np.random.default_rng(0)
    for cls, n in (("ok", 25), ("bad", 5)):
        for i in range(n):
            save_png(tmp_path / f"data/train/{cls}/{i}.png", rng.integers(0, 256, (16, 16), dtype=np.uint8))
    uc = UseCase.model_validate(folder_use_case(tmp_path / "data"))
    module = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(256, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    o = PoisoningScreen(PoisoningScreenParams())(context_for(uc, module, tmp_path / "work"))
    alarms = next(m for m in o.measurements if m.metric == "poisoning_alarms")
    assert o.summary.keys() == {"ok"}  # the 'ok' class was screened
    assert alarms.value is None and "1 of 2 classes" in alarms.details["undefined"]
    req = Requirement(id="P1", text="no poisoning alarm", metric="poisoning_alarms", comparator="<=",
                      threshold=0, scope={"split": "train"})
    (v,) = judge([req], [o])
    assert v.verdict is Verdict.INCONCLUSIVE and "not screened" in v.rationale


def test_a_class_larger_than_the_sample_is_screened_on_a_seeded_sample_and_its_counts_are_estimates(tmp_path):
    """Memory bound: at most max_items items per class; the same sample at any batch size; the counts over a
    sample are no census, so 'poisoning_alarms <= 0' cannot PASS on them."""
    import torch
    from conftest import context_for, folder_use_case, save_png

    from trustcase.checks.poisoning_screen import PoisoningScreen, PoisoningScreenParams
    from trustcase.schemas import Requirement, UseCase, Verdict
    from trustcase.testing import evidence_of
    from trustcase.verdicts import judge

    rng = np.random.default_rng(0)
    for cls, n in (("ok", 60), ("bad", 30)):
        for i in range(n):
            save_png(tmp_path / f"data/train/{cls}/{i}.png", rng.integers(0, 256, (16, 16), dtype=np.uint8))
    raw = folder_use_case(tmp_path / "data")
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(256, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    outs = []
    for batch_size in (7, 32):
        uc = UseCase.model_validate({**raw, "data": {**raw["data"], "batch_size": batch_size}})
        outs.append(PoisoningScreen(PoisoningScreenParams(max_items=25))(context_for(uc, module, tmp_path / "w")))
    o = outs[0]
    assert evidence_of(outs[0]) == evidence_of(outs[1])
    assert {c: (v["items"], v["screened"]) for c, v in o.summary.items()} == {"ok": (60, 25), "bad": (30, 25)}
    alarms = next(m for m in o.measurements if m.metric == "poisoning_alarms")
    assert alarms.kind == "estimate" and alarms.interval is None and "ok 25 of 60" in alarms.details["no_interval"]
    req = Requirement(id="P1", text="no poisoning alarm", metric="poisoning_alarms", comparator="<=",
                      threshold=0, scope={"split": "train"})
    (v,) = judge([req], [o])
    assert v.verdict is Verdict.INCONCLUSIVE

"""Local robustness proofs: exact on linear models (closed-form radius), sound on ReLU networks (no proved
ball holds a changed prediction), and the check end to end on the ACAS Xu use case."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import acas_use_case, context_for, folder_use_case
from test_properties import needs_acas, random_mlp
from torch import nn

from trustcase import clock
from trustcase.certification import graph as G
from trustcase.certification.local_robustness import decide, decisions
from trustcase.checks import Unsupported, artefact_name, build
from trustcase.schemas import CheckSpec, Requirement, UseCase
from trustcase.verdicts import judge

ROOT = Path(__file__).resolve().parent.parent


def ball(net, x, eps, timeout=10.0):
    """The verdict of `decide` (the check's, the lab's) on the L-inf ball of radius eps around x."""
    with torch.no_grad():
        c = int(net(torch.tensor(x[None], dtype=torch.float32)).argmax())
    t = lambda v: torch.tensor(v[None], dtype=torch.float64)  # noqa: E731
    return decide(G.from_model(net, (len(x),)), net, t(x), t(x - eps), t(x + eps), c, timeout)["verdict"], c


@pytest.mark.parametrize("seed", range(3))
def test_linear_models_are_proved_exactly_up_to_the_closed_form_radius(seed):
    """f = W x + b: the prediction c holds on the L-inf ball of radius eps iff, for every j,
    (w_c - w_j) x + b_c - b_j > eps ||w_c - w_j||_1."""
    rng = np.random.default_rng(seed)
    net = nn.Sequential(nn.Linear(4, 3)).eval()
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor(rng.normal(size=(3, 4))))
        net[0].bias.copy_(torch.tensor(rng.normal(size=3)))
    W, b = net[0].weight.detach().double().numpy(), net[0].bias.detach().double().numpy()
    x = rng.normal(size=4)
    c = int(np.argmax(W @ x + b))
    radius = min(((W[c] - W[j]) @ x + b[c] - b[j]) / np.abs(W[c] - W[j]).sum() for j in range(3) if j != c)
    assert ball(net, x, 0.98 * radius) == ("verified", c)
    assert ball(net, x, 1.02 * radius) == ("falsified", c)


@pytest.mark.parametrize("seed", range(4))
def test_a_proved_ball_holds_no_changed_prediction(seed):
    net = random_mlp(seed, sizes=(3, 12, 12, 3))
    rng = np.random.default_rng(seed)
    seen = set()
    for _ in range(8):
        x = rng.normal(size=3)
        for eps in (0.05, 0.3, 1.0, 3.0, 10.0):
            verdict, c = ball(net, x, eps)
            seen.add(verdict)
            if verdict == "verified":
                probe = x + rng.uniform(-eps, eps, (20000, 3))
                probe = np.concatenate([probe, x + eps * np.array(np.meshgrid(*[[-1, 1]] * 3)).reshape(3, -1).T])
                with torch.no_grad():
                    assert (net(torch.tensor(probe, dtype=torch.float32)).argmax(1) == c).all()
    assert seen >= {"verified", "falsified"}  # both outcomes exercised


def _image_folder(tmp_path):
    from conftest import save_png

    root = tmp_path / "data"
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for cls in ("ok", "bad"):
            for i in range(3):
                save_png(root / f"{split}/{cls}/{i}.png", rng.integers(0, 256, (16, 16), dtype=np.uint8))
    return UseCase.model_validate(folder_use_case(root))


def test_a_layer_the_bounds_cannot_handle_is_not_run_with_the_layer_named(tmp_path):
    uc = _image_folder(tmp_path)
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Sigmoid(), nn.Flatten(), nn.Linear(2 * 14 * 14, 2))
    check = build(CheckSpec(check="local_robustness"))
    with pytest.raises(Unsupported, match=r"layer 1 '1' \(Sigmoid\)"):
        check(context_for(uc, net, tmp_path / "checks" / "local_robustness"))


def test_an_image_cnn_gets_verdicts_per_ball_in_grey_levels_and_counterexample_images(tmp_path):
    uc = _image_folder(tmp_path)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 3, 3, stride=2), nn.BatchNorm2d(3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                        nn.Linear(27, 2))
    with torch.no_grad():
        net[1].running_var.fill_(4.0)
    check = build(CheckSpec(check="local_robustness", params={"radii": [0.5, 4, 64], "unit": "pixel",
                                                               "max_items": 4, "timeout": 2.0}))
    ctx = context_for(uc, net, tmp_path / "checks" / "local_robustness")
    out = check(ctx)
    s = out.summary
    assert s["engine"] == "layer graph" and s["items"] == 4 and s["unit"] == "pixel"
    for k in range(3):
        assert s["verified"][k] + s["falsified"][k] + s["unknown"][k] == 4
    assert s["verified"][0] > 0 and s["falsified"][-1] > 0
    scopes = {(m.metric, m.scope.perturbation.name, m.amplitude) for m in out.measurements}
    assert ("local_robustness_certified_accuracy", "linf_pixels", 0.5) in scopes
    saved = sorted((ctx.workdir / "counterexamples").glob("*.npy"))
    assert saved and len(saved) == sum(1 for a in out.artefacts if a.kind == "counterexample")
    import csv

    rows = {r["id"]: r for r in csv.DictReader(open(ctx.workdir / "items.csv"))}
    for path in saved:  # each counterexample changes the prediction by a plain forward pass
        row = next(r for i, r in rows.items() if path.name == artefact_name(i, ".npy"))
        c = int(row["prediction"])
        z = ctx.model.logits(np.load(path)[None].astype(np.float32))[0]
        assert z[1 - c] >= z[c]


@needs_acas
def test_the_check_on_the_acasxu_use_case(tmp_path):
    from trustcase.checks import Context
    from trustcase.data.streaming import DataSource
    from trustcase.models.loading import load_classifier

    uc = acas_use_case(tmp_path)
    check = build(CheckSpec(check="local_robustness", params={"radii": [0.001, 0.05], "max_items": 20}))
    ctx = Context(use_case=uc, model=load_classifier(uc.model), data=DataSource(uc.data, 0), seed=0,
                  workdir=tmp_path / "checks" / "local_robustness")
    # The check's 2 s per (input, radius) on the process's CPU clock: on a loaded machine a wall-clock budget buys
    # a sliver of a core and every pair can end unknown.
    wall = clock.use(time.process_time)
    try:
        out = check(ctx)
    finally:
        clock.use(wall)
    s = out.summary
    assert s["items"] == 20
    for k in range(len(s["radii"])):
        assert s["verified"][k] + s["falsified"][k] + s["unknown"][k] == 20
    assert s["verified"] == sorted(s["verified"], reverse=True)  # a larger ball is never easier
    assert s["falsified"] == sorted(s["falsified"])
    assert s["verified"][0] > 0 and s["falsified"][-1] > 0  # N_1,1 is robust somewhere and fragile somewhere
    assert (ctx.workdir / "items.csv").read_text().count("\n") == 21
    req = Requirement(id="L3", text="t", metric="local_robustness_verified", comparator=">=", threshold=0.01,
                      scope={"perturbation": {"name": "linf_radius", "max_amplitude": 0.001}})
    assert judge([req], [out])[0].verdict.value == "PASS"


def test_decisions_count_each_deciding_stage_and_the_median_time():
    answers = [{"method": "ibp", "seconds": 0.01}, {"method": "alpha-crown", "seconds": 2.0},
               {"method": "crown", "seconds": 0.5}, {"method": "bab: relu splits (12 boxes)", "seconds": 9.0},
               {"method": "attack engine (pgd), re-checked by a forward pass", "seconds": 0.2},
               {"method": "", "seconds": 30.0}]  # unknown: no stage decided it
    assert decisions(answers) == {"decided_by": {"ibp": 1, "crown": 1, "alpha-crown": 1, "bab": 1, "attack engine": 1,
                                                 "corner": 0}, "median_seconds": 1.25}

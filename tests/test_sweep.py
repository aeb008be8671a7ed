"""Perturbation sweeps on models whose answers are known in closed form, then on the real tiny CNN."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import context_for
from PIL import Image
from scipy import stats

from trustcase.checks import CheckError, Context, Unsupported, build
from trustcase.data.streaming import DataSource, Item
from trustcase.models.loading import load_classifier
from trustcase.robustness.sweep import area_under
from trustcase.schemas import CheckSpec, UseCase, Verdict, load_use_case
from trustcase.verdicts import judge

HERE = Path(__file__).resolve().parent


class ConstantSplit:
    """Constant images: the first `n_ok` of class 0 at grey level `ok`, the rest of class 1 at `bad`."""

    def __init__(self, split: str, n: int = 200, n_ok: int | None = None, ok: float = 50, bad: float = 220,
                 size: int = 8, dtype: str = "uint8"):
        self.n, self.n_ok = n, n // 2 if n_ok is None else n_ok
        self.ok, self.bad, self.size, self.dtype = ok, bad, size, dtype
        self.reads = 0

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> Item:
        self.reads += 1
        label = int(i >= self.n_ok)
        image = np.full((self.size, self.size), self.bad if label else self.ok, dtype=self.dtype)
        return Item(image=image, label=label, id=f"item-{i}", meta={"cell_type": "mono" if i % 2 else "poly"})


class MeanThreshold(torch.nn.Module):
    """Predicts class 1 when the mean normalised input exceeds t: fails once brightness pushes it there."""

    def __init__(self, t: float, k: float = 1000.0):
        super().__init__()
        self.t, self.k = t, k

    def forward(self, x):
        m = x.mean(dim=(1, 2, 3))
        return torch.stack([(self.t - m) * self.k, (m - self.t) * self.k], dim=1)


class PixelThreshold(MeanThreshold):
    """Predicts class 1 when the top-left pixel exceeds t."""

    def forward(self, x):
        p = x[:, 0, 0, 0]
        return torch.stack([(self.t - p) * self.k, (p - self.t) * self.k], dim=1)


def synthetic_case(requirements=(), loader: str = "test_sweep:ConstantSplit", params=None, value_range=(0, 255),
                   size: int = 8, confidential: bool = False, input_shape=None, normalisation=None) -> UseCase:
    return UseCase.model_validate({
        "id": "synthetic", "title": "t", "owner": "o", "criticality": "high", "intended_function": "f",
        "confidentiality": "confidential" if confidential else "public",
        "model": {"format": "torchscript", "path": "unused.pt", "input_shape": input_shape or [1, size, size],
                  "value_range": list(value_range), "normalisation": normalisation or {"mean": [0.0], "std": [1.0]},
                  "class_names": ["functional", "defective"], "critical_class": "defective"},
        "data": {"loader": loader, "path": str(HERE), "params": params or {}, "splits": {"test": "test"},
                 "batch_size": 32},
        "odd": {"descriptors": [{"name": "cell_type", "source": "metadata", "values": ["mono", "poly"]}]},
        "requirements": list(requirements), "plan": {"checks": []},
    })


def context(uc: UseCase, module: torch.nn.Module, tmp_path: Path, seed: int = 0) -> Context:
    return context_for(uc, module, tmp_path / "checks" / "perturbation_sweep", seed)


def sweep(perturbations, **params):
    return build(CheckSpec(check="perturbation_sweep", params={"perturbations": perturbations, **params}))


def claim(rid: str, metric: str, threshold: float, name: str, up_to: float, comparator: str = ">=") -> dict:
    return {"id": rid, "text": rid, "metric": metric, "comparator": comparator, "threshold": threshold,
            "scope": {"perturbation": {"name": name, "max_amplitude": up_to}}}


def get(outcome, metric: str, name: str, amplitude: float):
    return next(m for m in outcome.measurements if m.metric == metric and not m.scope.subgroup
                and m.scope.perturbation.name == name and m.amplitude == amplitude)


# --- a model built to fail above a known amplitude ----------------------------------------------------------

BRIGHTER = {"brighter": {"perturbation": "brightness", "grid": [0.1, 0.2, 0.3, 0.4], "options": {"direction": "up"}}}


def test_breaking_amplitude_of_a_model_built_to_fail_above_a_known_amplitude(tmp_path):
    # class 0 images sit at grey 50; the model calls "defective" above 50 + 0.25 x 255: it breaks between 0.2 and 0.3
    reqs = [claim("R-held", "accuracy", 0.9, "brighter", 0.2), claim("R-broken", "accuracy", 0.9, "brighter", 0.4),
            claim("R-recall", "recall:defective", 0.9, "brighter", 0.4)]
    uc = synthetic_case(reqs)
    out = sweep(BRIGHTER)(context(uc, MeanThreshold((50 + 0.25 * 255) / 255), tmp_path))
    assert [get(out, "accuracy", "brighter", a).value for a in (0.0, 0.1, 0.2, 0.3, 0.4)] == [1, 1, 1, .5, .5]
    assert get(out, "flip_rate", "brighter", 0.3).value == 0.5 and get(out, "flip_rate", "brighter", 0.0).value == 0
    acc = get(out, "accuracy", "brighter", 0.2)
    assert acc.n == 200 and acc.interval.lower == pytest.approx(stats.beta.ppf(0.025, 200, 1))

    evidence = {e.claim_id: e for e in judge(uc.requirements, [out])}
    assert evidence["R-held"].verdict is Verdict.PASS
    assert evidence["R-broken"].verdict is Verdict.FAIL and evidence["R-broken"].details["breaking_amplitude"] == 0.2
    assert evidence["R-recall"].verdict is Verdict.PASS  # class 1 images are bright already: always caught
    s = out.summary["brighter"]
    assert s["breaking"]["R-broken"] | {"holds_up_to": 0.2, "not_held_from": 0.3, "verdict_there": "FAIL",
                                        "point_holds_up_to": 0.2, "value": 1.0} == s["breaking"]["R-broken"]
    assert s["breaking"]["R-held"]["holds_up_to"] == 0.2  # judged over the whole grid, whatever the claim
    assert s["breaking"]["R-recall"]["holds_up_to"] == 0.4 and s["breaking"]["R-recall"]["not_held_from"] is None
    assert s["accuracy_auc"] == pytest.approx((0.1 * 2 + 0.075 + 0.05) / 0.4)
    assert s["critical_recall_auc"] == 1.0 and s["flip_rate"] == [0, 0, 0, 0.5, 0.5] and s["n"] == 200

    (curve,) = out.curves
    assert curve.id == "robustness_brighter" and curve.x == [0.0, 0.1, 0.2, 0.3, 0.4]
    assert set(curve.series) == {"accuracy", "recall:defective", "flip_rate"}
    assert curve.series["accuracy"].lower[3] < 0.5 < curve.series["accuracy"].upper[3]
    assert curve.y_marks["R-broken: accuracy >= 0.9"] == 0.9
    assert curve.x_marks["R-broken claimed up to"] == 0.4 and curve.x_marks["R-broken holds up to"] == 0.2
    # subgroups come for free from the Tally, and claims on them get the same treatment
    mono = [m for m in out.measurements if m.scope.subgroup == {"cell_type": "mono"} and m.metric == "accuracy"]
    assert len(mono) == 5 and all(m.n == 100 for m in mono)


def test_a_claim_that_does_not_hold_on_clean_data_has_no_breaking_amplitude(tmp_path):
    # 20 class-0 items, all correct clean: accuracy 1 but its lower bound (0.83) is below 0.9: INCONCLUSIVE
    uc = synthetic_case([claim("R", "accuracy", 0.9, "brighter", 0.2)], params={"n": 20, "n_ok": 20})
    out = sweep(BRIGHTER)(context(uc, MeanThreshold((50 + 0.25 * 255) / 255), tmp_path))
    b = out.summary["brighter"]["breaking"]["R"]
    assert b | {"holds_up_to": None, "not_held_from": 0.0, "verdict_there": "INCONCLUSIVE",
                "point_holds_up_to": 0.2} == b


def test_confidence_intervals_contain_the_true_rate_in_simulation(tmp_path):
    # flat grey 0.5 + noise of std a; the model errs when the top-left pixel exceeds 0.6: P = 1 - Phi(0.1 / a)
    grid = [0.05, 0.1, 0.2]
    truth = {a: 1 - stats.norm.cdf(0.1 / a) for a in grid}
    uc = synthetic_case(params={"n": 60, "n_ok": 60, "ok": 0.5, "dtype": "float32"}, value_range=(0, 1))
    check = sweep({"gaussian_noise": grid})
    covered, rates = [], {a: [] for a in grid}
    for seed in range(40):
        out = check(context(uc, PixelThreshold(0.6), tmp_path, seed))
        for a in grid:
            m = get(out, "accuracy", "gaussian_noise", a)
            err_lo, err_hi = 1 - m.interval.upper, 1 - m.interval.lower
            covered.append(err_lo <= truth[a] <= err_hi)
            rates[a].append(1 - m.value)
    assert np.mean(covered) >= 0.9  # Clopper-Pearson: >= 95% for every p
    for a in grid:  # and the noise really has the requested std: the error rates match the closed form
        se = math.sqrt(truth[a] * (1 - truth[a]) / (60 * 40))
        assert abs(np.mean(rates[a]) - truth[a]) < 4 * se, (a, np.mean(rates[a]), truth[a])


# --- mechanics --------------------------------------------------------------------------------------


def test_deterministic_sharded_and_independent_of_threads_and_batching(tmp_path):
    uc = synthetic_case(params={"n": 64})
    spec = {"dead_pixels": [0.05, 0.2], "darker": {"perturbation": "brightness", "options": {"direction": "down"}}}
    model = MeanThreshold(100 / 255)
    runs = [sweep(spec, workers=w, batch_size=b)(context(uc, model, tmp_path / f"{w}-{b}"))
            for w, b in ((0, None), (2, None), (0, 7))]
    values = [[(m.metric, m.scope, m.amplitude, m.value) for m in r.measurements] for r in runs]
    assert values[0] == values[1] == values[2]
    check = sweep(spec)
    shards = check.shards()
    assert [list(s.params.perturbations) for s in shards] == [["dead_pixels"], ["darker"]]
    assert shards[0].params.grid("dead_pixels") == [0.0, 0.05, 0.2]
    parts = [s(context(uc, model, tmp_path / "shards")) for s in shards]
    assert [m.value for p in parts for m in p.measurements] == [m.value for m in runs[0].measurements]
    assert {m.scope.perturbation.name for m in parts[1].measurements} == {"darker"}


def test_example_strip_is_written_unless_the_use_case_is_confidential(tmp_path):
    spec = {"gaussian_blur": [1.0, 2.0]}
    out = sweep(spec)(context(synthetic_case(size=16, params={"size": 16}), MeanThreshold(0.5), tmp_path / "public"))
    (art,) = out.artefacts
    assert art.kind == "image" and out.summary["gaussian_blur"]["strip"] == art.path
    png = tmp_path / "public" / "checks" / art.path
    with Image.open(png) as im:
        assert im.size == (3 * 96 + 2 * 4, 96 + 20)  # three amplitudes, upscaled to 96 px, captioned
    uc = synthetic_case(size=16, params={"size": 16}, confidential=True)
    secret = sweep(spec)(context(uc, MeanThreshold(0.5), tmp_path / "s"))
    assert not secret.artefacts and secret.summary["gaussian_blur"]["strip"] is None
    assert any("confidential" in x for x in secret.limitations)
    assert not list((tmp_path / "s").rglob("*.png"))


def test_validity_states_the_conditions(tmp_path):
    out = sweep({"gaussian_blur": [1.0]})(context(synthetic_case(), MeanThreshold(0.5), tmp_path))
    (v,) = out.validity
    assert "pixel space [0, 255]" in v and "seed 0" in v and "200 items" in v and "95% Clopper-Pearson" in v


def test_image_shape_problems_stop_the_sweep_before_any_work(tmp_path):
    uc = synthetic_case()
    ctx = context(uc, MeanThreshold(0.5), tmp_path)
    with pytest.raises(CheckError, match="40 columns but the images have 8"):
        sweep({"gaussian_blur": [1.0], "dead_columns": [40]})(ctx)
    assert ctx.data.stream("test").split.reads == 0
    tabular = synthetic_case(input_shape=[8])
    with pytest.raises(Unsupported, match="perturbs images"):
        sweep({"gaussian_blur": [1.0]})(context(tabular, MeanThreshold(0.5), tmp_path))


def test_area_under_the_curve():
    assert area_under([0, 1, 2], [1, 1, 1]) == 1.0
    assert area_under([0, 1, 3], [1, 0.5, 0.5]) == pytest.approx((0.75 + 1.0) / 3)
    assert area_under([0], [0.7]) == 0.7


# --- the real tiny CNN on real ELPV images --------------------------------------------------------------


def test_sweep_on_the_tiny_solar_model_agrees_with_the_performance_check(tiny_case, tmp_path):
    uc = load_use_case(tiny_case)
    clf = load_classifier(uc.model)
    ctx = Context(use_case=uc, model=clf, data=DataSource(uc.data, 0), seed=0, workdir=tmp_path / "c" / "sweep")
    perf = build(CheckSpec(check="performance"))(ctx)
    out = sweep({"gaussian_blur": [1.0, 3.0], "dead_columns": [2]})(ctx)
    clean = get(out, "accuracy", "gaussian_blur", 0.0)
    reference = next(m for m in perf.measurements if m.metric == "accuracy" and not m.scope.subgroup)
    assert (clean.value, clean.n) == (reference.value, reference.n)
    assert all(m.n == reference.n for m in out.measurements if not m.scope.subgroup and m.metric == "accuracy")
    assert {c.id for c in out.curves} == {"robustness_gaussian_blur", "robustness_dead_columns"}
    assert len(out.artefacts) == 2 and out.stage == "testing"

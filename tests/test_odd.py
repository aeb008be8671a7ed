"""ODD monitors: descriptors on images with known values, specification limits, learned-monitor calibration,
save/load, bad input, and detection vs blur on the real solar-cell data (tiny model)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.numpy import save_file
from torch import nn

from trustcase.checks import CheckError, Context, build
from trustcase.data import images as I
from trustcase.data.streaming import Batch, DataSource
from trustcase.models.classifier import Classifier
from trustcase.models.loading import load_classifier
from trustcase.odd import calibration, features
from trustcase.odd import learned as L
from trustcase.odd import monitor as odd
from trustcase.schemas import CheckSpec, Descriptor, ModelSpec, load_use_case

State = odd.State


def const(values, side=4):
    """Constant grey images: brightness is exactly the value."""
    return np.stack([np.full((side, side, 1), v, dtype=np.float64) for v in values])


# --- descriptors ----------------------------------------------------------------------------------

def test_descriptors_on_images_with_known_values():
    rng = np.random.default_rng(0)
    x = const([0.0, 100.0, 255.0], side=8)
    assert I.brightness(x).tolist() == [0.0, 100.0, 255.0]
    assert I.contrast(x).tolist() == [0.0, 0.0, 0.0]
    assert I.laplacian_variance(x).tolist() == [0.0, 0.0, 0.0]
    assert I.noise_sigma(x).tolist() == [0.0, 0.0, 0.0]
    assert I.saturated_fraction(x).tolist() == [0.0, 0.0, 1.0]
    assert I.dead_pixel_fraction(x).tolist() == [1.0, 0.0, 0.0]
    assert I.dead_lines(x).tolist() == [16.0, 16.0, 16.0]  # a uniform image: every row and column is flat

    # additive Gaussian noise on a linear ramp (which the noise mask cancels exactly)
    ramp = np.linspace(20, 200, 128)[None, :] + np.linspace(0, 30, 128)[:, None]
    noisy = (ramp + rng.normal(0, 10, (128, 128)))[None, :, :, None]
    assert I.noise_sigma(noisy)[0] == pytest.approx(10, rel=0.03)
    assert I.noise_sigma(ramp[None, :, :, None])[0] == pytest.approx(0, abs=1e-9)

    # exactly 37 dead and 11 saturated pixels out of 32 * 32, two dead columns and one dead row
    img = rng.uniform(50, 200, (32, 32, 1))
    flat = img.reshape(-1)
    idx = rng.choice(flat.size, 48, replace=False)
    flat[idx[:37]], flat[idx[37:]] = 0.0, 255.0
    assert I.dead_pixel_fraction(img[None])[0] == pytest.approx(37 / 1024)
    assert I.saturated_fraction(img[None])[0] == pytest.approx(11 / 1024)
    lines = rng.uniform(50, 200, (32, 32, 1))
    lines[:, [3, 17]] = 0.0
    lines[9, :] = 0.0
    assert I.dead_lines(lines[None])[0] == 3
    assert I.saturated_fraction(const([1.0]), value_range=(0.0, 1.0))[0] == 1.0

    # the filters against their definition written out in numpy (valid region, RGB through the luminance)
    rgb = rng.uniform(0, 255, (3, 9, 11, 3))
    g = rgb @ np.array([0.299, 0.587, 0.114])
    c = g[:, 1:-1, 1:-1]
    lap = g[:, :-2, 1:-1] + g[:, 2:, 1:-1] + g[:, 1:-1, :-2] + g[:, 1:-1, 2:] - 4 * c
    r = g[:, :, :-2] - 2 * g[:, :, 1:-1] + g[:, :, 2:]
    second = r[:, :-2] - 2 * r[:, 1:-1] + r[:, 2:]
    assert np.allclose(I.contrast(rgb), g.std(axis=(1, 2)), rtol=1e-12)
    assert np.allclose(I.laplacian_variance(rgb), lap.var(axis=(1, 2)), rtol=1e-12)
    assert np.allclose(I.noise_sigma(rgb), np.sqrt(np.pi / 2) / 6 * np.abs(second).mean(axis=(1, 2)), rtol=1e-12)


def test_blur_lowers_sharpness_monotonically():
    img = np.random.default_rng(1).uniform(0, 255, (1, 64, 64, 1)).astype(np.uint8)
    from trustcase.robustness.perturbations import get
    from trustcase.seeding import item_seeds

    blur = get("gaussian_blur", (0.0, 255.0))
    seeds = item_seeds(0, "test", [0], "gaussian_blur")
    s = [I.laplacian_variance(blur.apply(img, a, seeds))[0] for a in (0, 0.5, 1, 2, 3)]
    assert all(a > b for a, b in zip(s, s[1:], strict=False))


# --- specification monitor ------------------------------------------------------------------------

def test_specification_states_exactly_at_the_limits():
    spec = odd.SpecificationMonitor.from_odd([Descriptor(name="brightness", min=40, max=200, margin=10)])
    grid = [39.0, 39.99, 40.0, 45.0, 49.99, 50.0, 100.0, 190.0, 190.01, 200.0, 200.01, 250.0]
    expected = [2, 2, 1, 1, 1, 0, 0, 0, 1, 1, 2, 2]
    r = spec.evaluate(const(grid))
    assert r.states[:, 0].tolist() == expected
    assert r.values["brightness"] == grid
    # without margin the limits themselves are IN; one-sided ranges
    spec0 = odd.SpecificationMonitor.from_odd([Descriptor(name="brightness", min=40, max=200)])
    assert spec0.evaluate(const([39.99, 40.0, 200.0, 200.01])).states[:, 0].tolist() == [2, 0, 0, 2]
    lo = odd.SpecificationMonitor.from_odd([Descriptor(name="contrast", max=5, margin=1)])
    img = np.zeros((2, 4, 4, 1))
    img[1, :2] = 12.0  # contrast (std) = 6
    assert lo.evaluate(img).states[:, 0].tolist() == [0, 2]


def test_metadata_and_tabular_descriptors_with_reasons():
    descs = [Descriptor(name="cell_type", source="metadata", values=["mono", "poly"]),
             Descriptor(name="x1", source="feature", min=0, max=10, margin=1)]
    spec = odd.SpecificationMonitor.from_odd(descs)
    x = np.array([[5.0, 5.0], [0.0, 0.5], [0.0, 11.0], [0.0, np.nan]])
    r = spec.evaluate(x, {"cell_type": ["mono", "poly", "cigs", "mono"]})
    assert r.states.tolist() == [[0, 0], [0, 1], [2, 2], [0, 2]]
    named = odd.SpecificationMonitor.from_odd([Descriptor(name="rho", source="feature", min=0, max=1)],
                                              feature_names=["theta", "rho"])
    assert named.evaluate(np.array([[9.0, 0.5], [0.5, 9.0]])).states[:, 0].tolist() == [0, 2]
    # missing metadata: cannot confirm the input is inside: NEAR, with the reason
    assert spec.evaluate(x).states[:, 0].tolist() == [1, 1, 1, 1]
    lim = spec.limits
    assert lim[0].reason("cigs", 2) == "cell_type = 'cigs' is not one of ['mono', 'poly'] (OUT)"
    assert lim[1].reason(11.0, 2) == "x1 = 11 > max 10 (OUT)"
    assert lim[1].reason(0.5, 1) == "x1 = 0.5 within 1 of min 0 (NEAR)"


def test_bad_declarations_are_named():
    with pytest.raises(odd.MonitorError, match="'glare'.*does not exist.*brightness"):
        odd.SpecificationMonitor.from_odd([Descriptor(name="glare", min=0, max=1),
                                           Descriptor(name="brightness", min=0, max=9)])
    with pytest.raises(odd.MonitorError, match="'speed'.*not one of the input features"):
        odd.SpecificationMonitor.from_odd([Descriptor(name="speed", source="feature", min=0, max=1)],
                                          feature_names=["rho"])
    with pytest.raises(ValueError, match="min 5.0 > max 1.0"):
        Descriptor(name="brightness", min=5, max=1)
    with pytest.raises(ValueError, match="margin 3.0 is larger than half the range"):
        Descriptor(name="brightness", min=0, max=4, margin=3)
    spec = odd.SpecificationMonitor.from_odd([Descriptor(name="brightness", min=0, max=9)])
    with pytest.raises(odd.MonitorError, match="needs images"):
        spec.evaluate(np.zeros((3, 5)))


# --- learned monitor ------------------------------------------------------------------------------

def test_streaming_fit_equals_batch_fit_and_calibrated_false_alarm_rate_holds():
    rng = np.random.default_rng(0)
    d, k = 12, 3
    mix = rng.normal(size=(d, d))
    centres = rng.normal(0, 3, (k, d))

    def draw(n):
        y = rng.integers(0, k, n)
        return rng.normal(size=(n, d)) @ mix + centres[y], y

    f, y = draw(3000)
    fit = L.GaussianFit(k, d)
    for i in range(0, len(f), 77):  # odd batch size: streaming must not depend on it
        fit.update(f[i:i + 77], y[i:i + 77])
    means = np.stack([f[y == c].mean(axis=0) for c in range(k)])
    assert np.allclose(fit.means, means)
    cov, rho = fit.covariance("oas")
    assert 0 <= rho < 0.1  # plenty of data: little shrinkage
    maha = L.Mahalanobis.fit(fit.means, cov)
    prec = np.linalg.inv(cov)
    probe = f[:5] + 1.0
    exact = np.min([np.einsum("bi,ij,bj->b", probe - m, prec, probe - m) for m in fit.means], axis=0)
    assert np.allclose(maha(probe), exact, rtol=1e-4)

    learned = odd.LearnedMonitor(["mahalanobis", "energy"], maha, {}, {}, np.inf, np.inf)
    logits = lambda x: -0.05 * ((x[:, None, :] - centres[None]) ** 2).sum(-1)  # noqa: E731
    cal = calibration.Calibration()
    fc, _ = draw(4000)
    cal.update(learned.raw(fc, logits(fc)))
    cal.finish(learned, near_rate=0.05, out_rate=0.01)
    ft, _ = draw(20000)
    states = learned.judge(learned.statistic(learned.raw(ft, logits(ft))))
    # sampling error: calibration quantile (n = 4000) and test share (n = 20000), 4 standard deviations
    for rate, st in ((0.05, State.NEAR), (0.01, State.OUT)):
        sd = np.sqrt(rate * (1 - rate) * (1 / 4000 + 1 / 20000))
        assert abs((states >= st).mean() - rate) < 4 * sd
    shifted = ft[:2000] + 4.0
    far = (learned.judge(learned.statistic(learned.raw(shifted, logits(shifted)))) == State.OUT).mean()
    assert far > 0.9


def test_conformal_threshold_and_tail_extrapolation():
    s = np.arange(1, 100, dtype=float)  # n = 99
    assert calibration.conformal_threshold(s, 0.1) == (90.0, "conformal")  # ceil(100 * 0.9) = 90th smallest
    t, how = calibration.conformal_threshold(np.random.default_rng(0).exponential(size=500), 0.0005)
    assert "Pareto" in how and 6 < t < 12  # exponential: true quantile -ln(0.0005) = 7.6 (50 exceedances)


class Opaque(nn.Module):
    """Its last Linear is not the output: no penultimate features to trust."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(16, 2), nn.Linear(16, 2)

    def forward(self, x):
        x = x.flatten(1)
        return self.a(x) * 2 - self.b(x).relu()


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.body, self.head = nn.Linear(16, 6), nn.Linear(6, 2)

    def forward(self, x):
        return self.head(torch.relu(self.body(x.flatten(1))))


def small_spec(path: Path) -> ModelSpec:
    return ModelSpec(format="torchscript", path=path, input_shape=[1, 4, 4], class_names=["a", "b"],
                     critical_class="b", normalisation={"mean": [0.5], "std": [0.25]})


def seq() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 6), nn.ReLU(), nn.Dropout(0.1), nn.Linear(6, 2)).eval()


def test_feature_extraction_routes(tmp_path):
    torch.jit.trace(seq(), torch.zeros(1, 1, 4, 4)).save(str(tmp_path / "t.pt"))
    traced = torch.jit.load(str(tmp_path / "t.pt"))  # as a model file is loaded
    spec = small_spec(tmp_path / "m.pt")
    x = np.random.default_rng(0).uniform(0, 255, (3, 4, 4, 1))
    for module, mode, why in ((traced, "penultimate", "sequential"), (seq(), "penultimate", "sequential"),
                              (Residual().eval(), "penultimate", "hook"), (Opaque().eval(), "logits", "opaque"),
                              (torch.jit.script(Residual().eval()), "logits", "opaque")):
        ex = features.FeatureExtractor(Classifier(spec, module=module))
        assert (ex.mode, why in ex.why) == (mode, True), ex.why
        feats, logits = ex(x)
        assert np.allclose(logits, Classifier(spec, module=module).logits(x), atol=1e-6)
        assert feats.shape[1] == (6 if mode == "penultimate" else 2)
    # a TorchScript Sequential is cut into one compiled call, with the same features as the eager model
    compiled, eager = (features.FeatureExtractor(Classifier(spec, module=m)) for m in (traced, seq()))
    assert isinstance(compiled._run, torch.jit.ScriptModule)
    assert np.allclose(compiled(x)[0], eager(x)[0], atol=1e-6)


# --- the combined monitor, saved and reloaded ------------------------------------------------------

def batches(rng, n, shift=0.0, size=50):
    for i in range(0, n, size):
        imgs = np.clip(rng.normal(120 + shift, 25, (size, 4, 4, 1)), 0, 255)
        yield Batch(images=imgs, labels=(imgs.mean(axis=(1, 2, 3)) > 120).astype(np.int64),
                    ids=[str(j) for j in range(i, i + size)], meta={"cell_type": ["mono"] * size},
                    index=np.arange(i, i + size))


@pytest.fixture
def fitted(tmp_path):
    path = tmp_path / "m.pt"
    torch.jit.trace(seq(), torch.zeros(1, 1, 4, 4)).save(str(path))
    clf = load_classifier(small_spec(path))
    spec = odd.SpecificationMonitor.from_odd([
        Descriptor(name="cell_type", source="metadata", values=["mono", "poly"]),
        Descriptor(name="brightness", min=40, max=220, margin=15)])
    rng = np.random.default_rng(0)
    from trustcase.models.classifier import sha256_file

    mon = odd.fit(clf, sha256_file(path), spec, batches(rng, 600), batches(rng, 400), rank=4)
    return mon, path


def test_saved_monitor_reloads_to_identical_decisions(fitted, tmp_path):
    mon, model_path = fitted
    assert mon.feature_mode == "penultimate" and mon.learned.mahalanobis.rank == 4
    file = mon.save(tmp_path / "monitor.safetensors")
    again = odd.Monitor.load(file, model_path)
    rng = np.random.default_rng(5)
    x = np.concatenate([b.images for b in batches(rng, 200)] + [b.images for b in batches(rng, 100, shift=90)])
    meta = {"cell_type": ["mono"] * 150 + ["cigs"] * 150}
    a, b = mon.evaluate(x, meta), again.evaluate(x, meta)
    assert np.array_equal(a.state, b.state) and np.array_equal(a.statistic, b.statistic)
    assert [a.reasons(i) for i in range(len(a))] == [b.reasons(i) for i in range(len(b))]
    assert set(a.state.tolist()) == {0, 1, 2}
    rec = b.record(int(np.argmax(b.state)))
    assert rec["state"] == "OUT" and rec["reasons"] and rec["prediction"] in ("a", "b")
    json.dumps(rec)
    # one input in any layout
    assert again.evaluate(x[0, :, :, 0]).state.shape == (1,)
    with pytest.raises(odd.MonitorError, match=r"input of shape \(5, 5\) does not fit.*\(4, 4, 1\)"):
        again.evaluate(np.zeros((5, 5)))


def test_monitor_file_for_another_model_or_schema_is_rejected(fitted, tmp_path):
    mon, model_path = fitted
    file = mon.save(tmp_path / "monitor.safetensors")
    other = tmp_path / "other.pt"
    m = seq()
    with torch.no_grad():
        m[1].weight.add_(0.1)
    torch.jit.trace(m, torch.zeros(1, 1, 4, 4)).save(str(other))
    with pytest.raises(odd.MonitorError, match=r"fitted for model sha256 .*, but model file .*other.pt has sha256"):
        odd.Monitor.load(file, other)
    with safe_open(str(file), framework="np") as f:
        head, arrays = json.loads(f.metadata()["trustcase_monitor"]), {k: f.get_tensor(k) for k in f.keys()}
    old = tmp_path / "old.safetensors"
    save_file(arrays, str(old), metadata={"trustcase_monitor": json.dumps({**head, "schema_version": "0"})})
    with pytest.raises(odd.MonitorError, match="schema version '0'.*reads version '2'"):
        odd.Monitor.load(old, model_path)
    junk = tmp_path / "junk.safetensors"
    junk.write_text("{}")
    with pytest.raises(odd.MonitorError, match="not a trustcase monitor file"):
        odd.Monitor.load(junk)


def test_runtime_api_imports_neither_prefect_nor_mlflow():
    code = ("import sys, trustcase.odd, trustcase.odd.monitor; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('prefect', 'mlflow')]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


# --- the check, on the real solar-cell data --------------------------------------------------------

def test_params_are_validated():
    with pytest.raises(CheckError, match="out_rate < near_rate"):
        build(CheckSpec(check="odd_monitor", params={"near_rate": 0.01, "out_rate": 0.05}))
    with pytest.raises(CheckError, match="unknown perturbation"):
        build(CheckSpec(check="odd_monitor", params={"perturbations": {"fog": None}}))
    with pytest.raises(CheckError, match="boundary names perturbations that are not swept"):
        build(CheckSpec(check="odd_monitor", params={"perturbations": {"gaussian_blur": [1.0]},
                                                      "boundary": {"jpeg": 3}}))


def test_detection_grows_with_blur_on_the_solar_cells(tiny_case, tmp_path):
    uc = load_use_case(tiny_case)
    check = build(CheckSpec(check="odd_monitor", params={
        "perturbations": {"gaussian_blur": [0.5, 1.0, 2.0, 4.0]}, "rank": 16, "near_rate": 0.1, "out_rate": 0.02}))
    ctx = Context(use_case=uc, model=load_classifier(uc.model), data=DataSource(uc.data, 0), seed=0,
                  workdir=tmp_path / "checks" / "odd_monitor")
    out = check(ctx)
    assert out.stage == "deployment"
    stop = {m.amplitude: m.value for m in out.measurements if m.metric == "stop_rate"}
    grid = sorted(stop)
    assert grid == [0.0, 0.5, 1.0, 2.0, 4.0]
    assert all(stop[a] <= stop[b] + 0.05 for a, b in zip(grid, grid[1:], strict=False))
    assert stop[4.0] >= 0.9 and stop[4.0] > stop[0.0] + 0.5
    metrics = {m.metric for m in out.measurements if m.scope.perturbation is None}
    assert {"false_alarm_rate", "alert_rate", "accuracy_accepted", "detection_rate", "detection_rate_alert",
            "auroc:mahalanobis", "auroc:energy", "fpr_at_95tpr:learned"} <= metrics
    curve = next(c for c in out.curves if c.id == "odd_detection:gaussian_blur")
    assert "ODD boundary" in curve.x_marks and "model accuracy" in curve.series
    (art,) = out.artefacts
    assert art.kind == "monitor"
    mon = odd.Monitor.load(ctx.workdir.parent / art.path, ctx.model)
    batch = next(iter(ctx.batches("test")))
    assert mon.evaluate(batch.images, batch.meta).state.shape == (len(batch),)
    json.dumps(out.summary)

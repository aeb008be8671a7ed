"""feature_drift and `trustcase drift`: the MMD permutation test's exact behaviour and its false-alarm rate over
repetitions, the seeded sample's invariance, and the command on a folder of real cells, with its bad inputs."""

from __future__ import annotations

import numpy as np
import pytest
from typer.testing import CliRunner

from trustcase.cli import app
from trustcase.data import drift as D
from trustcase.measurement import clopper_pearson


def test_the_same_distribution_is_no_drift_and_a_shift_is_drift():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(60, 5)), rng.normal(size=(60, 5))
    same = D.mmd_test(x, y, 199, seed=0)
    moved = D.mmd_test(x, y + 1.0, 199, seed=0)
    assert same.pvalue > 0.05 and moved.pvalue == pytest.approx(1 / 200)
    assert moved.mmd > same.mmd > 0 and 0 <= moved.mmd <= np.sqrt(2) + 1e-9
    assert D.mmd_test(x, x.copy(), 99, seed=0).pvalue == 1.0  # identical samples: every permutation reaches 0


def test_false_alarms_at_the_5_percent_level_over_random_splits_of_the_same_data():
    rng = np.random.default_rng(1)
    pool = rng.standard_t(df=4, size=(2000, 8))  # heavy tails: no Gaussian luck
    alarms, reps = 0, 200
    for r in range(reps):
        idx = rng.permutation(len(pool))[:80]
        alarms += D.mmd_test(pool[idx[:40]], pool[idx[40:]], 99, seed=r).pvalue < 0.05
    # the permutation test is exact: the rate is at most 5%; 200 repetitions show it on the interval's lower end
    assert clopper_pearson(int(alarms), reps, 0.99).lower <= 0.05, alarms


def test_fewer_items_than_the_test_needs_is_refused():
    with pytest.raises(ValueError, match=f"at least {D.MIN_ITEMS}"):
        D.mmd_test(np.zeros((5, 2)), np.ones((20, 2)), 19, seed=0)


def test_the_sample_is_the_same_whatever_the_batches_and_their_order():
    f = np.arange(200, dtype=np.float64).reshape(100, 2)
    ids = [f"cell{i:03d}" for i in range(100)]
    a, b = D.Sample(30, 0, "feature_drift"), D.Sample(30, 0, "feature_drift")
    a.update(ids, f, {"brightness": f[:, 0]})
    for j in reversed(range(0, 100, 7)):
        b.update(ids[j:j + 7], f[j:j + 7], {"brightness": f[j:j + 7, 0]})
    (fa, da), (fb, db) = a.arrays(), b.arrays()
    assert len(a) == 30 and a.seen == b.seen == 100
    assert np.array_equal(fa, fb) and np.array_equal(da["brightness"], db["brightness"])


def write_cells(folder, case, n, gain=1.0, size=None):
    import sys

    import cv2
    import yaml

    raw = yaml.safe_load(case.read_text())
    sys.path.insert(0, raw["data"]["path"])
    import elpv

    split = elpv.ElpvSplit("test", size=size or raw["model"]["input_shape"][-1])
    folder.mkdir()
    for i in np.random.default_rng(0).choice(len(split), n, replace=False):
        it = split[int(i)]
        cv2.imwrite(str(folder / it.id), np.clip(it.image * gain, 0, 255).astype(np.uint8))
    return folder


def test_drift_answers_on_a_folder_of_cells(tiny_case, tmp_path):
    same = write_cells(tmp_path / "same", tiny_case, 40)
    dark = write_cells(tmp_path / "dark", tiny_case, 40, gain=0.5)
    r = CliRunner().invoke(app, ["drift", str(tiny_case), str(same), "--permutations", "99"])
    assert r.exit_code == 0 and r.output.startswith("no drift: p-value"), r.output
    r = CliRunner().invoke(app, ["drift", str(tiny_case), str(dark), "--permutations", "99"])
    assert r.exit_code == 3 and r.output.startswith("drift: p-value 0.01 "), r.output
    assert "moved most: brightness" in r.output


def test_a_batch_the_test_cannot_judge_exits_2_with_one_line(tiny_case, tmp_path):
    few = write_cells(tmp_path / "few", tiny_case, 4)
    r = CliRunner().invoke(app, ["drift", str(tiny_case), str(few)])
    assert r.exit_code == 2 and f"holds 4 input(s): the drift test needs at least {D.MIN_ITEMS}" in r.output
    big = write_cells(tmp_path / "big", tiny_case, 12, size=64)
    r = CliRunner().invoke(app, ["drift", str(tiny_case), str(big)])
    assert r.exit_code == 2 and "the model takes 32x32" in r.output and "Traceback" not in r.output, r.output


def test_the_check_tests_each_split_and_each_odd_subgroup(tiny_case, tmp_path):
    from trustcase.checks import Context
    from trustcase.checks.feature_drift import FeatureDrift
    from trustcase.data.streaming import DataSource
    from trustcase.measurement import clopper_pearson
    from trustcase.models.loading import load_classifier
    from trustcase.schemas import Requirement, Topic, Verdict, load_use_case
    from trustcase.verdicts import judge

    uc = load_use_case(tiny_case)
    ctx = Context(uc, load_classifier(uc.model), DataSource(uc.data, model=uc.model), 0, tmp_path / "feature_drift")
    out = FeatureDrift(FeatureDrift.Params(permutations=49))(ctx)
    p = {m.scope.label(): m for m in out.measurements if m.metric == "feature_drift_pvalue"}
    assert set(p) == {f"{s} split{g}" for s in ("validation", "test")
                      for g in ("", ", cell_type = mono", ", cell_type = poly")}, sorted(p)
    for m in p.values():  # a permutation p-value is a multiple of 1/50, never 0
        assert 1 / 50 <= m.value <= 1 and abs(m.value * 50 - round(m.value * 50)) < 1e-9
        # a Monte-Carlo estimate over 49 permutations: the exact interval of k of 49 holds (1 + k) / 50
        k = m.details["exceeding"]
        assert m.kind == "estimate" and m.value == (1 + k) / 50
        assert m.interval == clopper_pearson(k, 49, uc.plan.confidence).model_copy(update={"method": m.interval.method})
        assert m.interval.lower < m.value <= m.interval.upper
    assert all(m.kind == "estimate" and m.interval is None for m in out.measurements if m.metric == "feature_drift_mmd")
    # a claim at the point estimate itself cannot PASS: the interval's lower end decides
    v = p["validation split"]
    req = Requirement(id="D9", text="no drift", metric="feature_drift_pvalue", comparator=">=", threshold=v.value,
                      scope={"split": "validation"})
    assert judge([req], [out])[0].verdict is not Verdict.PASS
    assert [f.topic for f in out.findings] == [Topic.DATA, Topic.DATA]

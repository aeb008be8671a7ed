"""`trustcase improve`: the training contract validated up front, a method's needs named before any work, and
the whole loop on the tiny real case (HUDD selection, two fine-tuned versions, their assessments, the report,
the registry's tags and the alias rule). Real torch, real Prefect, real MLflow registry."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from conftest import tiny_use_case, write_yaml
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from trustcase.cli import app
from trustcase.flows import improve as imp
from trustcase.flows import tracking
from trustcase.schemas import ExtraItem, TrainingRequest, load_use_case

TRAINING = {"entry": "train:fit", "params": {"width": 4, "limit": 300, "finetune_epochs": 1}}


def case(tmp_path: Path, tiny_model: Path, **overrides) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    raw = tiny_use_case(tmp_path, tiny_model, **overrides)
    raw["plan"]["checks"].append({"check": "root_causes", "params": {"improvement_split": "validation", "k_max": 4}})
    raw.setdefault("training", TRAINING)
    if raw["training"] is None:
        del raw["training"]
    return write_yaml(tmp_path / "use_case.yaml", raw)


def lipschitz_case(tmp_path: Path, tiny_model: Path) -> Path:
    """The tiny case with the Lipschitz check and its claim C1 (certified at L2 radius 0.001)."""
    raw = yaml.safe_load(case(tmp_path, tiny_model).read_text())
    bundled = yaml.safe_load((Path(__file__).parent.parent / "use_cases/solar_cells/use_case.yaml").read_text())
    raw["requirements"] += [r for r in bundled["requirements"] if r["id"] == "C1-lipschitz"]
    raw["plan"]["checks"].append({"check": "lipschitz", "params": {"ascent_points": 4, "ascent_steps": 5}})
    return write_yaml(tmp_path / "use_case.yaml", raw)


def test_the_contract_and_the_methods_are_checked_before_any_work(tmp_path, tiny_model):
    path = case(tmp_path, tiny_model)
    uc = load_use_case(path)
    fn = imp.training_entry(uc, path)
    assert fn.__name__ == "fit"
    bad = {
        "missing": ({"entry": "train:nope"}, "has no attribute 'nope'"),
        "module": ({"entry": "no_such_module:fit"}, "cannot import module 'no_such_module'"),
        "signature": ({"entry": "train:train"}, "must take one TrainingRequest"),
    }
    for name, (training, message) in bad.items():
        p = case(tmp_path / name, tiny_model, training=training)
        with pytest.raises(imp.ImproveError, match=message):
            imp.training_entry(load_use_case(p), p)
    none = case(tmp_path / "none", tiny_model, training=None)
    with pytest.raises(imp.ImproveError, match="no 'training' section"):
        imp.training_entry(load_use_case(none), none)
    assert imp.method_settings(uc, "hudd")["pool"] == "validation"
    with pytest.raises(imp.ImproveError, match="unknown method 'dropout'"):
        imp.method_settings(uc, "dropout")
    with pytest.raises(imp.ImproveError, match="no requirement claims lipschitz_certified_accuracy"):
        imp.method_settings(uc, "lipschitz")
    assert imp.method_settings(load_use_case(lipschitz_case(tmp_path / "l", tiny_model)), "lipschitz") == \
        {"l2_radius": pytest.approx(0.001 * 255)}  # the claimed radius, from [0, 1] to pixel units
    with pytest.raises(imp.ImproveError, match="smoothing sigma"):
        imp.method_settings(uc, "noise")  # no randomized_smoothing in this plan, no training.params.noise_sigma
    assert imp.method_settings(load_use_case(
        case(tmp_path / "n", tiny_model, training={**TRAINING, "params": {"noise_sigma": 0.1}})), "noise") == \
        {"noise_sigma": pytest.approx(25.5)}  # a fraction of [0, 255], in pixel units
    raw = yaml.safe_load(path.read_text())
    raw["plan"]["checks"] = raw["plan"]["checks"][:-1]
    no_pool = write_yaml(tmp_path / "nopool.yaml", raw)
    with pytest.raises(imp.ImproveError, match="needs a pool"):
        imp.method_settings(load_use_case(no_pool), "hudd")
    raw["training"] = {**TRAINING, "pool": "holdout"}
    with pytest.raises(imp.ImproveError, match="'holdout' is not a data role"):
        imp.method_settings(load_use_case(write_yaml(tmp_path / "badpool.yaml", raw)), "hudd")


def test_a_request_reaches_the_script_and_trains_from_the_parent(tmp_path, tiny_model):
    """The solar script honours the contract: extra items with their copies, the parent's weights."""
    path = case(tmp_path, tiny_model)
    fit = imp.training_entry(load_use_case(path), path)
    extra = [ExtraItem(role="validation", index=3, label=1, copies=3), ExtraItem(role="validation", index=5, label=0)]
    r = fit(TrainingRequest(out=tmp_path / "v.pt", use_case=path, init=tiny_model, extra=extra, epochs=1,
                            params=TRAINING["params"]))
    assert r.model.is_file() and r.log["params"]["extra_items"] == 4 and r.log["params"]["init"] == str(tiny_model)
    assert r.log["params"]["train_items"] == 300 + 4


@pytest.mark.slow  # three assessments and two trainings: about a minute on an idle machine
def test_hudd_improve_end_to_end(tmp_path, tiny_model, tracking_uri, prefect_harness):
    path = case(tmp_path, tiny_model)
    result = CliRunner().invoke(app, ["improve", str(path), "--method", "hudd", "--budget", "12", "--epochs", "1",
                                      "--out", str(tmp_path / "out"), "--tracking-uri", tracking_uri])
    assert result.exit_code == 0, result.output
    report = next((tmp_path / "out").glob("*-improve-hudd-from-v*/improvement.json"))
    s = json.loads(report.read_text())
    assert s["parent"] == "1" and s["versions"] == {"improved": "2", "baseline": "3"}
    c = s["clusters"]
    assert c["selected"] == 12 and sum(c["selected_clusters"]) == 12  # copies: an equal share per cluster
    shares = [s for s in c["selected_clusters"] if s]  # clusters with a pool item within reach
    assert max(shares) - min(shares) <= 1
    assert all((d == 0) == (s == 0) and d <= s for d, s in zip(c["distinct_per_cluster"], c["selected_clusters"],
                                                                strict=True))
    assert c["pool_within_reach"] <= c["pool_items"]
    assert set(c["accuracy"]) == {"parent", "improved", "baseline"}
    assert {r["claim"] for r in s["claims"]} == {r.id for r in load_use_case(path).requirements}
    assert all(set(r) >= {"parent", "improved", "baseline", "regression"} for r in s["claims"])
    assert (report.parent / "improvement.html").read_text().count("<tr") >= len(s["claims"]) + 1
    tracking.configure(tracking_uri)
    client = MlflowClient()
    for role, v in s["versions"].items():
        mv = client.get_model_version("solar_cells", v)
        assert mv.tags["trustcase.improve.parent"] == "1" and mv.tags["trustcase.improve.role"] == role
        assert mv.tags["trustcase.verdict"] in ("PASS", "FAIL", "INCONCLUSIVE")  # assessed, never left bare
        assert mv.tags["trustcase.run_id"] == s["runs"][role]
    assert len(mv.tags["trustcase.improve.selection"].split(",")) == len(
        client.get_model_version("solar_cells", "3").tags["trustcase.improve.selection"].split(","))
    # the alias follows the watcher's rule: only a version that passes and regresses on no claim holds it
    holder = s["qualified"]
    if holder is not None:
        row = {r["claim"]: r for r in s["claims"]}
        role = {v: k for k, v in s["versions"].items()}.get(holder, "parent")
        assert all(r[role]["verdict"] == "PASS" for r in row.values() if r["mandatory"])


@pytest.mark.slow  # two registered versions assessed by the watcher: ~2 minutes (review4 R15)
def test_a_version_that_regresses_never_takes_the_alias(prefect_harness, tmp_path, tiny_model, tracking_uri):
    """The watcher's rule, which improve follows: version 2 passes every mandatory claim (accuracy >= 0) but
    its advisory recall claim goes PASS -> FAIL against the qualified version 1: it stays unqualified."""
    from test_watch import _recall_threshold, _register, _zeroed

    from trustcase.flows import watch

    raw = tiny_use_case(tmp_path, tiny_model)
    raw["plan"]["checks"] = [{"check": "performance"}]
    probe = write_yaml(tmp_path / "probe.yaml", raw)
    raw["requirements"] = [
        {"id": "R-acc", "text": "Always holds.", "metric": "accuracy", "comparator": ">=", "threshold": 0.0},
        {"id": "R-recall", "text": "Defective cells are flagged.", "metric": "recall:defective",
         "comparator": ">=", "threshold": _recall_threshold(probe), "mandatory": False},
    ]
    path = write_yaml(tmp_path / "use_case.yaml", raw)
    assert _register(raw, tmp_path, tiny_model, tracking_uri) == "1"
    assert _register(raw, tmp_path, _zeroed(tiny_model, tmp_path / "zeroed.pt"), tracking_uri) == "2"
    first, second = watch.once(path, tmp_path / "out", tracking_uri)
    assert (first["verdict"], first["qualified"]) == ("PASS", True)
    assert second["verdict"] == "PASS" and second["regressions"] == ["R-recall"]  # mandatory claims all pass ...
    assert second["qualified"] is False  # ... but a regression keeps the alias where it is
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    assert str(client.get_model_version_by_alias("solar_cells", "qualified").version) == "1"


def test_a_lipschitz_request_trains_a_1_lipschitz_model_from_scratch(tmp_path, tiny_model):
    """augment 'lipschitz': the script's 1-Lipschitz CNN, exported baked and traced, bounded by ~1 in the model's
    input (the product of its layer constants) and never below its measured slope; not from a parent's weights."""
    from trustcase.certification import lipschitz as L
    from trustcase.data.streaming import DataSource
    from trustcase.models.loading import load_classifier

    path = lipschitz_case(tmp_path, tiny_model)
    uc = load_use_case(path)
    fit = imp.training_entry(uc, path)
    r = fit(TrainingRequest(out=tmp_path / "lip.pt", use_case=path, augment="lipschitz", l2_radius=2.55, epochs=1,
                            params=TRAINING["params"]))
    assert r.log["params"]["lipschitz"] is True and r.log["params"]["init"] is None
    assert r.log["params"]["margin_radius"] == pytest.approx(0.01)  # 2.55 grey levels of 255
    clf = load_classifier(uc.model.model_copy(update={"path": r.model}))
    bound = L.analyse(clf.module, uc.model.input_shape)
    assert bound.total <= 1 + 1e-9 and bound.total > 0.5  # 1-Lipschitz; float64 margins ~1e-12 (rounding.py)
    assert {row["kind"] for row in bound.layers} == {"conv2d", "activation", "avgpool", "linear"}
    x = clf.to_input(next(iter(DataSource(uc.data, 0, uc.model).stream("test").batches())).images[:4])
    assert 0 < L.empirical_lower_bound(clf.module, x, steps=5) <= bound.total
    with pytest.raises(ValueError, match="trains from scratch"):
        fit(TrainingRequest(out=tmp_path / "no.pt", use_case=path, augment="lipschitz", init=tiny_model, epochs=1,
                            params=TRAINING["params"]))


@pytest.mark.slow  # three assessments and two trainings from scratch
def test_lipschitz_improve_trains_and_registers_both_versions(tmp_path, tiny_model, tracking_uri, prefect_harness):
    path = lipschitz_case(tmp_path, tiny_model)
    result = CliRunner().invoke(app, ["improve", str(path), "--method", "lipschitz", "--epochs", "1",
                                      "--out", str(tmp_path / "out"), "--tracking-uri", tracking_uri])
    assert result.exit_code == 0, result.output
    s = json.loads(next((tmp_path / "out").glob("*-improve-lipschitz-from-v*/improvement.json")).read_text())
    assert s["versions"] == {"improved": "2", "baseline": "3"} and s["settings"] == {"l2_radius": 0.255}
    c1 = next(r for r in s["claims"] if r["claim"] == "C1-lipschitz")
    assert all(c1[role]["value"] is not None for role in ("parent", "improved", "baseline"))
    tracking.configure(tracking_uri)
    client = MlflowClient()
    for role, v in s["versions"].items():
        mv = client.get_model_version("solar_cells", v)
        assert mv.tags["trustcase.improve.method"] == "lipschitz" and mv.tags["trustcase.improve.role"] == role
        assert mv.tags["trustcase.improve.init"] == "from scratch"  # no weights carry over to another architecture
        assert mv.tags["trustcase.run_id"] == s["runs"][role]
    improved = MlflowClient().get_run(s["runs"]["improved"]).data.metrics
    parent = MlflowClient().get_run(s["runs"]["parent"]).data.metrics
    upper = "lipschitz/test/lipschitz_upper_bound"
    assert improved[upper] <= 1.0001 / 0.16 < parent[upper]  # 1 in the model input, scaled by 1 / std


def test_hudd_under_tiles_is_refused_before_the_parent_is_assessed(tmp_path):
    """HUDD reads the inner layers, which see tiles: whether the data are tiled is known from the use case, so
    `method_settings` (called before the parent is registered and assessed) says why not."""
    from test_segmentation_tiles_assess import write_case

    path = write_case(tmp_path, plan=[{"check": "performance", "params": {"split": "test"}},
                                      {"check": "root_causes", "params": {"improvement_split": "validation"}}])
    with pytest.raises(imp.ImproveError, match="--method hudd under fit: tiles: .*inner layers"):
        imp.method_settings(load_use_case(path), "hudd")
    raw = yaml.safe_load(path.read_text())
    raw["data"]["params"].update(fit="resize", overlap=[0, 0])  # the same case resized: hudd is taught segmentation
    assert imp.method_settings(load_use_case(write_yaml(tmp_path / "pad.yaml", raw)), "hudd")["pool"] == "validation"

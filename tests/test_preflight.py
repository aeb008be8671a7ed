"""One preflight for `validate` and `assess`: what assess would reject, validate finds first, every problem at once
with its line in the file."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from conftest import SOLAR, folder_use_case, save_png, tiny_use_case, write_yaml

from trustcase.flows.preflight import preflight
from trustcase.schemas import UseCaseError


def problems(path, seed=None):
    with pytest.raises(UseCaseError) as e:
        preflight(path, seed)
    return {p.location: p for p in e.value.problems}


def line_of(path, problem):
    return path.read_text().splitlines()[problem.line - 1]


def test_a_valid_use_case_passes(tiny_case):
    assert preflight(tiny_case).id == "solar_cells"


def test_every_problem_at_once_with_its_line(tmp_path, tiny_model):
    raw = tiny_use_case(tmp_path, tiny_model)
    raw["data"]["params"]["threshold"] = "high"                    # the loader declares threshold: float
    raw["requirements"][0].update(metric="acuracy", mandatory=False)  # a typo in a non-mandatory claim
    raw["requirements"][1]["metric"] = "false_negative_rate:functional"  # only the critical class has one
    raw["requirements"][4]["scope"]["perturbation"]["name"] = "gaussian_blurr"
    raw["odd"]["descriptors"][2]["name"] = "contrastt"             # drawn in the report, measured by nothing
    raw["plan"]["checks"].append({"check": "adversarial", "params": {"attacks": ["pgd_linf"], "max_items": 0}})
    path = write_yaml(tmp_path / "uc.yaml", raw)
    ps = problems(path)
    assert "float" in ps["data.params.threshold"].message and "threshold" in line_of(path, ps["data.params.threshold"])
    assert "did you mean 'accuracy'" in ps["requirements[0].metric"].message
    assert "false_negative_rate:functional" in line_of(path, ps["requirements[1].metric"])
    assert "gaussian_blurr" in line_of(path, ps["requirements[4].scope.perturbation.name"])
    assert "does not exist" in ps["odd.descriptors[2].name"].message
    assert "greater than or equal to 1" in ps["plan.checks[3].params.max_items"].message
    assert all(p.line for p in ps.values())


@pytest.mark.parametrize("breakage, location, fragment", [
    (lambda raw, tmp: raw["model"].update(path=str(tmp / "missing.pt")), "model.path", "model file not found"),
    (lambda raw, tmp: (tmp / "m.onnx").write_bytes(b"garbage" * 10) and raw["model"].update(
        format="onnx", path=str(tmp / "m.onnx")), "model.path", "cannot load onnx model"),
    (lambda raw, tmp: raw["model"].update(input_shape=[1, 48, 48]), "model.path", "does not accept input"),
    (lambda raw, tmp: raw["data"]["params"].update(size=48), "data.splits.train",
     "does not fit the model's input: shape (48, 48, 1), the model takes (32, 32, 1)"),
    (lambda raw, tmp: raw["data"]["params"].update(colour="red"), "data.params.colour", "takes no parameter 'colour'"),
    (lambda raw, tmp: raw["plan"]["checks"].append({"check": "tiny_partner_boom:Check"}), "plan.checks[3].check",
     "raised RuntimeError: partner licence"),
    (lambda raw, tmp: raw["plan"]["checks"].append({"check": "randomized_smoothing",
                                                    "params": {"sigma": float("nan")}}),
     "plan.checks[3].params.sigma", "finite number"),
])
def test_what_assess_rejects_validate_finds(tmp_path, tiny_model, breakage, location, fragment):
    (tmp_path / "tiny_partner_boom.py").write_text("raise RuntimeError('partner licence expired')\n")
    raw = tiny_use_case(tmp_path, tiny_model)
    breakage(raw, tmp_path)
    ps = problems(write_yaml(tmp_path / "uc.yaml", raw))
    assert location in ps and fragment in ps[location].message, ps


class _Pickled(torch.nn.Module):
    def forward(self, x):
        return x.flatten(1)[:, :2]


def test_an_untrusted_pickle_names_the_refused_global(tmp_path, tiny_model):
    torch.save(_Pickled(), tmp_path / "pickled.pt")
    (tmp_path / "tiny_pickle_factory.py").write_text("import torch\ndef build():\n    return torch.nn.Identity()\n")
    raw = tiny_use_case(tmp_path, tiny_model)
    raw["model"].update(format="state_dict", factory="tiny_pickle_factory:build", path=str(tmp_path / "pickled.pt"))
    [p] = problems(write_yaml(tmp_path / "uc.yaml", raw)).values()
    assert "needs the Python global test_preflight._Pickled" in p.message and "allow_pickle" in p.message
    assert "\x1b[" not in p.message and p.message.endswith("if you trust this file)")


def test_a_state_dict_factory_beside_the_use_case_imports(tmp_path, tiny_model):
    """The factory module sits beside the use-case file; the model is loaded before any loader runs."""
    (tmp_path / "tiny_beside_factory.py").write_text(
        f"import sys\nsys.path.insert(0, {str(SOLAR)!r})\nimport cnn\n"
        "def build(width: int = 4, size: int = 32):\n    return cnn.build(width=width, size=size)\n")
    import importlib.util
    spec = importlib.util.spec_from_file_location("beside", tmp_path / "tiny_beside_factory.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    torch.save(module.build().state_dict(), tmp_path / "weights.pt")
    raw = tiny_use_case(tmp_path, tiny_model)
    raw["model"].update(format="state_dict", factory="tiny_beside_factory:build", path="weights.pt",
                        factory_args={"width": 4})
    assert preflight(write_yaml(tmp_path / "uc.yaml", raw)).model.factory == "tiny_beside_factory:build"
    raw["model"]["factory_args"] = {"width": "wide"}
    ps = problems(write_yaml(tmp_path / "uc2.yaml", raw))
    assert "'wide' does not fit build's width: int" in ps["model.factory_args.width"].message
    assert list(ps) == ["model.factory_args.width"]  # said once, not again by building the module


def test_the_seed_picks_the_items_the_preflight_reads(tmp_path):
    """--seed is honoured: a capped split is the seeded subset the assessment will read."""
    root = tmp_path / "data"
    rng = np.random.default_rng(0)
    for i in range(6):
        save_png(root / f"train/ok/{i}.png", rng.integers(0, 255, (16, 16), dtype=np.uint8))
    save_png(root / "test/ok/0_tiny.png", np.zeros((1, 1), np.uint8))
    save_png(root / "test/ok/1_fine.png", np.zeros((16, 16), np.uint8))
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(256, 2)).eval()
    torch.jit.trace(net, torch.zeros(1, 1, 16, 16)).save(str(tmp_path / "m.pt"))
    raw = folder_use_case(root)
    raw["model"]["path"] = str(tmp_path / "m.pt")
    raw["data"]["max_samples"] = {"test": 1}
    path = write_yaml(tmp_path / "uc.yaml", raw)
    picks = {s: int(np.random.default_rng(s).choice(2, size=1, replace=False)[0]) for s in range(8)}
    bad, good = next(s for s, i in picks.items() if i == 0), next(s for s, i in picks.items() if i == 1)
    ps = problems(path, seed=bad)
    assert "ok/0_tiny.png" in ps["data.splits.test"].message
    assert preflight(path, seed=good).id == "synthetic"


def test_20000_nested_brackets_are_a_located_error(tmp_path):
    path = tmp_path / "deep.yaml"
    path.write_text(yaml.safe_dump({"id": "x"}) + "title: " + "[" * 20000 + "]" * 20000 + "\n")
    ps = problems(path)
    assert ps[""].line == 2 and "nesting deeper" in ps[""].message


def test_checks_measure_only_what_they_declare(tmp_path, tiny_case):
    """`Check.produces` is what the preflight judges claims by: it must cover every measurement a check emits."""
    from conftest import context_for

    from trustcase.checks import build
    from trustcase.models.loading import load_classifier
    from trustcase.schemas import CheckSpec

    uc = preflight(tiny_case)
    uc = uc.model_copy(update={"data": uc.data.model_copy(update={"max_samples": {"train": 24, "validation": 8,
                                                                                  "test": 24}})})
    module = load_classifier(uc.model).module
    for spec in [*uc.plan.checks, CheckSpec(check="adversarial", params={"attacks": ["fgsm_linf"], "linf": [1.0],
                                                                         "max_items": 8, "distance": False})]:
        check = build(spec)
        declared = type(check).produces(check.params, uc)
        outcome = check(context_for(uc, module, tmp_path / spec.check))
        missed = {(m.metric, m.scope.label()) for m in outcome.measurements if not any(p.covers(m) for p in declared)}
        assert outcome.measurements and not missed, (spec.check, sorted(missed)[:5])


def test_validate_rejects_a_misspelled_metric_on_the_demo(tmp_path):
    """The bundled demo with R1's metric misspelled: `validate` exits 2 naming the claim, its line and the metric
    (it said "valid" while local_robustness declared nothing it measures)."""
    import os
    import shutil
    import subprocess
    import sys

    demo = tmp_path / "solar_cells"
    shutil.copytree(SOLAR, demo, ignore=shutil.ignore_patterns("artefacts", "__pycache__"))
    sys.path.insert(0, str(demo))
    try:
        import cnn
        net = cnn.build(arch="strided").eval()  # untrained: the model only has to load and fit the classes
    finally:
        sys.path.remove(str(demo))
        sys.modules.pop("cnn", None)
    (demo / "artefacts").mkdir()
    torch.jit.trace(net, torch.zeros(1, 1, 64, 64)).save(str(demo / "artefacts" / "solar_cnn.pt"))
    text = (demo / "use_case.yaml").read_text()
    r1 = text.index("id: R1-accuracy")
    typo = text.index("metric: accuracy", r1)
    (demo / "use_case.yaml").write_text(text[:typo] + "metric: acuracy" + text[typo + len("metric: accuracy"):])
    line = text[:typo].count("\n") + 1
    env = {**os.environ, "PREFECT_LOGGING_LEVEL": "WARNING", "COLUMNS": "400"}
    r = subprocess.run([sys.executable, "-m", "trustcase.cli", "validate", str(demo / "use_case.yaml")],
                       capture_output=True, text=True, env=env, timeout=300)
    out = r.stdout + r.stderr
    assert r.returncode == 2, out
    assert "(1 problem(s))" in out, out
    assert (f"line {line}: requirements[0].metric: claim R1-accuracy: no check of the plan measures 'acuracy'; "
            "did you mean 'accuracy'") in out, out


PARTNER = '''
from trustcase.checks import Check, Params

class FogParams(Params):
    split: str = "validation"

class Fog(Check):
    """A partner check that declares nothing it measures, reading one split."""
    name = "fog"
    Params = FogParams

class Anywhere(Check):
    """A partner check that declares nothing and has no split: it may read any."""
    name = "anywhere"
'''


def test_a_check_that_declares_nothing_exempts_only_the_claims_it_could_cover(tmp_path, tiny_model):
    (tmp_path / "tiny_partner_fog.py").write_text(PARTNER)
    raw = tiny_use_case(tmp_path, tiny_model)
    claim = dict(text="t", comparator=">=", threshold=0.5)
    fog = {"perturbation": {"name": "fog", "max_amplitude": 1.0}}
    raw["requirements"] = json.loads(json.dumps([  # no shared dicts: YAML would write them as aliases
        {"id": "F1", "metric": "accuracy", "scope": {"split": "validation", **fog}, **claim},  # it may measure it
        {"id": "F2", "metric": "accuracy", "scope": {"split": "test", **fog}, **claim},  # it never reads test
        {"id": "F3", "metric": "fog_index", "scope": {"split": "validation"}, **claim},  # a metric nobody declares
        {"id": "F4", "metric": "acuracy", "scope": {"split": "validation"}, **claim},  # a typo stays a typo
    ]))
    raw["plan"]["checks"].append({"check": "tiny_partner_fog:Fog"})
    ps = problems(write_yaml(tmp_path / "uc.yaml", raw))
    assert sorted(ps) == ["requirements[1].scope.perturbation.name", "requirements[2].metric",
                          "requirements[3].metric"], ps
    assert ps["requirements[1].scope.perturbation.name"].message.startswith("claim F2: no check of the plan measures "
                                                                           "accuracy under perturbation 'fog'")
    assert ps["requirements[2].metric"].message == (
        "claim F3: no check of the plan measures 'fog_index' (tiny_partner_fog:Fog declares nothing it measures: a "
        "metric of its own must be declared in its Check.produces)")
    assert "did you mean 'accuracy'" in ps["requirements[3].metric"].message
    # without a split parameter a check may read any split: F2 is exempt too
    raw["plan"]["checks"][-1] = {"check": "tiny_partner_fog:Anywhere"}
    ps = problems(write_yaml(tmp_path / "uc2.yaml", raw))
    assert sorted(ps) == ["requirements[2].metric", "requirements[3].metric"], ps
    # a registered metric the plan does not measure (local robustness) is known: exempt beside the partner
    raw["requirements"] = [{"id": "L1", "metric": "local_robustness_verified", "scope": {
        "perturbation": {"name": "linf_radius", "max_amplitude": 0.01}}, **claim}]
    assert preflight(write_yaml(tmp_path / "uc3.yaml", raw)).requirements[0].id == "L1"
    raw["plan"]["checks"].pop()
    ps = problems(write_yaml(tmp_path / "uc4.yaml", raw))
    assert list(ps) == ["requirements[0].metric"]

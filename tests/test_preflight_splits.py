"""Split names inside check parameters (`split`, `splits`, `reference`, `held_out`, `*_split`) name roles of
data.splits: a typo is found by `validate` with its line (review4 R8), not an INCONCLUSIVE claim after the run."""

from __future__ import annotations

import pytest
from conftest import tiny_use_case, write_yaml
from typer.testing import CliRunner

from trustcase.checks.poisoning_screen import PoisoningScreenParams
from trustcase.cli import app
from trustcase.flows.preflight import preflight, split_names
from trustcase.schemas import UseCaseError, load_use_case


def problems(path):
    with pytest.raises(UseCaseError) as e:
        preflight(path)
    return {p.location: p for p in e.value.problems}


def test_every_misspelt_split_name_of_a_check_is_found_with_its_line(tmp_path, tiny_model):
    raw = tiny_use_case(tmp_path, tiny_model)
    raw["plan"]["checks"] += [
        {"check": "poisoning_screen", "params": {"held_out": "valdation"}},
        {"check": "feature_leakage", "params": {"reference": "trian", "splits": ["test", "tset"]}},
        {"check": "odd_monitor", "params": {"calibration_split": "holdout"}},
        {"check": "feature_drift", "params": {"reference": "train", "splits": ["validation", "test"]}},  # right
    ]
    path = write_yaml(tmp_path / "uc.yaml", raw)
    ps = problems(path)
    lines = path.read_text().splitlines()
    expected = {
        "plan.checks[3].params.held_out": ("'valdation' is not a split of data.splits (train, validation, test); "
                                           "did you mean 'validation'?", "valdation"),
        "plan.checks[4].params.reference": ("did you mean 'train'?", "trian"),
        "plan.checks[4].params.splits[1]": ("splits: 'tset' is not a split", "tset"),
        "plan.checks[5].params.calibration_split": ("'holdout' is not a split of data.splits", "holdout"),
    }
    for where, (fragment, token) in expected.items():
        assert where in ps and fragment in ps[where].message, (where, ps)
        assert token in lines[ps[where].line - 1], (where, ps[where].line)
    assert not any(".checks[6]." in k or k.endswith("splits[0]") for k in ps), ps


def test_a_default_split_is_the_checks_own_and_is_not_refused(tmp_path, tiny_model):
    """Only names given in the plan are judged: a default (poisoning_screen's held_out 'validation') on a use case
    without that split is the check's to report at run time (an undefined count with the reason)."""
    raw = tiny_use_case(tmp_path, tiny_model)
    raw["data"]["splits"] = {"train": "train", "test": "test"}
    raw["data"]["max_samples"] = {"train": 120, "test": 100}
    uc = load_use_case(write_yaml(tmp_path / "uc.yaml", raw))
    assert split_names(PoisoningScreenParams(), uc) == []
    assert [w for w, _ in split_names(PoisoningScreenParams(held_out="validation"), uc)] == [("held_out",)]


def test_validate_exits_2_naming_the_line_of_a_misspelt_held_out_split(tmp_path, tiny_model):
    raw = tiny_use_case(tmp_path, tiny_model)
    raw["plan"]["checks"].append({"check": "poisoning_screen", "params": {"held_out": "valdation"}})
    path = write_yaml(tmp_path / "uc.yaml", raw)
    line = next(n for n, text in enumerate(path.read_text().splitlines(), 1) if "valdation" in text)
    # in process (the real subprocess path of validate is tests/test_cli.py's): the CLI's import costs 30 s here
    r = CliRunner().invoke(app, ["validate", str(path)], env={"COLUMNS": "400"})
    out = r.output
    assert r.exit_code == 2, out
    assert f"line {line}: plan.checks[3].params.held_out: held_out: 'valdation' is not a split" in out, out
    assert "Traceback" not in out

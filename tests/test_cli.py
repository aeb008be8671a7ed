"""The command line: exit codes, located messages, no traceback for user errors."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import yaml
from conftest import SOLAR, tiny_use_case, write_yaml
from typer.testing import CliRunner

from trustcase.cli import app

CLI = [sys.executable, "-m", "trustcase.cli"]


def cli(*args, cwd=None):
    env = {**os.environ, "PREFECT_LOGGING_LEVEL": "WARNING"}
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, cwd=cwd, env=env, timeout=300)


def test_validate_ok(tiny_case):
    """A use case whose model exists (the bundled one's model is trained by `trustcase demo`)."""
    r = cli("validate", tiny_case)
    assert r.returncode == 0 and "valid" in r.stdout, r.stderr


def test_validate_reports_every_problem_with_lines(tmp_path):
    raw = yaml.safe_load((SOLAR / "use_case.yaml").read_text())
    raw["criticality"] = "extreme"
    raw["requirements"][0]["comparator"] = "=>"
    raw["plan"]["checks"][2]["params"]["perturbations"] = {"gaussian_blurr": [1.0]}
    path = write_yaml(tmp_path / "broken.yaml", raw)
    r = cli("validate", path)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr + r.stdout
    assert "criticality" in r.stderr and "requirements[0].comparator" in r.stderr
    assert r.stderr.count("line ") >= 2
    # the plan is checked once the file itself is valid
    raw = yaml.safe_load((SOLAR / "use_case.yaml").read_text())
    raw["plan"]["checks"][2]["params"]["perturbations"] = {"gaussian_blurr": [1.0]}
    r = cli("validate", write_yaml(tmp_path / "plan.yaml", raw))
    assert r.returncode == 2 and "gaussian_blurr" in r.stderr and "plan.checks[2]" in r.stderr


@pytest.mark.parametrize("breakage, fragment", [
    (lambda raw, tmp: raw["model"].update(path=str(tmp / "missing.pt")), "model file not found"),
    (lambda raw, tmp: raw["data"].update(loader="nowhere:load"), "cannot import module 'nowhere'"),
    (lambda raw, tmp: raw["model"].update(class_names=["a", "b", "defective"]) or raw["plan"].pop("cost_matrix"),
     "expected (batch, 3)"),
    (lambda raw, tmp: raw["model"].update(input_shape=[1, 48, 48]), "does not accept input of shape [1, 48, 48]"),
    (lambda raw, tmp: (tmp / "pickle.pt").write_bytes(b"not a model") and raw["model"].update(
        path=str(tmp / "pickle.pt")), "cannot load torchscript model"),
])
def test_assess_user_errors_exit_2_before_any_work(tmp_path, tiny_model, breakage, fragment):
    raw = tiny_use_case(tmp_path, tiny_model)
    breakage(raw, tmp_path)
    r = cli("assess", write_yaml(tmp_path / "uc.yaml", raw), "--out", tmp_path / "out", cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert fragment in r.stderr.replace("\n", " ")
    assert "Traceback" not in r.stderr + r.stdout
    assert not (tmp_path / "out").exists()                     # nothing half-written


@pytest.mark.usefixtures("prefect_harness")
def test_assess_exit_codes_follow_the_verdict(tmp_path, tiny_model, tracking_uri):
    runner = CliRunner()
    raw = tiny_use_case(tmp_path, tiny_model)
    raw["requirements"] = [{"id": "easy", "text": "t", "metric": "accuracy", "comparator": ">=", "threshold": 0.0}]
    ok = write_yaml(tmp_path / "ok.yaml", raw)
    r = runner.invoke(app, ["assess", str(ok), "--out", str(tmp_path / "a"), "--tracking-uri", tracking_uri])
    assert r.exit_code == 0, r.output
    assert "report.html" in r.output and "MLflow run" in r.output
    raw["requirements"][0]["threshold"] = 0.999
    hard = write_yaml(tmp_path / "hard.yaml", raw)
    r = runner.invoke(app, ["assess", str(hard), "--out", str(tmp_path / "b"), "--tracking-uri", tracking_uri])
    assert r.exit_code == 3, r.output


def test_report_for_unknown_run_is_a_clear_error(tmp_path, tracking_uri):
    r = cli("report", "f" * 32, "--tracking-uri", tracking_uri, cwd=tmp_path)
    assert r.returncode == 2 and "no MLflow run" in r.stderr and "Traceback" not in r.stderr


def test_validate_finds_what_assess_rejects(tmp_path, tiny_model):
    """`validate` said "valid" for a loader parameter of the wrong type and a typo in a claim's metric, and gave a
    RecursionError for 20,000 nested brackets; now: every problem, one located line each, exit 2, no traceback."""
    runner = CliRunner()
    raw = tiny_use_case(tmp_path, tiny_model)
    raw["data"]["params"]["threshold"] = "high"
    raw["requirements"][0]["metric"] = "acuracy"
    r = runner.invoke(app, ["validate", str(write_yaml(tmp_path / "uc.yaml", raw)), "--seed", "3"])
    assert r.exit_code == 2 and "Traceback" not in r.output, r.output
    assert "(2 problem(s))" in r.output and "data.params.threshold" in r.output
    assert "did you mean 'accuracy'" in r.output
    (tmp_path / "deep.yaml").write_text("id: x\ntitle: " + "[" * 20000 + "]" * 20000 + "\n")
    r = runner.invoke(app, ["validate", str(tmp_path / "deep.yaml")])
    assert r.exit_code == 2 and "line 2" in r.output and "nesting deeper" in r.output
    assert "Traceback" not in r.output and "RecursionError" not in r.output


@pytest.mark.parametrize("raised,code,line", [
    (ZeroDivisionError("division by zero"), 1, "internal error: ZeroDivisionError: division by zero"),
    (KeyError("summary"), 1, "internal error: KeyError: 'summary'"),
    (None, 2, "error: the partner's licence has expired"),  # a partner's own UserError subclass
])
def test_every_command_tells_user_errors_from_internal_ones_by_class(tmp_path, monkeypatch, raised, code, line):
    """One test, `isinstance(e, UserError)`: a user error is one line and exit 2 whatever its module, anything
    else an internal error, exit 1, its traceback in a log file (a ValueError of a shape bug is not a user's)."""
    from trustcase.errors import UserError
    from trustcase.flows import rerender

    class LicenceError(UserError):
        pass

    def broken(*args, **kwargs):
        raise raised if raised is not None else LicenceError("the partner's licence has expired")

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(rerender, "rerender", broken)
    r = CliRunner().invoke(app, ["report", "f" * 32, "--out", str(tmp_path / "out")])
    assert r.exit_code == code, r.output
    assert line in " ".join(r.output.split()) and "Traceback" not in r.output
    log = tmp_path / ".trustcase" / "last-error.log"
    assert log.exists() == (code == 1) and (code == 2 or "Traceback" in log.read_text())


def test_the_clis_own_argument_checks_are_user_errors(tmp_path):
    runner = CliRunner()
    r = runner.invoke(app, ["check-property", str(tmp_path / "n.nnet"), str(tmp_path / "p.vnnlib"), "--timeout", "0"])
    assert r.exit_code == 2 and "--timeout must be > 0 seconds, got 0.0" in r.output
    r = runner.invoke(app, ["check-property", str(tmp_path / "n.nnet"), str(tmp_path / "p.vnnlib")])
    assert r.exit_code == 2 and "Traceback" not in r.output  # no such network file: named, exit 2
    r = runner.invoke(app, ["explore", "--port", "70000"])
    assert r.exit_code == 2 and "--port 70000: expected 1..65535" in r.output

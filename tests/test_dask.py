"""Scale-out: the checks on a local Dask cluster of two worker processes give the evidence of the
single-process run; a Dask address that does not answer is a clear error before any work."""

from __future__ import annotations

import socket
import warnings

import pytest
import yaml
from typer.testing import CliRunner

from trustcase.cli import app
from trustcase.flows import runners
from trustcase.schemas import Assessment


def _silent_port() -> int:
    """A loopback port nobody listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_dask_address_that_does_not_answer_is_a_clear_error(tiny_case, tracking_uri):
    address = f"tcp://127.0.0.1:{_silent_port()}"
    with pytest.raises(runners.RunnerError, match="did not answer within 1 s"):
        runners.probe(address, timeout=1)
    result = CliRunner().invoke(app, ["assess", str(tiny_case), "--runner", "dask", "--dask-address", address,
                                      "--tracking-uri", tracking_uri])
    assert result.exit_code == 2, result.output
    assert f"the Dask scheduler at '{address}' did not answer" in result.output


def test_runner_choices_are_checked():
    with pytest.raises(runners.RunnerError, match="unknown runner 'spark'"):
        runners.task_runner("spark")
    with pytest.raises(runners.RunnerError, match="--dask-address needs --runner dask"):
        runners.task_runner("thread", "tcp://127.0.0.1:8786")
    local = runners.task_runner("dask")
    assert local.cluster_kwargs["n_workers"] == 2 and local.cluster_kwargs["processes"] is True


def _outcomes(folder) -> tuple[list[dict], list[dict]]:
    a = Assessment.model_validate_json((folder / "assessment.json").read_text())
    return ([o.model_dump(mode="json", exclude={"duration_s"}) for o in a.outcomes],
            [e.model_dump(mode="json") for e in a.evidence])


@pytest.mark.slow
def test_sweep_on_a_local_dask_cluster_equals_the_single_process_run(prefect_harness, tiny_case, tracking_uri,
                                                                      tmp_path):
    single = runners.run(str(tiny_case), str(tmp_path / "thread"), tracking_uri=tracking_uri)
    spread = runners.run(str(tiny_case), str(tmp_path / "dask"), tracking_uri=tracking_uri, runner="dask", workers=2)
    assert single.complete and spread.complete, (single.errors, spread.errors)
    assert single.run_id != spread.run_id
    outcomes, evidence = _outcomes(tmp_path / "thread")
    assert [o["check"] for o in outcomes] == ["data_quality", "performance", "perturbation_sweep"]
    assert _outcomes(tmp_path / "dask") == (outcomes, evidence)


def test_local_workers_run_one_torch_thread_and_keep_their_output_off_the_terminal(tmp_path, monkeypatch, capfd):
    """Two workers on two cores run one torch thread each; a worker's chatter (a third-party warning, C-level
    output) goes to the workers' log, not to the terminal the user reads."""
    from distributed import Client, LocalCluster

    monkeypatch.chdir(tmp_path)
    kwargs = {**runners.task_runner("dask", workers=1).cluster_kwargs, "n_workers": 1}

    def chatter() -> int:
        import os
        import sys
        import warnings

        import torch

        warnings.warn("a third-party warning nobody can act on", stacklevel=1)
        os.write(2, b"C-level chatter\n")
        print("Python chatter", file=sys.stderr)
        return torch.get_num_threads()

    with socket.socket() as held, warnings.catch_warnings():
        try:  # Dask's default dashboard port taken, as by another cluster
            held.bind(("127.0.0.1", 8787))
            held.listen()
        except OSError:
            pass  # already taken
        warnings.simplefilter("error")  # no warning in this process either ("Port 8787 is already in use")
        with LocalCluster(**kwargs) as cluster, Client(cluster, set_as_default=False) as client:
            assert list(client.run(chatter).values()) == [runners.WORKER_THREADS]
    log = (tmp_path / runners.WORKER_LOG).read_text()
    assert all(s in log for s in ("a third-party warning", "C-level chatter", "Python chatter")), log
    err = capfd.readouterr().err
    assert "chatter" not in err and "third-party warning" not in err and "distributed." not in err, err


@pytest.mark.slow
def test_checks_with_hooks_and_draws_on_a_local_dask_cluster_equal_the_thread_runner(
        prefect_harness, tiny_model, tracking_uri, tmp_path):
    """The demo's kind of checks (attacks, attribution methods that hook the model, smoothing's noise) give the
    same evidence bit for bit on two worker processes as on the thread runner with the same torch thread count
    (one: the test process's, conftest), and both records say one thread."""
    from conftest import tiny_use_case, write_yaml

    case = write_yaml(tmp_path / "use_case.yaml", tiny_use_case(tmp_path, tiny_model))
    raw = yaml.safe_load(case.read_text())
    raw["requirements"] = [r for r in raw["requirements"] if r["id"].startswith(("R1-", "R2-", "R6-"))]
    raw["plan"]["checks"] = [
        {"check": "performance"},
        {"check": "adversarial", "params": {"attacks": ["fgsm_linf", "auto_linf"], "linf": [1.0, 4.0],
                                            "max_items": 12, "apgd_steps": 20}},
        {"check": "explainability", "params": {"methods": ["saliency", "guided_backprop", "grad_cam"],
                                               "items": 2, "sensitivity_items": 1, "gallery": 1}},
        {"check": "randomized_smoothing", "params": {"sigma": 0.12, "n0": 8, "n": 24, "max_items": 6}},
    ]
    write_yaml(case, raw)
    single = runners.run(str(case), str(tmp_path / "thread"), tracking_uri=tracking_uri)
    spread = runners.run(str(case), str(tmp_path / "dask"), tracking_uri=tracking_uri, runner="dask", workers=2)
    assert single.complete and spread.complete, (single.errors, spread.errors)
    outcomes, evidence = _outcomes(tmp_path / "thread")
    assert {o["check"] for o in outcomes} >= {"adversarial", "explainability", "randomized_smoothing"}
    assert _outcomes(tmp_path / "dask") == (outcomes, evidence)
    for folder in ("thread", "dask"):
        platform = Assessment.model_validate_json((tmp_path / folder / "assessment.json").read_text()
                                                  ).provenance.platform
        assert platform["torch_threads"] == "1"

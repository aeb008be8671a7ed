"""Scale-out: the checks on a local Dask cluster of two worker processes give the evidence of the
single-process run; a Dask address that does not answer is a clear error before any work."""

from __future__ import annotations

import socket

import pytest
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

"""Server deployments, tested with processes this module starts on loopback: a throwaway PostgreSQL cluster
(Debian's initdb / pg_ctl, in a temporary folder) behind a Prefect server and an MLflow tracking server, and a
Dask scheduler with two workers. Each assessment is the `trustcase assess` command in its own process, as in
production; docs/deployment.md shows the same commands.

- through the servers, the evidence equals the embedded run's (temporary Prefect server, SQLite MLflow store);
- a Dask worker killed in the middle of a sweep changes nothing in the evidence;
- an MLflow server restarted mid-assessment gives a completed run; one that stays down gives a clear failure
  and a run without verdict, never a half-written run marked FINISHED;
- an unreachable Prefect server is a clear error naming PREFECT_API_URL (default test: fast, no server).
"""

from __future__ import annotations

import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from conftest import ROOT, tiny_use_case, write_yaml
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from trustcase.schemas import Assessment

BIN = Path(sys.executable).parent  # the venv's trustcase, prefect, mlflow and dask commands
PG_BIN = sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=lambda p: int(p.parent.name))  # Debian's server


def free_port() -> int:
    """A loopback port nobody listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_unreachable_prefect_server_is_a_clear_error_naming_prefect_api_url(tiny_case, tracking_uri):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from trustcase.cli import app

    url = f"http://127.0.0.1:{free_port()}/api"
    with temporary_settings(updates={PREFECT_API_URL: url}):
        result = CliRunner().invoke(app, ["assess", str(tiny_case), "--tracking-uri", tracking_uri])
    assert result.exit_code == 2, result.output
    assert f"the Prefect server at PREFECT_API_URL={url} did not answer" in result.output
    assert "Traceback" not in result.output


# --- processes on loopback ----------------------------------------------------------------------------------

def quiet_env(home: Path, **extra) -> dict[str, str]:
    """This process's environment without any Prefect / MLflow server, one thread per process, telemetry off."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    env.update(PREFECT_HOME=str(home / "prefect"), PREFECT_SERVER_ANALYTICS_ENABLED="false", DO_NOT_TRACK="1",
               MLFLOW_DISABLE_TELEMETRY="true", PREFECT_LOGGING_LEVEL="WARNING", TRUSTCASE_CACHE=str(home / "cache"),
               OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(ROOT / "tests"), env.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    env.update(extra)
    return env


class Service:
    """A server process with its log; `stop` ends it (and only it)."""

    def __init__(self, name: str, cmd: list, env: dict, folder: Path, health: str | None = None):
        self.name, self.cmd, self.env, self.health = name, [str(c) for c in cmd], env, health
        self.log = folder / f"{name}.log"
        self.start()

    def start(self, timeout: float = 180) -> None:
        with open(self.log, "a") as log:
            self.proc = subprocess.Popen(self.cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        deadline = time.monotonic() + timeout
        while self.health:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited ({self.proc.returncode}):\n{self.log.read_text()[-3000:]}")
            try:
                if httpx.get(self.health, timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} did not answer {self.health}:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.5)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)  # its own session: the server and the workers it forked
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(30)


@pytest.fixture(scope="module")
def postgres():
    """A throwaway PostgreSQL cluster on loopback with the databases `prefect` and `mlflow`; its URL's
    `user:password@host:port` part. initdb refuses root: as root, the cluster runs as `nobody`."""
    if not PG_BIN:
        pytest.skip("no PostgreSQL server (Debian's postgresql package: scripts/setup.sh --test installs it)")
    pg = PG_BIN[-1]
    root = Path(tempfile.mkdtemp(prefix="trustcase-pg-"))  # not under pytest's folder: `nobody` must enter it
    as_user: list[str] = []
    if os.geteuid() == 0:
        nobody = pwd.getpwnam("nobody")
        os.chown(root, nobody.pw_uid, nobody.pw_gid)
        as_user = ["runuser", "-u", "nobody", "--"]
    password, port = secrets.token_hex(12), free_port()
    (root / "pw").write_text(password)
    os.chmod(root / "pw", 0o644)

    def run(cmd, **kw):
        subprocess.run([str(c) for c in cmd], check=True, capture_output=True, timeout=120, **kw)

    try:
        run(as_user + [pg / "initdb", "-D", root / "data", "-U", "trustcase", "--pwfile", root / "pw",
                       "--auth", "scram-sha-256", "-E", "UTF8", "--locale", "C"])
        run(as_user + [pg / "pg_ctl", "-D", root / "data", "-l", root / "server.log", "-w", "-t", "60", "-o",
                       f"-c listen_addresses=127.0.0.1 -p {port} -k {root}", "start"])
        env = {**os.environ, "PGPASSWORD": password}
        for db in ("prefect", "mlflow"):
            run([pg / "createdb", "-h", "127.0.0.1", "-p", port, "-U", "trustcase", db], env=env)
        yield f"trustcase:{password}@127.0.0.1:{port}"
    finally:
        subprocess.run(as_user + [str(pg / "pg_ctl"), "-D", str(root / "data"), "-m", "fast", "-w", "stop"],
                       capture_output=True, timeout=120)
        shutil.rmtree(root, ignore_errors=True)


def psql(postgres: str, db: str, sql: str) -> str:
    creds, _, hostport = postgres.rpartition("@")
    user, password = creds.split(":", 1)
    host, port = hostport.split(":")
    return subprocess.run([str(PG_BIN[-1] / "psql"), "-h", host, "-p", port, "-U", user, "-d", db, "-tAc", sql],
                          env={**os.environ, "PGPASSWORD": password}, check=True, capture_output=True,
                          text=True).stdout.strip()


@dataclass
class Servers:
    prefect_api: str
    mlflow_uri: str
    mlflow: Service
    folder: Path


@pytest.fixture(scope="module")
def servers(postgres, tmp_path_factory):
    """A Prefect server and an MLflow tracking server (artefacts served through it), both on PostgreSQL."""
    folder = tmp_path_factory.mktemp("servers")
    p_port, m_port = free_port(), free_port()
    prefect = Service("prefect", [BIN / "prefect", "server", "start", "--host", "127.0.0.1", "--port", p_port,
                                  "--no-ui"],
                      quiet_env(folder, PREFECT_API_DATABASE_CONNECTION_URL=f"postgresql+asyncpg://{postgres}/prefect"),
                      folder, health=f"http://127.0.0.1:{p_port}/api/health")
    mlflow = Service("mlflow", [BIN / "mlflow", "server", "--host", "127.0.0.1", "--port", m_port, "--workers", "1",
                                "--backend-store-uri", f"postgresql+psycopg://{postgres}/mlflow",
                                "--serve-artifacts", "--artifacts-destination", folder / "mlartifacts"],
                     quiet_env(folder), folder, health=f"http://127.0.0.1:{m_port}/health")
    try:
        yield Servers(f"http://127.0.0.1:{p_port}/api", f"http://127.0.0.1:{m_port}", mlflow, folder)
    finally:
        mlflow.stop()
        prefect.stop()


# --- the assessments ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def case(tiny_model, tmp_path_factory) -> Path:
    """The tiny solar-cell case with a sweep of three shards, one of which kills its Dask worker once."""
    folder = tmp_path_factory.mktemp("case")
    raw = tiny_use_case(folder, tiny_model)
    raw["requirements"] = [r for r in raw["requirements"] if r["id"] in
                           ("R1-accuracy", "R2-recall", "R3-recall-mono", "R5-blur", "R6-calibration")]
    raw["plan"]["checks"][-1]["params"]["perturbations"] = {
        "gaussian_blur": [1.0, 2.0],
        "killer": {"perturbation": "worker_killer:BlurThatKillsItsWorker", "grid": [0.5, 1.5],
                   "options": {"marker": str(folder / "killed.txt")}},
        "brightness": [0.05, 0.1],
    }
    return write_yaml(folder / "use_case.yaml", raw)


class Assessing:
    """`trustcase assess` in its own process group, its output in files (the temporary Prefect server it may
    start inherits them: pipes would outlive a killed assessment)."""

    def __init__(self, case: Path, out: Path, env: dict, *extra: str):
        self.out = out
        self.log = out.parent / f"{out.name}.stdout", out.parent / f"{out.name}.stderr"
        with open(self.log[0], "w") as o, open(self.log[1], "w") as e:
            self.proc = subprocess.Popen([str(BIN / "trustcase"), "assess", str(case), "--out", str(out), *extra],
                                         env=env, cwd=out.parent, stdout=o, stderr=e, start_new_session=True)

    def wait(self, timeout: float = 900) -> int:
        try:
            return self.proc.wait(timeout)
        finally:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)  # what it started and left behind, if anything
            except ProcessLookupError:
                pass

    @property
    def output(self) -> str:
        return "\n".join(f.read_text() for f in self.log)

    def poll(self):
        return self.proc.poll()


def assess(case: Path, out: Path, env: dict, *extra: str) -> Assessment:
    run = Assessing(case, out, env, *extra)
    code = run.wait()
    assert code in (0, 3), f"exit {code}\n{run.output}"  # a verdict, whichever
    return Assessment.model_validate_json((out / "assessment.json").read_text())


def evidence(a: Assessment) -> tuple[list[dict], list[dict]]:
    return ([o.model_dump(mode="json", exclude={"duration_s"}) for o in a.outcomes],
            [e.model_dump(mode="json") for e in a.evidence])


@pytest.fixture(scope="module")
def embedded(case, tmp_path_factory) -> Assessment:
    """The reference: no server at all (a temporary Prefect server, an MLflow SQLite store)."""
    folder = tmp_path_factory.mktemp("embedded")
    return assess(case, folder / "out", quiet_env(folder), "--tracking-uri", f"sqlite:///{folder / 'mlflow.db'}")


def server_env(servers: Servers, folder: Path, **extra) -> dict:
    return quiet_env(folder, PREFECT_API_URL=servers.prefect_api, MLFLOW_TRACKING_URI=servers.mlflow_uri, **extra)


def completed(servers: Servers, a: Assessment) -> None:
    """The run is FINISHED with its verdict, record, report and pack, and the record is the one on disk."""
    client = MlflowClient(servers.mlflow_uri)
    run = client.get_run(a.provenance.mlflow_run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["verdict"] == a.verdict.value and run.data.tags["complete"] == "True"
    logged = {f.path for f in client.list_artifacts(run.info.run_id)}
    assert {"assessment.json", "report.html", "report.pdf", "pack.zip"} <= logged
    with tempfile.TemporaryDirectory() as tmp:
        logged = client.download_artifacts(run.info.run_id, "assessment.json", tmp)
        assert evidence(Assessment.model_validate_json(Path(logged).read_text())) == evidence(a)


@pytest.mark.slow
def test_an_assessment_through_the_servers_on_postgresql_equals_the_embedded_run(servers, postgres, case, embedded,
                                                                                   tmp_path):
    a = assess(case, tmp_path / "out", server_env(servers, tmp_path))
    assert a.complete and evidence(a) == evidence(embedded)
    assert [o.check for o in a.outcomes] == ["data_quality", "performance"] + ["perturbation_sweep"] * 3
    completed(servers, a)
    run_id = a.provenance.mlflow_run_id
    assert psql(postgres, "mlflow", f"select status from runs where run_uuid = '{run_id}'") == "FINISHED"
    flow_runs = httpx.post(f"{servers.prefect_api}/flow_runs/filter", json={}, timeout=10).json()
    assert "COMPLETED" in {f["state_type"] for f in flow_runs}
    assert int(psql(postgres, "prefect", "select count(*) from flow_run where state_type = 'COMPLETED'")) >= 1


@pytest.mark.slow
def test_a_dask_worker_killed_during_a_sweep_changes_nothing(servers, case, embedded, tmp_path):
    marker = case.parent / "killed.txt"
    marker.unlink(missing_ok=True)
    env = server_env(servers, tmp_path)
    address = f"tcp://127.0.0.1:{free_port()}"
    scheduler = Service("dask-scheduler", [BIN / "dask", "scheduler", "--host", "127.0.0.1", "--port",
                                           address.rsplit(":", 1)[1], "--no-dashboard"], env, tmp_path)
    workers = [Service(f"dask-worker-{i}", [BIN / "dask", "worker", address, "--nthreads", "1", "--no-nanny",
                                            "--no-dashboard", "--name", f"w{i}"], env, tmp_path) for i in range(2)]
    try:
        a = assess(case, tmp_path / "out", env, "--runner", "dask", "--dask-address", address)
        assert marker.is_file(), "no worker was killed"
        victim = int(marker.read_text())
        assert [w.proc.pid for w in workers if w.proc.poll() is not None] == [victim]  # killed, the other lives
        assert a.complete and evidence(a) == evidence(embedded)
        completed(servers, a)
    finally:
        for w in workers:
            w.stop()
        scheduler.stop()


def wait_for_live_metrics(client: MlflowClient, proc, since: float, timeout: float = 300):
    """The assessment's run, once its first check's metrics are in (the MLflow UI would show it RUNNING)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                                  f"attributes.status = 'RUNNING' and attributes.start_time > {int(since * 1000)}")
        if runs and runs[0].data.metrics:
            return runs[0]
        time.sleep(0.2)
    raise AssertionError(f"no live run with metrics (exit {proc.poll()}): {proc.output}")


@pytest.mark.slow
def test_an_mlflow_server_restarted_mid_assessment_gives_a_completed_run(servers, case, embedded, tmp_path):
    since = time.time()
    proc = Assessing(case, tmp_path / "out", server_env(servers, tmp_path))
    client = MlflowClient(servers.mlflow_uri)
    live = wait_for_live_metrics(client, proc, since)
    assert "verdict" not in live.data.tags
    servers.mlflow.stop()
    time.sleep(5)
    servers.mlflow.start()
    code = proc.wait()
    assert code in (0, 3), f"exit {code}\n{proc.output}"  # MLflow's retries bridged the gap
    a = Assessment.model_validate_json((tmp_path / "out" / "assessment.json").read_text())
    assert a.provenance.mlflow_run_id == live.info.run_id and evidence(a) == evidence(embedded)
    completed(servers, a)


@pytest.mark.slow
def test_an_mlflow_server_that_stays_down_is_a_clear_failure_and_no_finished_run(servers, case, tmp_path):
    env = server_env(servers, tmp_path, MLFLOW_HTTP_REQUEST_MAX_RETRIES="1", MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR="1")
    since = time.time()
    proc = Assessing(case, tmp_path / "out", env)
    client = MlflowClient(servers.mlflow_uri)
    live = wait_for_live_metrics(client, proc, since)
    servers.mlflow.stop()
    try:
        code = proc.wait()
    finally:
        servers.mlflow.start()
    assert code == 1, f"exit {code}\n{proc.output}"
    assert f"in the MLflow tracking store {servers.mlflow_uri} (MLFLOW_TRACKING_URI)" in proc.log[1].read_text()
    run = client.get_run(live.info.run_id)
    assert run.info.status != "FINISHED" and "verdict" not in run.data.tags and "complete" not in run.data.tags
    assert not (tmp_path / "out" / "report.html").exists() or "pack.zip" not in {
        f.path for f in client.list_artifacts(run.info.run_id)}


@pytest.mark.slow
@pytest.mark.parametrize("sig,status", [(signal.SIGTERM, "KILLED"), (signal.SIGKILL, "RUNNING")])
def test_a_killed_assessment_leaves_no_verdict(case, tmp_path, sig, status):
    """SIGTERM (Prefect turns it into an exception in the flow): KILLED; SIGKILL: nothing runs, RUNNING."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    since = time.time()
    proc = Assessing(case, tmp_path / "out", quiet_env(tmp_path), "--tracking-uri", uri)
    client = MlflowClient(uri)
    live = wait_for_live_metrics(client, proc, since)
    proc.proc.send_signal(sig)
    assert proc.wait(120) != 0
    run = client.get_run(live.info.run_id)
    assert run.info.status == status
    assert "verdict" not in run.data.tags and "complete" not in run.data.tags

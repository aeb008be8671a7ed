"""Nothing leaves the machine: the demo-style assessment of the tiny use case runs as the `trustcase`
command in a network namespace that has only loopback (`unshare -n`), and every socket that the
command and its child processes (the temporary Prefect server) open is recorded through a Python
audit hook: only loopback and local (AF_UNIX) sockets are allowed."""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import ROOT, tiny_use_case, write_yaml

AUDIT = """
import json, os, socket, sys

_LOG = os.environ.get("TRUSTCASE_SOCKET_AUDIT")
_EVENTS = {"socket.connect", "socket.bind", "socket.sendto", "socket.sendmsg", "socket.getaddrinfo",
           "socket.gethostbyname", "socket.gethostbyaddr"}

def _audit(event, args):
    if not _LOG or event not in _EVENTS:
        return
    if event in ("socket.getaddrinfo", "socket.gethostbyname", "socket.gethostbyaddr"):
        family, address = "lookup", args[0]
    else:
        family, address = getattr(args[0], "family", None), args[1]
    if isinstance(address, bytes):
        address = address.decode(errors="replace")
    with open(_LOG, "a") as f:
        f.write(json.dumps({"pid": os.getpid(), "event": event, "family": str(family),
                            "address": address if isinstance(address, (str, type(None))) else list(address)},
                           default=str) + "\\n")

if _LOG:
    sys.addaudithook(_audit)
"""


def _unshare() -> list[str] | None:
    """A command prefix giving a new network namespace with only loopback up, when this machine allows it."""
    if not (shutil.which("unshare") and shutil.which("ip")):
        return None
    probe = subprocess.run(["unshare", "-n", "sh", "-c", "ip link set lo up"], capture_output=True)
    return ["unshare", "-n", "sh", "-c", 'ip link set lo up && exec "$@"', "sh"] if probe.returncode == 0 else None


@pytest.fixture(scope="module")
def offline_run(tmp_path_factory, tiny_model):
    """`trustcase assess` on the tiny use case, offline when possible, with every socket recorded."""
    tmp = tmp_path_factory.mktemp("offline")
    raw = tiny_use_case(tmp, tiny_model)
    raw["plan"]["checks"] = [{"check": "data_quality"}, {"check": "performance"}]
    # no sweep in this plan: its claims would be measured by nothing (a preflight error)
    raw["requirements"] = [r for r in raw["requirements"] if not (r.get("scope") or {}).get("perturbation")]
    case = write_yaml(tmp / "use_case.yaml", raw)
    site = tmp / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(textwrap.dedent(AUDIT))
    log = tmp / "sockets.jsonl"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    env.update(PYTHONPATH=str(site), TRUSTCASE_SOCKET_AUDIT=str(log), PREFECT_HOME=str(tmp / "prefect"),
               PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="600", PREFECT_LOGGING_LEVEL="WARNING",
               NO_PROXY="*", HTTP_PROXY="", HTTPS_PROXY="")
    prefix = _unshare()
    cmd = [str(Path(sys.executable).parent / "trustcase"), "assess", str(case), "--out", str(tmp / "out"),
           "--tracking-uri", f"sqlite:///{tmp / 'mlflow.db'}"]
    proc = subprocess.run((prefix or []) + cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=900)
    records = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    return {"proc": proc, "offline": prefix is not None, "out": tmp / "out", "sockets": records}


def test_the_assessment_completes_with_networking_removed(offline_run):
    if not offline_run["offline"]:
        pytest.skip("cannot create a network namespace here (unshare -n needs privileges)")
    proc = offline_run["proc"]
    assert proc.returncode in (0, 3), proc.stdout + proc.stderr  # 0 all pass, 3 some claim not passed
    assert "verdict:" in proc.stdout
    out = offline_run["out"]
    assert (out / "report.html").is_file() and (out / "assessment.json").is_file()


def _local(address) -> bool:
    if address is None or address in ("", "localhost", "localhost.localdomain", socket.gethostname()):
        return True
    host = address[0] if isinstance(address, list) else address
    if isinstance(host, str) and (host.startswith("/") or host.startswith("\x00") or host == ""):
        return True  # AF_UNIX paths, abstract sockets, unnamed
    try:
        ip = ipaddress.ip_address(host.split("%")[0])
    except ValueError:
        return host in ("localhost", socket.gethostname())
    return ip.is_loopback or ip.is_unspecified  # binding 0.0.0.0 is local; connecting to it reaches loopback


def test_only_loopback_sockets_are_opened(offline_run):
    proc, sockets = offline_run["proc"], offline_run["sockets"]
    assert proc.returncode in (0, 3), proc.stdout + proc.stderr
    assert len({s["pid"] for s in sockets}) >= 1 and any(s["event"] == "socket.connect" for s in sockets), \
        "the audit recorded nothing: the hook is not installed"
    outside = [s for s in sockets if not _local(s["address"])]
    assert not outside, f"non-loopback sockets: {outside[:10]}"


def test_the_package_turns_telemetry_off_before_anything_is_imported():
    code = ("import os, trustcase; print(os.environ['DO_NOT_TRACK'], os.environ['PREFECT_SERVER_ANALYTICS_ENABLED'],"
            " os.environ['MLFLOW_DISABLE_TELEMETRY'])")
    env = {k: v for k, v in os.environ.items() if k not in ("DO_NOT_TRACK", "PREFECT_SERVER_ANALYTICS_ENABLED",
                                                           "MLFLOW_DISABLE_TELEMETRY")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=ROOT)
    assert out.stdout.split() == ["1", "false", "true"]


def test_the_audit_tells_loopback_from_the_outside():
    assert _local(["127.0.0.1", 4200]) and _local(["::1", 80, 0, 0]) and _local("/tmp/x.sock") and _local(None)
    assert not _local(["192.0.2.1", 443]) and not _local("pypi.org") and not _local(["2001:db8::1", 443, 0, 0])

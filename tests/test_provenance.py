"""The evidence records the machine: what decides whether two runs agree bit for bit."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

from trustcase.flows import provenance
from trustcase.schemas import Provenance


def test_the_platform_names_the_cpu_the_kernels_and_the_threads():
    p = provenance.platform()
    assert p["aten_cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert p["torch_threads"] == str(torch.get_num_threads()) and p["torch"] == torch.__version__
    assert p["cpu"] and p["cpu_count"] == str(os.cpu_count())
    assert set(p["cpu_flags"].split()) <= set(provenance.SIMD)


def test_a_lowered_capability_is_recorded():
    """ATEN_CPU_CAPABILITY=default (what .ci/run uses): torch's plain kernels, and the record says so."""
    code = "import json; from trustcase.flows import provenance; print(json.dumps(provenance.platform()))"
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "default", "OMP_NUM_THREADS": "1"}
    out = json.loads(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                                    check=True).stdout)
    assert out["aten_cpu_capability"] == "DEFAULT" and out["ATEN_CPU_CAPABILITY"] == "default"
    assert out["torch_threads"] == "1"


def test_a_record_from_before_the_platform_field_still_loads():
    old = {"use_case_id": "u", "use_case_sha256": "0", "model_sha256": "0", "data_sha256": "0", "code_version": "1",
           "packages": {}, "seed": 0, "started_at": "2026-01-01T00:00:00Z"}
    assert Provenance.model_validate(old).platform == {}

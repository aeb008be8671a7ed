"""What was run, on what, by which code and on which machine: recorded with every assessment.

Figures are bit for bit the same for the same code, data, seed and thread count on the same machine (CPU
model and the instruction set torch dispatches to, `aten_cpu_capability`); on another machine float32
kernels sum in another order, so scores move in their last bits and a trained model can differ. `platform()`
records what decides it; certified bounds hold everywhere (their rounding margins, `certification.rounding`).
"""

from __future__ import annotations

import hashlib
import importlib.metadata as md
import os
import platform as host
import subprocess
from functools import cache
from pathlib import Path

import yaml

import trustcase

PACKAGES = ("trustcase", "torch", "numpy", "scipy", "pydantic", "prefect", "mlflow", "captum",
            "albumentations", "opencv-python-headless", "onnxruntime", "elpv-dataset", "weasyprint")


@cache
def packages() -> dict[str, str]:
    out = {"python": host.python_version()}
    for p in PACKAGES:
        try:
            out[p] = md.version(p)
        except md.PackageNotFoundError:
            pass
    return out


# the instruction-set extensions that change which float kernels run (and so the last bits of float32 results)
SIMD = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16",
        "amx_tile", "amx_bf16", "neon", "asimd", "sve")


@cache
def _cpu() -> tuple[str, str]:
    """CPU model and its SIMD flags (Linux /proc/cpuinfo; elsewhere the processor string and no flags)."""
    model, flags = host.processor() or host.machine(), set()
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8", errors="replace"):
            key, _, value = line.partition(":")
            key = key.strip().lower()
            if key in ("model name", "cpu model") and value.strip():
                model = value.strip()
            elif key in ("flags", "features"):
                flags |= set(value.split())
    except OSError:
        pass
    return model, " ".join(f for f in SIMD if f in flags)


def platform() -> dict[str, str]:
    """The machine the figures were computed on: CPU model and SIMD flags, the kernels torch dispatches to (its
    ATen CPU capability, which the ATEN_CPU_CAPABILITY variable can lower), thread counts, torch version."""
    import torch

    model, flags = _cpu()
    return {"system": f"{host.system()} {host.machine()}", "cpu": model, "cpu_flags": flags,
            "cpu_count": str(os.cpu_count()), "torch": torch.__version__,
            "aten_cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "ATEN_CPU_CAPABILITY": os.environ.get("ATEN_CPU_CAPABILITY", "(unset)"),
            "torch_threads": str(torch.get_num_threads()),
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "(unset)")}


@cache
def source_sha256() -> str:
    """Hash of the trustcase sources: the code version even outside a git checkout."""
    root = Path(trustcase.__file__).parent
    h = hashlib.sha256()
    for f in sorted(root.rglob("*")):
        if f.suffix in {".py", ".j2", ".css"} and "__pycache__" not in f.parts:
            h.update(str(f.relative_to(root)).encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


@cache
def code_version() -> str:
    root = Path(trustcase.__file__).parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=root, capture_output=True,
                                text=True, timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "trustcase"], cwd=root, capture_output=True,
                               text=True, timeout=5).stdout.strip()
        git = f"git {commit}{'+dirty' if dirty else ''}"
    except (OSError, subprocess.SubprocessError):
        git = "no git"
    return f"{trustcase.__version__} ({git}, src {source_sha256()[:12]})"


def canonical_sha256(obj) -> str:
    return hashlib.sha256(yaml.safe_dump(obj, sort_keys=True).encode()).hexdigest()

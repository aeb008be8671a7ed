"""What was run, on what, by which code: recorded with every assessment."""

from __future__ import annotations

import hashlib
import importlib.metadata as md
import platform
import subprocess
from functools import cache
from pathlib import Path

import yaml

import trustcase

PACKAGES = ("trustcase", "torch", "numpy", "scipy", "pydantic", "prefect", "mlflow", "captum",
            "albumentations", "opencv-python-headless", "onnxruntime", "elpv-dataset", "weasyprint")


@cache
def packages() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for p in PACKAGES:
        try:
            out[p] = md.version(p)
        except md.PackageNotFoundError:
            pass
    return out


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

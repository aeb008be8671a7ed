"""What was run, on what, by which code and on which machine: recorded with every assessment.

Figures are bit for bit the same for the same code, data, seed and thread count on the same machine (CPU
model and the instruction set torch dispatches to, `aten_cpu_capability`); on another machine float32
kernels sum in another order, so scores move in their last bits and a trained model can differ. `platform()`
records what decides it; certified bounds hold everywhere (their rounding margins, `certification.rounding`).
"""

from __future__ import annotations

import ast
import hashlib
import importlib.metadata as md
import importlib.util
import os
import platform as host
import subprocess
import sys
import sysconfig
from functools import cache
from pathlib import Path
from types import ModuleType

import yaml

import trustcase
from trustcase.models.classifier import sha256_file
from trustcase.registry import bare_name

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


def model_sha256(spec) -> str:
    """What a result depends on of the model: its file (a black box's folder) and, for ONNX, every external data
    file its tensors name (`model.onnx` + `model.weights`: the weights are not in the first file)."""
    path = Path(spec.path)
    own = sha256_file(path)
    extra = onnx_external_data(path) if spec.format == "onnx" else []
    if not extra:
        return own
    h = hashlib.sha256(own.encode())
    for f in extra:
        h.update(b"\0" + f.name.encode() + b"\0" + sha256_file(f).encode())
    return h.hexdigest()


def onnx_external_data(path: Path) -> list[Path]:
    """The files an ONNX model keeps its tensors in, beside the model file (none when it holds them itself)."""
    import onnx
    from onnx.external_data_helper import ExternalDataInfo, _get_all_tensors, uses_external_data

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # noqa: BLE001  (not an ONNX file: loading the model says so, with its reason)
        return []
    names = {ExternalDataInfo(t).location for t in _get_all_tensors(model) if uses_external_data(t)}
    return sorted(path.parent / n for n in names)


def _outside(file: str) -> bool:
    """Whether a module file is the standard library's, an installed package's or trustcase's (versioned apart)."""
    roots = {sysconfig.get_paths()[k] for k in ("stdlib", "platstdlib", "purelib", "platlib")}
    roots.add(str(Path(trustcase.__file__).parent))
    return any(Path(file).is_relative_to(r) for r in roots)


def _imports(module: ModuleType, source: str) -> set[str]:
    """The modules a source imports anywhere (functions included), relative imports resolved."""
    out: set[str] = set()
    package = module.__package__ or ""
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}".strip(".")
            out.add(base)
            out |= {f"{base}.{a.name}" for a in node.names}  # `from pkg import submodule`
    return {m for m in out if m}


class Uncacheable(Exception):
    """Partner code whose source cannot be hashed: its results are not cached (they cannot be keyed)."""


def code_closure(modules: list[str]) -> list[str]:
    """`module:sha256` of every source file the named partner modules run: each one, and every module they
    import, transitively (as written in their source, functions included), that is not the standard library's,
    an installed package's or trustcase's; a module of the same top-level package as a named one counts even
    when installed. Raises `Uncacheable` for partner code without a source file."""
    tops = {m.partition(".")[0] for m in modules}
    todo, seen, out = list(modules), set(), []
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        module = sys.modules.get(name)
        if module is None:
            try:
                spec = importlib.util.find_spec(name)
            except (ImportError, ValueError):  # `from x import attribute`, a module that is not there
                continue
            origin = spec.origin if spec else None
        else:
            origin = getattr(module, "__file__", None)
        if not origin or origin in ("built-in", "frozen"):
            continue
        if _outside(origin) and name.partition(".")[0] not in tops or name.partition(".")[0] == "trustcase":
            continue
        if not origin.endswith(".py"):
            raise Uncacheable(f"module {name} ({Path(origin).name}) has no Python source to hash")
        source = Path(origin).read_text(encoding="utf-8", errors="replace")
        out.append(f"{bare_name(name)}:{hashlib.sha256(source.encode()).hexdigest()}")  # the file it ran from
        try:
            todo += sorted(_imports(module or ModuleType(name), source))
        except SyntaxError:
            continue
    return sorted(set(out))  # a folder's module loaded by its folder's name and imported bare: one file


def canonical_sha256(obj) -> str:
    return hashlib.sha256(yaml.safe_dump(obj, sort_keys=True).encode()).hexdigest()

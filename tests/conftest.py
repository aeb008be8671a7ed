"""Shared fixtures: a real Prefect (test harness), a real MLflow store in a temporary folder,
and a real tiny CNN trained on a small subset of the real ELPV solar-cell images."""

from __future__ import annotations

import os

# One thread per BLAS/OpenMP/torch pool, set before torch is imported: results and durations are
# reproducible, and 2 cores shared by parallel jobs are not oversubscribed (a Lipschitz test took
# 111 s on 2 threads beside another job, 1.2 s on one).
for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import importlib.util  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

import trustcase  # noqa: E402, F401  (telemetry off first)

torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parent.parent
SOLAR = ROOT / "use_cases" / "solar_cells"
SHARED = Path(os.environ.get("TRUSTCASE_SHARED", ROOT.parent / "shared"))


@pytest.fixture(scope="session")
def prefect_harness(tmp_path_factory):
    """A throw-away Prefect database and result storage for the whole session (flow tests only)."""
    home = tmp_path_factory.mktemp("prefect-home")
    os.environ["PREFECT_HOME"] = str(home)
    os.environ["PREFECT_LOCAL_STORAGE_PATH"] = str(home / "storage")
    os.environ["TRUSTCASE_CACHE"] = str(home / "trustcase-cache")  # check results and artefacts, keyed on content
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture
def tracking_uri(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


def load_train_module():
    spec = importlib.util.spec_from_file_location("solar_train_for_tests", SOLAR / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny_use_case(folder: Path, model_path: Path, **overrides) -> dict:
    """The bundled solar-cell use case shrunk for tests: 32x32 images, a few hundred items."""
    raw = yaml.safe_load((SOLAR / "use_case.yaml").read_text())
    raw["model"].update(path=str(model_path), input_shape=[1, 32, 32])
    raw["data"].update(path=str(SOLAR), params={"size": 32, "threshold": 0.5},
                       max_samples={"train": 120, "validation": 60, "test": 100}, batch_size=32)
    raw["plan"]["checks"] = [
        {"check": "data_quality"},
        {"check": "performance"},
        {"check": "perturbation_sweep", "params": {"perturbations": {"gaussian_blur": [1.0, 2.0]}}},
    ]
    # only the claims this plan measures: a claim no check of the plan measures is a preflight error (D6-D8 are
    # feature_drift's, feature_leakage's and poisoning_screen's)
    raw["requirements"] = [r for r in raw["requirements"]
                           if r["id"].startswith(("R1-", "R2-", "R3-", "R4-", "R5-", "R6-", "D1-", "D2-", "D3-",
                                                  "D4-", "D5-"))]
    for k, v in overrides.items():
        raw[k] = v
    return raw


def write_yaml(path: Path, raw: dict) -> Path:
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A real CNN trained for a few seconds on 300 real ELPV images at 32x32 (TorchScript)."""
    folder = tmp_path_factory.mktemp("tiny-model")
    model_path = folder / "tiny.pt"
    yml = write_yaml(folder / "contract.yaml", tiny_use_case(folder, model_path))
    # the conv-BN-maxpool CNN, plainly trained: the fixture many tests read (the bundled default is certified)
    load_train_module().train(model_path, epochs=2, width=4, use_case=yml, limit=300, log=lambda *_: None,
                              arch="pooled", ibp_eps=0.0)
    return model_path


@pytest.fixture
def tiny_case(tmp_path, tiny_model) -> Path:
    """A valid small use-case file in a fresh folder, pointing at the tiny model."""
    return write_yaml(tmp_path / "use_case.yaml", tiny_use_case(tmp_path, tiny_model))


# --- small synthetic image folders, for checks that must be triggered on purpose ----------------

def folder_use_case(root: Path, class_names=("ok", "bad"), size=16, **extra) -> dict:
    """A use case over an `image_folder` dataset at root/<split>/<class>/*.png (no model file needed
    for component tests: the Context gets an eager module directly)."""
    raw = {
        "id": "synthetic", "title": "Synthetic", "owner": "tests", "criticality": "low",
        "intended_function": "tests",
        "model": {"format": "torchscript", "path": str(root / "none.pt"), "input_shape": [1, size, size],
                  "class_names": list(class_names), "critical_class": class_names[-1]},
        "data": {"loader": "image_folder", "params": {"root": str(root), "class_names": list(class_names)},
                 "splits": {"train": "train", "test": "test"}, "batch_size": 8},
        "requirements": [],
        "plan": {"checks": [{"check": "data_quality"}]},
    }
    raw.update(extra)
    return raw


def save_png(path: Path, image) -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path)
    return path


def context_for(use_case, module, workdir: Path, seed: int = 0):
    from trustcase.checks import Context
    from trustcase.data.streaming import DataSource
    from trustcase.models.classifier import Classifier

    module.eval()
    return Context(use_case=use_case, model=Classifier(use_case.model, module=module),
                   data=DataSource(use_case.data, seed, use_case.model), seed=seed, workdir=workdir)


def acas_use_case(tmp_path: Path):
    """The ACAS Xu use case with its network N_1,1 exported to tmp_path (needs ../shared/acasxu)."""
    from trustcase.schemas import load_use_case

    folder = ROOT / "use_cases" / "acas_xu"
    spec = importlib.util.spec_from_file_location("acas_for_tests", folder / "acas.py")
    acas = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(acas)
    model_path = acas.export("1_1", tmp_path / "acasxu_1_1.pt")
    raw = (folder / "use_case.yaml").read_text().replace("artefacts/acasxu_1_1.pt", str(model_path))
    (tmp_path / "use_case.yaml").write_text(raw.replace("path: .", f"path: {folder}"))
    return load_use_case(tmp_path / "use_case.yaml")

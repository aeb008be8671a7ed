"""`trustcase assess` of a bundled use case on a subset of its real data, with a seeded untrained TorchScript model
of its own train.py (this tests the flow, not the model), on real Prefect and MLflow: shared by the slow
end-to-end tests of the detection and segmentation cases."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import yaml

from trustcase.flows.assess import assess
from trustcase.schemas import Assessment

CASES = Path(__file__).resolve().parents[1] / "use_cases"
SUBSET = {"train": 24, "validation": 12, "test": 24}


def case_module(case: str, module: str):
    """A module of a bundled use case's folder (its data loader, its train.py), loaded from that folder under its
    own name: two cases both have a `train.py`, and a bare import would return whichever came first."""
    name = f"{case}_{module}"
    if name not in sys.modules:
        folder = str(CASES / case)
        if folder not in sys.path:
            sys.path.append(folder)  # for the module's own imports of its siblings
        spec = importlib.util.spec_from_file_location(name, CASES / case / f"{module}.py")
        sys.modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[name])
    return sys.modules[name]


def assess_subset(case: str, network: str, tmp_path: Path, tracking_uri: str,
                  edit: Callable[[dict], None]) -> tuple[Assessment, str]:
    """Assess `case` with train.py's `network` (seeded, untrained) on SUBSET; `edit` trims the raw use case.
    Returns the assessment (complete, every claim with its evidence) and the report's HTML."""
    torch.manual_seed(0)
    model = tmp_path / "model.pt"
    torch.jit.script(getattr(case_module(case, "train"), network)().eval()).save(str(model))
    raw = yaml.safe_load((CASES / case / "use_case.yaml").read_text())
    raw["model"]["path"] = str(model)
    raw["data"].update(path=str(CASES / case), max_samples=dict(SUBSET))
    for check in raw["plan"]["checks"]:
        if check["check"] == "perturbation_sweep":
            check["params"]["perturbations"] = {"gaussian_blur": [1.0], "dead_pixels": [0.01]}
    edit(raw)
    (tmp_path / "uc.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    r = assess(str(tmp_path / "uc.yaml"), str(tmp_path / "out"), None, tracking_uri)
    assert r.complete
    a = Assessment.model_validate_json((tmp_path / "out" / "assessment.json").read_text())
    assert {e.claim_id for e in a.evidence} == {x.id for x in a.requirements}
    return a, (tmp_path / "out" / "report.html").read_text()

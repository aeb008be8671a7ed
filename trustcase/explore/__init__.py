"""`trustcase explore`: a local web lab over the model and its evidence.

    trustcase explore use_cases/solar_cells/use_case.yaml          # http://127.0.0.1:8765/

- Runs (`/runs`): the assessments of the MLflow store (use case, model version, verdict, date), each with its
  claims, each claim with its evidence (measurements, intervals, curves, the check's artefacts) and links to
  the HTML/PDF report and the evidence pack.
- The lab (`/lab`): the use case's model, loaded once per process, on the test split (filters: class,
  correct/incorrect, ODD subgroup, ODD decision, HUDD cluster of the last assessment) or an uploaded image:
  prediction, the ODD monitor's decision and reasons (the monitor fitted by the last assessment, else the
  use case's specification), every registered attribution method for a class or a layer's channel or unit
  (starting from the options the last assessment validated it with), class and channel visualisation, every
  registered perturbation on a slider, and "prove it" (local robustness of the certification engine).

Everything is served by the application itself (no CDN; a Content-Security-Policy forbids any other origin);
it binds to 127.0.0.1 unless `--host` is given, which then requires `--token`. Work runs off the event loop:
short requests on a small bounded pool; attributions, visualisations and proofs as jobs on another (a job id,
progress, a long poll, cooperative cancellation at every model evaluation).
Artefacts fetched from MLflow are cached under `.trustcase/explore/` in the working directory; uploads stay
in memory. For a confidential use case images go to loopback clients only.
"""

from __future__ import annotations

from pathlib import Path

from trustcase.explore.app import create_app, host_names, is_loopback
from trustcase.explore.lab import Lab, LabError
from trustcase.explore.store import Store, StoreError

CACHE = Path(".trustcase") / "explore"


def build(use_case_path: Path | None, tracking_uri: str | None = None, token: str | None = None,
          cache: Path = CACHE, host: str = "127.0.0.1"):
    """The application for a use case (None: runs only); the model is loaded here, once. Returns (app, note)."""
    from trustcase.schemas import load_use_case

    store = Store(tracking_uri, cache)
    lab, note = None, ""
    if use_case_path is not None:
        uc = load_use_case(use_case_path)
        runtime = None
        try:
            run = store.last(uc.id)
            if run is not None:
                runtime = store.runtime_files(run)
                note = f"last assessment of {uc.id}: run {run}"
        except StoreError as e:
            note = f"no runtime artefacts from the store: {e}"
        lab = Lab(uc, runtime)
    return create_app(lab, store, token, hosts=host_names(host)), note


__all__ = ["CACHE", "Lab", "LabError", "Store", "StoreError", "build", "create_app", "is_loopback"]

"""The bundled demo's model: trained by the use case's own script when missing, then registered."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from trustcase.data.streaming import DataError
from trustcase.flows import tracking
from trustcase.models.classifier import sha256_file
from trustcase.schemas import load_use_case


def _train_module(use_case_path: Path):
    script = use_case_path.parent / "train.py"
    spec = importlib.util.spec_from_file_location(f"trustcase_train_{use_case_path.parent.name}", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def ensure_bundled_model(use_case_path: Path, tracking_uri: str | None, console=None) -> str:
    """Train the model if its file is missing or stale (the use case's `train.py` may define `stale(path)`, the
    reason its model no longer fits the data); register it in the MLflow registry. Returns the version."""
    module = _train_module(use_case_path)
    missing = getattr(module, "missing_data", None)  # a use case's own data check, else the solar cells' package
    if missing is not None and (why := missing()):
        raise DataError(why)
    if missing is None and importlib.util.find_spec("elpv_dataset") is None:
        raise DataError("the demo's data package is not installed: pip install 'elpv-dataset' "
                        "(or the project's `demo` extra); `make demo` does it")
    uc = load_use_case(use_case_path)
    path = Path(uc.model.path)
    log_file = path.with_suffix(".json")
    why = getattr(module, "stale", lambda _: None)(path) if path.is_file() else "no model file yet"
    if why:
        if console is not None:
            console.print(f"training the model: {why}")
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

            epochs = int(getattr(module, "DEFAULT_EPOCHS", 30))  # the training script's default recipe
            title = f"Training the {uc.title}" if missing is not None else "Training the solar-cell CNN"
            with Progress(TextColumn(title), BarColumn(), TextColumn("{task.description}"),
                          TimeElapsedColumn(), console=console) as bar:
                job = bar.add_task("", total=epochs)

                def log(line: str) -> None:  # "epoch 3/30 loss 0.41 val acc ...": the epoch and the validation part
                    _, val, after = line.partition("val")
                    bar.update(job, advance=1, description=line.split(" loss")[0] + (f" ·{after}" if val else ""))

                module.train(path, epochs=epochs, log=log)
        else:
            module.train(path)
    training = json.loads(log_file.read_text()) if log_file.is_file() else {}
    tracking.configure(tracking_uri)
    return tracking.register_model(uc, path, sha256_file(path), training)

"""The ODD monitor at run time, beside the model in production: no Prefect, no MLflow.

    from trustcase.odd import Monitor
    monitor = Monitor.load("monitor.safetensors", "model.pt")  # the model it was fitted for, hash-checked
    decisions = monitor.evaluate(images)                   # (H, W), (H, W, C) or (B, H, W, C), pixel space
    for i in range(len(decisions)):
        print(decisions.record(i))                         # state IN / NEAR / OUT, reasons, prediction

`Monitor.load(path, model)` takes the model file (TorchScript / ONNX) or a loaded Classifier: the monitor file is
data and never names a model to load. A model with another hash, or a file of another schema version, is
rejected with `MonitorError`.
"""

import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from trustcase.odd.monitor import (
    DESCRIPTORS,
    SCHEMA_VERSION,
    Decisions,
    LearnedMonitor,
    Monitor,
    MonitorError,
    SpecificationMonitor,
    State,
    fit,
)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}
BATCH = 256  # inputs of one file judged at once


def input_files(paths: Sequence[str | Path]) -> list[Path]:
    """Files named, and the images / .npy files of folders named (sorted, not recursive)."""
    files = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES | {".npy"})
            if not found:
                raise MonitorError(f"folder {p} holds no image or .npy file")
            files += found
        elif p.is_file():
            files.append(p)
        else:
            raise MonitorError(f"input not found: {p}")
    return files


def read_input(path: Path, monitor: Monitor, resize: bool = False) -> np.ndarray:
    """One file as a batch in the monitor's layout: an image (grey or RGB per the model's channels, resized
    with area averaging when `resize`), or a .npy array of one input or a batch (pixel space)."""
    shape = list(monitor.model_spec.input_shape)
    if path.suffix.lower() == ".npy":
        try:
            x = np.load(path, allow_pickle=False)  # object arrays would need unpickling: refused
        except (ValueError, OSError, EOFError) as e:
            raise MonitorError(f"cannot read {path} as a numeric .npy array: {e}") from None
    else:
        from PIL import Image, UnidentifiedImageError

        from trustcase.data.streaming import Rejected, check_pixels

        try:
            with warnings.catch_warnings():  # our pixel limit decides, before decoding
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                im = Image.open(path)
            with im:
                check_pixels(*im.size, path)
                x = np.array(im.convert("L" if shape[0] == 1 else "RGB"))
        except Rejected as e:
            raise MonitorError(str(e)) from None
        except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as e:
            raise MonitorError(f"cannot read image {path}: {e}") from None
        if len(shape) == 3 and x.shape[:2] != tuple(shape[1:]):
            if not resize:
                raise MonitorError(f"image {path} is {x.shape[1]}x{x.shape[0]} px, the model takes "
                                   f"{shape[2]}x{shape[1]}: pass --resize to resample it")
            import cv2

            x = cv2.resize(x, (shape[2], shape[1]), interpolation=cv2.INTER_AREA)
    try:
        return monitor.batch(x)
    except MonitorError as e:
        raise MonitorError(f"{path}: {e}") from None


def evaluate_files(monitor: Monitor, paths: Sequence[str | Path], meta: dict[str, str] | None = None,
                   resize: bool = False) -> Iterator[tuple[str, dict]]:
    """(input name, decision record) for every input of the files and folders named, one file at a time. A file
    that cannot be judged (unreadable, not the model's input) is OUT with the reason and `error` set; the rest
    go on."""
    monitor.check_meta(meta or {})
    for f in input_files(paths):
        try:
            x = read_input(f, monitor, resize)
        except MonitorError as e:
            yield str(f), {"state": State.OUT.name, "reasons": [f"not judged: {e}"], "error": str(e)}
            continue
        for start in range(0, len(x), BATCH):  # a .npy of thousands of inputs goes through the model in batches
            part = x[start:start + BATCH]
            d = monitor.evaluate(part, {k: [v] * len(part) for k, v in (meta or {}).items()})
            for i in range(len(d)):
                yield (str(f) if len(x) == 1 else f"{f}[{start + i}]"), d.record(i)


__all__ = ["DESCRIPTORS", "SCHEMA_VERSION", "Decisions", "LearnedMonitor", "Monitor", "MonitorError",
           "SpecificationMonitor", "State", "evaluate_files", "fit", "input_files", "read_input"]

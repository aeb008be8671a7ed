"""One loader per model format, in one table: the only place that turns a `ModelSpec` into a `Classifier`."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import torch

from trustcase.models.blackbox import load_black_box
from trustcase.models.classifier import Classifier, ModelError, probe
from trustcase.registry import resolve
from trustcase.schemas import ModelSpec


def _torchscript(spec: ModelSpec) -> Classifier:
    return Classifier(spec, module=torch.jit.load(str(spec.path), map_location="cpu").eval())


def _state_dict(spec: ModelSpec) -> Classifier:
    module = resolve(spec.factory, what="model factory", error=ModelError)(**spec.factory_args)
    state = torch.load(spec.path, map_location="cpu", weights_only=not spec.allow_pickle)
    if isinstance(state, torch.nn.Module):
        state = state.state_dict()
    module.load_state_dict(state)
    return Classifier(spec, module=module.eval())


def _onnx(spec: ModelSpec) -> Classifier:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = torch.get_num_threads()
    return Classifier(spec, session=ort.InferenceSession(str(spec.path), opts, providers=["CPUExecutionProvider"]))


FILE_FORMATS: dict[str, Callable[[ModelSpec], Classifier]] = {
    "torchscript": _torchscript, "state_dict": _state_dict, "onnx": _onnx}
BLACK_BOXES: dict[str, Callable[[ModelSpec], Classifier]] = {"python": load_black_box, "challenge": load_black_box}


def load_failure(e: Exception) -> str:
    """torch's message in plain words: no colour codes, and for a pickle, the global it would have had to run."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e))
    refused = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
    if refused:
        return (f"the file is a pickle that needs the Python global {refused.group(1)}; trustcase does not unpickle "
                "an untrusted file (save the weights with torch.save(model.state_dict()) or export TorchScript, "
                "or set model.allow_pickle: true only if you trust this file)")
    return f"{type(e).__name__}: {' '.join(text.split())}"


def load_classifier(spec: ModelSpec, wrap: Callable[[Classifier], Classifier] | None = None) -> Classifier:
    """The model of a use case, probed with one input of its declared contract before anything else runs; `wrap`
    gives another task's view of it (`tasks.detection.Detector`), whose output contract the probe then checks."""
    if spec.format in BLACK_BOXES:
        clf = BLACK_BOXES[spec.format](spec)
    else:
        path = Path(spec.path)
        if not path.is_file():
            raise ModelError(f"model file not found: {path}")
        try:
            clf = FILE_FORMATS[spec.format](spec)
        except ModelError:
            raise
        except Exception as e:  # torch raises many types for a bad file; name the file and the cause
            raise ModelError(f"cannot load {spec.format} model {path}: {load_failure(e)}") from None
    if wrap is not None:
        clf = wrap(clf)
    probe(clf)
    return clf

"""Load the model under assessment and run it on pixel-space batches, checking what comes out."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch

from trustcase.errors import UserError
from trustcase.schemas import ModelSpec


class ModelError(UserError):
    """A user error about the model: missing file, wrong format, output that does not fit the classes."""


class NonFiniteOutput(ModelError):
    pass


def sha256_file(path: Path) -> str:
    """Content hash of a model file, or of every file of a black-box component's folder (names included)."""
    h = hashlib.sha256()
    path = Path(path)
    files = [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    for file in files:
        if file != path:
            h.update(str(file.relative_to(path)).encode() + b"\0")
        with open(file, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


class Classifier:
    """A classifier seen through the use case's contract: pixel-space images in, logits out.

    `module` is the torch module (None for a black box such as ONNX); checks that need
    gradients use it, every other check uses only `logits`.
    """

    def __init__(self, spec: ModelSpec, module: torch.nn.Module | None = None, session=None):
        self.spec, self.module, self.session = spec, module, session
        lo, hi = spec.value_range
        c = spec.input_shape[0]
        mean = np.broadcast_to(np.asarray(spec.normalisation.mean, dtype=np.float32), (c,))
        std = np.broadcast_to(np.asarray(spec.normalisation.std, dtype=np.float32), (c,))
        # one affine map pixel -> model input: x * scale + shift, per channel (per feature for tabular inputs)
        view = (1, c) if self.tabular else (1, c, 1, 1)
        self._scale = torch.tensor(1.0 / ((hi - lo) * std)).view(view)
        self._shift = torch.tensor((-lo / (hi - lo) - mean) / std).view(view)

    @property
    def tabular(self) -> bool:
        """input_shape [F]: one feature vector per item, batches (B, F)."""
        return len(self.spec.input_shape) == 1

    @property
    def n_classes(self) -> int:
        return len(self.spec.class_names)

    @property
    def differentiable(self) -> bool:
        return self.module is not None

    def to_input(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) pixel space -> (B, C, H, W) normalised float32; tabular: (B, F) -> (B, F).

        A tabular item streamed by data.py as a (1, F) array arrives as (B, 1, F, 1): accepted when it
        holds exactly F values per item.
        """
        if isinstance(images, np.ndarray):  # a read-only array (a memory-mapped file) is copied, not shared
            x = torch.as_tensor(images if images.flags.writeable else images.copy()).float()
        else:
            x = images.float()
        if self.tabular:
            f = self.spec.input_shape[0]
            if x.ndim < 2 or int(np.prod(x.shape[1:])) != f:
                raise ModelError(f"expected a batch (B, {f}) of feature vectors, got shape {tuple(x.shape)}")
            return x.reshape(len(x), f) * self._scale + self._shift
        if x.ndim != 4:
            raise ModelError(f"expected a batch (B, H, W, C), got shape {tuple(x.shape)}")
        x = x.permute(0, 3, 1, 2)
        if list(x.shape[1:]) != list(self.spec.input_shape):
            raise ModelError(
                f"input of shape {list(x.shape[1:])} (C, H, W) does not match model.input_shape {self.spec.input_shape}"
            )
        return x * self._scale + self._shift

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised input -> logits, differentiable when the model is a torch module."""
        if self.module is not None:
            return self.module(x)
        out = self.session.run(None, {self.session.get_inputs()[0].name: x.detach().numpy()})[0]
        return torch.from_numpy(np.asarray(out, dtype=np.float32))

    def logits(self, images: np.ndarray, ids: list[str] | None = None) -> np.ndarray:
        with torch.inference_mode():
            out = self.forward(self.to_input(images))
        self.check_output(out, ids)
        return out.numpy()

    def check_output(self, out: torch.Tensor, ids: list[str] | None = None) -> None:
        if out.ndim != 2 or out.shape[1] != self.n_classes:
            raise ModelError(
                f"model output has shape {tuple(out.shape)}, expected (batch, {self.n_classes}) "
                f"for classes {self.spec.class_names}"
            )
        bad = ~torch.isfinite(out).all(dim=1)
        if bad.any():
            where = [ids[i] for i in torch.nonzero(bad).flatten().tolist()][:5] if ids else []
            raise NonFiniteOutput(
                f"model produced NaN/inf logits for {int(bad.sum())} input(s)" + (f", e.g. {where}" if where else "")
            )


def probe(clf: Classifier) -> None:
    """Fail early, with the contract in the message, if the model does not fit the use case."""
    lo, hi = clf.spec.value_range
    c, *hw = clf.spec.input_shape
    x = np.full((2, *hw, c) if hw else (2, c), (lo + hi) / 2, dtype=np.float32)
    try:
        clf.logits(x)
    except ModelError:
        raise
    except Exception as e:
        first = next((ln for ln in str(e).splitlines() if ln.strip()), "")
        raise ModelError(f"model does not accept input of shape {clf.spec.input_shape}: {type(e).__name__}: {first}") \
            from None

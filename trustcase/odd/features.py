"""The model's own features for the learned monitor: the input of its last Linear layer when that can be
found and verified on a probe, else the logits; for a detector or a segmenter, the features its backbone exports
(a segmenter without them: its per-pixel logits pooled per class)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from trustcase.models import anatomy
from trustcase.models.classifier import Classifier


class FeatureExtractor:
    """(features, logits) in one forward pass. Features are the input of the model's last Linear layer
    when that can be found and verified on a probe (children of a Sequential run in order, else a forward
    pre-hook on an eager module); otherwise the logits themselves (`mode` says which, `why` says why)."""

    # a detector (tasks.detection.Detector, which has `detect`) or a segmenter (tasks.segmentation.Segmenter, which
    # has `segment`) has no one class per image: its backbone exports `features(x) -> (B, F)` (an exported
    # TorchScript method), one Gaussian is fitted to them (`pooled`) and only the scores on features apply
    pooled = False
    scores: tuple[str, ...] = ("mahalanobis", "energy")

    def __init__(self, model: Classifier):
        self.model = model
        self.mode, self.why = "logits", "the model is a black box (no torch module)"
        self._run: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None
        if hasattr(model, "detect") or hasattr(model, "segment"):
            self._backbone(model)
            return
        if model.module is None:
            return
        probe = torch.randn(2, *model.spec.input_shape, generator=torch.Generator().manual_seed(0))
        with torch.inference_mode():
            ref = model.module(probe)
            for name, run in (("sequential", self._sequential), ("hook", self._hooked)):
                fn = run(model.module)
                if fn is None:
                    continue
                try:
                    feats, logits = fn(probe)
                except Exception:  # an opaque module may fail in any way: fall through to the next route
                    continue
                if logits.shape == ref.shape and torch.allclose(logits, ref, rtol=1e-4, atol=1e-5):
                    self._run, self.mode, self.why = fn, "penultimate", f"input of the last Linear layer ({name})"
                    return
        self.why = "the model's structure is opaque (no verifiable last Linear layer)"

    def _backbone(self, model: Classifier) -> None:
        kind = "detector" if hasattr(model, "detect") else "segmenter"
        self.pooled, self.scores, self.mode = True, ("mahalanobis",), "none"
        self.why = f"the {kind} exports no features(x) method (its backbone's features, (batch, F))"
        features = getattr(model.module, "features", None) if model.module is not None else None
        if not callable(features):
            if model.module is None:
                self.why = f"the {kind} is a black box (no torch module)"
            if kind == "segmenter":  # its per-pixel logits say something of the input: pooled per class
                self._run = lambda x: (self._pooled_logits(x), None)
                self.mode, self.why = "pooled_logits", f"{self.why}: its per-pixel logits, mean and max per class"
            return
        probe = torch.randn(2, *model.spec.input_shape, generator=torch.Generator().manual_seed(0))
        with torch.inference_mode():
            f = features(probe)
        if not isinstance(f, torch.Tensor) or f.ndim != 2 or len(f) != 2 or not torch.isfinite(f).all():
            self.why = f"the detector's features(x) gave {getattr(f, 'shape', type(f).__name__)}, not (batch, F)"
            return
        self._run = lambda x: (features(x), None)
        self.mode, self.why = "backbone", f"the {kind}'s backbone features (its features(x) method)"

    def _pooled_logits(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 2K): a segmenter's per-pixel logits (B, K, H, W) checked by its contract, mean and max per class."""
        out = self.model.forward(x)
        self.model.check_output(out)
        return torch.cat([out.mean(dim=(2, 3)), out.amax(dim=(2, 3))], dim=1)

    @staticmethod
    def _is_linear(m: torch.nn.Module) -> bool:
        return isinstance(m, torch.nn.Linear) or getattr(m, "original_name", "") == "Linear"

    def _sequential(self, module):
        children = list(module.children())
        if len(children) < 2 or not self._is_linear(children[-1]):
            return None
        split = anatomy.SplitHead(torch.nn.Sequential(*children[:-1]), children[-1])
        if isinstance(module, torch.jit.ScriptModule):
            # one compiled call, as fast as the model's own forward; layer by layer from Python costs
            # a dispatch per child, which at batch 1 is more than the monitor itself
            try:
                return torch.jit.script(split)
            except Exception:  # a child TorchScript cannot compose: the Python route gives the same numbers
                pass
        return split

    def _hooked(self, module):
        if isinstance(module, torch.jit.ScriptModule):
            return None
        heads = [m for m in module.modules() if isinstance(m, torch.nn.Linear)]
        if not heads:
            return None
        head, seen = heads[-1], []

        def run(x):
            seen.clear()
            handle = head.register_forward_pre_hook(lambda _, args: seen.append(args[0]))
            try:
                out = module(x)
            finally:
                handle.remove()
            if len(seen) != 1:
                raise RuntimeError("the last Linear layer ran more than once")
            f = seen[0].flatten(1)
            if not torch.allclose(head(f), out, rtol=1e-4, atol=1e-5):
                raise RuntimeError("the last Linear layer is not the output")
            return f, out
        return run

    def prepare(self, inputs: np.ndarray) -> torch.Tensor:
        if len(self.model.spec.input_shape) == 1:  # tabular: (B, F), used as given
            return torch.as_tensor(np.asarray(inputs, dtype=np.float32))
        return self.model.to_input(inputs)

    def __call__(self, inputs: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """(features, logits); a detector's or segmenter's logits are None (its output is not needed to judge its
        input)."""
        if self.pooled and self._run is None:  # a detector without features: nothing to read
            return None, None
        with torch.inference_mode():
            x = self.prepare(inputs)
            if self._run is None:
                logits = self.model.forward(x)
                feats = logits
            else:
                feats, logits = self._run(x)
        if logits is None:
            return feats.double().numpy(), None
        self.model.check_output(logits)
        return feats.numpy(), logits.numpy()

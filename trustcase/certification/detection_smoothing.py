"""Randomized smoothing of a detector's per-image decision "an indication is present": the binary classifier
f(x) = [some detection scores >= the operating threshold], certified by the one smoothing certifier
(`certification.smoothing.certify`: its seeding, its Clopper-Pearson bound and its rounding margins).

The certificate covers the smoothed decision g(x) = argmax_c P(f(x + e) = c) (a majority vote under Gaussian noise),
not the boxes: where they are, how many, and of which class are not certified. An image's label is "present" when it
has at least one true box.
"""

from __future__ import annotations

import numpy as np
import torch

from trustcase.models.classifier import Classifier

DECISION = ["no indication", "indication"]  # the classes of the derived classifier


class IndicationPresent(Classifier):
    """The detector's image-level decision as a two-class classifier: output one-hot (absent, present), present when
    a detection scores >= `threshold` (a tie at the threshold is present, as the detection metrics count it)."""

    def __init__(self, detector: Classifier, threshold: float):
        super().__init__(detector.spec.model_copy(update={"class_names": DECISION, "critical_class": DECISION[1]}),
                         module=detector.module, session=detector.session)
        self.detector, self.threshold = detector, threshold

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        present = (self.detector.forward(x)[..., 4] >= self.threshold).any(dim=1)
        return torch.nn.functional.one_hot(present.long(), 2).float()


def indication_labels(boxes: list[np.ndarray]) -> np.ndarray:
    """Per image 1 when it has a true box, else 0."""
    return np.array([int(len(b) > 0) for b in boxes], np.int64)

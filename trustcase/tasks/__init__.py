"""What differs between tasks (classification, detection, segmentation), in one place: the model's output contract,
what an item's label is, how the model is loaded and probed. Checks and the preflight ask the use case's task
(`task_of(use_case)`) instead of branching on its name."""

from __future__ import annotations

from typing import Any, ClassVar, Protocol

import numpy as np

from trustcase.measurement import BOOTSTRAP_REPLICATES
from trustcase.models.classifier import Classifier
from trustcase.models.loading import load_classifier
from trustcase.performance import Tally, rate_metrics
from trustcase.schemas import ConfusionMatrix, Measurement, ModelSpec, ReliabilityDiagram, UseCase


class Scorer(Protocol):
    """A task's performance figures, streamed: `update` per batch, `compute` at the end (a split, or one
    amplitude of a perturbation), `figures` and `validity` for the evidence."""

    def update(self, model: Classifier, batch) -> np.ndarray: ...  # per item its decision (flip rates compare them)
    def compute(self, split: str, confidence: float, perturbation: str | None = None,
                amplitude: float | None = None) -> list[Measurement]: ...
    def figures(self, split: str, measurements: list[Measurement]) -> list: ...  # `Figure`s and `Curve`s
    def validity(self, split: str, confidence: float) -> str: ...
    def example(self) -> np.ndarray | None: ...  # an example image (BGR uint8) of the model's output, if any


class Task:
    name: ClassVar[str]
    output: ClassVar[str]  # the model's output contract, in words (for messages and the evidence)
    subgroups: ClassVar[bool] = True  # its scorer also measures per categorical ODD value
    perturbed_subgroups: ClassVar[bool] = True  # ... under a perturbation too
    label_properties: ClassVar[tuple[str, ...]] = ()  # per-label properties data quality compares between splits
    rejected_labels: ClassVar[str | None] = None  # data quality's count of items refused for their label, if any
    label_flags: ClassVar[tuple[str, ...]] = ()  # data quality's counts of labels worth flagging (`count_flags`)

    def load_model(self, spec: ModelSpec) -> Classifier:
        """The model, probed with one input of its contract (a `ModelError` naming what does not fit)."""
        raise NotImplementedError

    def judge_label(self, label: Any, n_classes: int, image_hw: tuple[int, int] | None = None) -> Any:
        """An item's label in this task's form, or `data.streaming.Rejected` saying what is wrong."""
        raise NotImplementedError

    def metrics(self, use_case: UseCase, calibration: bool = True) -> list[str]:
        """The metric names its scorer emits on a split (without calibration: under a perturbation)."""
        raise NotImplementedError

    def label_stats(self, labels, n_classes: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """A batch's labels as counts per class and the values of `label_properties`."""
        raise NotImplementedError

    def count_flags(self, labels) -> dict[str, int]:
        """A batch's count of labels of each kind in `label_flags` (e.g. empty masks)."""
        return {}

    def scorer(self, use_case: UseCase, check: str, seed: int, calibration_bins: int = 15,
               calibration: bool = True) -> Scorer:
        raise NotImplementedError


class Classification(Task):
    name = "classification"
    output = "logits (batch, classes)"

    def load_model(self, spec: ModelSpec) -> Classifier:
        return load_classifier(spec)

    def judge_label(self, label, n_classes, image_hw=None):
        from trustcase.data.streaming import judge_label

        return judge_label(label, n_classes)

    def metrics(self, use_case, calibration=True):
        return [*rate_metrics(use_case), *(["ece"] if calibration else [])]

    def label_stats(self, labels, n_classes):
        return np.bincount(labels, minlength=n_classes), {}

    def scorer(self, use_case, check, seed, calibration_bins=15, calibration=True):
        return ClassificationScorer(use_case, check, seed, calibration_bins, calibration)


class ClassificationScorer:
    """Accuracy, per-class rates, cost and calibration (`performance.Tally`), its confusion matrix and
    reliability diagram."""

    def __init__(self, use_case: UseCase, check: str, seed: int, calibration_bins: int = 15, calibration: bool = True):
        self.uc, self.check, self.calibration = use_case, check, calibration
        self.tally = Tally(use_case, calibration_bins, check=check, seed=seed)

    def update(self, model, batch):
        """The predicted classes."""
        return self.tally.update(model.logits(batch.images, batch.ids), batch.labels, batch.meta, ids=batch.ids)

    def compute(self, split, confidence, perturbation=None, amplitude=None):
        return self.tally.compute(self.check, split, confidence, perturbation, amplitude, calibration=self.calibration)

    def figures(self, split, measurements):
        t = self.tally
        out = [ConfusionMatrix(title=f"Confusion matrix ({split})", classes=self.uc.model.class_names,
                               counts=t.cm.tolist(), illustrates=["accuracy", "recall", "precision"])]
        ece = next((m for m in measurements if m.metric == "ece" and not m.scope.subgroup), None)
        if ece is not None and ece.value is not None:
            out.append(ReliabilityDiagram(
                title=f"Reliability (ECE = {ece.value:.3f})", edges=t.edges.tolist(),
                accuracy=(t.bin_correct / np.maximum(t.bin_count, 1)).tolist(), count=t.bin_count.tolist()))
        return out

    def example(self):
        return None

    def validity(self, split, confidence):
        return (f"measured on the {split} split ({int(self.tally.cm.sum())} items), {confidence:.0%} Clopper-Pearson "
                "intervals; ECE and cost: percentile intervals of a Poisson bootstrap over items "
                f"({BOOTSTRAP_REPLICATES} replicates, each item's weights drawn from its id)")


def task_named(name: str) -> Task:
    """The task of this name (`UseCase.task` allows only these)."""
    from trustcase.tasks.detection import Detection  # they build on this module
    from trustcase.tasks.segmentation import Segmentation

    return {"classification": Classification, "detection": Detection, "segmentation": Segmentation}[name]()


def task_of(use_case: UseCase) -> Task:
    return task_named(use_case.task)

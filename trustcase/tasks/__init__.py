"""What differs between tasks (classification, detection), in one place: the model's output contract, what an
item's label is, how the model is loaded and probed. Checks and the preflight ask the use case's task
(`task_of(use_case)`) instead of branching on its name."""

from __future__ import annotations

from typing import Any, ClassVar

from trustcase.models.classifier import Classifier
from trustcase.models.loading import load_classifier
from trustcase.schemas import ModelSpec, UseCase


class Task:
    name: ClassVar[str]
    output: ClassVar[str]  # the model's output contract, in words (for messages and the evidence)

    def load_model(self, spec: ModelSpec) -> Classifier:
        """The model, probed with one input of its contract (a `ModelError` naming what does not fit)."""
        raise NotImplementedError

    def judge_label(self, label: Any, n_classes: int, image_hw: tuple[int, int] | None = None) -> Any:
        """An item's label in this task's form, or `data.streaming.Rejected` saying what is wrong."""
        raise NotImplementedError


class Classification(Task):
    name = "classification"
    output = "logits (batch, classes)"

    def load_model(self, spec: ModelSpec) -> Classifier:
        return load_classifier(spec)

    def judge_label(self, label, n_classes, image_hw=None):
        from trustcase.data.streaming import judge_label

        return judge_label(label, n_classes)


def task_of(use_case: UseCase) -> Task:
    from trustcase.tasks.detection import Detection

    return {"classification": Classification, "detection": Detection}[use_case.task]()

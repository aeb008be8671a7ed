"""The use-case contract: one YAML file per industrial use case, validated once at the edge."""

from __future__ import annotations

import math
import re
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

REF = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
CLASS_METRICS = {"recall", "precision", "false_negative_rate", "class_share", "ap50", "ap",
                 "iou", "dice", "pixel_precision", "pixel_recall"}  # metric:<class name>
# metrics that are proportions (0..1): a claim on one beyond that range can never pass (or never fail)
PROPORTIONS = CLASS_METRICS | {"accuracy", "balanced_accuracy", "ece", "false_alarm_rate", "alert_rate", "stop_rate",
                               "detection_rate", "detection_rate_alert", "accuracy_accepted", "accuracy_stopped",
                               "odd_share", "properties_holding", "certified_accuracy", "robust_accuracy",
                               "map50", "map", "indication_recall",  # detection: mean AP at IoU 0.5 and 0.5:0.95
                               "mean_iou", "mean_dice", "image_recall", "image_false_alarm_rate"}  # segmentation
SEEDS = 2**32  # a seed is 0 <= seed < 2**32: what numpy's and torch's generators all take
MAX_INPUT_VALUES = 50_000_000  # one input of more values than this cannot be batched on a workstation


class Strict(BaseModel):
    """Unknown keys are errors: a typo in a safety file must not be silently ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def _ref(value: str) -> str:
    if not REF.match(value):
        raise ValueError(f"expected 'module:function', got {value!r}")
    return value


Ref = Annotated[str, Field(description="an importable 'module:function' reference")]
Finite = Annotated[float, Field(allow_inf_nan=False)]  # a NaN threshold would make every claim fail, silently


class Criticality(str, Enum):
    low = "low"
    medium = "medium"
    high = "high"
    critical = "critical"


class Confidentiality(str, Enum):
    public = "public"
    confidential = "confidential"


class Normalisation(Strict):
    """x_model = ((x_pixel - range.min) / (range.max - range.min) - mean) / std, per channel."""

    mean: list[Finite] = Field([0.0], min_length=1)
    std: list[Finite] = Field([1.0], min_length=1)

    @field_validator("std")
    @classmethod
    def _positive(cls, v: list[float]) -> list[float]:
        if any(s <= 0 for s in v):
            raise ValueError("every std must be > 0")
        return v


class ModelSpec(Strict):
    format: Literal["torchscript", "state_dict", "onnx", "python", "challenge"] = Field(
        description="python / challenge: a black box (models/blackbox.py), `path` its folder or file")
    path: Path
    entry: Ref | None = Field(None, description="black box: 'module:Class' imported from `path`")
    config_file: Path | None = Field(None, description="challenge: passed to load_model (relative to `path`)")
    input_dtype: Literal["float32", "uint8"] = Field("float32", description="pixel type handed to a black box")
    factory: Ref | None = Field(None, description="'module:function' building the nn.Module (state_dict)")
    factory_args: dict[str, Any] = {}
    input_shape: list[int] = Field(description="one input, channels first, e.g. [1, 64, 64]")
    value_range: tuple[Finite, Finite] = (0.0, 255.0)
    normalisation: Normalisation = Normalisation()
    class_names: list[str]
    critical_class: str
    score_threshold: Finite = Field(0.5, ge=0, le=1, description="detection: the operating score threshold (a "
                                    "detection scoring at least this is an indication)")
    defect_pixels: int = Field(1, ge=1, description="segmentation: the operating rule, an image is defective when at "
                               "least this many of its pixels are predicted a class other than the first (background)")
    allow_pickle: bool = Field(False, description="opt in to unpickling the model file (unsafe)")
    registered_name: str | None = Field(None, description="MLflow registered model name")

    @field_validator("factory", "entry")
    @classmethod
    def _factory_ref(cls, v: str | None) -> str | None:
        return None if v is None else _ref(v)

    @field_validator("input_shape")
    @classmethod
    def _shape(cls, v: list[int]) -> list[int]:
        if not v or any(d < 1 for d in v):
            raise ValueError("every dimension must be >= 1")
        if math.prod(v) > MAX_INPUT_VALUES:
            raise ValueError(f"{v} is {math.prod(v):,} values per input, more than {MAX_INPUT_VALUES:,}: "
                             "not an input a batch can hold")
        return v

    @model_validator(mode="after")
    def _coherent(self) -> ModelSpec:
        if len(self.class_names) < 2:
            raise ValueError("class_names needs at least two classes")
        if len(set(self.class_names)) != len(self.class_names):
            raise ValueError("class_names has duplicates")
        if self.critical_class not in self.class_names:
            raise ValueError(f"critical_class {self.critical_class!r} is not one of class_names {self.class_names}")
        if self.format == "state_dict" and not self.factory:
            raise ValueError("format 'state_dict' needs 'factory: module:function'")
        if self.format in ("python", "challenge") and not self.entry:
            raise ValueError(f"format {self.format!r} needs 'entry: module:Class' (the black box)")
        lo, hi = self.value_range
        if not lo < hi:
            raise ValueError("value_range must be [min, max] with min < max")
        if len(self.input_shape) == 3 and self.defect_pixels > self.input_shape[1] * self.input_shape[2]:
            h, w = self.input_shape[1:]
            raise ValueError(f"defect_pixels {self.defect_pixels} is more than the {h}x{w} = {h * w} pixels of an "
                             "input: no image could ever be decided defective")
        c = self.input_shape[0]
        for key in ("mean", "std"):
            n = len(getattr(self.normalisation, key))
            if n not in (1, c):
                raise ValueError(f"normalisation.{key} has {n} values; input_shape {self.input_shape} has {c} "
                                 f"channel(s): give 1 value or {c}")
        return self


class DataSpec(Strict):
    loader: str = Field(description="a built-in loader name or 'module:function'")
    params: dict[str, Any] = {}
    splits: dict[str, str] = Field(
        default={"train": "train", "validation": "validation", "test": "test"},
        description="role -> split name passed to the loader",
    )
    max_samples: dict[str, int] = Field({}, description="optional cap per split role")
    batch_size: int = Field(64, ge=1)
    workers: int = Field(0, ge=0, description="DataLoader worker processes")
    path: Path | None = Field(None, description="folder added to sys.path to import a partner's loader")

    @model_validator(mode="after")
    def _test_split(self) -> DataSpec:
        if "test" not in self.splits:
            raise ValueError("splits must name a 'test' split")
        for role, cap in self.max_samples.items():
            if role not in self.splits:
                raise ValueError(f"max_samples names unknown split {role!r}")
            if cap < 1:
                raise ValueError(f"max_samples[{role}] must be >= 1")
        return self


class Descriptor(Strict):
    """A measurable property of one input with the range the ODD allows."""

    name: str
    unit: str = ""
    source: Literal["image", "metadata", "feature"] = "image"
    min: Finite | None = None
    max: Finite | None = None
    values: list[str] | None = Field(None, description="allowed values of a categorical descriptor")
    margin: Finite = Field(0.0, ge=0, description="width of the alert zone inside the boundary")

    @model_validator(mode="after")
    def _range(self) -> Descriptor:
        if self.values is None and self.min is None and self.max is None:
            raise ValueError(f"descriptor {self.name!r} needs min/max or values")
        if self.min is not None and self.max is not None:
            if self.min > self.max:
                raise ValueError(f"descriptor {self.name!r}: min {self.min} > max {self.max}")
            if 2 * self.margin > self.max - self.min:
                raise ValueError(f"descriptor {self.name!r}: margin {self.margin} is larger than half the range")
        return self

    @property
    def categorical(self) -> bool:
        return self.values is not None


class ODD(Strict):
    description: str = ""
    descriptors: list[Descriptor] = []

    @field_validator("descriptors")
    @classmethod
    def _unique(cls, v: list[Descriptor]) -> list[Descriptor]:
        names = [d.name for d in v]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"duplicate descriptors: {sorted(dup)}")
        return v


Comparator = Literal[">=", ">", "<=", "<"]


class PerturbationScope(Strict):
    name: str
    max_amplitude: Finite = Field(ge=0, description="the claim holds for every amplitude from 0 up to this one")


class Scope(Strict):
    """Where a claim must hold: a split, optionally a subgroup (ODD value), optionally under a perturbation."""

    split: str = "test"
    subgroup: dict[str, str] = {}
    perturbation: PerturbationScope | None = None

    def label(self) -> str:
        parts = [f"{self.split} split"]
        parts += [f"{k} = {v}" for k, v in sorted(self.subgroup.items())]
        if self.perturbation:
            parts.append(f"under {self.perturbation.name} <= {self.perturbation.max_amplitude:g}")
        return ", ".join(parts)


class Requirement(Strict):
    id: str = Field(pattern=r"^[A-Za-z][\w.-]*$")
    text: str
    metric: str = Field(description="e.g. accuracy, recall:defective, false_negative_rate:defective, ece")
    comparator: Comparator
    threshold: Finite
    scope: Scope = Scope()
    mandatory: bool = True

    @model_validator(mode="after")
    def _possible(self) -> Requirement:
        """A claim on a proportion that no value in [0, 1] can satisfy is a typo, not a requirement."""
        if self.metric.partition(":")[0] in PROPORTIONS:
            t, c = self.threshold, self.comparator
            if (c == ">=" and t > 1) or (c == ">" and t >= 1) or (c == "<=" and t < 0) or (c == "<" and t <= 0):
                raise ValueError(f"{self.metric} is a proportion (0 to 1): '{c} {t:g}' can never pass")
        return self


class CheckSpec(Strict):
    check: str = Field(description="a registered check name or 'module:Class'")
    params: dict[str, Any] = {}


class AssessmentPlan(Strict):
    checks: list[CheckSpec]
    seed: int = Field(0, ge=0, lt=SEEDS)
    confidence: float = Field(0.95, gt=0, lt=1, description="level of every confidence interval")
    cost_matrix: list[list[Annotated[Finite, Field(ge=0)]]] | None = Field(
        None, description="cost[true][predicted], in the order of class_names"
    )


class TrainingSpec(Strict):
    """How a new version of the model is trained: a function `entry(request: TrainingRequest) ->
    TrainingResult` (see `schemas.training`), found with the use case's data folder on the import path."""

    entry: str = Field(description="'module:function' taking a TrainingRequest")
    params: dict[str, Any] = Field({}, description="passed to the function as request.params")
    pool: str | None = Field(None, description="data role of the pool the unsafe set is drawn from (HUDD); "
                                               "default: the root_causes check's improvement_split")

    @field_validator("entry")
    @classmethod
    def _entry_ref(cls, v: str) -> str:
        return _ref(v)


class UseCase(Strict):
    id: str = Field(pattern=r"^[a-z][a-z0-9_-]*$")
    title: str
    owner: str
    criticality: Criticality
    intended_function: str
    confidentiality: Confidentiality = Confidentiality.public
    task: Literal["classification", "detection", "segmentation"] = Field(
        "classification", description="what the model does: its output contract, labels and metrics (trustcase.tasks)")
    model: ModelSpec
    data: DataSpec
    odd: ODD = ODD()
    requirements: list[Requirement]
    plan: AssessmentPlan
    training: TrainingSpec | None = None
    compliance: Path | None = Field(None, description="the use case's own catalogue of objectives (e.g. a partner's "
                                    "requirements), in the form of trustcase/standards/*.yaml; relative to this file")

    def cross_problems(self) -> list[tuple[tuple, str]]:
        """Problems that span sections, each with the location of the offending field."""
        out: list[tuple[tuple, str]] = []
        seen: set[str] = set()
        known = {d.name: d for d in self.odd.descriptors}
        for i, r in enumerate(self.requirements):
            if r.id in seen:
                out.append((("requirements", i, "id"), f"duplicate requirement id {r.id!r}"))
            seen.add(r.id)
            if r.scope.split not in self.data.splits:
                out.append((("requirements", i, "scope", "split"),
                             f"split {r.scope.split!r} is not in data.splits {list(self.data.splits)}"))
            for k, v in r.scope.subgroup.items():
                d = known.get(k)
                loc = ("requirements", i, "scope", "subgroup", k)
                if d is None or not d.categorical:
                    out.append((loc, f"{k!r} is not a categorical ODD descriptor"))
                elif v not in (d.values or []):
                    out.append((loc, f"{k} = {v!r} is not among {d.values}"))
            family, _, cls = r.metric.partition(":")
            if family in CLASS_METRICS and cls not in self.model.class_names:
                out.append((("requirements", i, "metric"), f"class {cls!r} is not one of {self.model.class_names}"))
        cm = self.plan.cost_matrix
        n = len(self.model.class_names)
        if cm is not None and (len(cm) != n or any(len(row) != n for row in cm)):
            out.append((("plan", "cost_matrix"), f"must be {n}x{n} (class_names order)"))
        return out

    @model_validator(mode="after")
    def _cross(self, info: ValidationInfo) -> UseCase:
        # the file loader defers these to locate each one by line (schemas/loading.py)
        if not (info.context or {}).get("defer_cross"):
            problems = self.cross_problems()
            if problems:
                raise ValueError("; ".join(f"{'.'.join(map(str, loc))}: {msg}" for loc, msg in problems))
        return self

    @property
    def confidential(self) -> bool:
        return self.confidentiality is Confidentiality.confidential

    @property
    def critical_index(self) -> int:
        return self.model.class_names.index(self.model.critical_class)

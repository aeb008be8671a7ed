"""The specification monitor: each declared ODD descriptor against its range, with a margin as the alert
zone (IN < NEAR < OUT). Limits are inclusive; NaN is OUT; a metadata value not given is NEAR."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

import numpy as np

from trustcase.errors import UserError
from trustcase.odd.descriptors import DESCRIPTORS, Views
from trustcase.schemas import Descriptor


class MonitorError(UserError, ValueError):
    """A user error about a monitor: unknown descriptor, bad file, other model, input of the wrong shape."""


class State(IntEnum):
    IN = 0
    NEAR = 1
    OUT = 2


_FEATURE = re.compile(r"^(?:x|f|feature_?)?(\d+)$")


@dataclass(frozen=True)
class Limit:
    """One declared descriptor: where its value comes from and the range the ODD allows."""

    name: str
    source: str = "image"
    unit: str = ""
    min: float | None = None
    max: float | None = None
    values: tuple[str, ...] | None = None
    margin: float = 0.0
    column: int | None = None  # for source "feature"

    @classmethod
    def from_descriptor(cls, d: Descriptor, feature_names: Sequence[str] | None = None) -> Limit:
        column = None
        if d.source == "image" and d.name not in DESCRIPTORS:
            raise MonitorError(f"ODD descriptor {d.name!r} (source image) does not exist; known image descriptors: "
                               f"{sorted(DESCRIPTORS)}")
        if d.source == "feature":
            if feature_names is not None:
                if d.name not in feature_names:
                    raise MonitorError(f"ODD descriptor {d.name!r} (source feature) is not one of the input "
                                       f"features {list(feature_names)}")
                column = list(feature_names).index(d.name)
            else:
                m = _FEATURE.match(d.name)
                if not m:
                    raise MonitorError(f"ODD descriptor {d.name!r} (source feature): without feature names, name "
                                       "a column as x<i> (e.g. x0)")
                column = int(m.group(1))
        if d.min is not None and d.max is not None and 2 * d.margin > d.max - d.min:
            raise MonitorError(f"ODD descriptor {d.name!r}: margin {d.margin} is larger than half the range")
        return cls(name=d.name, source=d.source, unit=d.unit or (DESCRIPTORS[d.name].unit if d.name in DESCRIPTORS
                                                                  else ""),
                   min=d.min, max=d.max, values=tuple(d.values) if d.values is not None else None,
                   margin=d.margin, column=column)

    @property
    def categorical(self) -> bool:
        return self.values is not None

    @property
    def bounds(self) -> tuple[float, float, float]:
        """(min, max, margin) with an absent limit as an infinite one."""
        return (-math.inf if self.min is None else self.min, math.inf if self.max is None else self.max, self.margin)

    def reason(self, value: Any, state: int) -> str:
        unit = f" {self.unit}" if self.unit else ""
        if self.categorical:
            if value is None:
                return f"{self.name} not given: cannot be checked (NEAR)"
            return f"{self.name} = {value!r} is not one of {list(self.values)} (OUT)"
        if value is None:
            return f"{self.name} not given: cannot be checked (NEAR)"
        if not math.isfinite(value):
            return f"{self.name} = {value} is not a number (OUT)"
        v = f"{self.name} = {value:.4g}{unit}"
        if state == State.OUT:
            return f"{v} < min {self.min:g} (OUT)" if self.min is not None and value < self.min \
                else f"{v} > max {self.max:g} (OUT)"
        if self.min is not None and value < self.min + self.margin:
            return f"{v} within {self.margin:g} of min {self.min:g} (NEAR)"
        return f"{v} within {self.margin:g} of max {self.max:g} (NEAR)"

    def to_dict(self) -> dict:
        d = {k: getattr(self, k) for k in ("name", "source", "unit", "min", "max", "margin", "column")}
        d["values"] = list(self.values) if self.values is not None else None
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Limit:
        return cls(**{**d, "values": tuple(d["values"]) if d.get("values") is not None else None})


def judge(values: np.ndarray, lo: np.ndarray, hi: np.ndarray, margin: np.ndarray) -> np.ndarray:
    """Numeric values (B, L) against L ranges at once -> states (B, L). Limits are inclusive; NaN is OUT.
    One pass for every descriptor: at batch 1 the per-call cost of numpy, not the arithmetic, is the bill."""
    v = values
    out = (v < lo) | (v > hi) | ~np.isfinite(v)  # NaN and inf are OUT even where a limit is absent
    near = (v < lo + margin) | (v > hi - margin)
    return np.where(out, State.OUT, np.where(near, State.NEAR, State.IN)).astype(np.int8)


@dataclass
class SpecResult:
    values: dict[str, list]  # descriptor -> one value per input (float, str or None)
    states: np.ndarray  # (B, D) int8, one column per limit


class SpecificationMonitor:
    """Every declared descriptor against its range, with the margin as the alert zone."""

    def __init__(self, limits: Sequence[Limit], value_range: tuple[float, float] = (0.0, 255.0)):
        self.limits, self.value_range = list(limits), (float(value_range[0]), float(value_range[1]))
        self._numeric = [j for j, lim in enumerate(self.limits) if not lim.categorical]
        self._bounds = np.array([self.limits[j].bounds for j in self._numeric], dtype=np.float64).reshape(-1, 3).T

    @classmethod
    def from_odd(cls, descriptors: Sequence[Descriptor], value_range: tuple[float, float] = (0.0, 255.0),
                 feature_names: Sequence[str] | None = None) -> SpecificationMonitor:
        """Every problem of the declaration at once, naming each descriptor."""
        limits, problems = [], []
        for d in descriptors:
            try:
                limits.append(Limit.from_descriptor(d, feature_names))
            except MonitorError as e:
                problems.append(str(e))
        if problems:
            raise MonitorError("; ".join(problems))
        return cls(limits, value_range)

    @property
    def names(self) -> list[str]:
        return [lim.name for lim in self.limits]

    def evaluate(self, inputs: np.ndarray, meta: dict[str, Sequence[Any]] | None = None) -> SpecResult:
        n = len(inputs)
        states = np.zeros((n, len(self.limits)), dtype=np.int8)
        numeric = np.full((n, len(self.limits)), np.nan)  # the numeric columns are judged together below
        given = np.ones(len(self.limits), dtype=bool)
        values: dict[str, list] = {}
        views = Views(inputs, self.value_range)
        for j, lim in enumerate(self.limits):
            if lim.source == "image":
                if inputs.ndim != 4:
                    raise MonitorError(f"descriptor {lim.name!r} needs images (B, H, W, C), got shape {inputs.shape}")
                v = np.asarray(DESCRIPTORS[lim.name].fn(views), dtype=np.float64)
            elif lim.source == "feature":
                if inputs.ndim != 2 or lim.column >= inputs.shape[1]:
                    raise MonitorError(f"descriptor {lim.name!r} is column {lim.column} of a tabular input (B, F); "
                                       f"got shape {inputs.shape}")
                v = np.asarray(inputs[:, lim.column], dtype=np.float64)
            else:
                raw = (meta or {}).get(lim.name)
                if raw is None or len(raw) != n:
                    given[j] = False
                    values[lim.name] = [None] * n
                    continue
                if lim.categorical:
                    ok = np.array([str(x) in lim.values for x in raw])
                    states[:, j] = np.where(ok, State.IN, State.OUT)
                    values[lim.name] = [str(x) for x in raw]
                    continue
                v = np.array([_float(x) for x in raw])
            numeric[:, j] = v
            values[lim.name] = v.tolist()
        if self._numeric:
            states[:, self._numeric] = judge(numeric[:, self._numeric], *self._bounds)
        states[:, ~given] = State.NEAR  # a metadata value the caller did not give cannot be confirmed
        return SpecResult(values, states)

    def to_dict(self) -> dict:
        return {"value_range": list(self.value_range), "limits": [lim.to_dict() for lim in self.limits]}

    @classmethod
    def from_dict(cls, d: dict) -> SpecificationMonitor:
        return cls([Limit.from_dict(x) for x in d["limits"]], tuple(d["value_range"]))


def _float(x: Any) -> float:
    try:
        return float(x)
    except (TypeError, ValueError):
        return float("nan")


"""ODD-boundary monitors: alert as an input approaches the edge of the operational design domain, stop
when it has left it.

Two monitors, combined (the combined state is the worse of the two, IN < NEAR < OUT):

- `SpecificationMonitor`: each descriptor declared in the use case's ODD (`odd.descriptors`: a
  measurable property of one input with its allowed range and margin) against its range. Inside and
  clear of the margin: IN; inside but within `margin` of a limit: NEAR (alert); outside: OUT (stop).
  A categorical descriptor is IN when its value is allowed, OUT otherwise; a metadata value the caller
  did not give is NEAR (the monitor cannot confirm the input is inside the ODD). Limits are inclusive:
  min and max themselves are inside, min + margin and max - margin are clear of the margin.
- `LearnedMonitor`: what the specification cannot name, scored on the model's own features and
  outputs. `mahalanobis`: the smallest squared Mahalanobis distance of the penultimate-layer features
  to the class means under one shared covariance, shrunk towards a scaled identity (OAS or a fixed
  coefficient: penultimate layers have more dimensions than most calibration sets have items);
  `energy`: -logsumexp(logits) (Liu et al. 2020). Each score is standardised on the calibration data
  (median, IQR) and the learned statistic is their maximum; its NEAR and OUT thresholds are the
  conformal quantiles of the calibration scores at the declared false-alarm rates, so that a fresh
  in-ODD input exceeds them with probability <= the rate. When the calibration set is too small for a
  rate (n + 1 < 1 / rate), the OUT threshold is extrapolated by a generalised Pareto fit of the tail
  and says so. Fitting streams (`GaussianFit.update` per batch, Chan's pairwise update of the shared
  within-class scatter), as does calibration (one scalar per item).

Descriptors (`DESCRIPTORS`, source "image"; values in the model's pixel space):
brightness, contrast, sharpness, noise, saturated_fraction, dead_pixel_fraction, dead_lines.
Source "metadata": a value the data loader gives per item (Batch.meta). Source "feature": a column of
a tabular input (B, F), named by `feature_names` or as `x<i>`.

The fitted monitor is saved as one safetensors file (arrays) whose header holds the JSON description:
format name, schema version, the model's sha256 and contract, the specification, thresholds and
calibration. No pickle. A file of another schema version, or loaded against another model, is rejected.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import stats

from trustcase.data import images as I
from trustcase.models.classifier import Classifier, ModelError, sha256_file
from trustcase.models.loading import load_classifier
from trustcase.schemas import Descriptor, ModelSpec

FORMAT = "trustcase-odd-monitor"
SCHEMA_VERSION = "1"
SCORES = ("mahalanobis", "energy")


class MonitorError(ValueError):
    """A user error about a monitor: unknown descriptor, bad file, other model, input of the wrong shape."""


class State(IntEnum):
    IN = 0
    NEAR = 1
    OUT = 2


# --- descriptors ----------------------------------------------------------------------------------

class Views:
    """One batch of images and what several descriptors share (the luminance), computed once."""

    def __init__(self, images: np.ndarray, value_range: tuple[float, float]):
        self.images, self.value_range = images, value_range
        self._grey: np.ndarray | None = None

    @property
    def grey(self) -> np.ndarray:
        """(B, H, W, 1) float64 luminance, in the layout the `images` functions take."""
        if self._grey is None:
            self._grey = I.grey(self.images)[..., None]
        return self._grey


@dataclass(frozen=True)
class DescriptorKind:
    name: str
    unit: str
    fn: Callable[[Views], np.ndarray]  # -> (B,)
    doc: str


DESCRIPTORS: dict[str, DescriptorKind] = {d.name: d for d in [
    DescriptorKind("brightness", "grey level", lambda v: I.brightness(v.grey), "mean luminance"),
    DescriptorKind("contrast", "grey level RMS", lambda v: I.contrast(v.grey), "standard deviation of the luminance"),
    DescriptorKind("sharpness", "variance of the Laplacian", lambda v: I.laplacian_variance(v.grey),
                   "low values mean blur"),
    DescriptorKind("noise", "grey level (sigma)", lambda v: I.noise_sigma(v.grey),
                   "standard deviation of additive noise (Immerkaer)"),
    DescriptorKind("saturated_fraction", "share of pixels", lambda v: I.saturated_fraction(v.images, v.value_range),
                   "pixels at the top of the range"),
    DescriptorKind("dead_pixel_fraction", "share of pixels",
                   lambda v: I.dead_pixel_fraction(v.images, v.value_range), "pixels at the bottom of the range"),
    DescriptorKind("dead_lines", "rows + columns", lambda v: I.dead_lines(v.images), "flat rows and columns"),
]}

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


# --- the model's features -------------------------------------------------------------------------

class FeatureExtractor:
    """(features, logits) in one forward pass. Features are the input of the model's last Linear layer
    when that can be found and verified on a probe (children of a Sequential run in order, else a forward
    pre-hook on an eager module); otherwise the logits themselves (`mode` says which, `why` says why)."""

    def __init__(self, model: Classifier):
        self.model = model
        self.mode, self.why = "logits", "the model is a black box (no torch module)"
        self._run: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None
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

    @staticmethod
    def _is_linear(m: torch.nn.Module) -> bool:
        return isinstance(m, torch.nn.Linear) or getattr(m, "original_name", "") == "Linear"

    def _sequential(self, module):
        children = list(module.children())
        if len(children) < 2 or not self._is_linear(children[-1]):
            return None
        split = _SplitHead(torch.nn.Sequential(*children[:-1]), children[-1])
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

    def __call__(self, inputs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        with torch.inference_mode():
            x = self.prepare(inputs)
            if self._run is None:
                logits = self.model.forward(x)
                feats = logits
            else:
                feats, logits = self._run(x)
        self.model.check_output(logits)
        return feats.numpy(), logits.numpy()


class _SplitHead(torch.nn.Module):
    """A Sequential model cut before its last Linear layer: (features, logits) in one forward pass."""

    def __init__(self, body: torch.nn.Module, head: torch.nn.Module):
        super().__init__()
        self.body, self.head = body, head

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.body(x).flatten(1)
        return f, self.head(f)


# --- the learned monitor --------------------------------------------------------------------------

class GaussianFit:
    """Class means and one shared within-class covariance, updated batch by batch (Chan et al.'s pairwise
    update): memory O(K d + d^2), whatever the number of items."""

    def __init__(self, n_classes: int, dim: int):
        self.counts = np.zeros(n_classes, np.int64)
        self.means = np.zeros((n_classes, dim))
        self.scatter = np.zeros((dim, dim))

    def update(self, features: np.ndarray, labels: np.ndarray) -> None:
        f = np.asarray(features, dtype=np.float64)
        if f.ndim != 2 or f.shape[1] != self.scatter.shape[0]:
            raise ValueError(f"features must be (B, {self.scatter.shape[0]}), got {f.shape}")
        for k in np.unique(labels):
            x = f[labels == k]
            nb, mb = len(x), x.mean(axis=0)
            xc = x - mb
            n, delta = self.counts[k], mb - self.means[k]
            total = n + nb
            self.scatter += xc.T @ xc + np.outer(delta, delta) * (n * nb / total)
            self.means[k] += delta * (nb / total)
            self.counts[k] = total

    def covariance(self, shrinkage: float | str = "oas") -> tuple[np.ndarray, float]:
        """The regularised shared covariance and the shrinkage used (Chen et al. 2010's OAS by default)."""
        classes = int((self.counts > 0).sum())
        dof = int(self.counts.sum()) - classes
        if dof < 1:
            raise ValueError(f"need more items than classes to fit a covariance (got {int(self.counts.sum())})")
        s = self.scatter / dof
        d = s.shape[0]
        mu = float(np.trace(s)) / d
        if mu <= 0:
            raise ValueError("the features are constant over the fit data: no covariance to fit")
        if shrinkage == "oas":
            alpha = float((s ** 2).mean())
            den = (dof + 1) * (alpha - mu ** 2 / d)
            rho = 1.0 if den <= 0 else min((alpha + mu ** 2) / den, 1.0)
        else:
            rho = float(shrinkage)
        return (1 - rho) * s + rho * mu * np.eye(d), rho


def conformal_threshold(scores: np.ndarray, rate: float) -> tuple[float, str]:
    """Smallest t with P(fresh score > t) <= rate for exchangeable scores: the ceil((n+1)(1-rate))-th
    smallest calibration score. Beyond the data (n + 1 < 1 / rate), a generalised Pareto fit of the top
    10% extrapolates the tail (an estimate, not a guarantee)."""
    s = np.sort(np.asarray(scores, dtype=np.float64))
    n = len(s)
    if n == 0:
        raise ValueError("no calibration scores")
    k = math.ceil((n + 1) * (1 - rate))
    if k <= n:
        return float(s[k - 1]), "conformal"
    tail = max(10, n // 10)
    if n < 50:
        return float(s[-1]), f"largest calibration score (n = {n}: false-alarm rate only bounded by 1/(n+1))"
    u = s[-tail - 1]
    exceed = s[-tail:] - u
    c, _, scale = stats.genpareto.fit(exceed, floc=0.0)
    t = u + stats.genpareto.ppf(1 - rate * (n + 1) / tail, c, loc=0.0, scale=scale)
    return float(max(t, s[-1])), f"generalised Pareto tail (top {tail} of {n})"


class Mahalanobis:
    """min_k (f - m_k)^T S^-1 (f - m_k) for S = V diag(l) V^T. With every direction (rank None) it is exact
    (d^2 operations per input); with `rank` r < d, the r leading directions are kept exactly and the others
    share their mean variance (probabilistic PCA): d r operations, so the monitor stays cheap beside the model."""

    def __init__(self, means: np.ndarray, basis: np.ndarray, inv_residual: float):
        self.means = np.asarray(means, dtype=np.float64)  # (K, d)
        self.basis = np.ascontiguousarray(basis, dtype=np.float32)  # (d, r)
        self.inv_residual = float(inv_residual)  # 0 when exact
        # the scores run on torch's thread pool, the one the model already uses: numpy's BLAS would bring a
        # second pool whose spinning threads slow the model's next forward pass (measured: 2x at batch 64)
        self._basis = torch.from_numpy(self.basis)
        self._c = (self._basis.new_tensor(self.means.astype(np.float32)) @ self._basis).double()  # projected
        self._c_sq = (self._c ** 2).sum(dim=1)
        self._means = torch.from_numpy(self.means)
        self._m_sq = (self._means ** 2).sum(dim=1)

    @classmethod
    def fit(cls, means: np.ndarray, cov: np.ndarray, rank: int | None = None) -> Mahalanobis:
        vals, vecs = np.linalg.eigh(cov)  # ascending
        vals = np.maximum(vals, vals.max() * 1e-12)
        if rank is None or rank >= len(vals):
            return cls(means, vecs / np.sqrt(vals), 0.0)
        inv_res = 1.0 / vals[:-rank].mean()
        top, v = vals[-rank:], vecs[:, -rank:]
        # S^-1 = inv_res (I - V V^T) + V diag(1/l) V^T = inv_res I - V diag(inv_res - 1/l) V^T
        return cls(means, v * np.sqrt(np.maximum(inv_res - 1.0 / top, 0.0)), inv_res)

    @property
    def rank(self) -> int:
        return self.basis.shape[1]

    def __call__(self, features: np.ndarray) -> np.ndarray:
        f = torch.as_tensor(np.asarray(features, dtype=np.float32))
        if f.ndim != 2 or f.shape[1] != self.basis.shape[0]:
            raise MonitorError(f"features of shape {tuple(f.shape)} do not fit the fitted dimension "
                               f"{self.basis.shape[0]}")
        with torch.inference_mode():
            z = (f @ self._basis).double()
            proj = (z ** 2).sum(dim=1, keepdim=True) - 2 * z @ self._c.T + self._c_sq
            if self.inv_residual:
                f64 = f.double()
                full = (f64 ** 2).sum(dim=1, keepdim=True) - 2 * f64 @ self._means.T + self._m_sq
                d = self.inv_residual * full - proj
            else:
                d = proj
            return d.min(dim=1).values.clamp_min(0.0).numpy()


class LearnedMonitor:
    """Scores on the model's features and logits, standardised and calibrated at declared false-alarm rates."""

    def __init__(self, scores: Sequence[str], mahalanobis: Mahalanobis | None, centre: dict[str, float],
                 scale: dict[str, float], near: float, out: float, info: dict | None = None):
        unknown = set(scores) - set(SCORES)
        if unknown or not scores:
            raise MonitorError(f"unknown learned scores {sorted(unknown)}; known: {list(SCORES)}")
        if "mahalanobis" in scores and mahalanobis is None:
            raise MonitorError("the mahalanobis score needs a fitted class-conditional Gaussian")
        self.scores, self.mahalanobis = list(scores), mahalanobis
        self.centre, self.scale, self.near, self.out = centre, scale, near, out
        self.info = info or {}

    def raw(self, features: np.ndarray, logits: np.ndarray) -> dict[str, np.ndarray]:
        out = {}
        if "mahalanobis" in self.scores:
            out["mahalanobis"] = self.mahalanobis(features)
        if "energy" in self.scores:
            lg = np.asarray(logits, dtype=np.float64)
            m = lg.max(axis=1)
            out["energy"] = -(m + np.log(np.exp(lg - m[:, None]).sum(axis=1)))
        return out

    def standardise(self, raw: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {k: (v - self.centre[k]) / self.scale[k] for k, v in raw.items()}

    def statistic(self, raw: dict[str, np.ndarray]) -> np.ndarray:
        return np.max(np.stack(list(self.standardise(raw).values())), axis=0)

    def judge(self, stat: np.ndarray) -> np.ndarray:
        s = np.where(stat > self.near, State.NEAR, State.IN).astype(np.int8)
        s[(stat > self.out) | ~np.isfinite(stat)] = State.OUT
        return s

    def threshold_of(self, score: str, level: str) -> float:
        """The raw value of one score at the NEAR or OUT threshold (for the reasons)."""
        return self.centre[score] + self.scale[score] * (self.near if level == "near" else self.out)

    def to_arrays(self) -> dict[str, np.ndarray]:
        if self.mahalanobis is None:
            return {}
        return {"means": self.mahalanobis.means, "basis": self.mahalanobis.basis}

    def to_dict(self) -> dict:
        inv = None if self.mahalanobis is None else self.mahalanobis.inv_residual
        return {"scores": self.scores, "centre": self.centre, "scale": self.scale, "near": self.near,
                "out": self.out, "inv_residual": inv, "info": self.info}

    @classmethod
    def from_parts(cls, d: dict, arrays: dict[str, np.ndarray]) -> LearnedMonitor:
        maha = None
        if "mahalanobis" in d["scores"]:
            try:
                maha = Mahalanobis(arrays["means"], arrays["basis"], d["inv_residual"])
            except KeyError as e:
                raise MonitorError(f"monitor file lacks the array {e}") from None
        return cls(d["scores"], maha, d["centre"], d["scale"], d["near"], d["out"], d.get("info"))


class Calibration:
    """Collects the raw scores of held-out in-ODD items (one scalar per score and item), then sets the
    standardisation and the NEAR/OUT thresholds at the declared false-alarm rates."""

    def __init__(self):
        self.raw: dict[str, list[np.ndarray]] = {}

    def update(self, raw: dict[str, np.ndarray]) -> None:
        for k, v in raw.items():
            self.raw.setdefault(k, []).append(np.asarray(v, dtype=np.float64))

    def finish(self, monitor: LearnedMonitor, near_rate: float, out_rate: float) -> LearnedMonitor:
        raw = {k: np.concatenate(v) for k, v in self.raw.items()}
        n = len(next(iter(raw.values()))) if raw else 0
        if n < 2:
            raise ValueError(f"need at least 2 in-ODD calibration items, got {n}")
        for k, v in raw.items():
            q1, med, q3 = np.quantile(v, [0.25, 0.5, 0.75])
            monitor.centre[k] = float(med)
            monitor.scale[k] = float(q3 - q1) if q3 > q1 else float(np.std(v) or 1.0)
        stat = monitor.statistic(raw)
        monitor.near, near_how = conformal_threshold(stat, near_rate)
        monitor.out, out_how = conformal_threshold(stat, out_rate)
        monitor.out = max(monitor.out, monitor.near)
        monitor.info.update(n_calibration=n, near_rate=near_rate, out_rate=out_rate, near_method=near_how,
                            out_method=out_how, quantiles={k: np.quantile(v, [0.5, 0.95, 0.999]).tolist()
                                                           for k, v in raw.items()})
        return monitor


# --- the combined monitor -------------------------------------------------------------------------

@dataclass
class Decisions:
    """What the monitor decided for a batch: one state per input with the reasons behind it."""

    state: np.ndarray  # (B,) int8, State values
    spec: SpecResult
    spec_names: list[str]
    limits: list[Limit]
    learned_state: np.ndarray | None = None  # (B,)
    scores: dict[str, np.ndarray] = field(default_factory=dict)  # raw learned scores
    statistic: np.ndarray | None = None
    logits: np.ndarray | None = None
    learned: LearnedMonitor | None = None
    class_names: list[str] | None = None

    def __len__(self) -> int:
        return len(self.state)

    @property
    def prediction(self) -> np.ndarray | None:
        return None if self.logits is None else self.logits.argmax(axis=1)

    def reasons(self, i: int) -> list[str]:
        out = []
        for j, lim in enumerate(self.limits):
            s = int(self.spec.states[i, j])
            if s != State.IN:
                out.append(lim.reason(self.spec.values[lim.name][i], s))
        if self.learned_state is not None and self.learned_state[i] != State.IN:
            level = "out" if self.learned_state[i] == State.OUT else "near"
            z = self.learned.standardise({k: v[i:i + 1] for k, v in self.scores.items()})
            worst = max(z, key=lambda k: z[k][0])
            rate = self.learned.info.get(f"{level}_rate")
            rtxt = f", false-alarm rate {rate:.3g}" if rate is not None else ""
            out.append(f"learned: {worst} = {self.scores[worst][i]:.4g} > {level.upper()} threshold "
                       f"{self.learned.threshold_of(worst, level):.4g}{rtxt} ({level.upper()})")
        return out

    def record(self, i: int) -> dict:
        """One input's decision as plain JSON-ready data."""
        r: dict[str, Any] = {"state": State(int(self.state[i])).name, "reasons": self.reasons(i),
                             "descriptors": {k: _plain(v[i]) for k, v in self.spec.values.items()}}
        if self.scores:
            r["scores"] = {k: float(v[i]) for k, v in self.scores.items()}
        if self.logits is not None:
            p = int(self.logits[i].argmax())
            r["prediction"] = self.class_names[p] if self.class_names else p
        return r


def _plain(v):
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


class Monitor:
    """Specification + learned monitor for one model: `evaluate(inputs)` runs the model once and says, per
    input, IN / NEAR / OUT with the reasons, and what the model predicted."""

    def __init__(self, spec: SpecificationMonitor, learned: LearnedMonitor | None, model_sha256: str,
                 model_spec: ModelSpec, feature_mode: str = "logits", info: dict | None = None,
                 model: Classifier | None = None):
        self.spec, self.learned = spec, learned
        self.model_sha256, self.model_spec = model_sha256, model_spec
        self.feature_mode, self.info = feature_mode, info or {}
        self.model: Classifier | None = None
        self.extractor: FeatureExtractor | None = None
        if model is not None:
            self.attach(model)

    def attach(self, model: Classifier) -> Monitor:
        """Run beside this model (checked against the hash the monitor was fitted for)."""
        path = Path(model.spec.path)
        if path.is_file():
            sha = sha256_file(path)
            if sha != self.model_sha256:
                raise MonitorError(f"the monitor was fitted for model sha256 {self.model_sha256[:12]}…, but model "
                                   f"file {path} has sha256 {sha[:12]}…: refit the monitor for this model")
        self.model, self.extractor = model, FeatureExtractor(model)
        if self.learned is not None and self.extractor.mode != self.feature_mode:
            raise MonitorError(f"the monitor's learned scores use {self.feature_mode} features, but only "
                               f"{self.extractor.mode} features can be read from this model ({self.extractor.why})")
        return self

    # -- evaluation ----------------------------------------------------------------------------------

    def batch(self, inputs: np.ndarray) -> np.ndarray:
        """One input or a batch, in the model's layout ((H, W), (H, W, C), (B, H, W, C), (F,) or (B, F))."""
        x = np.asarray(inputs)
        shape = list(self.model_spec.input_shape)
        if len(shape) == 1:
            expected = (shape[0],)
        else:
            c, *hw = shape
            expected = (*hw, c)
            if c == 1 and x.shape[-2:] == tuple(hw) and x.ndim in (2, 3):  # grey (H, W) or (B, H, W)
                x = x[..., None]
        if x.shape == expected:
            x = x[None]
        if x.ndim != len(expected) + 1 or x.shape[1:] != expected:
            layout = "(F,) or (B, F)" if len(shape) == 1 else "(H, W, C) or (B, H, W, C)"
            raise MonitorError(f"input of shape {tuple(np.asarray(inputs).shape)} does not fit the monitor: "
                               f"expected {layout} with {'F' if len(shape) == 1 else '(H, W, C)'} = {expected}")
        return x

    def evaluate(self, inputs: np.ndarray, meta: dict[str, Sequence[Any]] | None = None) -> Decisions:
        x = self.batch(inputs)
        sr = self.spec.evaluate(x, meta)
        state = sr.states.max(axis=1) if sr.states.shape[1] else np.zeros(len(x), np.int8)
        d = Decisions(state=state.astype(np.int8), spec=sr, spec_names=self.spec.names, limits=self.spec.limits,
                      class_names=list(self.model_spec.class_names))
        if self.extractor is not None:
            feats, logits = self.extractor(x)
            d.logits = logits
            if self.learned is not None:
                d.scores = self.learned.raw(feats, logits)
                d.statistic = self.learned.statistic(d.scores)
                d.learned_state = self.learned.judge(d.statistic)
                d.learned = self.learned
                d.state = np.maximum(d.state, d.learned_state)
        elif self.learned is not None:
            raise MonitorError("the monitor has a learned part: attach the model it was fitted for (attach(model))")
        return d

    # -- persistence ---------------------------------------------------------------------------------

    def header(self) -> dict:
        return {"format": FORMAT, "schema_version": SCHEMA_VERSION, "model_sha256": self.model_sha256,
                "model": self.model_spec.model_dump(mode="json"), "feature_mode": self.feature_mode,
                "specification": self.spec.to_dict(),
                "learned": None if self.learned is None else self.learned.to_dict(), "info": self.info}

    def save(self, path: str | Path) -> Path:
        from safetensors.numpy import save_file

        path = Path(path)
        arrays = {} if self.learned is None else self.learned.to_arrays()
        save_file(arrays, str(path), metadata={"trustcase_monitor": json.dumps(self.header())})
        return path

    @classmethod
    def read_header(cls, path: str | Path) -> tuple[dict, dict[str, np.ndarray]]:
        from safetensors import SafetensorError, safe_open

        path = Path(path)
        if not path.is_file():
            raise MonitorError(f"monitor file not found: {path}")
        try:
            with safe_open(str(path), framework="np") as f:
                meta = f.metadata() or {}
                arrays = {k: f.get_tensor(k) for k in f.keys()}
        except (SafetensorError, OSError, ValueError) as e:
            raise MonitorError(f"{path} is not a trustcase monitor file ({e})") from None
        try:
            head = json.loads(meta["trustcase_monitor"])
        except (KeyError, json.JSONDecodeError):
            raise MonitorError(f"{path} is not a trustcase monitor file (no monitor header)") from None
        if head.get("format") != FORMAT:
            raise MonitorError(f"{path} is not a trustcase monitor file (format {head.get('format')!r})")
        if head.get("schema_version") != SCHEMA_VERSION:
            raise MonitorError(f"{path} has monitor schema version {head.get('schema_version')!r}; this trustcase "
                               f"reads version {SCHEMA_VERSION!r}: refit the monitor")
        return head, arrays

    @classmethod
    def load(cls, path: str | Path, model: Classifier | str | Path | None = None) -> Monitor:
        """Load a saved monitor. `model`: the Classifier or model file to run beside (default: the model file
        the monitor was fitted for); it must have the hash recorded in the monitor."""
        head, arrays = cls.read_header(path)
        spec = ModelSpec.model_validate(head["model"])
        mon = cls(SpecificationMonitor.from_dict(head["specification"]),
                  None if head["learned"] is None else LearnedMonitor.from_parts(head["learned"], arrays),
                  head["model_sha256"], spec, head.get("feature_mode", "logits"), head.get("info", {}))
        if model is None and mon.learned is None:
            return mon
        if not isinstance(model, Classifier):
            spec = spec.model_copy(update={"path": Path(model)}) if model is not None else spec
            if not Path(spec.path).is_file():
                raise MonitorError(f"model file {spec.path} (that the monitor was fitted for) not found: "
                                   "give the model file")
            sha = sha256_file(Path(spec.path))
            if sha != mon.model_sha256:
                raise MonitorError(f"{path} was fitted for model sha256 {mon.model_sha256[:12]}…, but model file "
                                   f"{spec.path} has sha256 {sha[:12]}…: refit the monitor for this model")
            try:
                model = load_classifier(spec)
            except ModelError as e:
                raise MonitorError(str(e)) from None
        return mon.attach(model)


# --- fitting --------------------------------------------------------------------------------------

def fit(model: Classifier, model_sha256: str, spec: SpecificationMonitor, fit_batches: Iterable,
        calibration_batches: Iterable, scores: Sequence[str] = SCORES, near_rate: float = 0.05,
        out_rate: float = 0.001, shrinkage: float | str = "oas", rank: int | None = 128) -> Monitor:
    """Fit the learned monitor on one stream of batches and calibrate it on another (held out), both
    restricted to inputs the specification accepts (not OUT). Batches have `images`, `labels`, `meta`."""
    if not 0 < out_rate < near_rate < 1:
        raise MonitorError(f"false-alarm rates must satisfy 0 < out_rate < near_rate < 1, got {out_rate}, {near_rate}")
    mon = Monitor(spec, None, model_sha256, model.spec, model=model)
    extractor = mon.extractor
    info: dict[str, Any] = {"feature_mode": extractor.mode, "features": extractor.why}
    maha = None
    if "mahalanobis" in scores:
        gauss, kept, dropped = None, 0, 0
        for b in fit_batches:
            inside = spec.evaluate(b.images, b.meta).states.max(axis=1, initial=0) < State.OUT
            dropped += int((~inside).sum())
            if not inside.any():
                continue
            feats, _ = extractor(b.images[inside])
            gauss = gauss or GaussianFit(model.n_classes, feats.shape[1])
            gauss.update(feats, b.labels[inside])
            kept += int(inside.sum())
        if gauss is None:
            raise MonitorError("no fit item is inside the specification: cannot fit the learned monitor")
        cov, rho = gauss.covariance(shrinkage)
        maha = Mahalanobis.fit(gauss.means[gauss.counts > 0], cov, rank)
        info.update(n_fit=kept, fit_outside_spec=dropped, shrinkage=rho, feature_dim=int(cov.shape[0]),
                    rank=maha.rank, class_counts=gauss.counts.tolist())
    learned = LearnedMonitor(scores, maha, {}, {}, float("inf"), float("inf"), info)
    cal, dropped = Calibration(), 0
    for b in calibration_batches:
        inside = spec.evaluate(b.images, b.meta).states.max(axis=1, initial=0) < State.OUT
        dropped += int((~inside).sum())
        if inside.any():
            feats, logits = extractor(b.images[inside])
            cal.update(learned.raw(feats, logits))
    try:
        cal.finish(learned, near_rate, out_rate)
    except ValueError as e:
        raise MonitorError(str(e)) from None
    learned.info["calibration_outside_spec"] = dropped
    mon.learned, mon.feature_mode, mon.info = learned, extractor.mode, dict(learned.info)
    return mon

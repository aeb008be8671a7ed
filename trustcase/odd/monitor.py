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
format name, schema version, the model's sha256 and input contract (format, shape, value range,
normalisation, classes), the specification, thresholds and calibration. The file is data only: it never
names a model file, a factory, an entry point or a pickle switch, and a header that does is rejected. The
caller supplies the model (a loaded Classifier, or a TorchScript / ONNX file), whose hash must be the
recorded one before anything runs. A file of another schema version is rejected.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from trustcase.models.classifier import Classifier, ModelError, sha256_file
from trustcase.models.loading import load_classifier
from trustcase.odd.calibration import Calibration
from trustcase.odd.descriptors import DESCRIPTORS
from trustcase.odd.features import FeatureExtractor
from trustcase.odd.learned import SCORES, GaussianFit, LearnedMonitor, Mahalanobis
from trustcase.odd.specification import Limit, MonitorError, SpecificationMonitor, SpecResult, State
from trustcase.schemas import ModelSpec

__all__ = ["DESCRIPTORS", "SCORES", "Decisions", "LearnedMonitor", "Limit", "Monitor", "MonitorError",
           "SpecificationMonitor", "State", "fit"]


FORMAT = "trustcase-odd-monitor"


SCHEMA_VERSION = "2"  # 2: the model is described (contract + hash), never named (no path, factory, pickle switch)
CONTRACT = ("format", "input_shape", "value_range", "normalisation", "class_names", "critical_class", "input_dtype")
SELF_LOADING = ("torchscript", "onnx")  # formats loadable from the file alone, without code


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
    non_finite: np.ndarray | None = None  # (B,) NaN/inf values per input: such an input is OUT, nothing else judged

    def __len__(self) -> int:
        return len(self.state)

    @property
    def prediction(self) -> np.ndarray | None:
        return None if self.logits is None else self.logits.argmax(axis=1)

    def reasons(self, i: int) -> list[str]:
        if self.non_finite is not None and self.non_finite[i]:
            return [f"input has {int(self.non_finite[i])} NaN/inf value(s): outside every operating condition, "
                    "the model is not judged on it (OUT)"]
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
        if self.non_finite is not None and self.non_finite[i]:
            return {"state": State.OUT.name, "reasons": self.reasons(i), "descriptors": {}}
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
        if x.dtype.kind not in "biuf":
            raise MonitorError(f"input values of type {x.dtype}: expected numbers (pixel values)")
        if x.size == 0:
            raise MonitorError(f"input of shape {x.shape} holds no value")
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

    def check_meta(self, keys) -> None:
        """Metadata a caller gives by hand must name descriptors of this monitor: a misspelt key would be
        ignored silently and its descriptor judged as missing. (A loader's batches may carry more keys.)"""
        known = sorted(lim.name for lim in self.spec.limits if lim.source == "metadata")
        unknown = sorted(set(keys) - set(known))
        if unknown:
            raise MonitorError(f"metadata {', '.join(map(repr, unknown))}: not a metadata descriptor of this "
                               f"monitor (known: {', '.join(known) or 'none'})")

    def evaluate(self, inputs: np.ndarray, meta: dict[str, Sequence[Any]] | None = None) -> Decisions:
        x = self.batch(inputs)
        for key, values in (meta or {}).items():
            if isinstance(values, str) or not hasattr(values, "__len__") or len(values) != len(x):
                got = "one string" if isinstance(values, str) else f"{len(values)} value(s)" \
                    if hasattr(values, "__len__") else type(values).__name__
                raise MonitorError(f"meta[{key!r}] must hold one value per input ({len(x)}), got {got}")
        # a NaN/inf input is OUT by the rules: judged alone, replaced by a neutral input so its batch goes on
        bad = (~np.isfinite(x)).reshape(len(x), -1).sum(axis=1) if x.dtype.kind == "f" else np.zeros(len(x), int)
        if bad.any():
            x = np.where(np.isfinite(x), x, np.asarray(self.model_spec.value_range[0], x.dtype))
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
        if bad.any():
            d.non_finite = bad
            d.state = np.where(bad > 0, np.int8(State.OUT), d.state).astype(np.int8)
        return d

    # -- persistence ---------------------------------------------------------------------------------

    def header(self) -> dict:
        model = {k: v for k, v in self.model_spec.model_dump(mode="json").items() if k in CONTRACT}
        return {"format": FORMAT, "schema_version": SCHEMA_VERSION, "model_sha256": self.model_sha256,
                "model": model, "feature_mode": self.feature_mode,
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
        model = head.get("model")
        extra = sorted(set(model) - set(CONTRACT)) if isinstance(model, dict) else ["(not a mapping)"]
        if extra:
            raise MonitorError(f"{path}: its model description holds {', '.join(extra)}: a monitor file is data "
                               f"and never says how to load or build a model (allowed: {', '.join(CONTRACT)})")
        return head, arrays

    @staticmethod
    def _contract(model: dict, path: Path | None = None) -> ModelSpec:
        """The model contract as a ModelSpec that names no code: `path` the caller's file (else none)."""
        fields = {**model, "path": path or Path(), "format": model.get("format") if path else "onnx"}
        try:  # without a file, validated as a code-free format (state_dict would ask for its factory)
            return ModelSpec.model_validate(fields).model_copy(update={"format": model.get("format")})
        except ValueError as e:
            raise MonitorError(f"the monitor's model contract is invalid: {e}") from None

    @classmethod
    def load(cls, path: str | Path, model: Classifier | str | Path | None = None) -> Monitor:
        """Load a saved monitor. `model`: the model to run beside, supplied by the caller (a loaded Classifier,
        or a TorchScript / ONNX file, whose hash must be the recorded one before it is loaded); needed when
        the monitor has a learned part. Without it, a monitor of the specification alone."""
        head, arrays = cls.read_header(path)
        why = _malformed(head)
        if why:
            raise MonitorError(f"{path}: its monitor header is malformed ({why}): refit the monitor")
        try:
            mon = cls(SpecificationMonitor.from_dict(head["specification"]),
                      None if head["learned"] is None else LearnedMonitor.from_parts(head["learned"], arrays),
                      head["model_sha256"], cls._contract(head["model"]), head.get("feature_mode", "logits"),
                      head.get("info", {}))
        except (KeyError, TypeError, ValueError) as e:
            raise MonitorError(f"{path}: its monitor header is malformed ({type(e).__name__}: {e})") from None
        if model is None:
            if mon.learned is None:
                return mon
            raise MonitorError(f"{path} has a learned part: give the model it was fitted for (sha256 "
                               f"{mon.model_sha256[:12]}…; --model FILE, or a loaded Classifier)")
        if not isinstance(model, Classifier):
            file = Path(model)
            if not file.is_file():
                raise MonitorError(f"model file {file} not found")
            sha = sha256_file(file)
            if sha != mon.model_sha256:
                raise MonitorError(f"{path} was fitted for model sha256 {mon.model_sha256[:12]}…, but model file "
                                   f"{file} has sha256 {sha[:12]}…: refit the monitor for this model")
            if head["model"]["format"] not in SELF_LOADING:
                raise MonitorError(f"a {head['model']['format']} model needs its code to be built: load it as the "
                                   "use case says and pass the Classifier")
            try:
                model = load_classifier(cls._contract(head["model"], file), wrap=_task_view(head.get("info", {})))
            except ModelError as e:
                raise MonitorError(str(e)) from None
        return mon.attach(model)


def _task_view(info: dict):
    """How the monitor's model is seen: a detector's or segmenter's contract (its features are read through it),
    else as a classifier (a monitor fitted before the task was recorded)."""
    task = info.get("task")
    if task == "detection":
        from trustcase.tasks.detection import Detector

        return Detector
    if task == "segmentation":
        from trustcase.tasks.segmentation import Segmenter

        return Segmenter
    return None


def _finite(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def _malformed(head: dict) -> str | None:
    """Why a monitor header cannot be trusted to decide (a missing field, a NaN or infinite threshold, a limit
    whose min exceeds its max), else None: a NaN threshold would answer IN to everything."""
    if not (isinstance(head.get("model_sha256"), str) and re.fullmatch(r"[0-9a-f]{64}", head["model_sha256"])):
        return "model_sha256 is not a SHA-256"
    spec = head.get("specification")
    if not isinstance(spec, dict) or not isinstance(spec.get("limits"), list):
        return "no specification limits"
    vr = spec.get("value_range")
    if not (isinstance(vr, list) and len(vr) == 2 and all(map(_finite, vr)) and vr[0] < vr[1]):
        return f"value_range {vr!r}"
    for i, lim in enumerate(spec["limits"]):
        if not isinstance(lim, dict) or not isinstance(lim.get("name"), str):
            return f"limit {i} has no name"
        lo, hi, margin = lim.get("min"), lim.get("max"), lim.get("margin", 0.0)
        if any(v is not None and not _finite(v) for v in (lo, hi)) or not _finite(margin) or margin < 0:
            return f"limit {lim['name']!r}: min {lo!r}, max {hi!r}, margin {margin!r} must be finite numbers"
        if lo is not None and hi is not None and lo > hi:
            return f"limit {lim['name']!r}: min {lo} > max {hi}"
        if lo is None and hi is None and lim.get("values") is None:
            return f"limit {lim['name']!r} bounds nothing"
    learned = head.get("learned", "missing")
    if learned is None:
        return None
    if not isinstance(learned, dict) or not isinstance(learned.get("scores"), list):
        return "learned part without its scores"
    near, out = learned.get("near"), learned.get("out")
    if not (_finite(near) and _finite(out) and near <= out):
        return f"learned thresholds near {near!r}, out {out!r}: finite, near <= out"
    for key in ("centre", "scale"):
        part = learned.get(key)
        if not isinstance(part, dict) or set(part) != set(learned["scores"]) or not all(map(_finite, part.values())):
            return f"learned {key} {part!r}: one finite number per score"
    if not all(v > 0 for v in learned["scale"].values()):
        return "learned scale must be > 0"
    return None


def fit(model: Classifier, model_sha256: str, spec: SpecificationMonitor, fit_batches: Iterable,
        calibration_batches: Iterable, scores: Sequence[str] = SCORES, near_rate: float = 0.05,
        out_rate: float = 0.001, shrinkage: float | str = "oas", rank: int | None = 128) -> Monitor:
    """Fit the learned monitor on one stream of batches and calibrate it on another (held out), both
    restricted to inputs the specification accepts (not OUT). Batches have `images`, `labels`, `meta`."""
    if not 0 < out_rate < near_rate < 1:
        raise MonitorError(f"false-alarm rates must satisfy 0 < out_rate < near_rate < 1, got {out_rate}, {near_rate}")
    mon = Monitor(spec, None, model_sha256, model.spec, model=model)
    extractor = mon.extractor
    if extractor.mode == "none" or not set(scores) & set(extractor.scores):
        raise MonitorError(f"no learned score {list(scores)} applies to this model's features ({extractor.why})")
    scores = [s for s in scores if s in extractor.scores]  # a detector has no logits: no energy
    info: dict[str, Any] = {"feature_mode": extractor.mode, "features": extractor.why,
                            "task": "detection" if hasattr(model, "detect") else
                            "segmentation" if hasattr(model, "segment") else "classification"}
    maha = None
    if "mahalanobis" in scores:
        gauss, kept, dropped = None, 0, 0
        for b in fit_batches:
            inside = spec.evaluate(b.images, b.meta).states.max(axis=1, initial=0) < State.OUT
            dropped += int((~inside).sum())
            if not inside.any():
                continue
            feats, _ = extractor(b.images[inside])
            gauss = gauss or GaussianFit(1 if extractor.pooled else model.n_classes, feats.shape[1])
            gauss.update(feats, np.zeros(len(feats), int) if extractor.pooled else b.labels[inside])
            kept += int(inside.sum())
        if gauss is None:
            raise MonitorError("no fit item is inside the specification: cannot fit the learned monitor")
        cov, rho = gauss.covariance(shrinkage)
        maha = Mahalanobis.fit(gauss.means[gauss.counts > 0], cov, rank)
        info.update(n_fit=kept, fit_outside_spec=dropped, shrinkage=rho, feature_dim=int(cov.shape[0]),
                    rank=maha.rank, class_counts=gauss.counts.tolist())
    learned = LearnedMonitor(scores, maha, {}, {}, float("inf"), float("inf"), info)
    cal, dropped, kept = Calibration(), 0, 0
    for b in calibration_batches:
        inside = spec.evaluate(b.images, b.meta).states.max(axis=1, initial=0) < State.OUT
        dropped += int((~inside).sum())
        kept += int(inside.sum())
        if inside.any():
            feats, logits = extractor(b.images[inside])
            cal.update(learned.raw(feats, logits))
    if kept < 2:  # the data's fault, said as such; any other error of the calibration is a bug
        raise MonitorError(f"need at least 2 in-ODD calibration items, got {kept} ({dropped} outside the "
                           "specification)")
    cal.finish(learned, near_rate, out_rate)
    learned.info["calibration_outside_spec"] = dropped
    mon.learned, mon.feature_mode, mon.info = learned, extractor.mode, dict(learned.info)
    return mon


"""Black-box AI components: bought off the shelf, they expose predictions and nothing else.

Two kinds besides ONNX (which `models.loading.load_classifier` runs through onnxruntime):

- `format: python`: `entry: module:Name` names a class (instantiated without arguments) or a factory
  function returning an object with `predict(images: np.ndarray (B, H, W, C), pixel space) -> (B, K)`
  probabilities, in the order of `class_names`.
- `format: challenge`: the Confiance.ai welding-challenge interface, so that components built for it
  are assessed as they are: a class with `load_model(config_file=None)` and
  `predict(input_images: list[np.ndarray], images_meta_informations: list[dict]) -> dict` with
  `predictions` (a class name or "UNKNOWN" per image), `probabilities` (one list of K floats per
  image, summing to 1), optionally `OOD_scores` (>= 1 means out of distribution) and
  `explainability` (one per-pixel map in [0, 1] per image).

`path` is the component's folder (or file); it goes on `sys.path` for the import and its content
is the model's hash. Every answer is validated; a wrong key, a wrong length or probabilities that do
not sum to 1 is a `ModelError` naming the problem. Checks that need gradients are skipped
(`Classifier.differentiable` is False); checks that only need predictions see
`logits = log(probabilities)` (so softmax gives the component's probabilities back).

The `component_outputs` check judges what only a challenge component says (its measurements:
`ComponentOutputs.produces`).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from trustcase.models.classifier import Classifier, ModelError
from trustcase.registry import resolve
from trustcase.schemas import ModelSpec

UNKNOWN = "UNKNOWN"
KEYS_REQUIRED = ("predictions", "probabilities")
KEYS_OPTIONAL = ("OOD_scores", "explainability")
SUM_TOLERANCE = 1e-3


@dataclass
class Outputs:
    """One batch of a black box's answers, validated."""

    probabilities: np.ndarray  # (B, K) float64, rows sum to 1
    decisions: np.ndarray  # (B,) int: class index, -1 for UNKNOWN
    ood_scores: np.ndarray | None = None  # (B,)
    explanations: np.ndarray | None = None  # (B, H, W) in [0, 1]


def _where(ids: list[str] | None, rows) -> str:
    rows = list(rows)[:5]
    return f" (items {[ids[i] for i in rows]})" if ids else f" (rows {rows})"


def validate_probabilities(p, batch: int, n_classes: int, ids: list[str] | None = None,
                           pixels: tuple[int, int] | None = None) -> np.ndarray:
    """(B, K) probabilities; a segmenter's (`pixels`: its input H, W) are per pixel, (B, K, H, W)."""
    try:
        arr = np.asarray(p, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise ModelError(f"black box: probabilities are not numeric lists: {e}") from None
    if arr.shape != (batch, n_classes, *(pixels or ())):
        raise ModelError(f"black box: probabilities have shape {arr.shape}, expected ({batch}, {n_classes}"
                         + (f", {pixels[0]}, {pixels[1]}): per pixel" if pixels else "): one list")
                         + f" of {n_classes} probabilities per image")
    rows = arr.reshape(batch, n_classes, -1)  # an image's rows: one, or one per pixel
    bad = ~np.isfinite(rows).all(axis=(1, 2)) | (rows < 0).any(axis=(1, 2)) | (rows > 1).any(axis=(1, 2))
    if bad.any():
        raise ModelError(f"black box: {int(bad.sum())} probability row(s) outside [0, 1] or not finite"
                         + _where(ids, np.flatnonzero(bad)))
    sums = rows.sum(axis=1)  # (B, pixels): each image's row furthest from 1 speaks for it
    sums = sums[np.arange(batch), np.abs(sums - 1).argmax(axis=1)]
    off = np.abs(sums - 1) > SUM_TOLERANCE
    if off.any():
        raise ModelError(f"black box: probabilities of {int(off.sum())} image(s) do not sum to 1 "
                         f"(e.g. {sums[off][0]:.4f}, tolerance {SUM_TOLERANCE})" + _where(ids, np.flatnonzero(off)))
    return arr


def validate_answer(answer, batch: int, class_names: list[str], image_hw: tuple[int, int],
                    ids: list[str] | None = None) -> Outputs:
    """The challenge's `predict` result -> Outputs, or a ModelError naming what is wrong."""
    if not isinstance(answer, dict):
        raise ModelError(f"black box: predict returned {type(answer).__name__}, expected a dict with keys "
                         f"{list(KEYS_REQUIRED)} (+ optional {list(KEYS_OPTIONAL)})")
    missing = [k for k in KEYS_REQUIRED if k not in answer]
    unknown = sorted(set(answer) - set(KEYS_REQUIRED) - set(KEYS_OPTIONAL))
    if missing or unknown:
        raise ModelError(f"black box: predict returned keys {sorted(answer)}; missing {missing}, unknown {unknown}; "
                         f"expected {list(KEYS_REQUIRED)} and optionally {list(KEYS_OPTIONAL)}")
    for k, v in answer.items():
        if v is not None and len(v) != batch:
            raise ModelError(f"black box: {k!r} has {len(v)} entries for a batch of {batch} images")
    probs = validate_probabilities(answer["probabilities"], batch, len(class_names), ids)
    index = {c: i for i, c in enumerate(class_names)}
    wrong = [p for p in answer["predictions"] if p != UNKNOWN and p not in index]
    if wrong:
        raise ModelError(f"black box: predictions {sorted(set(map(str, wrong)))[:5]} are not among "
                         f"{class_names} or {UNKNOWN!r}")
    decisions = np.asarray([index.get(p, -1) for p in answer["predictions"]], dtype=np.int64)
    out = Outputs(probabilities=probs, decisions=decisions)
    if answer.get("OOD_scores") is not None:
        s = np.asarray(answer["OOD_scores"], dtype=np.float64).reshape(-1)
        if s.shape != (batch,) or not np.isfinite(s).all():
            raise ModelError(f"black box: OOD_scores must be {batch} finite numbers, got shape {s.shape}")
        out.ood_scores = s
    if answer.get("explainability") is not None:
        maps = []
        for i, m in enumerate(answer["explainability"]):
            m = np.asarray(m, dtype=np.float64)
            m = m[..., 0] if m.ndim == 3 and m.shape[-1] == 1 else m
            if m.shape != tuple(image_hw):
                raise ModelError(f"black box: explainability map {i} has shape {m.shape}, expected {tuple(image_hw)}")
            if not np.isfinite(m).all() or m.min() < 0 or m.max() > 1:
                raise ModelError(f"black box: explainability map {i} has values outside [0, 1]" + _where(ids, [i]))
            maps.append(m)
        out.explanations = np.stack(maps)
    return out


def _import(spec: ModelSpec):
    folder = Path(spec.path) if Path(spec.path).is_dir() else Path(spec.path).parent
    return resolve(spec.entry, folder, "model entry", ModelError)


class BlackBox(Classifier):
    """A Classifier over a component that only answers predictions (no module, no gradients)."""

    def __init__(self, spec: ModelSpec, component):
        super().__init__(spec)
        self.component = component
        self.kind = spec.format
        self.pixels: tuple[int, int] | None = None  # a segmenter's input H, W: its answers are per pixel

    @property
    def differentiable(self) -> bool:
        return False

    @property
    def challenge(self) -> bool:
        return self.kind == "challenge"

    def _pixels(self, images: np.ndarray) -> np.ndarray:
        if self.spec.input_dtype == "uint8":
            lo, hi = self.spec.value_range
            return np.clip(np.rint(images), max(lo, 0), min(hi, 255)).astype(np.uint8)
        return np.asarray(images, dtype=np.float32)

    def outputs(self, images: np.ndarray, meta: list[dict] | None = None, ids: list[str] | None = None) -> Outputs:
        images = np.asarray(images)
        if self.tabular and not self.challenge:  # feature vectors (B, F): a plain predict
            if list(images.shape[1:]) != list(self.spec.input_shape):
                raise ModelError(f"input of shape {list(images.shape[1:])} does not match model.input_shape "
                                 f"{self.spec.input_shape}")
            arr = validate_probabilities(np.asarray(self.component.predict(self._pixels(images))), len(images),
                                         self.n_classes, ids)
            return Outputs(probabilities=arr, decisions=arr.argmax(axis=1))
        b, h, w, c = images.shape
        if [c, h, w] != list(self.spec.input_shape):
            raise ModelError(f"input of shape {[c, h, w]} (C, H, W) does not match model.input_shape "
                             f"{self.spec.input_shape}")
        pixels = self._pixels(images)
        if not self.challenge:
            probs = self.component.predict(pixels)
            if isinstance(probs, torch.Tensor):
                probs = probs.detach().cpu().numpy()
            arr = validate_probabilities(probs, b, self.n_classes, ids, self.pixels)
            return Outputs(probabilities=arr, decisions=arr.argmax(axis=1))
        listed = [im[..., 0] if c == 1 else im for im in pixels]  # grey images as (H, W), like the challenge
        infos = [dict(m) for m in meta] if meta is not None else [{} for _ in range(b)]
        for i, info in enumerate(infos):
            if ids:
                info.setdefault("id", ids[i])
        answer = self.component.predict(listed, infos)
        return validate_answer(answer, b, list(self.spec.class_names), (h, w), ids)

    def logits(self, images: np.ndarray, ids: list[str] | None = None) -> np.ndarray:
        probs = self.outputs(images, ids=ids).probabilities
        return np.log(np.clip(probs, 1e-12, 1.0)).astype(np.float32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised input (model-agnostic attribution perturbs there) -> log-probabilities, no gradient."""
        pixels = (x.detach() - self._shift) / self._scale
        pixels = (pixels if self.tabular else pixels.permute(0, 2, 3, 1)).numpy()
        return torch.from_numpy(self.logits(pixels))


def load_black_box(spec: ModelSpec) -> BlackBox:
    path = Path(spec.path)
    if not path.exists():
        raise ModelError(f"black-box component not found: {path}")
    target = _import(spec)
    try:
        component = target() if callable(target) else target
    except Exception as e:
        raise ModelError(f"cannot build the black box {spec.entry}: {type(e).__name__}: {str(e)[:300]}") from None
    if not callable(getattr(component, "predict", None)):
        raise ModelError(f"{spec.entry} has no predict method: a black box must answer predict(...)")
    if spec.format == "challenge":
        load = getattr(component, "load_model", None)
        if not callable(load):
            raise ModelError(f"{spec.entry} has no load_model(config_file=None): not the challenge interface")
        n_args = len(inspect.signature(component.predict).parameters)
        if n_args < 2:
            raise ModelError(f"{spec.entry}.predict takes {n_args} argument(s); the challenge interface is "
                             "predict(input_images, images_meta_informations)")
        config = spec.config_file
        if config is not None and not config.is_absolute():
            config = (path if path.is_dir() else path.parent) / config
        if config is not None and not config.is_file():
            raise ModelError(f"model.config_file not found: {config}")
        try:
            load(str(config)) if config is not None else load()
        except Exception as e:
            raise ModelError(f"{spec.entry}.load_model failed: {type(e).__name__}: {str(e)[:300]}") from None
    return BlackBox(spec, component)


def deletion_drops(model: BlackBox, images: np.ndarray, maps: np.ndarray, target: np.ndarray,
                   fractions: list[float], seeds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean drop of the target's probability when the top (map) or random pixels are set to the image mean;
    item i's random pixels from its seed (`trustcase.seeding`)."""
    b, h, w, _ = images.shape
    base = model.outputs(images).probabilities[np.arange(b), target]
    order = np.argsort(-maps.reshape(b, -1), axis=1, kind="stable")
    rand = np.stack([np.random.default_rng(int(s)).permutation(h * w) for s in seeds])
    fill = images.mean(axis=(1, 2), keepdims=True)
    top, rnd = [], []
    for f in fractions:
        k = max(1, int(round(f * h * w)))
        drops = []
        for idx in (order, rand):
            x = images.copy().reshape(b, h * w, -1)
            np.put_along_axis(x, idx[:, :k, None], fill.reshape(b, 1, -1), axis=1)
            p = model.outputs(x.reshape(images.shape)).probabilities[np.arange(b), target]
            drops.append(base - p)
        top.append(drops[0])
        rnd.append(drops[1])
    return np.stack(top, axis=1), np.stack(rnd, axis=1)


def _meta_rows(meta: dict[str, list[str]], n: int) -> list[dict]:
    return [{k: v[i] for k, v in meta.items()} for i in range(n)]



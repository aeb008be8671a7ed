"""The conformance suite of a check, like scikit-learn's `check_estimator`: run it on your own check.

    from trustcase.testing import check_conformance
    report = check_conformance("my_package.checks:MyCheck", {"split": "test"})   # synthetic images
    report = check_conformance("my_check", params, use_case=uc, model=clf, workdir=folder)  # your own case

Each property is a promise every check makes to the flow and to the reader of its evidence:

- deterministic: the same seed gives the same evidence (measurements, curves, artefact hashes, summary);
- batching: the same evidence at two batch sizes (the data's and, when the check has one, its own
  `batch_size` param; artefacts by name, not by hash), and across shards: the shards' measurements
  together are the whole check's;
- streams: the check reads its data through batches of at most the batch size, never a whole split;
- records: the outcome names its check and AMLAS stage, states validity conditions, every measurement
  says which check made it, every artefact is the file it declares (SHA-256: provenance);
- produces: the check declares what it measures (`Check.produces(params, use_case)`, what the preflight
  judges claims by) and measures nothing it did not declare;
- says what it cannot do: on the real black-box class (`BlackBox`, predictions only) and on a tabular
  model it either runs or raises `Unsupported` with a reason, never another exception; a check that
  declares `needs_gradients` must refuse the black box;
- n = 0: with its split empty, every figure computed on no item is undefined (no value), so a claim on
  it is INCONCLUSIVE, or the check stops with a clear error (`CheckError`, `ValueError`, `Unsupported`).

`check_conformance` returns {property: "ok" or "skipped: why"} and raises `ConformanceError` listing
every broken property. Evidence is compared exactly for integers and strings, to 1e-5 (relative) for
floats: summation order may change the last bits, never a decision.
"""

from __future__ import annotations

import functools
import math
import shutil
import tempfile
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from trustcase.checks import Check, Context, build
from trustcase.data.streaming import DataSource, Item
from trustcase.errors import CheckError, Unsupported, UserError
from trustcase.models.blackbox import BlackBox
from trustcase.models.classifier import Classifier, sha256_file
from trustcase.schemas import CheckOutcome, CheckSpec, Requirement, Stage, UseCase, Verdict
from trustcase.verdicts import judge

__all__ = ["ConformanceError", "SquareDetector", "black_box_of", "check_conformance", "evidence_of", "same_evidence",
           "synthetic_boxes", "synthetic_case", "synthetic_images", "synthetic_table"]

REL_TOL = 1e-5  # float32 sums in another order move the 7th digit (a monitor centre by 2e-6)
VOLATILE = ("seconds", "duration", "elapsed")  # summary keys that measure time, not the model


class ConformanceError(AssertionError):
    """One or more properties of the conformance suite do not hold; the message lists them."""


# --- synthetic cases (the suite's own data, like check_estimator's) ---------------------------------

def _rng(split: str, seed: int) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(split.encode())])


def synthetic_images(split: str, n: int = 24, side: int = 16, seed: int = 0) -> list[Item]:
    """Grey images in [0, 255]: class 1 ("defect") has a bright square at a random place, class 0 none."""
    rng = _rng(split, seed)
    items = []
    for i in range(n):
        img = rng.normal(90, 25, (side, side))
        label = i % 2
        if label:
            r, c = rng.integers(0, side - side // 3, 2)
            img[r:r + side // 3, c:c + side // 3] += 110
        items.append(Item(image=np.clip(img, 0, 255).astype(np.uint8), label=label, id=f"{split}-{i:03d}"))
    return items


def synthetic_masks(split: str, n: int = 24, side: int = 16, seed: int = 0) -> list[Item]:
    """The segmentation case: the images of `synthetic_images`, each labelled by its mask (the bright square is
    class 1, "defect"; every other pixel class 0)."""
    from trustcase.data.streaming import Mask

    rng = _rng(split, seed)
    items = []
    for i in range(n):
        img = rng.normal(90, 25, (side, side))
        mask = np.zeros((side, side), np.uint8)
        if i % 2:
            r, c = rng.integers(0, side - side // 3, 2)
            img[r:r + side // 3, c:c + side // 3] += 110
            mask[r:r + side // 3, c:c + side // 3] = 1
        items.append(Item(image=np.clip(img, 0, 255).astype(np.uint8), label=Mask(mask), id=f"{split}-{i:03d}",
                          meta={"kind": "square" if i % 2 else "plain"}))
    return items


def synthetic_boxes(split: str, n: int = 24, side: int = 16, seed: int = 0) -> list[Item]:
    """The detection case: the images of `synthetic_images`, each labelled by its true boxes (the bright square,
    class 0 "defect"; none on a plain image)."""
    from trustcase.data.streaming import Boxes

    rng, k = _rng(split, seed), side // 3
    items = []
    for i in range(n):  # the draws of `synthetic_images`, in its order
        img, rows = rng.normal(90, 25, (side, side)), []
        if i % 2:
            r, c = rng.integers(0, side - k, 2)
            img[r:r + k, c:c + k] += 110
            rows = [(c, r, c + k, r + k, 0)]
        items.append(Item(image=np.clip(img, 0, 255).astype(np.uint8), label=Boxes(np.array(rows, np.float64)
                                                                                     .reshape(-1, 5)),
                          id=f"{split}-{i:03d}", meta={"kind": "square" if i % 2 else "plain"}))
    return items


class SquareDetector(nn.Module):
    """The synthetic case's detector: a box filter of the square's side (one Conv2d of equal weights) over the
    image scaled to [0, 1]; its largest mean is one detection of class 0, scoring sigmoid(20 (mean - 0.6)).
    Differentiable (a max), exported as TorchScript with `features(x)` (the filtered map's mean and max)."""

    def __init__(self, side: int):
        super().__init__()
        self.k = side // 3
        self.window = nn.Conv2d(1, 1, self.k, bias=False)
        nn.init.constant_(self.window.weight, 1.0 / self.k ** 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.window(x)
        b, w = m.shape[0], m.shape[3]
        best, at = m.reshape(b, -1).max(dim=1)
        ys = torch.div(at, w, rounding_mode="floor").to(x.dtype)
        xs = (at - torch.div(at, w, rounding_mode="floor") * w).to(x.dtype)
        box = torch.stack([xs, ys, xs + self.k, ys + self.k, torch.sigmoid(20.0 * (best - 0.6)), xs * 0], dim=1)
        return box[:, None, :]

    @torch.jit.export
    def features(self, x: torch.Tensor) -> torch.Tensor:
        m = self.window(x).flatten(1)
        return torch.stack([m.mean(dim=1), m.max(dim=1).values], dim=1)


def synthetic_table(split: str, n: int = 24, features: int = 4, seed: int = 0) -> list[Item]:
    """Feature vectors in [0, 1]: class 1 iff x0 + x1 > 1."""
    x = _rng(split, seed).random((n, features)).astype(np.float32)
    return [Item(image=row, label=int(row[0] + row[1] > 1), id=f"{split}-{i:03d}") for i, row in enumerate(x)]


def _fit(module: nn.Module, x: np.ndarray, y: np.ndarray, steps: int = 60, weight: list[float] | None = None) \
        -> nn.Module:
    opt = torch.optim.Adam(module.parameters(), lr=0.02)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    w = None if weight is None else torch.tensor(weight)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(module(xt), yt, weight=w).backward()
        opt.step()
    return module.eval()


@functools.cache
def _trained(kind: str, size: int) -> tuple[nn.Module, Path]:
    """A small model fitted on the synthetic train split (seconds), saved as TorchScript beside."""
    folder = Path(tempfile.mkdtemp(prefix="trustcase-conformance-"))
    with torch.random.fork_rng():  # the same model whatever ran before in the process; the caller's RNG untouched
        torch.manual_seed(0)
        return _fit_and_save(kind, size, folder)


def _fit_and_save(kind: str, size: int, folder: Path) -> tuple[nn.Module, Path]:
    if kind == "boxes":  # nothing to fit: its window is the square's
        module = SquareDetector(size).eval()
        path = folder / f"{kind}.pt"
        torch.jit.script(module).save(str(path))
        return module, path
    if kind == "masks":  # a per-pixel classifier: logits (B, 2, H, W)
        items = synthetic_masks("train", 64, size)
        x = np.stack([it.image for it in items])[:, None].astype(np.float32) / 255.0
        module = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 2, 1))
        # defect pixels are about 5% of the pixels: weighted, or "never a defect" is the cheapest answer
        module = _fit(module, x, np.stack([it.label.classes for it in items]).astype(np.int64), 120, [1.0, 10.0])
        path = folder / f"{kind}.pt"
        torch.jit.trace(module, torch.from_numpy(x[:1])).save(str(path))
        return module, path
    if kind == "image":
        items = synthetic_images("train", 64, size)
        x = np.stack([it.image for it in items])[:, None].astype(np.float32) / 255.0
        module = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                               nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                               nn.Linear(8, 2))
    else:
        items = synthetic_table("train", 64, size)
        x = np.stack([it.image for it in items]).astype(np.float32)
        module = nn.Sequential(nn.Linear(size, 8), nn.ReLU(), nn.Linear(8, 2))
    module = _fit(module, x, np.array([it.label for it in items]))
    path = folder / f"{kind}.pt"
    torch.jit.trace(module, torch.from_numpy(x[:1])).save(str(path))
    return module, path


def synthetic_case(plan: list[dict] | None = None, *, tabular: bool = False, batch_size: int = 8, n: int = 24,
                   size: int | None = None, task: str = "classification") -> tuple[UseCase, Classifier]:
    """A use case over the synthetic loader and its fitted model (eager module: gradients available); `task`
    segmentation: the masks of the same images and a per-pixel model (the use case's task's view of it); `task`
    detection: the squares' boxes and `SquareDetector`."""
    size = size or (4 if tabular else 16)
    segmentation, detection = task == "segmentation", task == "detection"
    module, path = _trained("table" if tabular else "masks" if segmentation else "boxes" if detection else "image",
                            size)
    loader = "trustcase.testing:" + ("synthetic_table" if tabular else "synthetic_masks" if segmentation
                                     else "synthetic_boxes" if detection else "synthetic_images")
    params = {"n": n, ("features" if tabular else "side"): size}
    uc = UseCase.model_validate({
        "id": "conformance", "title": "Conformance", "owner": "trustcase", "criticality": "low",
        "intended_function": "the conformance suite of a check",
        "model": {"format": "torchscript", "path": str(path), "input_shape": [size] if tabular else [1, size, size],
                  "value_range": [0, 1] if tabular else [0, 255],
                  "class_names": ["defect", "scratch"] if detection else ["ok", "defect"], "critical_class": "defect"},
        "data": {"loader": loader, "params": params, "batch_size": batch_size,
                 "splits": {"train": "train", "validation": "validation", "test": "test"}},
        "requirements": [], "plan": {"checks": plan or [{"check": "performance"}]}, "task": task,
        "odd": {"descriptors": [{"name": "kind", "source": "metadata", "values": ["square", "plain"]}]}
        if segmentation or detection else {},
    })
    if detection:
        from trustcase.tasks.detection import Detector

        return uc, Detector(Classifier(uc.model, module=module))
    if segmentation:
        from trustcase.tasks.segmentation import Segmenter

        return uc, Segmenter(Classifier(uc.model, module=module))
    return uc, Classifier(uc.model, module=module)


# --- evidence, compared --------------------------------------------------------------------------

def evidence_of(outcome: CheckOutcome, hashes: bool = True) -> dict:
    """What a reader relies on: measurements, curves, artefacts, validity, limitations, summary (no timings).
    `hashes=False` leaves out the artefacts' SHA-256: a binary file of floats summed in another order (a
    fitted monitor at another batch size) differs in its last bits, its figures do not."""
    d = _timeless(outcome.model_dump(mode="json", exclude={"duration_s"}))
    if not hashes:
        d["artefacts"] = [{k: v for k, v in a.items() if k != "sha256"} for a in d["artefacts"]]
    return d


def _timeless(d: Any) -> Any:
    """Without the keys that measure time (seconds, duration, elapsed), at any depth."""
    if isinstance(d, dict):
        return {k: _timeless(v) for k, v in d.items() if not any(w in str(k) for w in VOLATILE)}
    if isinstance(d, list):
        return [_timeless(v) for v in d]
    return d


def _diff(a: Any, b: Any, where: str = "") -> str | None:
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return f"{where}: keys {sorted(set(a) ^ set(b))} differ"
        return next((d for k in a if (d := _diff(a[k], b[k], f"{where}.{k}"))), None)
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        if len(a) != len(b):
            return f"{where}: {len(a)} vs {len(b)} entries"
        return next((d for i, (x, y) in enumerate(zip(a, b, strict=True)) if (d := _diff(x, y, f"{where}[{i}]"))),
                    None)
    if isinstance(a, float) and isinstance(b, float | int) or isinstance(b, float) and isinstance(a, int):
        if (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=REL_TOL, abs_tol=1e-9):
            return None
        return f"{where}: {a!r} vs {b!r}"
    return None if a == b else f"{where}: {a!r} vs {b!r}"


def same_evidence(a: CheckOutcome, b: CheckOutcome, hashes: bool = True) -> str | None:
    """None when two outcomes carry the same evidence, else where they first differ."""
    return _diff(evidence_of(a, hashes), evidence_of(b, hashes))


def _measurement_key(m: dict) -> str:
    return repr((m["metric"], m["scope"], m["amplitude"]))


# --- running a check on a context that records how it reads the data ------------------------------

class _Recording(DataSource):
    """A DataSource that records every batch size it hands out, and can empty a split."""

    def __init__(self, spec, seed, model, empty: frozenset[str] = frozenset()):
        super().__init__(spec, seed, model)
        self.sizes: list[int] = []
        self.empty = empty

    def stream(self, role: str):
        s = super().stream(role)
        if not getattr(s, "_recorded", False):
            if role in self.empty:
                s.positions = s.positions[:0]
            plain = s.batches

            def batches(batch_size: int | None = None):
                for b in plain(batch_size):
                    self.sizes.append(len(b))
                    yield b

            s.batches, s._recorded = batches, True
        return s


def _with_batch_size(spec: CheckSpec, use_case: UseCase, bs: int) -> tuple[CheckSpec, UseCase]:
    uc = use_case.model_copy(update={"data": use_case.data.model_copy(update={"batch_size": bs})})
    cls = build(spec).__class__
    if "batch_size" in cls.Params.model_fields:
        spec = spec.model_copy(update={"params": {**spec.params, "batch_size": bs}})
    return spec, uc


class _Runner:
    def __init__(self, workdir: Path, seed: int):
        self.workdir, self.seed, self.count = workdir, seed, 0

    def __call__(self, check: Check, use_case: UseCase, model: Classifier,
                 empty: frozenset[str] = frozenset()) -> tuple[CheckOutcome, _Recording]:
        self.count += 1
        data = _Recording(use_case.data, self.seed, use_case.model, empty)
        ctx = Context(use_case=use_case, model=model, data=data, seed=self.seed,
                      workdir=self.workdir / f"run-{self.count}" / check.name)
        return check(ctx), data


class _Component:
    """A model behind the `python` black-box interface: predict(images (B, H, W, C) pixels) -> probabilities."""

    def __init__(self, model: Classifier):
        self.model = model

    def predict(self, images: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return torch.softmax(self.model.forward(self.model.to_input(np.asarray(images, np.float32))).double(),
                                 1).numpy()


class _ChallengeComponent(_Component):
    """The same model behind the welding-challenge interface: UNKNOWN near the boundary, an OOD score (distance
    of the mean grey level from mid-range) and a map (the image itself, scaled to [0, 1])."""

    def load_model(self, config_file=None):
        return None

    def predict(self, input_images: list[np.ndarray], images_meta_informations: list[dict]) -> dict:
        images = np.stack([im[..., None] if im.ndim == 2 else im for im in input_images]).astype(np.float32)
        p = super().predict(images)
        names = list(self.model.spec.class_names)
        lo, hi = self.model.spec.value_range
        scaled = (images - lo) / (hi - lo)
        return {"predictions": ["UNKNOWN" if row.max() < 0.6 else names[int(row.argmax())] for row in p],
                "probabilities": p.tolist(),
                "OOD_scores": (np.abs(scaled.mean(axis=(1, 2, 3)) - 0.5) * 4).tolist(),
                "explainability": [s.mean(axis=-1) for s in scaled]}


def black_box_of(model: Classifier, challenge: bool = False) -> BlackBox:
    """The real black-box class over a model's predictions (no module, no gradients); `challenge`: behind
    the welding-challenge interface."""
    kind = "challenge" if challenge else "python"
    spec = model.spec.model_copy(update={"format": kind, "entry": f"trustcase.testing:{type(model).__name__}"})
    box = BlackBox(spec, (_ChallengeComponent if challenge else _Component)(model))
    return type(model)(box) if hasattr(model, "_inner") else box  # a task's view (a segmenter) of it, kept


# --- the suite -----------------------------------------------------------------------------------

def check_conformance(check: str, params: dict | None = None, *, use_case: UseCase | None = None,
                      model: Classifier | None = None, workdir: Path | None = None, seed: int = 0,
                      batch_sizes: tuple[int, int] = (8, 3), tabular: bool | None = None,
                      properties: tuple[str, ...] | None = None) -> dict[str, str]:
    """Run the conformance suite on one check (a registered name or 'module:Class') with `params`.

    Without `use_case`/`model`, the synthetic image case (or the tabular one, `tabular=True`) is used.
    `properties` restricts the suite (names: deterministic, batching, shards, streams, records, produces,
    black_box, tabular, empty). Returns {property: "ok" | "skipped: ..."}; raises ConformanceError.
    """
    spec = CheckSpec(check=check, params=params or {})
    if use_case is None or model is None:
        use_case, model = synthetic_case([spec.model_dump()], tabular=bool(tabular))
    own = workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="trustcase-conformance-")) if own else Path(workdir)
    run = _Runner(workdir, seed)
    report: dict[str, str] = {}
    problems: list[str] = []
    wanted = set(properties or ("deterministic", "batching", "shards", "streams", "records", "produces",
                                "black_box", "tabular", "empty"))

    def record(name: str, fn: Callable[[], str | None]) -> None:
        if name not in wanted:
            return
        try:
            result = fn()
        except ConformanceError as e:
            problems.append(f"{name}: {e}")
            report[name] = f"FAILED: {e}"
            return
        report[name] = result or "ok"

    try:
        s0, uc0 = _with_batch_size(spec, use_case, batch_sizes[0])
        check0 = build(s0)
        try:
            first, data0 = run(check0, uc0, model)
        except Unsupported as e:  # a check taught a task may find one part of it not applicable: it says why
            if uc0.task == "classification" or not str(e).strip():
                raise
            return {"applies": f"ok (Unsupported on {uc0.task}: {str(e)[:120]})"}

        def deterministic():
            again, _ = run(build(s0), uc0, model)
            if d := same_evidence(first, again):
                raise ConformanceError(f"two runs with seed {seed} differ at {d}")

        def batching():
            s1, uc1 = _with_batch_size(spec, use_case, batch_sizes[1])
            other, _ = run(build(s1), uc1, model)
            if d := same_evidence(first, other, hashes=False):
                raise ConformanceError(f"batch size {batch_sizes[0]} vs {batch_sizes[1]} differ at {d}")

        def shards():
            parts = check0.shards()
            if len(parts) < 2:
                return "skipped: one shard with these params"
            whole = {_measurement_key(m): m for m in evidence_of(first)["measurements"]}
            merged: dict[str, dict] = {}
            for part in parts:
                out, _ = run(part, uc0, model)
                for m in evidence_of(out)["measurements"]:
                    merged[_measurement_key(m)] = m
            if d := _diff(dict(sorted(whole.items())), dict(sorted(merged.items())), "measurements"):
                raise ConformanceError(f"the {len(parts)} shards together differ from the whole check at {d}")
            return None

        def streams():
            limit = max(batch_sizes[0], getattr(check0.params, "batch_size", None) or 0)
            if not data0.sizes:
                return "skipped: the check read no batch"
            if max(data0.sizes) > limit:
                raise ConformanceError(f"a batch of {max(data0.sizes)} items was read (batch size {limit})")
            return None

        def records():
            return _records(check0, first, workdir)

        def produces():
            return _declares(check0, uc0, first)

        def black_box():
            if uc0.task == "detection":
                return "skipped: no black-box interface answers detections (format python answers probabilities)"
            return _refuses_or_runs(run, build(s0), uc0, black_box_of(model), "the black box",
                                    must_refuse=check0.needs_gradients)

        def tabular_model():
            if model.tabular:
                return "skipped: the case is tabular already"
            uc_t, clf_t = synthetic_case([spec.model_dump()], tabular=True)
            try:
                check_t = build(spec)
            except CheckError as e:
                return f"ok (refused at validation: {e})"
            return _refuses_or_runs(run, check_t, uc_t, clf_t, "a tabular model")

        def empty():
            role = getattr(check0.params, "split", None) or "test"
            try:
                out, _ = run(build(s0), uc0, model, frozenset({role}))
            except (UserError, Unsupported) as e:  # a plain ValueError of an empty array is a bug, not a refusal
                if not str(e).strip():
                    raise ConformanceError(f"an empty {role} split raised {type(e).__name__} without a message") \
                        from None
                return f"ok (stops: {type(e).__name__}: {str(e)[:120]})"
            except Exception as e:
                raise ConformanceError(f"an empty {role} split raised {type(e).__name__}: {e}") from None
            return _undefined_when_empty(out)

        record("deterministic", deterministic)
        record("batching", batching)
        record("shards", shards)
        record("streams", streams)
        record("records", records)
        record("produces", produces)
        record("black_box", black_box)
        record("tabular", tabular_model)
        record("empty", empty)
    finally:
        if own:
            shutil.rmtree(workdir, ignore_errors=True)
    if problems:
        raise ConformanceError(f"{check}: " + "; ".join(problems))
    return report


def _records(check: Check, out: CheckOutcome, workdir: Path) -> None:
    if out.check != check.name:
        raise ConformanceError(f"the outcome names check {out.check!r}, not {check.name!r}")
    if out.stage not in set(Stage):
        raise ConformanceError(f"unknown AMLAS stage {out.stage!r}")
    if not out.validity or not all(isinstance(v, str) and v.strip() for v in out.validity):
        raise ConformanceError("no validity conditions: evidence must say when it holds")
    wrong = sorted({m.check for m in out.measurements} - {check.name})
    if wrong:
        raise ConformanceError(f"measurements claim to come from {wrong}")
    for m in out.measurements:
        if m.interval is not None and m.n is None:
            raise ConformanceError(f"{m.metric} has an interval but no n")
    for art in out.artefacts:
        found = [p for p in workdir.glob(f"run-*/{art.path}") if p.is_file()]
        if not found or all(sha256_file(p) != art.sha256 for p in found):
            raise ConformanceError(f"artefact {art.path} is not the file its SHA-256 names")
    return None


def _declares(check: Check, use_case: UseCase, out: CheckOutcome) -> None:
    declared = type(check).produces(check.params, use_case)
    if declared is None:
        raise ConformanceError("declares nothing it measures: implement Check.produces(params, use_case), which "
                               "the preflight judges claims by")
    missed = sorted({(m.metric, m.scope.label()) for m in out.measurements if not any(p.covers(m) for p in declared)})
    if missed:
        raise ConformanceError(f"measures what Check.produces does not declare: {missed[:5]}")
    return None


def _refuses_or_runs(run: _Runner, check: Check, use_case: UseCase, model: Classifier, what: str,
                     must_refuse: bool = False) -> str:
    try:
        out, _ = run(check, use_case, model)
    except Unsupported as e:
        if not str(e).strip():
            raise ConformanceError(f"Unsupported on {what} without a reason") from None
        return f"ok (Unsupported: {str(e)[:120]})"
    except Exception as e:
        raise ConformanceError(f"on {what}: {type(e).__name__}: {str(e)[:300]} (expected a run or Unsupported "
                               "with a reason)") from None
    if must_refuse:
        raise ConformanceError(f"declares needs_gradients but ran on {what}")
    if out.check != check.name:
        raise ConformanceError(f"on {what}, the outcome names check {out.check!r}")
    return "ok (runs)"


def _undefined_when_empty(out: CheckOutcome) -> str:
    empty = [m for m in out.measurements if m.n == 0]
    bad = [m.metric for m in empty if m.value is not None and not math.isnan(m.value)]
    if bad:
        raise ConformanceError(f"figures computed on no item have a value: {sorted(set(bad))[:5]}")
    for m in empty:
        r = Requirement(id="R", text="conformance", metric=m.metric, comparator=">=", threshold=0.5, scope=m.scope)
        v = judge([r], [out])[0]
        if v.verdict is not Verdict.INCONCLUSIVE:
            raise ConformanceError(f"a claim on {m.metric} measured on no item is {v.verdict.value}")
    return f"ok ({len(empty)} figures on no item, each INCONCLUSIVE)"

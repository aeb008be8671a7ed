"""The lab's science side, with no web in it: one use case's model loaded once, its test split indexed (per-item
scalars only, images read back one at a time), uploads decoded defensively, and the registered attribution
methods, perturbations, the ODD monitor and the local-robustness prover run on one image."""

from __future__ import annotations

import base64
import copy
import hashlib
import io
import math
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from trustcase.certification import graph as G
from trustcase.certification.local_robustness import decide
from trustcase.certification.properties import single_thread
from trustcase.data.streaming import DataSource
from trustcase.errors import Unsupported, UserError
from trustcase.explain import attribution as A
from trustcase.explain import imaging
from trustcase.explore.jobs import Job
from trustcase.models.classifier import sha256_file
from trustcase.models.loading import load_classifier
from trustcase.odd import Monitor, MonitorError, SpecificationMonitor
from trustcase.registry import RegistryError
from trustcase.robustness.perturbations import PERTURBATIONS, PerturbationError, get
from trustcase.schemas import UseCase
from trustcase.seeding import item_seeds

MAX_UPLOAD_BYTES = 20 << 20
MAX_UPLOAD_PIXELS = 4096 * 4096  # refused from the header, before any pixel is decoded
EVAL_CHUNK = 16  # model evaluations between two cancellation points of an attribution
PROVE_MAX_SECONDS = 120.0
UPLOADS_KEPT = 32


class LabError(UserError):
    """A request the lab refuses, with the HTTP status and a message that names the problem."""

    def __init__(self, message: str, status: int = 422):
        super().__init__(message)
        self.status = status


@dataclass
class Runtime:
    """What the last assessment of the use case fitted and validated, for the lab."""

    run_id: str
    monitor: Path | None = None  # the fitted ODD monitor file
    clusters: dict[str, int] = field(default_factory=dict)  # item id -> HUDD cluster
    methods: dict[str, dict] = field(default_factory=dict)  # attribution method -> status, reasons, options


@dataclass
class Input:
    pixels: np.ndarray  # (H, W, C) in the model's pixel space
    meta: dict[str, str]
    label: int | None = None
    name: str = ""


class _Watched(A.Network):
    """The network of one job: its forward evaluates in chunks, counting progress and honouring a cancel."""

    def __init__(self, net: A.Network, job: Job | None):
        self.__dict__.update(net.__dict__)
        self.job = job

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = []
        for part in x.split(EVAL_CHUNK):
            if self.job is not None:
                self.job.step(len(part))
            outs.append(super().forward(part))
        return outs[0] if len(outs) == 1 else torch.cat(outs)


class Lab:
    def __init__(self, use_case: UseCase, runtime: Runtime | None = None, role: str = "test"):
        """`runtime`: what the last assessment fitted and validated (monitor, HUDD clusters, methods' ranking)."""
        self.uc = use_case
        self.model = load_classifier(use_case.model)  # once per process
        self.net = A.Network(self.model)
        self.seed = use_case.plan.seed
        self.data = DataSource(use_case.data, self.seed)
        self.role = role if role in self.data.roles else self.data.roles[-1]
        self.runtime = runtime or Runtime("")
        self.clusters = self.runtime.clusters
        self.monitor, self.monitor_note = self._monitor(self.runtime.monitor)
        self._local = threading.local()
        self._index: list[dict] | None = None
        self._index_lock = threading.Lock()
        self._uploads: OrderedDict[str, Input] = OrderedDict()
        self._uploads_lock = threading.Lock()
        self._shared = threading.Lock()  # the shared model: hooks (monitor features, layer probes) are not re-entrant
        self._layers: list[dict] | None = None

    # --- what the lab offers --------------------------------------------------------------------

    @property
    def classes(self) -> list[str]:
        return list(self.uc.model.class_names)

    def _monitor(self, path: Path | None) -> tuple[Monitor | None, str]:
        if self.model.tabular:
            return None, "no ODD monitor for tabular inputs in the lab"
        note = ""
        if path is not None:
            try:
                return Monitor.load(path, self.model), "the monitor fitted by the last assessment"
            except MonitorError as e:
                note = f"the last assessment's monitor does not fit ({e}); "
        if self.uc.odd is None or not self.uc.odd.descriptors:
            return None, note + "the use case declares no ODD descriptor"
        spec = SpecificationMonitor.from_odd(self.uc.odd.descriptors, self.uc.model.value_range)
        sha = sha256_file(Path(self.uc.model.path)) if Path(self.uc.model.path).is_file() else ""
        return (Monitor(spec, None, sha, self.uc.model, model=self.model),
                note + "the specification monitor of the use case's ODD (no fitted monitor found)")

    def methods(self) -> list[dict]:
        out = []
        for name in A.METHODS:
            try:
                cls = A.METHODS[name]
            except Exception as e:  # noqa: BLE001  (a partner's broken entry point is listed, not fatal)
                out.append({"name": name, "available": False, "why": f"{type(e).__name__}: {e}", "options": []})
                continue
            ok = self.net.differentiable or not cls.needs_gradients
            assessed = self.runtime.methods.get(name, {})
            fields = _fields(cls.Options)
            for f in fields:  # the options the last assessment validated the method with, as defaults
                f["default"] = assessed.get("options", {}).get(f["name"], f["default"])
            out.append({"name": name, "available": ok, "why": "" if ok else "needs gradients; the model is a black box",
                        "options": fields, "doc": (cls.__doc__ or "").strip().split("\n")[0],
                        "assessment": {k: v for k, v in assessed.items() if k != "options"} or None})
        return out

    def perturbations(self) -> list[dict]:
        out = []
        for name in PERTURBATIONS:
            try:
                cls = PERTURBATIONS[name]
            except Exception:  # noqa: BLE001
                continue
            lo, hi = cls.domain
            grid = [float(g) for g in cls.grid]
            top = max(grid) if grid else 1.0
            out.append({"name": name, "unit": cls.unit, "min": lo, "max": min(hi, top) if math.isfinite(hi) else top,
                        "step": 1 if cls.integer else top / 50, "integer": cls.integer,
                        "options": _fields(cls.Options), "doc": (cls.__doc__ or "").strip().split("\n")[0]})
        return out

    def layers(self) -> list[dict]:
        """Layers whose channels (and units) can be a target: every hookable leaf layer of a differentiable model,
        with the shape of its activation."""
        if self._layers is None:
            out = []
            probe = torch.zeros(1, *self.model.spec.input_shape)
            for name, layer in (self.net.layers() if self.net.differentiable else {}).items():
                try:
                    with self._shared:
                        shape = tuple(self.net.activations(layer, probe).shape[1:])
                except Exception:  # noqa: BLE001  (a layer that cannot be read alone is simply not offered)
                    continue
                out.append({"name": name, "kind": A.Network.kind(layer), "channels": int(shape[0]) if shape else 1,
                            "positions": list(shape[1:])})
            self._layers = out
        return self._layers

    # --- the test split -------------------------------------------------------------------------

    def index(self) -> list[dict]:
        """One row of scalars per readable item of the split, computed once (streamed in batches)."""
        with self._index_lock:
            if self._index is None:
                rows = []
                stream = self.data.stream(self.role)
                for batch in stream.batches():
                    with self._shared:
                        logits = self.model.logits(batch.images, batch.ids)
                        d = None if self.monitor is None else self.monitor.evaluate(batch.images, batch.meta)
                    probs = torch.softmax(torch.from_numpy(logits), 1).numpy()
                    states = [None if d is None else d.record(k)["state"] for k in range(len(batch))]
                    for k in range(len(batch)):
                        pred = int(probs[k].argmax())
                        rows.append({"item": len(rows), "position": int(batch.index[k]), "id": batch.ids[k],
                                     "label": int(batch.labels[k]), "prediction": pred,
                                     "confidence": round(float(probs[k, pred]), 4),
                                     "correct": pred == int(batch.labels[k]),
                                     "meta": {m: v[k] for m, v in batch.meta.items()},
                                     "decision": states[k], "cluster": self.clusters.get(batch.ids[k])})
                self._index = rows
            return self._index

    def items(self, cls: str | None = None, correct: bool | None = None, subgroup: dict[str, str] | None = None,
              decision: str | None = None, cluster: int | None = None) -> list[dict]:
        rows = self.index()
        if cls is not None:
            rows = [r for r in rows if r["label"] == self.class_index(cls)]
        if correct is not None:
            rows = [r for r in rows if r["correct"] == correct]
        for k, v in (subgroup or {}).items():
            rows = [r for r in rows if r["meta"].get(k) == v]
        if decision is not None:
            rows = [r for r in rows if r["decision"] == decision]
        if cluster is not None:
            rows = [r for r in rows if r["cluster"] == cluster]
        return rows

    def subgroups(self) -> dict[str, list[str]]:
        values: dict[str, set[str]] = {}
        for r in self.index():
            for k, v in r["meta"].items():
                values.setdefault(k, set()).add(v)
        return {k: sorted(v) for k, v in values.items()}

    def class_index(self, name: str) -> int:
        if name in self.classes:
            return self.classes.index(name)
        if name.isdigit() and int(name) < len(self.classes):
            return int(name)
        raise LabError(f"unknown class {name!r}; classes: {self.classes}")

    # --- inputs ---------------------------------------------------------------------------------

    def input(self, src: str) -> Input:
        """'test:<item>' (an item of the split index) or 'upload:<id>'."""
        kind, _, key = src.partition(":")
        if kind == "test":
            rows = self.index()
            if not key.isdigit() or int(key) >= len(rows):
                raise LabError(f"no test item {key!r} (the {self.role} split has {len(rows)} readable items)", 404)
            row = rows[int(key)]
            item = self.data.stream(self.role).split[row["position"]]
            x = np.asarray(item.image)
            return Input(x[..., None] if x.ndim == 2 else x, dict(item.meta), int(item.label), row["id"])
        if kind == "upload":
            with self._uploads_lock:
                if key not in self._uploads:
                    raise LabError(f"no uploaded image {key!r} (uploads are kept in memory, the last "
                                   f"{UPLOADS_KEPT} only)", 404)
                return self._uploads[key]
        raise LabError(f"input {src!r}: expected test:<item> or upload:<id>", 400)

    def upload(self, data: bytes, name: str = "", resize: bool = False) -> str:
        x = self.decode(data, resize)
        key = hashlib.sha256(data).hexdigest()[:16]  # the same file twice is one upload
        with self._uploads_lock:
            self._uploads[key] = Input(x, {}, None, name or "upload")
            self._uploads.move_to_end(key)
            while len(self._uploads) > UPLOADS_KEPT:
                self._uploads.popitem(last=False)
        return key

    def decode(self, data: bytes, resize: bool = False) -> np.ndarray:
        """An uploaded file as one input in pixel space, or a LabError that says what is wrong with it."""
        from PIL import Image, UnidentifiedImageError

        if self.model.tabular:
            raise LabError("the model takes feature vectors, not images", 422)
        if len(data) > MAX_UPLOAD_BYTES:
            raise LabError(f"file of {len(data)} bytes is larger than the limit of {MAX_UPLOAD_BYTES} bytes", 413)
        if not data:
            raise LabError("empty upload: send the bytes of one image file", 400)
        c, h, w = self.model.spec.input_shape
        try:
            im = Image.open(io.BytesIO(data))  # reads the header only
        except (UnidentifiedImageError, OSError):
            raise LabError("not an image: upload a PNG, JPEG, BMP or TIFF file", 415) from None
        with im:
            if im.width * im.height > MAX_UPLOAD_PIXELS:
                raise LabError(f"image of {im.width}x{im.height} px ({im.width * im.height} pixels) exceeds the "
                               f"limit of {MAX_UPLOAD_PIXELS} pixels", 413)
            bands = [b for b in im.getbands() if b != "A"]
            channels = 3 if im.mode == "P" else len(bands)
            if channels != c:
                raise LabError(f"image has {channels} channel(s) ({im.mode}), the model takes {c} "
                               f"({'grey' if c == 1 else 'RGB'})", 422)
            if (im.width, im.height) != (w, h) and not resize:
                raise LabError(f"image is {im.width}x{im.height} px, the model takes {w}x{h}: resample it, or "
                               "tick 'resize' to resample with area averaging", 422)
            try:
                x = np.asarray(im.convert("L" if c == 1 else "RGB"), dtype=np.float32)
            except (OSError, ValueError) as e:
                raise LabError(f"the image cannot be decoded: {e}", 415) from None
        if x.shape[:2] != (h, w):
            import cv2

            x = cv2.resize(x, (w, h), interpolation=cv2.INTER_AREA)
        lo, hi = self.uc.model.value_range
        x = lo + (hi - lo) * x / 255.0
        return x[..., None] if x.ndim == 2 else x

    # --- one image through the model -------------------------------------------------------------

    def predict(self, x: np.ndarray) -> list[float]:
        with self._shared:
            logits = self.model.logits(x[None].astype(np.float32))
        return [round(float(p), 6) for p in torch.softmax(torch.from_numpy(logits), 1)[0]]

    def decide(self, x: np.ndarray, meta: dict[str, str]) -> dict | None:
        if self.monitor is None:
            return None
        with self._shared:
            d = self.monitor.evaluate(x[None].astype(np.float32), {k: [v] for k, v in meta.items()})
        return d.record(0)

    def look(self, inp: Input) -> dict:
        """Prediction with probabilities and the monitor's decision, for one input."""
        probs = self.predict(inp.pixels)
        pred = int(np.argmax(probs))
        return {"prediction": self.classes[pred], "probabilities": dict(zip(self.classes, probs)),
                "label": None if inp.label is None else self.classes[inp.label], "name": inp.name,
                "decision": self.decide(inp.pixels, inp.meta)}

    def picture(self, x: np.ndarray) -> bytes:
        return png(imaging.to_uint8(x[None], self.uc.model.value_range)[0])

    # --- attribution ----------------------------------------------------------------------------

    def attribution_request(self, method: str, options: dict | None, target: dict,
                            inp: Input | None = None) -> tuple[A.Options, dict]:
        """Everything about an attribution request checked before any work starts (4xx otherwise). The default
        target is the class predicted for `inp`."""
        try:  # options checked against the model's input shape too (an occlusion window larger than the image)
            opts = A.options_for(method, options, self.uc.model.input_shape)
        except RegistryError as e:
            raise LabError(str(e), 404) from None
        except UserError as e:
            raise LabError(str(e)) from None
        t = self.target(target, inp)
        try:
            A.make(self._aimed(self.net, t), method, opts)  # e.g. an unknown Grad-CAM layer, gradients of a black box
        except Unsupported as e:
            raise LabError(str(e)) from None
        except UserError as e:
            raise LabError(str(e), 404 if "does not exist" in str(e) else 422) from None
        return opts, t

    def target(self, target: dict, inp: Input | None = None) -> dict:
        """A class (name or index; default: the class predicted for `inp`) or a `Neuron`: a channel of a named layer
        (its mean over positions), or one unit at `position`. Checked against the model; 4xx otherwise."""
        kind = target.get("kind", "class")
        if kind == "class":
            name = target.get("class")
            if name is None:
                name = str(int(np.argmax(self.predict(inp.pixels)))) if inp is not None else "0"
            return {"kind": "class", "index": self.class_index(str(name))}
        if kind != "channel":
            raise LabError(f"target kind {kind!r}: expected class or channel")
        if not self.layers():
            raise LabError("channel targets need the model's internals (a differentiable model with layers)")
        ch, pos = target.get("channel"), target.get("position")
        if not isinstance(ch, int):
            raise LabError(f"channel {ch!r}: expected a whole number")
        neuron = A.Neuron(str(target.get("layer")), ch, None if pos is None else tuple(pos))
        try:
            with self._shared:
                self.net.focus(neuron)
        except (ValueError, TypeError) as e:  # an unknown layer is not found (404); a bad channel is invalid
            raise LabError(str(e), 404 if str(e).startswith("layer ") else 422) from None
        return {"kind": "channel", "layer": neuron.layer, "channel": ch, "position": pos, "index": 0}

    @staticmethod
    def neuron(target: dict) -> A.Neuron:
        pos = target.get("position")
        return A.Neuron(target["layer"], target["channel"], None if pos is None else tuple(pos))

    def _own(self) -> A.Network:
        """This job thread's own copy of the network: captum's hooks never see another request's forward, and
        copies are bounded by the job pool's size."""
        net = getattr(self._local, "net", None)
        if net is None:
            net = self.net
            if self.net.module is not None:
                net = A.Network(self.model, copy.deepcopy(self.net.module))
                net.note = self.net.note
            self._local.net = net
        return net

    @staticmethod
    def _aimed(net: A.Network, target: dict) -> A.Network:
        return net.focus(Lab.neuron(target)) if target["kind"] == "channel" else net

    @staticmethod
    def expected_evaluations(opts: A.Options) -> float | None:
        """Model evaluations a method will make, from its options when it says (progress), else unknown."""
        d = opts.model_dump()
        for key, extra in (("n_steps", 2), ("samples", 0), ("masks", 0)):
            if isinstance(d.get(key), int):
                return float(d[key] + extra)
        return None

    def baseline(self, kind: str) -> float | torch.Tensor:
        if kind == "mean":
            return 0.0  # the normalisation's mean
        if kind not in ("black", "white"):
            raise LabError(f"baseline {kind!r}: expected mean, black or white")
        lo, hi = self.uc.model.value_range
        c, h, w = self.uc.model.input_shape
        return self.model.to_input(np.full((1, h, w, c), lo if kind == "black" else hi, np.float32))

    def attribute(self, job: Job | None, inp: Input, method: str, opts: A.Options, target: dict,
                  baseline: str = "mean") -> dict:
        t0 = time.perf_counter()
        net = _Watched(self._aimed(self._own(), target), job)
        m = A.make(net, method, opts)
        x = self.model.to_input(inp.pixels[None].astype(np.float32))
        a = A.attribute(net, m, x, target["index"], self.baseline(baseline), self.seed)
        heat = a.heatmap()
        pic = imaging.overlay(inp.pixels[None], heat, self.uc.model.value_range)[0]
        out = {"method": method, "options": opts.model_dump(), "target": target, "baseline": baseline,
               "overlay": data_url(png(pic)), "positive_fraction": round(float((heat > 0).mean()), 4),
               "seconds": round(time.perf_counter() - t0, 4)}
        if a.delta is not None:
            out["convergence_delta"] = float(a.delta.abs().max())
        return out

    # --- class and channel visualisation -----------------------------------------------------------

    def visualise(self, job: Job | None, target: dict, steps: int) -> dict:
        """An input that maximises the class or channel (`explain.visualisation.visualise`); one model evaluation
        per ascent step, each a progress step and a cancellation point."""
        from trustcase.explain.visualisation import visualise

        if not self.net.differentiable:
            raise Unsupported("visualisation climbs the model's gradients; the model is a black box")
        t0 = time.perf_counter()
        net = _Watched(self._own(), job)
        image = visualise(net, [self.neuron(target) if target["kind"] == "channel" else target["index"]],
                          steps=steps, seed=self.seed)[0]
        return {"image": data_url(self.picture(image)), "target": target, "steps": steps,
                "seconds": round(time.perf_counter() - t0, 3)}

    # --- perturbation ---------------------------------------------------------------------------

    def perturb(self, inp: Input, name: str, amplitude: float, options: dict | None = None) -> tuple[np.ndarray, dict]:
        try:
            p = get(name, self.uc.model.value_range, **(options or {}))
            a = p.validate(amplitude)
            p.check_shape(inp.pixels.shape, [a])
            x = p.apply(inp.pixels[None].astype(np.float32), a, item_seeds(self.seed, "lab", [inp.name], name))[0]
        except PerturbationError as e:
            raise LabError(str(e), 404 if "unknown perturbation" in str(e) else 422) from None
        look = self.look(Input(x, inp.meta, inp.label, inp.name))
        return x, {"perturbation": name, "amplitude": a, "unit": p.unit, **look}

    # --- prove it -------------------------------------------------------------------------------

    def prove_request(self, radius: float, timeout: float) -> G.Graph:
        if not (isinstance(radius, int | float) and math.isfinite(radius) and 0 < radius <= 1):
            raise LabError(f"radius {radius!r}: expected 0 < r <= 1 (L-inf, input scaled to [0, 1])")
        if not (isinstance(timeout, int | float) and 0 < timeout <= PROVE_MAX_SECONDS):
            raise LabError(f"time budget {timeout!r} s: expected 0 < t <= {PROVE_MAX_SECONDS:g}")
        if self.model.module is None:
            raise LabError("prove it needs the model's weights; the model is a black box")
        try:
            return G.from_model(self.model.module, list(self.model.spec.input_shape))
        except G.GraphError as e:
            raise Unsupported(f"local robustness cannot be proved on this model: {e}") from None

    def prove(self, job: Job | None, inp: Input, radius: float, timeout: float) -> dict:
        """verified / falsified / unknown for the L-inf ball of `radius` around the input, within `timeout`:
        the `local_robustness` check's own decision (`local_robustness.decide`) on the model's layer graph."""
        graph = self.prove_request(radius, timeout)
        lo, hi = self.uc.model.value_range
        x = inp.pixels.astype(np.float64)
        pred = int(np.argmax(self.predict(inp.pixels)))
        module = self._own().module

        def forward(z: torch.Tensor) -> torch.Tensor:  # every call is a cancellation point
            if job is not None:
                job.step(0)
            return module(z)

        eps = radius * (hi - lo)
        box = [self.model.to_input(v[None].astype(np.float32)).double()
               for v in (x, np.clip(x - eps, lo, hi), np.clip(x + eps, lo, hi))]
        t0 = time.perf_counter()
        if job is not None:
            job.total = timeout
            ticker = threading.Thread(target=_tick, args=(job, t0, timeout), daemon=True)
            ticker.start()
        with single_thread():
            out = decide(graph, forward, *box, pred, timeout, self.seed)
        verdict = out["verdict"]
        return {"verdict": verdict, "radius": radius, "prediction": self.classes[pred], "timeout": timeout,
                "seconds": round(time.perf_counter() - t0, 3), "method": out.get("method") or out.get("reason", ""),
                "meaning": {"verified": "no input of the ball changes the prediction (proved)",
                            "falsified": "an input of the ball changes the prediction (counterexample re-checked)",
                            "unknown": "neither proved nor falsified within the time budget"}[verdict]}


def _tick(job: Job, t0: float, timeout: float) -> None:
    while job.state in ("queued", "running") and not job.cancelled:
        job.done = min(time.perf_counter() - t0, timeout)
        time.sleep(0.1)


def _fields(options: type) -> list[dict]:
    """An Options model as form fields: name, type, default, bounds, choices."""
    out = []
    for name, f in options.model_fields.items():
        schema = options.model_json_schema()["properties"].get(name, {})
        choices = schema.get("enum")
        kind = schema.get("type") or ("string" if choices else "any")
        if "anyOf" in schema:
            kinds = [s.get("type") for s in schema["anyOf"] if s.get("type") != "null"]
            kind = kinds[0] if kinds else "string"
        out.append({"name": name, "type": kind, "default": f.default, "choices": choices,
                    "min": schema.get("minimum", schema.get("exclusiveMinimum")),
                    "max": schema.get("maximum", schema.get("exclusiveMaximum")),
                    "description": f.description or ""})
    return out


def png(image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()

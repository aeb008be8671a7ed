"""Root causes of the model's errors, found by clustering internal relevance (HUDD, Fahmy et al. ICSE 2022).

For every error of a split, the relevance of each neuron of a few internal layers for what went wrong is
computed. What an error is and what its relevance explains is the task's (`errors_of`, one class per task):

- a classifier's error is a misclassified item, explained for its predicted class (LRP through captum when every
  layer of the model has an LRP rule, otherwise LayerGradCam or Layer Integrated Gradients, per `relevance`);
- a detector's is an image with at least one true box missed at the operating threshold (COCO's greedy matching at
  IoU 0.5, as the recall counts it), explained by the Grad-CAM of its missed boxes' score: D-RISE's similarity, the
  best IoU x score among the detections of the box's class (its class score where a detection overlaps it, and the
  region of the box otherwise: a missed box has no detection at IoU 0.5 above the threshold to explain). Several
  missed boxes: the sum of their scores (Grad-CAM is linear in the gradient: the sum of their maps). As in HUDD's
  key-point detection case, the relevance of the output that is wrong;
- a segmenter's is a defective image whose defect the image-level rule misses (fewer than `defect_pixels` defect
  pixels predicted), or, with `min_iou`, whose defect IoU is below it; explained by the Grad-CAM of the logits of
  each true defect pixel's class summed inside the true defect region (Seg-Grad-CAM of the true region).

Detectors and segmenters are hooked when eager and tapped from their graph when TorchScript
(`anatomy.convolution_taps`: layers conv1, conv2, ... in execution order). Per layer, the maps are
reduced to at most `max_features` values (spatial average pooling, channels kept while they fit),
scaled to unit norm (the pattern matters, not the magnitude), and clustered:

- pairwise Euclidean distances (scipy `pdist`, vectorised C, condensed: n(n-1)/2 doubles),
- Ward agglomerative clustering (scipy, nearest-neighbour chain: O(n^2) time),
- the number of clusters at the knee (kneed) of the within-cluster sum of squares vs k,
- the layer whose clusters are most compact: smallest size-weighted root-mean-square intra-cluster
  distance relative to that of all errors (scale-free, so layers of different size compare).

Each cluster is described by its members, size, errors (true -> predicted class; missed classes and box sizes;
missed defect classes and sizes, sizes by COCO's areas), representative items (closest to the cluster centre),
and the ODD descriptors of its members against the whole split: image
descriptors (brightness, contrast, sharpness) by a standardised median shift and a Mann-Whitney test,
categorical metadata by its share and a binomial test; significant ones make the text summary
("dark, blurred mono cells"). HUDD's retraining step: items of an improvement split are assigned to the
cluster of their nearest error, and the closest ones, balanced across clusters, form the "unsafe set" to label
and retrain on. A classifier's pool item is explained for its prediction (no label needed); a detector's for its
true boxes and a segmenter's for its true defect region (the pool is annotated: its boxes or masks are what the
retraining learns), so an item without a true box or defect belongs to no cluster.

    a = analyse(model, net, test_batches, layers, relevance="auto", max_features=2048, max_errors=8000,
                k_max=20, k=None, seed=0)                # errors, their clusters, the chosen layer, each reach
    a.clusters("cells", representatives=6)               # members, errors, representatives, ODD description
    pool = a.assign(model, pool_batches)                 # every pool item to its nearest error's cluster
    positions, copies = pool.select(a.k, budget=100, seed=0)  # the unsafe set

One pipeline for the `root_causes` check and `trustcase improve --method hudd`.
"""

from __future__ import annotations

import copy
import warnings
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
from captum.attr import LayerGradCam, LayerIntegratedGradients, LayerLRP
from captum.attr._core.lrp import SUPPORTED_LAYERS_WITH_RULES, SUPPORTED_NON_LINEAR_LAYERS
from captum.attr._utils.lrp_rules import EpsilonRule
from kneed import KneeLocator
from scipy import stats
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.spatial.distance import cdist, pdist
from torch import nn

from trustcase.errors import CheckError, Unsupported
from trustcase.explain import attribution as A
from trustcase.explain.methods.detection import activations, similarity
from trustcase.models import anatomy
from trustcase.models.classifier import Classifier
from trustcase.odd.descriptors import DESCRIPTORS, Views
from trustcase.robustness.detection_attacks import found_boxes
from trustcase.tasks.detection import Detector
from trustcase.tasks.segmentation import Segmenter
from trustcase.tasks.segmentation_metrics import image_decisions

WORDS = {"brightness": ("dark", "bright"), "contrast": ("low-contrast", "high-contrast"),
         "sharpness": ("blurred", "sharp")}


# --- relevance at internal layers ----------------------------------------------------------------

def lrp_ready(module: nn.Module | None) -> bool:
    """Whether captum's LRP has a rule for every leaf layer (Flatten is given the epsilon rule: exact for a reshape)."""
    if module is None or isinstance(module, torch.jit.ScriptModule):
        return False
    leaves = [m for m in module.modules() if not list(m.children())]
    ok = (*SUPPORTED_LAYERS_WITH_RULES, *SUPPORTED_NON_LINEAR_LAYERS, nn.Flatten)
    return all(type(m) in ok for m in leaves)


def score_layers(net: A.Network, probe: torch.Tensor) -> list[str]:
    """The layers a task's score can be explained at: the Conv2d layers of an eager model, the convolutions of a
    TorchScript one tapped from its graph (conv1, conv2, ... in execution order)."""
    if net.layers():
        return net.conv_layers()
    run = anatomy.convolution_taps(net.module) if isinstance(net.module, torch.jit.ScriptModule) else None
    if run is None:
        return []
    with torch.no_grad():
        return [f"conv{i + 1}" for i in range(len(run(probe)[1]))]


class Relevance:
    """Internal-layer relevance for a batch, reduced to comparable feature vectors (one per layer). With `score`
    (a detector's or segmenter's `score(output, target) -> (B,)`), the Grad-CAM of that score at each layer."""

    def __init__(self, net: A.Network, layers: list[str], method: str, max_features: int, ig_steps: int = 16,
                 score=None, probe: torch.Tensor | None = None):
        if not net.differentiable:
            raise Unsupported("root-cause clustering needs internal relevance; the model is a black box")
        self.score = score
        if score is not None:
            if method not in ("auto", "grad_cam"):
                raise CheckError(f"root_causes: relevance {method!r} explains a class; the errors of a detector or "
                                 "a segmenter are explained by grad_cam (of the missed box's or region's score)")
            known = score_layers(net, probe)
            for name in layers:
                if name not in known:
                    raise CheckError(f"root_causes: layer {name!r} does not exist; layers: {', '.join(known)}")
            self.layers = dict.fromkeys(layers)
            self.net, self.method, self.max_features, self.ig_steps = net, "grad_cam", max_features, ig_steps
            return
        known = net.layers()
        for name in layers:
            if name not in known:
                raise CheckError(f"root_causes: layer {name!r} does not exist; layers: {net.describe()}")
        if method == "auto":
            method = "lrp" if lrp_ready(net.module) else "grad_cam"
        if method == "lrp":
            if not lrp_ready(net.module):
                raise Unsupported(f"LRP needs a rule for every layer; the model has {net.describe()}")
            self.module = copy.deepcopy(net.module)  # LRP attaches rules to layers: keep the caller's model clean
            mods = dict(self.module.named_modules())
            self.layers = {n: mods[n] for n in layers}
            bad = [n for n, m in self.layers.items() if type(m) not in SUPPORTED_LAYERS_WITH_RULES]
            if bad:
                raise CheckError(f"root_causes: LRP relevance exists for layers with a rule (conv, linear, pooling, "
                                 f"batch norm), not for {bad}")
        else:
            self.layers = {n: known[n] for n in layers}
        self.net, self.method, self.max_features, self.ig_steps = net, method, max_features, ig_steps

    def raw(self, x: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.score is not None:
            return self._score_cam(x, target)
        mods = list(self.layers.values())
        with torch.random.fork_rng(devices=[]), torch.enable_grad(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*did not already require gradients")
            torch.manual_seed(0)
            if self.method == "lrp":
                for m in self.module.modules():  # captum removes rules after each call
                    if isinstance(m, nn.Flatten):
                        m.rule = EpsilonRule()
                out = LayerLRP(self.module, mods).attribute(x, target=target)
            elif self.method == "integrated_gradients":
                out = LayerIntegratedGradients(self.net.forward, mods).attribute(
                    x, target=target, n_steps=self.ig_steps, internal_batch_size=max(len(x), 1) * self.ig_steps)
            else:
                out = [LayerGradCam(self.net.forward, m).attribute(x, target=target) for m in mods]
        out = out if isinstance(out, list | tuple) else [out]
        return {n: r.detach() for n, r in zip(self.layers, out, strict=True)}

    def _score_cam(self, x: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        """Grad-CAM of each item's score at each layer, signed as captum's LayerGradCam: (B, 1, h, w) per layer
        (eval mode: an item's score depends on its input alone, so one backward pass of the sum serves the batch)."""
        names, acts, score = activations(self.net, x, target, None, self.score)
        grads = torch.autograd.grad(score.sum(), acts, allow_unused=True)
        out = {}
        for n in self.layers:
            if n not in names:
                raise CheckError(f"root_causes: layer {n!r} did not run for this input; layers that ran: {names}")
            a, g = acts[names.index(n)].detach(), grads[names.index(n)]
            g = torch.zeros_like(a) if g is None else g  # the score does not depend on this layer: no relevance
            out[n] = (g.mean(dim=(2, 3), keepdim=True) * a).sum(dim=1, keepdim=True)
        return out

    def reduce(self, r: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) -> (B, F <= max_features): average-pool space, then sum channels if still too big."""
        if r.ndim == 4:
            b, c, h, w = r.shape
            if c > self.max_features:
                r, c = r.sum(dim=1, keepdim=True), 1
            side = max(1, int(np.sqrt(self.max_features / c)))
            if side < h or side < w:
                r = nn.functional.adaptive_avg_pool2d(r, (min(side, h), min(side, w)))
        return r.reshape(len(r), -1)

    def features(self, x: torch.Tensor, target: torch.Tensor) -> dict[str, np.ndarray]:
        out = {}
        for name, r in self.raw(x, target).items():
            f = self.reduce(r)
            norm = f.norm(dim=1, keepdim=True)
            out[name] = (f / torch.where(norm > 0, norm, torch.ones_like(norm))).float().numpy()
        return out


# --- what an error is, per task --------------------------------------------------------------------

COCO_AREAS = ((32 ** 2, "small"), (96 ** 2, "medium"))  # COCO's object sizes, in pixels of the model's input


def size_word(area: float) -> str:
    return next((w for limit, w in COCO_AREAS if area < limit), "large")


@dataclass
class Explained:
    """What a batch holds to explain: the rows (positions in the batch), each row's relevance target and
    description, and per item of the batch what it got right out of how many (classes, boxes, defects)."""

    rows: np.ndarray
    target: torch.Tensor  # per row: class index; missed or true boxes (M, 5), class -1 padding; region weights
    kind: list[str]  # per row, e.g. "inclusion -> patches", "missed inclusion", "missed defect"
    size: list[str]  # per row: "" or e.g. "small boxes" (COCO's areas)
    right: np.ndarray
    total: np.ndarray


class ClassErrors:
    """A classifier's error: a misclassified item, explained for its predicted class (any item: its prediction)."""

    figure, score, labelled_by_class = "accuracy", None, True

    def __init__(self, model: Classifier):
        self.model, self.names = model, model.spec.class_names

    def layers(self, net: A.Network) -> list[str]:
        return net.conv_layers()

    def read(self, batch, errors: bool = True) -> Explained:
        pred = self.model.logits(batch.images, batch.ids).argmax(axis=1)
        right = pred == batch.labels
        rows = np.flatnonzero(~right) if errors else np.arange(len(batch))
        return Explained(rows, torch.as_tensor(pred[rows]),
                         [f"{self.names[batch.labels[i]]} -> {self.names[pred[i]]}" for i in rows], [""] * len(rows),
                         right.astype(np.int64), np.ones(len(batch), np.int64))


class DetectionErrors:
    """A detector's error: an image with a true box missed at the operating threshold (`found_boxes`, the recall's
    matching), explained for its missed boxes; any annotated image: for its true boxes."""

    figure, labelled_by_class = "recall", False

    def __init__(self, model: Detector):
        self.model, self.names, self.threshold = model, model.spec.class_names, model.spec.score_threshold

    def layers(self, net: A.Network) -> list[str]:
        return score_layers(net, torch.zeros(1, *self.model.spec.input_shape))

    @staticmethod
    def score(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The sum over an item's boxes (N, M, 5; class -1 pads) of D-RISE's similarity: (N,) (0 without detections)."""
        zero = out.sum(dim=(1, 2)) * 0  # in the graph, whatever D
        return zero if out.shape[1] == 0 else sum((similarity(out, target[:, m]) for m in range(target.shape[1])), zero)

    def read(self, batch, errors: bool = True) -> Explained:
        dets = self.model.detect(batch.images, batch.ids)
        found = [found_boxes(d, g, self.threshold) for d, g in zip(dets, batch.labels, strict=True)]
        boxes = [g[~f] if errors else g for g, f in zip(batch.labels, found, strict=True)]
        rows = np.flatnonzero([len(b) > 0 for b in boxes])
        target = torch.full((len(rows), max([len(boxes[i]) for i in rows], default=0), 5), -1.0)
        for j, i in enumerate(rows):
            target[j, :len(boxes[i])] = torch.as_tensor(boxes[i], dtype=torch.float32)
        kind = [("missed " if errors else "") + ", ".join(self.names[c] for c in sorted({int(k) for k in
                                                                                       boxes[i][:, 4]})) for i in rows]
        size = [", ".join(dict.fromkeys(size_word((b[2] - b[0]) * (b[3] - b[1])) for b in boxes[i])) + " boxes"
                for i in rows]
        return Explained(rows, target, kind, size, np.array([f.sum() for f in found], np.int64),
                         np.array([len(f) for f in found], np.int64))


class SegmentationErrors:
    """A segmenter's error: a defective image whose defect the image-level rule misses (or marked with a defect IoU
    below `min_iou`), explained for its true defect region; any defective image: for its true defect region."""

    figure, labelled_by_class = "recall", False

    def __init__(self, model: Segmenter, min_iou: float = 0.0):
        self.model, self.names, self.min_iou = model, model.spec.class_names, min_iou
        self.rule = model.spec.defect_pixels

    def layers(self, net: A.Network) -> list[str]:
        return score_layers(net, torch.zeros(1, *self.model.spec.input_shape))

    @staticmethod
    def score(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The logits of each true defect pixel's class, summed over the true defect region: (N,)."""
        return (out * target).sum(dim=(1, 2, 3))

    def read(self, batch, errors: bool = True) -> Explained:
        classes = self.model.segment(batch.images, batch.ids)
        pred = classes > 0
        true = np.stack([np.asarray(m) for m in batch.labels])
        defect = (true > 0).reshape(len(true), -1)
        p = pred.reshape(len(pred), -1)
        union = (p | defect).sum(1)
        iou = np.where(union > 0, (p & defect).sum(1) / np.maximum(union, 1), 1.0)
        decided = image_decisions(classes, self.rule)
        defective = defect.any(1)
        found = decided & (iou >= self.min_iou)
        rows = np.flatnonzero(defective & ~found if errors else defective)
        k = len(self.names)
        target = torch.from_numpy(np.stack([true[rows] == c for c in range(k)], 1).astype(np.float32))
        target[:, 0] = 0  # the background is no defect
        main = [int(np.bincount(true[i][true[i] > 0], minlength=k).argmax()) for i in rows]
        kind = [("" if not errors else "missed " if not decided[i] else "poorly marked ") + self.names[c]
                for i, c in zip(rows, main, strict=True)]
        size = [f"{size_word(defect[i].sum())} defects" for i in rows]
        return Explained(rows, target, kind, size, (defective & found).astype(np.int64), defective.astype(np.int64))


def errors_of(model: Classifier, min_iou: float = 0.0):
    """The task's reading of errors, by the model's contract (`tasks.task_of` loads a detector as a `Detector`)."""
    if isinstance(model, Detector):
        return DetectionErrors(model)
    if isinstance(model, Segmenter):
        return SegmentationErrors(model, min_iou)
    return ClassErrors(model)


@dataclass
class Errors:
    """The errors of a split (a seeded uniform sample beyond `max_errors`, so memory is bounded) with their
    relevance features per layer and descriptions, and the ODD descriptor values of every item of the split (a
    cluster is described against the whole split)."""

    features: dict[str, np.ndarray]
    index: list[int]  # position in the split's source
    position: list[int]  # position in the stream
    ids: list[str]
    kind: list[str]
    size: list[str]
    seen: int  # errors met, before sampling
    items: int
    values: dict[str, np.ndarray]
    categories: dict[str, np.ndarray]


def collect_errors(reader, rel: Relevance, batches: Iterable, image_descriptors: list[str],
                   meta_descriptors: list[str], value_range: tuple[float, float], max_errors: int,
                   seed: int) -> Errors:
    """Stream a split once: the task's errors, their relevance features, descriptor values of every item."""
    layers = list(rel.layers)
    values = {d: [] for d in image_descriptors}
    cats = {d: [] for d in meta_descriptors}
    feats = {n: [] for n in layers}
    lists = {k: [] for k in ("index", "position", "ids", "kind", "size", "key")}
    rng_key = np.random.default_rng(seed)
    pos = n_err_seen = 0

    def keep_sample():
        keep = np.sort(np.argsort(lists["key"])[:max_errors])
        for n in layers:
            feats[n] = [np.concatenate(feats[n])[keep]]
        for k, v in lists.items():
            lists[k] = [v[i] for i in keep]

    for batch in batches:
        views = Views(batch.images, value_range)
        for d in image_descriptors:
            values[d].append(DESCRIPTORS[d].fn(views))
        for d in meta_descriptors:
            cats[d].append(np.asarray(batch.meta.get(d, [""] * len(batch)), dtype=object))
        e = reader.read(batch)
        wrong = e.rows
        if len(wrong):
            f = rel.features(reader.model.to_input(batch.images[wrong]), e.target)
            for n in layers:
                feats[n].append(f[n])
            lists["index"] += batch.index[wrong].tolist()
            lists["position"] += (pos + wrong).tolist()
            lists["ids"] += [batch.ids[i] for i in wrong]
            lists["kind"] += e.kind
            lists["size"] += e.size
            lists["key"] += rng_key.random(len(wrong)).tolist()
            n_err_seen += len(wrong)
            if len(lists["ids"]) > 2 * max_errors:  # keep a seeded uniform sample: bounded memory
                keep_sample()
        pos += len(batch)
    if len(lists["ids"]) > max_errors:
        keep_sample()
    return Errors(features={n: np.concatenate(v) if v else np.empty((0, 0), np.float32) for n, v in feats.items()},
                  index=lists["index"], position=lists["position"], ids=lists["ids"], kind=lists["kind"],
                  size=lists["size"], seen=n_err_seen, items=pos,
                  values={d: np.concatenate(v) if v else np.empty(0) for d, v in values.items()},
                  categories={d: np.concatenate(v) if v else np.empty(0, object) for d, v in cats.items()})


# --- clustering ----------------------------------------------------------------------------------

def ward(features: np.ndarray) -> np.ndarray:
    """Ward linkage from vectorised pairwise Euclidean distances (condensed)."""
    return linkage(pdist(np.asarray(features, np.float64)), method="ward")


def within_curve(z: np.ndarray, k_max: int) -> np.ndarray:
    """Within-cluster sum of squares after cutting the Ward tree into k = 1..k_max clusters.

    scipy's Ward merge height is sqrt(2 * increase of the sum of squares), so the sum of squares left
    with k clusters is the sum of h^2 / 2 over the first n - k merges.
    """
    n = len(z) + 1
    cum = np.concatenate([[0.0], np.cumsum(z[:, 2] ** 2 / 2)])  # cum[m]: sum of squares after m merges
    ks = np.arange(1, min(k_max, n) + 1)
    return cum[n - ks]


def knee(ess: np.ndarray) -> int:
    """k at the knee of the decreasing, convex within-cluster curve (1 when there is no knee)."""
    if len(ess) < 3 or ess[0] <= 0:
        return 1
    kl = KneeLocator(np.arange(1, len(ess) + 1), ess, curve="convex", direction="decreasing")
    return int(kl.knee) if kl.knee is not None else 1


def sum_squares(features: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-cluster sum of squared deviations from the centroid, and sizes (labels 0..k-1), vectorised."""
    k = int(labels.max()) + 1
    sizes = np.bincount(labels, minlength=k)
    sums = np.zeros((k, features.shape[1]))
    np.add.at(sums, labels, features)
    sq = np.bincount(labels, weights=(features.astype(np.float64) ** 2).sum(axis=1), minlength=k)
    return sq - (sums ** 2).sum(axis=1) / np.maximum(sizes, 1), sizes


def compactness(features: np.ndarray, labels: np.ndarray) -> float:
    """Size-weighted RMS intra-cluster distance / RMS distance over all items (0: tight, 1: no structure)."""
    n = len(features)
    ess, sizes = sum_squares(features, labels)
    total, _ = sum_squares(features, np.zeros(n, np.int64))
    if n < 2 or total[0] <= 0:
        return 0.0
    rms = np.sqrt(2 * np.maximum(ess, 0) / np.maximum(sizes - 1, 1))
    return float((sizes / n * rms).sum() / np.sqrt(2 * total[0] / (n - 1)))


def cluster(features: np.ndarray, k_max: int = 20, k: int | None = None) -> dict:
    """Ward clusters of one layer's features: labels 0..k-1 (biggest first), k, curve, compactness."""
    n = len(features)
    if n == 1:
        return {"labels": np.zeros(1, np.int64), "k": 1, "curve": np.zeros(1), "compactness": 0.0}
    z = ward(features)
    curve = within_curve(z, k_max)
    k = min(k or knee(curve), n)
    raw = fcluster(z, k, criterion="maxclust") - 1
    order = np.argsort(-np.bincount(raw), kind="stable")  # renumber: biggest cluster first
    labels = np.argsort(order)[raw]
    return {"labels": labels, "k": int(labels.max()) + 1, "curve": curve, "compactness": compactness(features, labels)}


# --- HUDD's unsafe set: the pool items that fall inside an error cluster ---------------------------

def cluster_radii(members: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """Each cluster's reach under single linkage: the largest distance from one of its members to the nearest
    other member (a singleton's reach is 0: only its own copy would be inside)."""
    f = np.asarray(members, np.float64)
    out = np.zeros(k)
    for c in range(k):
        m = f[labels == c]
        if len(m) > 1:
            d = cdist(m, m)
            np.fill_diagonal(d, np.inf)
            out[c] = d.min(axis=1).max()
    return out


def assign(queries: np.ndarray, members: np.ndarray, labels: np.ndarray, k: int, radii: np.ndarray,
           chunk: int = 1024) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """HUDD's rule: each query goes to the cluster of its nearest member (single linkage), and counts only
    within that cluster's reach (a far-away item belongs to no root cause, however large the budget)."""
    order = np.argsort(labels, kind="stable")
    starts = np.searchsorted(labels[order], np.arange(k))
    best, dist = np.empty(len(queries), np.int64), np.empty(len(queries))
    for s in range(0, len(queries), chunk):
        d = cdist(queries[s:s + chunk].astype(np.float64), members[order].astype(np.float64))
        per = np.minimum.reduceat(d, starts, axis=1)  # (q, k): distance to the nearest member of each cluster
        best[s:s + chunk] = per.argmin(axis=1)
        dist[s:s + chunk] = per.min(axis=1)
    return best, dist, dist <= radii[best]


def hudd_selection(cluster_of: np.ndarray, distance: np.ndarray, inside: np.ndarray, k: int, budget: int,
                   seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The unsafe set as (positions, copies): an equal share of the budget per cluster, the closest items within
    the cluster's radius first; a cluster with fewer such items than its share is balanced by bootstrap
    resampling of the ones it has (seeded), so every root cause weighs the same in retraining."""
    rng = np.random.default_rng(seed)
    clusters = [c for c in range(k) if (inside & (cluster_of == c)).any()]
    positions, copies = [], []
    if not clusters:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    shares = np.full(len(clusters), budget // len(clusters))
    shares[: budget % len(clusters)] += 1
    for c, share in zip(clusters, shares, strict=True):
        pool = np.flatnonzero(inside & (cluster_of == c))
        pool = pool[np.argsort(distance[pool], kind="stable")]
        taken = pool[:share]
        count = np.ones(len(taken), np.int64)
        if len(taken) < share:  # bootstrap: draw the missing copies from the cluster's own items
            np.add.at(count, rng.integers(0, len(taken), share - len(taken)), 1)
        positions.append(taken)
        copies.append(count)
    return np.concatenate(positions), np.concatenate(copies)


# --- describing a cluster by the ODD -------------------------------------------------------------

def describe(members: np.ndarray, values: dict[str, np.ndarray], categorical: dict[str, np.ndarray],
             noun: str, alpha: float = 0.05, effect: float = 0.5) -> dict:
    """Which ODD descriptors set these items apart from the whole split, and a text summary."""
    words, kinds, rows = [], [], {}
    inside = np.zeros(len(next(iter({**values, **categorical}.values()), [])), bool)
    inside[members] = True
    for name, v in values.items():
        m, rest = v[inside], v[~inside]
        spread = v.std()
        shift = float((np.median(m) - np.median(v)) / spread) if spread > 0 else 0.0
        p = float(stats.mannwhitneyu(m, rest).pvalue) if len(m) and len(rest) else 1.0
        rows[name] = {"cluster_median": float(np.median(m)), "split_median": float(np.median(v)),
                      "standardised_shift": shift, "p_value": p}
        if p < alpha and abs(shift) >= effect:
            low, high = WORDS.get(name, (f"low-{name}", f"high-{name}"))
            words.append(low if shift < 0 else high)
    for name, v in categorical.items():
        values_, counts = np.unique(v, return_counts=True)
        share_all = dict(zip(values_.tolist(), (counts / len(v)).tolist(), strict=True))
        mv, mc = np.unique(v[inside], return_counts=True)
        share = dict(zip(mv.tolist(), (mc / max(inside.sum(), 1)).tolist(), strict=True))
        rows[name] = {"cluster_share": share, "split_share": share_all}
        if len(mv):
            top = mv[mc.argmax()]
            p = float(stats.binomtest(int(mc.max()), int(inside.sum()), share_all[top], alternative="greater").pvalue)
            rows[name]["p_value"] = p
            if p < alpha and share[top] >= 0.6 and share[top] - share_all[top] >= 0.15:
                kinds.append(str(top))
    text = " ".join(filter(None, [", ".join(words), " ".join(kinds), noun]))  # e.g. "dark, blurred mono cells"
    if not words and not kinds:
        text = f"no ODD descriptor sets these {noun} apart"
    return {"descriptors": rows, "text": text}



# --- the pipeline, for the check and `improve` ---------------------------------------------------

@dataclass
class Assignment:
    """The items of a split, each assigned to the cluster of its nearest error (`assign`); an item with nothing to
    explain (a detector's image without a true box, a segmenter's without a defect) to none (cluster -1)."""

    index: np.ndarray  # position in the split's source
    ids: list[str]
    labels: np.ndarray  # a classifier's class labels; -1 for other tasks (the item's own annotation is its label)
    cluster: np.ndarray
    distance: np.ndarray
    inside: np.ndarray  # within the cluster's reach

    def select(self, k: int, budget: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """HUDD's unsafe set among these items: (positions, copies), see `hudd_selection`."""
        return hudd_selection(self.cluster, self.distance, self.inside, k, budget, seed)


@dataclass
class Analysis:
    """HUDD on one split: its errors, their clusters at every layer, and at the layer whose clusters are the most
    compact, the clusters (labels 0..k-1, biggest first) and each one's reach. No error: `layer` is None, k 0."""

    reader: ClassErrors | DetectionErrors | SegmentationErrors
    relevance: Relevance
    errors: Errors
    per_layer: dict[str, dict]
    layer: str | None
    labels: np.ndarray
    k: int
    radii: np.ndarray

    @property
    def members(self) -> np.ndarray:
        return self.errors.features[self.layer]

    def closest(self, c: int, n: int) -> np.ndarray:
        """The n members of cluster c closest to its centre (positions in `errors`): its representatives."""
        mem = np.flatnonzero(self.labels == c)
        f = self.members[mem]
        return mem[np.argsort(((f - f.mean(axis=0)) ** 2).sum(axis=1), kind="stable")][:n]

    def clusters(self, noun: str, representatives: int) -> list[dict]:
        """Each cluster: size, share, members (first 200 ids), errors by kind (and size), representatives, the ODD
        descriptors that set it apart and a text summary."""
        e = self.errors
        position, kinds, sizes = np.array(e.position), np.array(e.kind, object), np.array(e.size, object)
        out = []
        for c in range(self.k):
            mem = np.flatnonzero(self.labels == c)
            desc = describe(position[mem], e.values, e.categories, noun) if (e.values or e.categories) else {
                "descriptors": {}, "text": "no ODD descriptor measured"}
            errors = dict(Counter(kinds[mem].tolist()).most_common())
            by_size = dict(Counter(s for s in sizes[mem].tolist() if s).most_common())
            main = next(iter(errors)) + (f" ({next(iter(by_size))})" if by_size else "")
            out.append({"id": c, "size": int(len(mem)), "share": len(mem) / len(e.ids),
                        "members": [e.ids[i] for i in mem[:200]], "errors": errors, "sizes": by_size,
                        "representatives": [e.ids[i] for i in self.closest(c, representatives)],
                        "descriptors": desc["descriptors"],
                        "text": f"{len(mem)} errors, mostly {main}: {desc['text']}"})
        return out

    def heatmaps(self, batches: Iterable, wanted: set[int]) -> dict[int, tuple[np.ndarray, torch.Tensor]]:
        """For the errors at `wanted` (positions in `errors`): (image, relevance at the chosen layer), read again."""
        e, out = self.errors, {}
        where = {int(e.index[i]): i for i in wanted}
        for batch in batches:
            sel = [j for j, i in enumerate(batch.index.tolist()) if i in where]
            if not sel:
                continue
            ex = self.reader.read(batch)
            rows = {int(r): j for j, r in enumerate(ex.rows)}
            sel = [j for j in sel if j in rows]
            if sel:
                raw = self.relevance.raw(self.reader.model.to_input(batch.images[sel]),
                                         ex.target[[rows[j] for j in sel]])[self.layer]
                for n, j in enumerate(sel):
                    out[where[int(batch.index[j])]] = (batch.images[j], raw[n])
        return out

    def assign(self, batches: Iterable) -> Assignment:
        """Stream a split and assign every item to the cluster of its nearest error, at the chosen layer; each item
        explained as the task explains a pool item (`read(batch, errors=False)`)."""
        index, ids, labels, best, dist, inside = [], [], [], [], [], []
        for batch in batches:
            ex = self.reader.read(batch, errors=False)
            b, d, i = np.full(len(batch), -1, np.int64), np.full(len(batch), np.inf), np.zeros(len(batch), bool)
            if len(ex.rows):
                f = self.relevance.features(self.reader.model.to_input(batch.images[ex.rows]), ex.target)[self.layer]
                b[ex.rows], d[ex.rows], i[ex.rows] = assign(f, self.members, self.labels, self.k, self.radii)
            index += batch.index.tolist()
            ids += batch.ids
            labels += batch.labels.tolist() if self.reader.labelled_by_class else [-1] * len(batch)
            best.append(b)
            dist.append(d)
            inside.append(i)

        def cat(parts, dtype):
            return np.concatenate(parts) if parts else np.empty(0, dtype)

        return Assignment(np.array(index, np.int64), ids, np.array(labels, np.int64), cat(best, np.int64),
                          cat(dist, np.float64), cat(inside, bool))


def analyse(model: Classifier, net: A.Network, batches: Iterable, layers: list[str] | None = None, *,
            relevance: str = "auto", max_features: int = 2048, max_errors: int = 8000, k_max: int = 20,
            k: int | None = None, seed: int = 0, image_descriptors: list[str] = (), meta_descriptors: list[str] = (),
            min_iou: float = 0.0) -> Analysis:
    """HUDD's root-cause analysis of a split: relevance of its errors (as the model's task reads them, `errors_of`)
    at `layers` (default: every convolution), Ward clusters per layer with k at the knee (or `k`), the most compact
    layer, and each of its clusters' reach."""
    reader = errors_of(model, min_iou)
    layers = list(layers or reader.layers(net))
    if not layers:
        named = net.describe()
        raise Unsupported("root_causes: the model has no convolution to take relevance from"
                          + (f"; name layers among {named}" if named else ""))
    rel = Relevance(net, layers, relevance, max_features, score=reader.score,
                    probe=torch.zeros(1, *model.spec.input_shape))
    e = collect_errors(reader, rel, batches, list(image_descriptors), list(meta_descriptors),
                       model.spec.value_range, max_errors, seed)
    if not e.ids:
        return Analysis(reader, rel, e, {}, None, np.empty(0, np.int64), 0, np.empty(0))
    per_layer = {n: cluster(e.features[n], k_max, k) for n in layers}
    best = min(layers, key=lambda n: (per_layer[n]["compactness"], layers.index(n)))
    labels, k_ = per_layer[best]["labels"], per_layer[best]["k"]
    return Analysis(reader, rel, e, per_layer, best, labels, k_, cluster_radii(e.features[best], labels, k_))

"""Root causes of the model's errors, found by clustering internal relevance (HUDD, Fahmy et al. ICSE 2022).

For every misclassified item of a split, the relevance of each neuron of a few internal layers for the
predicted class is computed (LRP through captum when every layer of the model has an LRP rule,
otherwise LayerGradCam or Layer Integrated Gradients, per `relevance`). Per layer, the maps are
reduced to at most `max_features` values (spatial average pooling, channels kept while they fit),
scaled to unit norm (the pattern matters, not the magnitude), and clustered:

- pairwise Euclidean distances (scipy `pdist`, vectorised C, condensed: n(n-1)/2 doubles),
- Ward agglomerative clustering (scipy, nearest-neighbour chain: O(n^2) time),
- the number of clusters at the knee (kneed) of the within-cluster sum of squares vs k,
- the layer whose clusters are most compact: smallest size-weighted root-mean-square intra-cluster
  distance relative to that of all errors (scale-free, so layers of different size compare).

Each cluster is described by its members, size, true/predicted classes, representative items (closest
to the cluster centre), and the ODD descriptors of its members against the whole split: image
descriptors (brightness, contrast, sharpness) by a standardised median shift and a Mann-Whitney test,
categorical metadata by its share and a binomial test; significant ones make the text summary
("dark, blurred mono cells"). HUDD's retraining step: items of an unlabeled improvement split are
assigned to the cluster of their nearest error, and the closest ones, balanced across clusters, form
the "unsafe set" to label and retrain on.

Check `root_causes` (stage "testing"). Metrics (scope: the params' split): root_cause_clusters (k; n =
clustered errors), errors (misclassified items found), largest_root_cause_share (share of errors in the
biggest cluster), unsafe_set_size (when an improvement split is given).
Summary: `clusters` (id, size, members (ids, first 200), classes, representatives, descriptors, text),
`layer` (the chosen one), `layers` (per layer: k, compactness, within-cluster curve), `relevance`,
`errors`, `unsafe_set` (per cluster: ids and distances), `message` when there is nothing to cluster.
Artefacts: cluster_<i>.png (montage: representatives and their relevance) and cluster_<i>.gif
(kind "image"; not written for confidential use cases), clusters.csv (every clustered error and its
cluster), unsafe_set.csv.
"""

from __future__ import annotations

import copy
import csv
import warnings
from typing import Literal

import numpy as np
import torch
from captum.attr import LayerAttribution, LayerGradCam, LayerIntegratedGradients, LayerLRP
from captum.attr._core.lrp import SUPPORTED_LAYERS_WITH_RULES, SUPPORTED_NON_LINEAR_LAYERS
from captum.attr._utils.lrp_rules import EpsilonRule
from kneed import KneeLocator
from pydantic import Field
from scipy import stats
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.spatial.distance import cdist, pdist
from torch import nn

from trustcase.components import attribution as A
from trustcase.components.checks import Check, CheckError, Context, Params, Unsupported, register
from trustcase.components.images import PROPERTIES
from trustcase.schemas import CheckOutcome, Curve, Measurement, Scope, Series

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


class Relevance:
    """Internal-layer relevance for a batch, reduced to comparable feature vectors (one per layer)."""

    def __init__(self, net: A.Network, layers: list[str], method: str, max_features: int, ig_steps: int = 16):
        if not net.differentiable:
            raise Unsupported("root-cause clustering needs internal relevance; the model is a black box")
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


def nearest_clusters(queries: np.ndarray, members: np.ndarray, labels: np.ndarray, k: int,
                     chunk: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """For each query: the cluster of its nearest member and that distance (chunked, vectorised)."""
    order = np.argsort(labels, kind="stable")
    starts = np.searchsorted(labels[order], np.arange(k))
    best, dist = np.empty(len(queries), np.int64), np.empty(len(queries))
    for s in range(0, len(queries), chunk):
        d = cdist(queries[s:s + chunk].astype(np.float64), members[order].astype(np.float64))
        per = np.minimum.reduceat(d, starts, axis=1)  # (q, k): distance to the nearest member of each cluster
        best[s:s + chunk] = per.argmin(axis=1)
        dist[s:s + chunk] = per.min(axis=1)
    return best, dist


def balanced_selection(cluster_of: np.ndarray, distance: np.ndarray, k: int, budget: int) -> np.ndarray:
    """Positions of the unsafe set: the closest items of each cluster, an equal share per cluster
    (clusters with too few candidates hand their share to the others)."""
    pools = [np.flatnonzero(cluster_of == c)[np.argsort(distance[cluster_of == c], kind="stable")] for c in range(k)]
    taken = np.zeros(k, np.int64)
    left = min(budget, len(cluster_of))
    while left > 0:
        open_ = [c for c in range(k) if taken[c] < len(pools[c])]
        if not open_:
            break
        share = max(1, left // len(open_))
        for c in open_:
            add = min(share, len(pools[c]) - taken[c], left)
            taken[c] += add
            left -= add
            if left == 0:
                break
    return np.concatenate([pools[c][:taken[c]] for c in range(k)]) if k else np.empty(0, np.int64)


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


# --- the check -----------------------------------------------------------------------------------

class RootCausesParams(Params):
    split: str = "test"
    layers: list[str] | None = Field(None, description="layers to try; default: every Conv2d layer")
    relevance: Literal["auto", "lrp", "grad_cam", "integrated_gradients"] = "auto"
    max_features: int = Field(2048, ge=4, description="relevance values kept per item and layer")
    max_errors: int = Field(8000, ge=2, description="errors clustered (a seeded sample beyond): bounds memory")
    k_max: int = Field(20, ge=2)
    k: int | None = Field(None, ge=1, description="force the number of clusters (default: the knee)")
    representatives: int = Field(6, ge=1)
    noun: str = Field("items", description="what the items are, for the text summary, e.g. 'cells'")
    improvement_split: str | None = Field(None, description="unlabeled data role to select the unsafe set from")
    unsafe_budget: int = Field(100, ge=1, description="items to select for labelling, balanced across clusters")
    batch_size: int = Field(64, ge=1)


@register
class RootCauses(Check):
    """HUDD: misclassified items clustered by internal relevance, described by the ODD."""

    name = "root_causes"
    Params = RootCausesParams
    stage = "testing"
    needs_gradients = True

    def run(self, ctx: Context) -> CheckOutcome:
        p: RootCausesParams = self.params
        uc = ctx.use_case
        net = A.Network(ctx.model)
        layers = p.layers or net.conv_layers()
        if not layers:
            raise Unsupported(f"no Conv2d layer to take relevance from; name layers among {net.describe()}")
        rel = Relevance(net, layers, p.relevance, p.max_features)
        image_desc = [d.name for d in uc.odd.descriptors if d.source == "image" and d.name in PROPERTIES]
        meta_desc = [d.name for d in uc.odd.descriptors if d.source == "metadata" and d.categorical]
        values = {d: [] for d in image_desc}
        cats = {d: [] for d in meta_desc}
        feats = {n: [] for n in layers}
        err_idx, err_pos, err_ids, err_label, err_pred, keys = [], [], [], [], [], []
        rng_key = np.random.default_rng(ctx.seed)
        pos = n_err_seen = 0
        for batch in ctx.batches(p.split, p.batch_size):
            pred = ctx.model.logits(batch.images, batch.ids).argmax(axis=1)
            for d in image_desc:
                values[d].append(PROPERTIES[d](batch.images))
            for d in meta_desc:
                cats[d].append(np.asarray(batch.meta.get(d, [""] * len(batch)), dtype=object))
            wrong = np.flatnonzero(pred != batch.labels)
            if len(wrong):
                x = ctx.model.to_input(batch.images[wrong])
                f = rel.features(x, torch.as_tensor(pred[wrong]))
                for n in layers:
                    feats[n].append(f[n])
                err_idx += batch.index[wrong].tolist()
                err_pos += (pos + wrong).tolist()
                err_ids += [batch.ids[i] for i in wrong]
                err_label += batch.labels[wrong].tolist()
                err_pred += pred[wrong].tolist()
                keys += rng_key.random(len(wrong)).tolist()
                n_err_seen += len(wrong)
                if len(err_idx) > 2 * p.max_errors:  # keep a seeded uniform sample: bounded memory
                    keep = np.sort(np.argsort(keys)[:p.max_errors])
                    feats = {n: [np.concatenate(feats[n])[keep]] for n in layers}
                    err_idx, err_pos, err_ids, err_label, err_pred, keys = (
                        [v[i] for i in keep] for v in (err_idx, err_pos, err_ids, err_label, err_pred, keys))
            pos += len(batch)
        n_items = pos
        scope = Scope(split=p.split)
        validity = [f"relevance: {rel.method} at layers {layers} for the predicted class, reduced to at most "
                    f"{p.max_features} values per layer, unit norm; model in eval mode",
                    "Ward clustering on Euclidean distances; k at the knee (kneed) of the within-cluster sum of "
                    f"squares, k <= {p.k_max}; layer: the most compact clusters (size-weighted RMS intra-cluster "
                    "distance relative to all errors)",
                    "ODD descriptors: Mann-Whitney (image properties) and one-sided binomial (metadata) tests "
                    "against the whole split, alpha 0.05, standardised median shift >= 0.5"]
        if not err_idx:
            msg = f"no misclassified item in the {p.split} split ({n_items} items): nothing to cluster"
            return CheckOutcome(check=self.name, validity=validity, summary={"message": msg, "clusters": [],
                                                                              "errors": 0, "relevance": rel.method},
                                measurements=[Measurement(check=self.name, metric="errors", value=0, n=n_items,
                                                          scope=scope),
                                              Measurement(check=self.name, metric="root_cause_clusters", value=0,
                                                          n=0, scope=scope)],
                                limitations=[msg])
        limitations = []
        if len(err_idx) > p.max_errors:
            keep = np.sort(np.argsort(keys)[:p.max_errors])
            feats = {n: [np.concatenate(feats[n])[keep]] for n in layers}
            err_idx, err_pos, err_ids, err_label, err_pred = (
                [v[i] for i in keep] for v in (err_idx, err_pos, err_ids, err_label, err_pred))
        feats = {n: np.concatenate(v) for n, v in feats.items()}
        n_err = len(err_idx)
        if n_err_seen > n_err:
            limitations.append(f"{n_err_seen} errors, {n_err} clustered (seeded sample, max_errors)")

        per_layer = {n: cluster(feats[n], p.k_max, p.k) for n in layers}
        best = min(layers, key=lambda n: (per_layer[n]["compactness"], layers.index(n)))
        chosen = per_layer[best]
        labels, k = chosen["labels"], chosen["k"]
        values = {d: np.concatenate(v) for d, v in values.items()}
        cats = {d: np.concatenate(v) for d, v in cats.items()}
        names = uc.model.class_names
        err_pos_a, err_label_a, err_pred_a = np.array(err_pos), np.array(err_label), np.array(err_pred)
        clusters = []
        reps_of = {}
        for c in range(k):
            mem = np.flatnonzero(labels == c)
            centre = feats[best][mem].mean(axis=0)
            closest = mem[np.argsort(((feats[best][mem] - centre) ** 2).sum(axis=1), kind="stable")]
            reps_of[c] = closest[:p.representatives]
            desc = describe(err_pos_a[mem], values, cats, p.noun) if (values or cats) else {
                "descriptors": {}, "text": "no ODD descriptor measured"}
            pairs = {f"{names[t]} -> {names[q]}": int(((err_label_a[mem] == t) & (err_pred_a[mem] == q)).sum())
                     for t in range(len(names)) for q in range(len(names)) if t != q}
            pairs = {k_: v for k_, v in pairs.items() if v}
            main = max(pairs, key=pairs.get)
            clusters.append({
                "id": c, "size": int(len(mem)), "share": len(mem) / n_err,
                "members": [err_ids[i] for i in mem[:200]], "errors": pairs,
                "representatives": [err_ids[i] for i in reps_of[c]], "descriptors": desc["descriptors"],
                "text": f"{len(mem)} errors, mostly {main}: {desc['text']}",
            })
        artefacts = self._tables(ctx, clusters, labels, err_ids, err_label_a, err_pred_a, names)
        if uc.confidential:
            limitations.append("confidential use case: no montage or animation of cluster members")
        else:
            artefacts += self._pictures(ctx, p, rel, best, err_idx, reps_of, err_pred_a)
        out = [Measurement(check=self.name, metric="errors", value=n_err_seen, n=n_items, scope=scope),
               Measurement(check=self.name, metric="root_cause_clusters", value=k, n=n_err, scope=scope,
                           details={"layer": best, "sizes": [c["size"] for c in clusters]}),
               Measurement(check=self.name, metric="largest_root_cause_share", value=clusters[0]["share"], n=n_err,
                           scope=scope, details={"text": clusters[0]["text"]})]
        summary = {
            "errors": n_err_seen, "clustered": n_err, "relevance": rel.method, "layer": best, "k": k,
            "clusters": clusters,
            "layers": {n: {"k": r["k"], "compactness": r["compactness"], "curve": r["curve"].tolist()}
                       for n, r in per_layer.items()},
        }
        if p.improvement_split:
            sel, rows = self._unsafe(ctx, p, rel, best, feats[best], labels, k)
            summary["unsafe_set"] = sel
            out.append(Measurement(check=self.name, metric="unsafe_set_size", value=len(rows), n=p.unsafe_budget,
                                   scope=Scope(split=p.improvement_split)))
            path = ctx.workdir / "unsafe_set.csv"
            with open(path, "w", newline="") as f:
                csv.writer(f).writerows([("id", "cluster", "distance"), *rows])
            artefacts.append(ctx.artefact(path, "file"))
            validity.append(f"unsafe set: items of the {p.improvement_split!r} split assigned to the cluster of their "
                            f"nearest error (relevance at layer {best}, predicted class), closest first, "
                            f"{p.unsafe_budget} balanced across clusters")
        curves = [Curve(id=f"{self.name}_within", title="Within-cluster sum of squares vs number of clusters",
                        x_label="clusters k", y_label="within-cluster sum of squares / total",
                        x=[float(i) for i in range(1, p.k_max + 1)],
                        x_marks={f"knee ({best})": float(k)},
                        series={f"layer {n}": Series(y=(r["curve"] / r["curve"][0] if r["curve"][0] > 0
                                                        else r["curve"]).tolist()
                                                     + [float("nan")] * (p.k_max - len(r["curve"])))
                                for n, r in per_layer.items()})]
        return CheckOutcome(check=self.name, measurements=out, curves=curves, artefacts=artefacts,
                            validity=validity, limitations=limitations + ([f"model internals: {net.note}"]
                                                                          if net.note else []),
                            summary=summary)

    def _tables(self, ctx, clusters, labels, ids, truth, pred, names):
        path = ctx.workdir / "clusters.csv"
        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(("id", "cluster", "true", "predicted"))
            w.writerows((ids[i], int(labels[i]), names[truth[i]], names[pred[i]]) for i in range(len(ids)))
        return [ctx.artefact(path, "file")]

    def _pictures(self, ctx, p, rel, layer, err_idx, reps_of, preds):
        """Montage and GIF of each cluster's representatives with their relevance (second, sparse read)."""
        uc = ctx.use_case
        want = {int(err_idx[i]): i for c in reps_of for i in reps_of[c]}
        imgs = {}
        for batch in ctx.batches(p.split, p.batch_size):
            for j, i in enumerate(batch.index):
                if int(i) in want:
                    imgs[want[int(i)]] = batch.images[j]
        arts = []
        for c, reps in reps_of.items():
            reps = [i for i in reps if i in imgs]
            if not reps:
                continue
            im = np.stack([imgs[i] for i in reps])
            x = ctx.model.to_input(im)
            raw = rel.raw(x, torch.as_tensor(preds[reps]))[layer]
            heat = raw.sum(dim=1, keepdim=True) if raw.ndim == 4 else raw.reshape(len(raw), 1, 1, -1)
            heat = LayerAttribution.interpolate(heat.abs(), tuple(x.shape[2:]), interpolate_mode="bilinear")
            shown = A.to_uint8(im, uc.model.value_range)
            over = A.overlay(im, heat[:, 0].numpy(), uc.model.value_range)
            scale = max(2, 128 // im.shape[1])
            png = ctx.workdir / f"cluster_{c}.png"
            A.save_png(png, A.tile([list(shown), list(over)], scale=scale))
            gif = ctx.workdir / f"cluster_{c}.gif"
            A.save_gif(gif, [A.tile([[shown[j], over[j]]], scale=scale) for j in range(len(reps))])
            arts += [ctx.artefact(png, "image"), ctx.artefact(gif, "image")]
        return arts

    def _unsafe(self, ctx, p, rel, layer, members, labels, k):
        if p.improvement_split not in ctx.data.roles:
            raise CheckError(f"root_causes: improvement_split {p.improvement_split!r} is not a data split role "
                             f"({ctx.data.roles})")
        ids, best, dist = [], [], []
        for batch in ctx.batches(p.improvement_split, p.batch_size):
            pred = ctx.model.logits(batch.images, batch.ids).argmax(axis=1)  # labels unknown: explain the prediction
            f = rel.features(ctx.model.to_input(batch.images), torch.as_tensor(pred))[layer]
            b, d = nearest_clusters(f, members, labels, k)
            ids += batch.ids
            best.append(b)
            dist.append(d)
        if not ids:
            return {}, []
        best, dist = np.concatenate(best), np.concatenate(dist)
        chosen = balanced_selection(best, dist, k, p.unsafe_budget)
        rows = [(ids[i], int(best[i]), round(float(dist[i]), 6)) for i in chosen]
        sel = {str(c): {"count": int((best[chosen] == c).sum()),
                        "ids": [r[0] for r in rows if r[1] == c][:200]} for c in range(k)}
        return sel, rows

"""The `root_causes` check: HUDD clusters of errors, described by the ODD, and the unsafe set (science in
`explain.root_causes.analyse`, shared with `trustcase improve --method hudd`). An error is the task's: a
misclassified item, an image with a missed true box (detection), a defective image whose defect the image-level
rule misses (segmentation; with `min_iou`, also one marked with a lower defect IoU).

Summary: `clusters` (id, size, share, members (ids, first 200), errors by kind (e.g. "inclusion -> patches",
"missed inclusion"), sizes (COCO's, of missed boxes or defects), representatives, descriptors, text), `layer` (the
chosen one), `layers` (per layer: k, compactness, within-cluster curve), `relevance`, `task`, `errors`,
`clustered`, `unsafe_set` (per cluster: count, radius, candidates, ids), `message` when there is nothing to
cluster. Artefacts: cluster_<i>.png (montage: representatives and their relevance) and cluster_<i>.gif (kind
"image"; not written for a confidential use case), clusters.csv (every clustered error, its cluster, kind and
size), unsafe_set.csv.
"""

from __future__ import annotations

import csv
from typing import Literal

import numpy as np
import torch
from captum.attr import LayerAttribution
from pydantic import Field

from trustcase.checks import Check, CheckError, Context, Params, Produces
from trustcase.explain import attribution as A
from trustcase.explain import imaging
from trustcase.explain.root_causes import Analysis, analyse
from trustcase.measurement import census, over_sample
from trustcase.odd.descriptors import DESCRIPTORS
from trustcase.schemas import CheckOutcome, Curve, Scope, Series, Stage

ERRORS = {"classification": "misclassified items",
          "detection": "images with at least one true box missed at the operating threshold {t} (COCO's greedy "
                       "matching of the detections scoring >= {t} at IoU 0.5, as indication_recall counts)",
          "segmentation": "defective images (a true defect pixel) with fewer than {a} predicted defect pixels (the "
                          "image-level rule), or a defect IoU below {i}"}
EXPLAINED = {"classification": "for the predicted class",
             "detection": "of the missed boxes' score (Grad-CAM of D-RISE's similarity: the best IoU x score among "
                          "the detections of the box's class, summed over the image's missed boxes)",
             "segmentation": "of the true defect region's score (Grad-CAM of the logits of each true defect pixel's "
                             "class, summed over the region)"}
NONE = {"classification": "misclassified item", "detection": "image with a missed true box",
        "segmentation": "defective image missed"}
POOL = {"classification": "predicted class", "detection": "its true boxes' score", "segmentation":
        "its true defect region's score; defect-free items belong to no cluster"}


class RootCausesParams(Params):
    split: str = "test"
    layers: list[str] | None = Field(None, description="layers to try; default: every convolution (a TorchScript "
                                      "detector's or segmenter's: conv1, conv2, ... in execution order)")
    relevance: Literal["auto", "lrp", "grad_cam", "integrated_gradients"] = "auto"
    max_features: int = Field(2048, ge=4, description="relevance values kept per item and layer")
    max_errors: int = Field(8000, ge=2, description="errors clustered (a seeded sample beyond): bounds memory")
    k_max: int = Field(20, ge=2)
    k: int | None = Field(None, ge=1, description="force the number of clusters (default: the knee)")
    representatives: int = Field(6, ge=1)
    noun: str = Field("items", description="what the items are, for the text summary, e.g. 'cells'")
    min_iou: float = Field(0.0, ge=0, le=1, description="segmentation: a defective image found by the image-level "
                           "rule is an error too when its defect IoU is below this")
    improvement_split: str | None = Field(None, description="data role to select the unsafe set from (a "
                                          "classifier's may be unlabeled; a detector's and a segmenter's are "
                                          "explained for their true boxes / defects)")
    unsafe_budget: int = Field(100, ge=1, description="copies in the unsafe set, an equal share per cluster")
    batch_size: int = Field(64, ge=1)


class RootCauses(Check):
    """HUDD: errors clustered by internal relevance, described by the ODD."""

    name = "root_causes"
    Params = RootCausesParams
    stage = Stage.TESTING
    tasks = frozenset({"classification", "detection", "segmentation"})
    not_tiled = ("HUDD clusters the relevance of the network's inner layers, which under tiles see tiles, not the "
                 "images whose errors it explains")

    @classmethod
    def produces(cls, params, use_case):
        """On the params' split: errors (the task's errors found; n: items), root_cause_clusters (k; n: clustered
        errors), largest_root_cause_share (share of the errors in the biggest cluster), and unsafe_set_size (on
        the improvement split, when one is given)."""
        return [Produces(m, params.split) for m in
                ("errors", "root_cause_clusters", "largest_root_cause_share", "unsafe_set_size")]
    needs_gradients = True

    def run(self, ctx: Context) -> CheckOutcome:
        p: RootCausesParams = self.params
        uc = ctx.use_case
        net = A.Network(ctx.model)
        a = analyse(ctx.model, net, ctx.batches(p.split, p.batch_size), p.layers, relevance=p.relevance,
                    max_features=p.max_features, max_errors=p.max_errors, k_max=p.k_max, k=p.k, seed=ctx.seed,
                    image_descriptors=[d.name for d in uc.odd.descriptors
                                       if d.source == "image" and d.name in DESCRIPTORS],
                    meta_descriptors=[d.name for d in uc.odd.descriptors if d.source == "metadata" and d.categorical],
                    min_iou=p.min_iou)
        e, rel = a.errors, a.relevance
        scope = Scope(split=p.split)
        what = ERRORS[uc.task].format(t=uc.model.score_threshold, a=uc.model.defect_pixels, i=p.min_iou)
        validity = [f"errors: {what}",
                    f"relevance: {rel.method} at layers {list(rel.layers)} {EXPLAINED[uc.task]}, reduced to at most "
                    f"{p.max_features} values per layer, unit norm; model in eval mode",
                    "Ward clustering on Euclidean distances; k at the knee (kneed) of the within-cluster sum of "
                    f"squares, k <= {p.k_max}; layer: the most compact clusters (size-weighted RMS intra-cluster "
                    "distance relative to all errors)",
                    "ODD descriptors: Mann-Whitney (image properties) and one-sided binomial (metadata) tests "
                    "against the whole split, alpha 0.05, standardised median shift >= 0.5"]
        if not e.ids:
            msg = f"no {NONE[uc.task]} in the {p.split} split ({e.items} items): nothing to cluster"
            return CheckOutcome(check=self.name, validity=validity, summary={"message": msg, "clusters": [],
                                                                              "errors": 0, "relevance": rel.method},
                                # an empty split is no evidence (undefined); items without an error are
                                measurements=[over_sample(census(check=self.name, metric="errors",
                                                                 value=0 if e.items else None, n=e.items,
                                                                 scope=scope), ctx.data.sampled(p.split)),
                                              census(check=self.name, metric="root_cause_clusters",
                                                     value=0 if e.items else None, n=0, scope=scope)],
                                limitations=[msg])
        limitations = []
        n_err, best, k = len(e.ids), a.layer, a.k
        if e.seen > n_err:
            limitations.append(f"{e.seen} errors, {n_err} clustered (seeded sample, max_errors)")
        clusters = a.clusters(p.noun, p.representatives)
        artefacts = self._tables(ctx, a)
        if uc.confidential:
            limitations.append("confidential use case: no montage or animation of cluster members")
        else:
            artefacts += self._pictures(ctx, p, a)
        out = [over_sample(census(check=self.name, metric="errors", value=e.seen, n=e.items, scope=scope),
                           ctx.data.sampled(p.split)),
               census(check=self.name, metric="root_cause_clusters", value=k, n=n_err, scope=scope,
                           details={"layer": best, "sizes": [c["size"] for c in clusters]}),
               census(check=self.name, metric="largest_root_cause_share", value=clusters[0]["share"], n=n_err,
                           scope=scope, details={"text": clusters[0]["text"]})]
        summary = {
            "errors": e.seen, "clustered": n_err, "relevance": rel.method, "layer": best, "k": k, "task": uc.task,
            "clusters": clusters,
            "layers": {n: {"k": r["k"], "compactness": r["compactness"], "curve": r["curve"].tolist()}
                       for n, r in a.per_layer.items()},
        }
        if p.improvement_split:
            sel, rows = self._unsafe(ctx, p, a)
            summary["unsafe_set"] = sel
            out.append(census(check=self.name, metric="unsafe_set_size", value=sum(r[3] for r in rows),
                                   n=p.unsafe_budget,
                                   scope=Scope(split=p.improvement_split)))
            path = ctx.workdir / "unsafe_set.csv"
            with open(path, "w", newline="") as f:
                csv.writer(f).writerows([("id", "cluster", "distance", "copies"), *rows])
            artefacts.append(ctx.artefact(path, "file"))
            validity.append(f"unsafe set (HUDD): items of the {p.improvement_split!r} split whose relevance (layer "
                            f"{best}, {POOL[uc.task]}) lies within the reach of its nearest cluster (single linkage: "
                            "no farther from a member than the cluster's own members are from their nearest), closest "
                            f"first, an equal share of {p.unsafe_budget} per cluster, bootstrap copies where a "
                            "cluster has fewer such items")
        curves = [Curve(id=f"{self.name}_within", title="Within-cluster sum of squares vs number of clusters",
                        x_label="clusters k", y_label="within-cluster sum of squares / total",
                        x=[float(i) for i in range(1, p.k_max + 1)],
                        x_marks={f"knee ({best})": float(k)},
                        series={f"layer {n}": Series(y=(r["curve"] / r["curve"][0] if r["curve"][0] > 0
                                                        else r["curve"]).tolist()
                                                     + [float("nan")] * (p.k_max - len(r["curve"])))
                                for n, r in a.per_layer.items()})]
        return CheckOutcome(check=self.name, measurements=out, curves=curves, artefacts=artefacts,
                            validity=validity, limitations=limitations + ([f"model internals: {net.note}"]
                                                                          if net.note else []),
                            summary=summary)

    def _tables(self, ctx, a: Analysis):
        path, e = ctx.workdir / "clusters.csv", a.errors
        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(("id", "cluster", "error", "size"))
            w.writerows((e.ids[i], int(a.labels[i]), e.kind[i], e.size[i]) for i in range(len(e.ids)))
        return [ctx.artefact(path, "clusters")]  # the lab colours items by it

    def _pictures(self, ctx, p, a: Analysis):
        """Montage and GIF of each cluster's representatives with their relevance (second, sparse read)."""
        uc = ctx.use_case
        reps_of = {c: a.closest(c, p.representatives) for c in range(a.k)}
        read = a.heatmaps(ctx.batches(p.split, p.batch_size), {int(i) for r in reps_of.values() for i in r})
        arts = []
        for c, reps in reps_of.items():
            reps = [i for i in reps if i in read]
            if not reps:
                continue
            im = np.stack([read[i][0] for i in reps])
            x = ctx.model.to_input(im)
            raw = torch.stack([read[i][1] for i in reps])
            heat = raw.sum(dim=1, keepdim=True) if raw.ndim == 4 else raw.reshape(len(raw), 1, 1, -1)
            heat = LayerAttribution.interpolate(heat.abs(), tuple(x.shape[2:]), interpolate_mode="bilinear")
            shown = imaging.to_uint8(im, uc.model.value_range)
            over = imaging.overlay(im, heat[:, 0].numpy(), uc.model.value_range)
            scale = max(2, 128 // im.shape[1])
            png = ctx.workdir / f"cluster_{c}.png"
            imaging.save_png(png, imaging.tile([list(shown), list(over)], scale=scale))
            gif = ctx.workdir / f"cluster_{c}.gif"
            imaging.save_gif(gif, [imaging.tile([[shown[j], over[j]]], scale=scale) for j in range(len(reps))])
            arts += [ctx.artefact(png, "image"), ctx.artefact(gif, "image")]
        return arts

    def _unsafe(self, ctx, p, a: Analysis):
        """HUDD's unsafe set from the improvement split: items within a cluster's reach, an equal share each."""
        if p.improvement_split not in ctx.data.roles:
            raise CheckError(f"root_causes: improvement_split {p.improvement_split!r} is not a data split role "
                             f"({ctx.data.roles})")
        pool = a.assign(ctx.batches(p.improvement_split, p.batch_size))
        if not pool.ids:
            return {}, []
        chosen, copies = pool.select(a.k, p.unsafe_budget, ctx.seed)
        rows = [(pool.ids[i], int(pool.cluster[i]), round(float(pool.distance[i]), 6), int(n))
                for i, n in zip(chosen, copies, strict=True)]
        sel = {str(c): {"count": int(copies[pool.cluster[chosen] == c].sum()), "radius": float(a.radii[c]),
                        "candidates_within_radius": int((pool.inside & (pool.cluster == c)).sum()),
                        "ids": [r[0] for r in rows if r[1] == c][:200]} for c in range(a.k)}
        return sel, rows

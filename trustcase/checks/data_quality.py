"""The `data_quality` check (AMLAS data stage): balance, readability, duplicates, leakage, drift and ODD
coverage of the splits (science in `data.quality` and `data.images`)."""

from __future__ import annotations

from collections import Counter

import numpy as np

from trustcase.checks import Check, Context, Params, Produces
from trustcase.data.quality import distributions, duplicates, exact_hash, odd_coverage, perceptual_hash
from trustcase.data.streaming import DataError
from trustcase.measurement import census, over_sample, proportion
from trustcase.odd.descriptors import DESCRIPTORS, Views
from trustcase.odd.specification import Limit
from trustcase.schemas import CheckOutcome, Histograms, Measurement, Scope, Stage
from trustcase.tasks import task_of


class DataQualityParams(Params):
    # max Hamming distance between 64-bit perceptual hashes (on ELPV, 4 already pairs look-alike mono cells)
    near_duplicate_distance: int = 2
    histogram_bins: int = 30


class DataQuality(Check):
    name = "data_quality"
    Params = DataQualityParams
    stage = Stage.DATA
    tasks = frozenset({"classification", "detection", "segmentation"})  # a detector's classes are its boxes', a
    whole_images = True  # under fit: tiles: pixel statistics and masks of the whole images, as read
    # segmenter's its pixels'

    @classmethod
    def produces(cls, params, use_case):
        per_split = ["items", "unreadable", "non_finite", "constant_images", "out_of_range", "class_share:*",
                     "imbalance_ratio", "duplicates", "near_duplicates", "leakage", "mean:*", "drift_pvalue:*"]
        per_split += [m for m in [task_of(use_case).rejected_labels, *task_of(use_case).label_flags] if m]
        return [Produces(m) for m in per_split] + [Produces(f"odd_coverage:{d.name}") for d in use_case.odd.descriptors]

    def run(self, ctx: Context) -> CheckOutcome:
        p: DataQualityParams = self.params
        uc = ctx.use_case
        lo, hi = uc.model.value_range
        names = uc.model.class_names
        task = task_of(uc)
        out: list[Measurement] = []
        images = len(uc.model.input_shape) == 3
        # tabular: one distribution per declared feature descriptor, at its column (x<i> naming, as specification.Limit)
        features = {} if images else {d.name: Limit.from_descriptor(d).column
                                      for d in uc.odd.descriptors if d.source == "feature"}
        split_of, phash, xhash = [], [], []
        props = {k: [] for k in [*(DESCRIPTORS if images else features), *task.label_properties]}
        meta_values: dict[str, Counter] = {}
        summary: dict = {"splits": {}, "unreadable": {}}

        def m(metric, value, role, n=None, **details):
            if n == 0:  # a count over no item is no evidence: undefined, so a claim on it is INCONCLUSIVE
                details["undefined"] = "no item (n = 0)"
            out.append(census(check=self.name, metric=metric, value=None if n == 0 else float(value), n=n,
                                   scope=Scope(split=role), details=details))

        for role in ctx.data.roles:
            stream = ctx.data.stream(role)
            counts = np.zeros(len(names), np.int64)
            flags = dict.fromkeys(task.label_flags, 0)
            n = constant = out_of_range = non_finite = 0
            role_props = {k: [] for k in props}
            for batch in stream.batches():
                imgs = batch.images
                xhash.extend(exact_hash(imgs).tolist())  # exact duplicates: the same pixels
                if isinstance(batch.labels, np.ndarray) and ((batch.labels < 0) | (batch.labels >= len(names))).any():
                    raise DataError(f"split {role!r}: labels outside 0..{len(names) - 1} (classes {names})")
                label_counts, label_props = task.label_stats(batch.labels, len(names))
                counts += label_counts
                for k, v in task.count_flags(batch.labels).items():
                    flags[k] += v
                n += len(batch)
                for k, v in label_props.items():
                    role_props[k].append(v)
                f = imgs.reshape(len(imgs), -1).astype(np.float64)
                finite = np.isfinite(f).all(axis=1)
                non_finite += int((~finite).sum())
                out_of_range += int((~finite | (f.min(axis=1) < lo) | (f.max(axis=1) > hi)).sum())
                if images:  # pixel statistics mean nothing for a row of tabular features
                    constant += int((f.max(axis=1) == f.min(axis=1)).sum())
                    phash.append(perceptual_hash(np.nan_to_num(imgs)))
                    views = Views(imgs, (lo, hi))  # the luminance once for every descriptor
                    for k, d in DESCRIPTORS.items():
                        role_props[k].append(d.fn(views))
                for name, j in features.items():
                    role_props[name].append(f[:, j])
                for key, values in batch.meta.items():
                    meta_values.setdefault(f"{role}/{key}", Counter()).update(values)
                split_of += [role] * len(batch)
            summary["unreadable"][role] = [f"{u.id}: {u.error}" for u in stream.unreadable][:50]
            m("items", n, role)
            m("unreadable", len(stream.unreadable), role, n=n + len(stream.unreadable))
            m("constant_images", constant, role, n=n)
            # NaN / inf values are a finding: items the input contract excluded, and any that reached the batch
            refused = sum(u.kind == "non_finite" for u in stream.unreadable)
            m("non_finite", non_finite + refused, role, n=n + len(stream.unreadable))
            m("out_of_range", out_of_range, role, n=n, value_range=[lo, hi])
            if task.rejected_labels:
                m(task.rejected_labels, sum(u.kind == "label" for u in stream.unreadable), role,
                  n=n + len(stream.unreadable))
            for k, v in flags.items():
                m(k, v, role, n=n)
            for c, k in zip(names, counts):
                out.append(proportion(self.name, f"class_share:{c}", int(k), int(counts.sum()), uc.plan.confidence,
                                      Scope(split=role), count=int(k)))
            m("imbalance_ratio", counts.max() / max(counts.min(), 1), role, n=n, counts=counts.tolist())
            for k in props:
                props[k].append(np.concatenate(role_props[k]) if role_props[k] else np.empty(0))
            summary["splits"][role] = {"items": n, "class_counts": dict(zip(names, counts.tolist()))}

        out += duplicates(self.name, split_of, np.array(xhash, np.uint64),
                          np.concatenate(phash) if phash else np.empty(0, np.uint64), p.near_duplicate_distance)
        ms, histograms = distributions(self.name, ctx.data.roles, props, p.histogram_bins)
        out += ms
        ms, summary["odd_coverage"] = odd_coverage(self.name, uc.odd.descriptors, ctx.data.roles, props, meta_values,
                                                   uc.plan.confidence)
        out += ms
        # counts over a capped split are counts over a sample: leakage also misses the unread training items
        counts = {"unreadable", "non_finite", "constant_images", "out_of_range", "duplicates", "near_duplicates",
                  "leakage", task.rejected_labels, *task.label_flags}
        out = [over_sample(x, ctx.data.sampled(x.scope.split, *(["train"] if x.metric == "leakage" else [])))
               if x.metric in counts else x for x in out]
        return CheckOutcome(
            check=self.name, measurements=out, summary=summary,
            figures=[Histograms(title="Properties per split", histograms=histograms,
                                caption="Distribution of each property per split (drift between splits).")]
            if histograms else [],
            caveat="Near duplicates are found by perceptual hash, drift by a two-sample Kolmogorov-Smirnov test "
                   "against the training split.",
            validity=[f"near duplicates: perceptual hash Hamming distance <= {p.near_duplicate_distance}/64",
                      "drift: two-sample Kolmogorov-Smirnov test of each image property against the train split"],
            limitations=[] if "train" in ctx.data.roles else ["no train split: leakage and drift not tested"],
        )

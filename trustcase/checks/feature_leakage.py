"""The `feature_leakage` check (AMLAS data stage, independence of the splits): items of a split that the model cannot
tell from a training item, by the similarity of their penultimate features to the nearest one (science in
`data.leakage`), with the threshold calibrated on the model's own feature space.

Calibration: on a seeded sample of the reference's items, each one's similarity to its nearest other reference item
that is not a perceptual duplicate of it (those are the same image again); the threshold is the order statistic whose
false-positive rate on distinct items is `false_positive_rate` (its interval from the order statistic's coverage). A
feature space where distinct items already reach a similarity of 1 cannot separate them: no threshold, and the
evidence says so. Power: copies of reference items with `copy_noise` grey levels of Gaussian noise, the share found.

Measurement per compared split: `feature_leakage`, the share of its items above the threshold (Clopper-Pearson);
the details hold the threshold, its false-positive rate with interval and the copies found. Each flagged pair is
listed with the perceptual-hash distance of its two images (0-2 bits: the same picture).
"""

from __future__ import annotations

import numpy as np
from pydantic import Field, ValidationInfo, field_validator

from trustcase.checks import Check, Context, Params, Produces
from trustcase.data.drift import Sample
from trustcase.data.leakage import NearestReference, calibrate, fewest_items
from trustcase.data.quality import exact_hash, perceptual_hash
from trustcase.measurement import clopper_pearson, proportion
from trustcase.odd.features import FeatureExtractor
from trustcase.schemas import CheckOutcome, Finding, Scope, Stage, Topic
from trustcase.seeding import item_seed

COLLAPSED = 1 - 1e-9  # a threshold this close to a cosine of 1: distinct items are one to the model, up to rounding


class FeatureLeakageParams(Params):
    reference: str = Field("train", description="the split whose items must not reappear")
    splits: list[str] | None = Field(None, description="the splits compared; None: every other split")
    false_positive_rate: float = Field(0.005, gt=0, lt=0.5, description="the share of distinct items the calibrated "
                                       "threshold may flag")
    distinct_hamming: int = Field(2, ge=0, le=32, description="perceptual-hash distance (bits of 64) up to which two "
                                  "reference items are one image, left out of the calibration (data_quality's)")
    calibration_items: int = Field(2000, ge=10, le=50000, validate_default=True,  # the default vs a given rate too
                                   description="seeded sample of reference items calibrated on (each against the "
                                   "whole reference): time bound")
    copies: int = Field(100, ge=0, le=2000, description="reference items copied with noise to measure the power")
    copy_noise: float = Field(1.0, ge=0, description="Gaussian noise of the copies, standard deviation in pixel "
                              "units (grey levels)")

    @field_validator("calibration_items")
    @classmethod
    def _enough_to_calibrate(cls, n: int, info: ValidationInfo) -> int:
        rate = info.data.get("false_positive_rate")  # validated before (declared first); absent if it failed
        if rate is not None and n < (need := fewest_items(rate)):
            raise ValueError(f"{n} items cannot calibrate a false_positive_rate of {rate:g}: the conformal threshold "
                             f"needs at least {need} (n + 1 >= 1 / rate)")
        return n


class FeatureLeakage(Check):
    name = "feature_leakage"
    Params = FeatureLeakageParams
    stage = Stage.DATA

    @classmethod
    def produces(cls, params, use_case):
        splits = params.splits if params.splits is not None else [s for s in use_case.data.splits
                                                                  if s != params.reference]
        return [Produces("feature_leakage", s) for s in splits]

    def run(self, ctx: Context) -> CheckOutcome:
        p: FeatureLeakageParams = self.params
        conf = ctx.use_case.plan.confidence
        lo_hi = tuple(ctx.use_case.model.value_range)
        images = len(ctx.use_case.model.input_shape) == 3
        # pictures get perceptual hashes (a look-alike is the same image again); rows of features an exact one
        picture_hash = (lambda x: perceptual_hash(np.nan_to_num(x))) if images else exact_hash
        extract = FeatureExtractor(ctx.model)
        index, hashes = NearestReference(), []
        calibration = Sample(p.calibration_items, ctx.seed, self.name)
        originals = Sample(p.copies, ctx.seed, self.name)  # the same seed order: the first items of the calibration
        for b in ctx.batches(p.reference):
            index.add(b.ids, extract(b.images)[0])
            hashes.append(picture_hash(b.images))
            calibration.update(b.ids, np.zeros((len(b), 0)))
            originals.update(b.ids, b.images)
        hashes = np.concatenate(hashes) if hashes else np.zeros(0, np.uint64)
        position = {i: k for k, i in enumerate(index.ids)}
        rows = np.array([position[i] for i in calibration.ids()], np.int64)
        distinct = p.distinct_hamming if images else 0
        threshold = calibrate(index.nearest_other(rows, hashes, distinct), p.false_positive_rate) \
            if len(rows) else None
        why = self._why_no_threshold(p, index, threshold, len(rows))
        cal = {"reference": p.reference, "calibrated_on": int(len(rows)), "false_positive_rate_asked":
               p.false_positive_rate, "feature_rank": index.rank}
        if threshold is not None:
            fp_lo, fp_hi = threshold.false_positive_interval(conf)
            cal |= {"threshold": threshold.value, "false_positive_rate": threshold.false_positive_rate(),
                    "false_positive_interval": [fp_lo, fp_hi]}
            found, n_copies = self._copies_found(ctx, extract, index, originals, threshold.value, lo_hi)
            if n_copies:
                iv = clopper_pearson(found, n_copies, conf)
                cal |= {"copies_found": found, "copies": n_copies, "copies_found_interval": [iv.lower, iv.upper],
                        "copy_noise": p.copy_noise}
        out, findings, summary = [], [], {"calibration": cal}
        splits = p.splits if p.splits is not None else [r for r in ctx.data.roles if r != p.reference]
        for role in splits:
            pairs, n = [], 0
            for b in ctx.batches(role):
                n += len(b)
                if why:
                    continue
                sim, ref = index.nearest(extract(b.images)[0])
                mine = picture_hash(b.images)
                for j in np.flatnonzero(sim > threshold.value):
                    bits = int(np.bitwise_count(mine[j] ^ hashes[position[ref[j]]]))
                    pairs.append((float(sim[j]), str(b.ids[j]), ref[j], bits))
            pairs.sort(key=lambda t: (-t[0], t[1]))
            same = sum(bits <= distinct for *_, bits in pairs)
            m = proportion(self.name, "feature_leakage", len(pairs), 0 if why else n, conf, Scope(split=role),
                           undefined=why or f"no item in the {role} split", **cal,
                           perceptual_duplicates=same)
            if cut := ctx.data.sampled(role, p.reference):  # a capped reference misses items a leak could match
                m = m.model_copy(update={"interval": None, "details": {**m.details, "no_interval": cut}})
            out.append(m)
            summary[role] = [f"{i} ~ {p.reference} {r} (similarity {s:.6f}, perceptual hashes {bits} bits apart)"
                             for s, i, r, bits in pairs[:50]]
            if pairs:
                findings.append(Finding(topic=Topic.DATA, cites={"k": m}, text=(
                    f"{len(pairs)} of the {n} {role} items ({{k}}) look, to the model, like a {p.reference} item "
                    f"({same} of them also in pixels, by perceptual hash); distinct items pass the threshold at a "
                    f"rate of {threshold.false_positive_rate():.1%}, about {threshold.false_positive_rate() * n:.1f} "
                    f"of {n} by chance: leakage to review.")))
        power = (f"; at it, {cal['copies_found']} of {cal['copies']} copies of {p.reference} items with "
                 f"Gaussian noise of {p.copy_noise:g} grey level(s) are found ({cal['copies_found_interval'][0]:.0%}-"
                 f"{cal['copies_found_interval'][1]:.0%})") if "copies" in cal else ""
        return CheckOutcome(
            check=self.name, measurements=out, findings=findings, summary=summary,
            limitations=[why] if why else [],
            caveat="Near in the model's feature space is not the same image: a flagged pair is a candidate leak, "
                   "for a reviewer to confirm (the perceptual-hash distance beside it says whether the pictures "
                   "match too).",
            validity=[f"cosine similarity of the model's {extract.mode} features ({extract.why}) whitened on the "
                      f"{p.reference} split ({index.rank} principal directions), exact nearest {p.reference} item",
                      *([f"threshold {threshold.value:.6f}: the order statistic of {threshold.n} {p.reference} items' "
                         f"similarity to their nearest other {p.reference} item ("
                         + (f"perceptual duplicates within {distinct} bits" if images else "exact duplicates")
                         + f" excluded) at which distinct items are flagged at a rate of "
                         f"{threshold.false_positive_rate():.2%} ({conf:.0%} interval {fp_lo:.2%}-{fp_hi:.2%}); "
                         f"calibrated on items the model was trained on: an unseen distinct item's rate can differ, "
                         f"in either direction; the calibration's nearest others include same-source look-alikes that "
                         f"are not perceptual duplicates (e.g. neighbouring cells of one module), and a held-out item "
                         f"has them in the reference too unless the split keeps each source whole, so such pairs are "
                         f"flagged beside true copies" + power]
                        if threshold is not None and not why else []),
                      f"{len(index)} {p.reference} items indexed"])

    @staticmethod
    def _why_no_threshold(p, index, threshold, calibrated: int) -> str:
        if not len(index):
            return f"no item in the {p.reference} split to compare with"
        if not index.rank:
            return (f"the model's features are the same for every {p.reference} item: no leakage test in this "
                    "feature space")
        if threshold is None:
            return (f"{calibrated} distinct {p.reference} items calibrate no threshold at a false-positive rate of "
                    f"{p.false_positive_rate:g} (it needs at least {fewest_items(p.false_positive_rate)})")
        if threshold.value >= COLLAPSED:
            return (f"the model's features do not separate distinct {p.reference} items: at a false-positive rate "
                    f"of {p.false_positive_rate:g} the threshold would be a similarity of {threshold.value:.9f}, "
                    f"where only identical features pass ({index.rank} principal directions): no leakage test in "
                    "this feature space")
        return ""

    def _copies_found(self, ctx, extract, index, originals, threshold, lo_hi) -> tuple[int, int]:
        """Copies of the sampled reference items with Gaussian noise (per item, the one seeding rule), and how many
        pass the threshold: the test's power against a leaked item seen through another exposure."""
        p = self.params
        if not len(originals):
            return 0, 0
        images, _ = originals.arrays()
        noisy = np.stack([np.clip(x + np.random.default_rng(item_seed(ctx.seed, self.name, i, "copy")).normal(
            0.0, p.copy_noise, x.shape), *lo_hi) for i, x in zip(originals.ids(), images, strict=True)])
        bs = ctx.use_case.data.batch_size
        sims = np.concatenate([index.nearest(extract(noisy[k:k + bs].astype(np.float32))[0])[0]
                               for k in range(0, len(noisy), bs)])
        return int((sims > threshold).sum()), len(noisy)

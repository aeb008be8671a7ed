"""The `label_issues` check (AMLAS data stage, "correctly labelled"): items whose label out-of-sample probabilities
contradict with confidence, by confident learning (science in `data.labels`).

Out of sample: on the held-out splits, the assessed model's probabilities; on the `train` split, out-of-fold
probabilities by cross-validation through the use case's training contract (`training.entry`: `folds` models, each
trained for `epochs` epochs without one fold, `TrainingRequest.held_out`). Folds are by near-duplicate group (perceptual
hashes within `near_duplicate_distance` bits, exact duplicates for tabular rows; the split rule of ELPV): a model that
trained on an item's near-copy repeats its label and hides the issue. Without a contract that can leave a fold
out, the train split is not screened and the evidence says why. Each split is screened on a seeded sample of at most
`max_items` items (the whole split when smaller).
Measurements per split: `suspected_labels` (the suspected share, the estimated noise rate, with its Clopper-Pearson
interval) and `suspected_labels:<class>` (the share of the items labelled that class).
Artefact: `suspected.png` (kind "image"), the least confident suspected items of each split with their label
and the suggested class; never for a confidential use case (real inputs).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from pydantic import Field, ValidationError, field_validator

from trustcase.checks import Check, CheckError, Context, Params, Produces
from trustcase.data import labels as L
from trustcase.data.drift import Sample
from trustcase.data.quality import exact_hash, near_pairs, perceptual_hash
from trustcase.errors import Unsupported, validation_message
from trustcase.measurement import proportion
from trustcase.models.classifier import ModelError
from trustcase.schemas import CheckOutcome, Finding, Scope, Stage, Topic
from trustcase.schemas.training import TrainingRequest, TrainingResult


class LabelIssuesParams(Params):
    splits: list[str] | None = Field(None, description="the splits screened; None: every held-out split, and train "
                                     "when cross-validated (folds > 0 and the use case has a training contract)")
    folds: int = Field(3, ge=0, le=10, description="cross-validation folds of the train split (0: none)")
    epochs: int = Field(5, ge=1, le=200, description="epochs of each fold's model (TrainingRequest.epochs): the cost "
                        "of the cross-validation, folds x epochs")
    training: dict[str, Any] = Field({}, description="request.params of the folds' models, over training.params "
                                     "(e.g. a cheaper recipe than the assessed model's)")
    near_duplicate_distance: int | None = Field(
        2, ge=0, le=32, description="perceptual-hash distance (bits of 64) within which train items are one group, "
        "kept in one fold (tabular rows: exact duplicates); None: every item its own group")
    max_items: int = Field(10000, ge=10, le=1_000_000, description="seeded sample screened per split: memory bound")
    thumbnails: int = Field(8, ge=0, le=64, description="suspected items shown per split (0: none)")

    @field_validator("folds")
    @classmethod
    def _folds(cls, v: int) -> int:
        if v == 1:
            raise ValueError("one fold leaves nothing to train on: 0 (no cross-validation) or at least 2")
        return v


class LabelIssues(Check):
    name = "label_issues"
    Params = LabelIssuesParams
    stage = Stage.DATA

    @staticmethod
    def _splits(params: LabelIssuesParams, roles, use_case) -> list[str]:
        if params.splits is not None:
            return list(params.splits)
        cross = params.folds and use_case.training is not None
        return [r for r in roles if r != "train" or cross]

    @classmethod
    def produces(cls, params, use_case):
        return [Produces(m, s) for s in cls._splits(params, use_case.data.splits, use_case)
                for m in ("suspected_labels", "suspected_labels:*")]

    def run(self, ctx: Context) -> CheckOutcome:
        p: LabelIssuesParams = self.params
        uc = ctx.use_case
        names, conf = uc.model.class_names, uc.plan.confidence
        images = len(uc.model.input_shape) == 3
        shown = p.thumbnails if images and not uc.confidential else 0
        out, findings, summary, limitations, rows = [], [], {}, [], []
        roles = self._splits(p, ctx.data.roles, uc)
        oof, grouped, not_cross = self._fold_models(ctx) if "train" in roles else (None, 0, "")
        validity = []
        for role in roles:
            scope = Scope(split=role)
            if role == "train" and oof is None:
                why = f"the train split's labels are not screened: {not_cross}"
                limitations.append(why)
                out.append(proportion(self.name, "suspected_labels", 0, 0, conf, scope, undefined=why))
                out += [proportion(self.name, f"suspected_labels:{c}", 0, 0, conf, scope, undefined=why)
                        for c in names]
                continue
            probabilities = oof if role == "train" else \
                (lambda x, ids: L.softmax(ctx.model.logits(x, ids)))
            sample = Sample(p.max_items, ctx.seed, self.name)
            lowest = L.LowestConfidence(shown)
            for batch in ctx.batches(role):
                pr = probabilities(batch.images, batch.ids)
                sample.update(batch.ids, pr, {"label": batch.labels})
                lowest.update(pr[np.arange(len(batch)), batch.labels], batch.ids, batch.images)
            pr, got = sample.arrays()
            y = got["label"].astype(np.int64) if len(sample) else np.zeros(0, np.int64)
            pr = pr if len(sample) else np.zeros((0, len(names)))
            ids = sample.ids()
            found = L.find(y, pr)
            limitations += [f"{role}: {w}" for w in found.warnings]
            k, n = int(found.suspected.sum()), len(y)
            whole = proportion(self.name, "suspected_labels", k, n, conf, scope, suspected=k)
            out.append(whole)
            per_class = {}
            for c, cls in enumerate(names):
                in_c = y == c
                kc = int((found.suspected & in_c).sum())
                per_class[cls] = kc
                out.append(proportion(self.name, f"suspected_labels:{cls}", kc, int(in_c.sum()), conf, scope,
                                      suspected=kc, undefined=f"no item labelled {cls} in the {role} split"))
            order = [j for j in np.argsort(found.quality, kind="stable") if found.suspected[j]]
            summary[role] = {"items": n, "seen": sample.seen, "suspected": k, "per_class": per_class,
                             "probabilities": "out of fold" if role == "train" else "the assessed model",
                             "suspected_items": [f"{ids[j]} (labelled {names[y[j]]}, suggested: "
                                                 f"{names[found.suggested[j]]})" for j in order[:50]]}
            if n:
                where = ", ".join(f"{v} labelled {c}" for c, v in per_class.items() if v)
                findings.append(Finding(topic=Topic.DATA, cites={"share": whole}, text=(
                    f"{k} of {n} labels of the {role} split look wrong ({{share}})" + (f": {where}." if k else ".")
                )))
            by_id = {i: j for j, i in enumerate(ids)}
            rows += [(role, i, x, names[y[by_id[i]]], names[found.suggested[by_id[i]]])
                     for _, i, x in lowest.items() if i in by_id and found.suspected[by_id[i]]]
        artefacts = self._thumbnails(ctx, rows) if rows else []
        if uc.confidential:
            limitations.append("confidential use case: no thumbnails of the suspected items (real inputs)")
        if "train" in ctx.data.roles and "train" not in roles:
            limitations.append("the train split's labels are not screened: " + (
                "it was not asked (splits)" if p.splits is not None else
                "cross-validation was not asked (folds: 0)" if not p.folds else
                "the use case offers no training contract (training.entry) to cross-validate through"))
        if oof is not None:
            summary.setdefault("train", {})["items_with_near_duplicates"] = grouped
            rule = ("by item" if p.near_duplicate_distance is None else
                    f"by near-duplicate group ({grouped} items have a near-copy in the split, perceptual hash within "
                    f"{p.near_duplicate_distance} bits: each group in one fold)" if images else
                    f"by group of exact duplicates ({grouped} items)")
            validity.append(
                f"train split: out-of-fold probabilities of {p.folds} models trained through the use case's training "
                f"contract ({uc.training.entry}, {p.epochs} epoch{'s' * (p.epochs > 1)} each, params "
                f"{p.training or 'as training.params'}), each without one fold of the items (folds {rule}, the one "
                "seeding rule); they are not the assessed model: its suspects are what this recipe contradicts")
        return CheckOutcome(
            check=self.name, measurements=out, findings=findings, artefacts=artefacts, summary=summary,
            limitations=limitations,
            caveat="A suspected label is one the model contradicts with confidence: a candidate for review by an "
                   "expert, not a proven error.",
            validity=["confident learning (cleanlab 2.9, pruning by the estimated noise rate per class pair) on "
                      "out-of-sample softmax probabilities: the assessed model's on the held-out splits",
                      *validity,
                      f"suspected share: {conf:.0%} Clopper-Pearson interval over the split's items (a seeded sample "
                      f"of at most {p.max_items} items per split, the one seeding rule); it estimates the noise rate "
                      "the model can see (errors the model repeats are not found)"])

    def _fold_models(self, ctx: Context) -> tuple[L.OutOfFold | None, int, str]:
        """The folds' models trained through the use case's training contract and how many train items share a
        group with another, or None and why not (the train split is then not screened): no contract, or one that
        answers `Unsupported` (it cannot leave items out) or does not confirm the fold. Anything else it raises is not
        a fallback: a `UserError` is the user's to fix, any other exception a bug."""
        from trustcase.models.loading import load_classifier
        from trustcase.registry import resolve

        p, uc = self.params, ctx.use_case
        if not p.folds:
            return None, 0, "cross-validation was not asked (folds: 0)"
        if uc.training is None:
            return None, 0, "the use case offers no training contract (training.entry) to cross-validate through"
        try:
            entry = resolve(uc.training.entry, uc.data.path, "training.entry", CheckError)
        except CheckError as e:
            return None, 0, str(e)
        fold, position, grouped = train_folds(ctx, p.folds, p.near_duplicate_distance)
        held: list[list[int]] = [[] for _ in range(p.folds)]
        for i, pos in position.items():
            held[fold[i]].append(pos)
        # the contract reads a use-case file: the one assessed (its paths are absolute already)
        case = ctx.workdir / "use_case.yaml"
        case.write_text(yaml.safe_dump(uc.model_dump(mode="json"), sort_keys=False))
        suffix = Path(uc.model.path).suffix if uc.model.path else ""
        models = []
        for f, positions in enumerate(held):
            where = f"training.entry {uc.training.entry!r}, fold {f + 1} of {p.folds}"
            request = TrainingRequest(out=ctx.workdir / f"fold{f + 1}{suffix}", use_case=case, seed=ctx.seed,
                                      held_out={"train": sorted(positions)}, epochs=p.epochs,
                                      params={**uc.training.params, **p.training})
            # the contract's one "cannot leave items out" is Unsupported: a fallback, said; a UserError (exit 2) or
            # any other exception (a bug: an internal error) propagates
            try:
                answer = entry(request)
            except Unsupported as e:
                return None, 0, f"{where} cannot leave items out: {e}"
            try:
                result = TrainingResult.model_validate(answer, from_attributes=True)
            except ValidationError as e:
                raise CheckError(f"{where} returned no TrainingResult: {validation_message(e)}") from None
            if result.held_out != len(positions):
                return None, 0, (f"{where} says it left {result.held_out} items out, not the fold's {len(positions)} "
                              "(TrainingResult.held_out): its model is not known to be out of sample")
            try:
                models.append(load_classifier(uc.model.model_copy(update={"path": result.model})))
            except ModelError as e:
                return None, 0, f"{where}: its model does not load: {e}"
        return L.OutOfFold(models, fold), grouped, ""

    def _thumbnails(self, ctx: Context, rows) -> list:
        from trustcase.explain import imaging

        lo_hi = tuple(ctx.use_case.model.value_range)
        tiles = imaging.to_uint8(np.stack([x for _, _, x, _, _ in rows]), lo_hi)
        per_row = 8
        grid = [list(tiles[i:i + per_row]) for i in range(0, len(tiles), per_row)]
        path = ctx.workdir / "suspected.png"
        imaging.save_png(path, imaging.tile(grid, scale=max(1, 96 // tiles.shape[1])))
        (ctx.workdir / "suspected.csv").write_text("split,item,label,suggested\n" + "".join(
            f"{r},{i},{lab},{m}\n" for r, i, _, lab, m in rows))
        return [ctx.artefact(path, "image"), ctx.artefact(ctx.workdir / "suspected.csv")]


def train_folds(ctx: Context, folds: int, distance: int | None) -> tuple[dict[str, int], dict[str, int], int]:
    """Each train item's fold (its group's: `labels.fold_groups`, near-duplicates by perceptual hashes within
    `distance` bits, exact duplicates for tabular rows, None: every item its own group; `labels.fold_of` of the
    group's key) and position in the split, and how many items share a group with another: one pass, 8 bytes of hash
    per item."""
    ids, positions, hashes = [], [], []
    images = len(ctx.use_case.model.input_shape) == 3
    for b in ctx.batches("train"):
        ids += [str(i) for i in b.ids]
        positions += [int(x) for x in b.index]
        if distance is not None:
            hashes.append(perceptual_hash(np.nan_to_num(b.images)) if images else exact_hash(b.images))
    pairs = near_pairs(np.concatenate(hashes), distance if images else 0) if hashes else np.empty((0, 2), np.int64)
    keys = L.fold_groups(ids, pairs)
    grouped = sum(n for n in Counter(keys).values() if n > 1)
    return ({i: L.fold_of(ctx.seed, k, folds) for i, k in zip(ids, keys, strict=True)},
            dict(zip(ids, positions, strict=True)), grouped)

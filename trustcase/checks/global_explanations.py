"""The `global_explanations` check: what the network as a whole relies on, as evidence.

- concept tests (TCAV, `explain.concepts`) on concepts built from the use case's own data without new labels:
  metadata values (e.g. cell_type=mono), descriptor bins (dark, bright, low / high contrast: quartiles of the
  sample) and perturbations (e.g. gaussian_blur@2); per concept and explained class, the TCAV score against
  `randoms` random sets and the two-sided t-test against random-vs-random scores (Bonferroni over the tests);
- class and channel visualisations (`explain.visualisation`), for every class and the channels of the last
  convolution that carry the critical class's decision;
- what each of those channels sees: its activation map on one input and the test inputs that activate it most;
- the representation map (`explain.representation`): UMAP of penultimate activations of the sample, clean and
  perturbed, coloured by class, correctness, ODD specification decision and perturbation, with the paths of a
  few inputs as the perturbation grows.

Metrics (scope: the split): tcav:<concept>:<class> (mean TCAV score over the random sets, t interval; details:
p_value, significant, null_mean, layer, cav_accuracy) for the first layer, tcav:<concept>:<class>@<layer> for
the others; concepts_significant (how many concept tests are significant).
Artefacts (kind "image"): concepts.png, visualisation.png, channels.png (not for a confidential use case: real
inputs), representation.png.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from trustcase import seeding
from trustcase.checks import Check, CheckError, Context, Params, Produces, Unsupported
from trustcase.errors import UserError
from trustcase.explain import attribution as A
from trustcase.explain import concepts as C
from trustcase.explain import imaging
from trustcase.explain import representation as R
from trustcase.explain import visualisation as V
from trustcase.explain.quality import mean_interval
from trustcase.measurement import census, estimate
from trustcase.odd.specification import SpecificationMonitor, State
from trustcase.robustness import perturbations as P
from trustcase.schemas import CheckOutcome, Scope, Stage


class Concepts(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    metadata: list[str] = Field([], description="metadata fields whose values become concepts (e.g. cell_type)")
    descriptors: list[Literal["dark", "bright", "low_contrast", "high_contrast"]] = ["dark", "bright",
                                                                                      "low_contrast"]
    perturbations: dict[str, float] = Field({}, description="perturbation name -> amplitude, e.g. gaussian_blur: 2")
    size: int = Field(30, ge=6, description="examples per concept and per random set")


class GlobalParams(Params):
    split: str = "test"
    items: int = Field(200, ge=20, description="seeded sample of the split for concepts, TCAV and the map")
    classes: list[str] | None = Field(None, description="classes whose decisions TCAV explains; default: critical")
    layers: list[str] | None = Field(None, description="TCAV layers; default: the last Conv2d")
    concepts: Concepts = Concepts()
    randoms: int = Field(10, ge=3, description="random sets per concept (and as many null pairs)")
    alpha: float = Field(0.05, gt=0, lt=1, description="family-wise significance level (Bonferroni)")
    steps: int = Field(128, ge=1, description="gradient-ascent steps of a visualisation")
    channels: int = Field(6, ge=0, description="most influential channels of the last convolution shown")
    top_images: int = Field(5, ge=1, description="top-activating test inputs per channel")
    representation: bool = True
    perturbation: str | None = Field(None, description="perturbation of the map and its paths (default: the "
                                                        "first concept perturbation)")
    amplitudes: list[float] = Field([], description="path amplitudes (default: the perturbation's grid)")
    paths: int = Field(4, ge=0)
    batch_size: int = Field(32, ge=1)


class GlobalExplanations(Check):
    """Concept tests, feature visualisation, filter views and the representation map."""

    name = "global_explanations"
    Params = GlobalParams
    stage = Stage.TESTING

    @classmethod
    def produces(cls, params, use_case):
        return [Produces("tcav:*", params.split), Produces("concepts_significant", params.split)]

    def run(self, ctx: Context) -> CheckOutcome:
        p: GlobalParams = self.params
        uc = ctx.use_case
        names = list(uc.model.class_names)
        vr = tuple(uc.model.value_range)
        classes = p.classes or [uc.model.critical_class]
        bad = [c for c in classes if c not in names]
        if bad:
            raise CheckError(f"global_explanations: classes {bad} do not exist; classes: {names}")
        perts = {}
        for name, amp in p.concepts.perturbations.items():
            try:
                perts[name] = P.PERTURBATIONS.resolve(name)(vr)
                perts[name].validate(amp)
            except UserError as e:
                raise CheckError(f"global_explanations: concept perturbation {name}: {e}") from None
        if p.perturbation and p.perturbation not in perts:  # the map's perturbation, refused before any work too
            try:
                perts[p.perturbation] = P.PERTURBATIONS.resolve(p.perturbation)(vr)
            except UserError as e:
                raise CheckError(f"global_explanations: perturbation {p.perturbation}: {e}") from None
        net = A.Network(ctx.model)
        if not net.differentiable:
            raise Unsupported("global explanations need the model's internals (activations, gradients); "
                              "the model is a black box")
        last_conv = net.layer(None)[0]
        layers = p.layers or [last_conv]
        for layer in layers:
            try:
                net.layer(layer)
            except UserError as e:  # a layer that does not exist (ExplainError)
                raise CheckError(f"global_explanations: {e}") from None

        # a seeded sample of the split: positions first (one cheap pass), then the sampled items read back
        positions = np.concatenate([b.index for b in ctx.batches(p.split)] or [np.zeros(0, int)])
        if not len(positions):
            raise Unsupported(f"split {p.split!r} has no readable items")
        rng = np.random.default_rng(ctx.seed)
        wanted = set(rng.choice(positions, size=min(p.items, len(positions)), replace=False).tolist())
        got = {}
        for batch in ctx.batches(p.split):
            for j, i in enumerate(batch.index):
                if int(i) in wanted:
                    got[int(i)] = (batch.images[j], int(batch.labels[j]), {k: v[j] for k, v in batch.meta.items()},
                                  batch.ids[j])
        index = np.array(sorted(got))
        images = np.stack([got[i][0] for i in index])
        labels = np.array([got[i][1] for i in index])
        ids = [got[i][3] for i in index]
        meta = {k: [got[i][2].get(k) for i in index] for k in got[int(index[0])][2]}
        x = ctx.model.to_input(images)
        preds = ctx.model.logits(images, ids).argmax(axis=1)
        scope = Scope(split=p.split)
        out, limitations, artefacts = [], [], []

        # --- concepts from the use case's own data ---
        size = p.concepts.size
        missing = [f for f in p.concepts.metadata if f not in meta]
        if missing:
            raise CheckError(f"global_explanations: metadata field {missing[0]!r} not in the data; fields: "
                             f"{sorted(meta)}")

        def perturb(name: str, amp: float, sel: np.ndarray) -> torch.Tensor:
            seeds = seeding.item_seeds(ctx.seed, self.name, [ids[k] for k in sel], name)
            return ctx.model.to_input(perts[name].apply(images[sel], amp, seeds))

        concept_sets, small = C.concept_sets(x, images, meta, rng, size, p.concepts.metadata, p.concepts.descriptors,
                                             p.concepts.perturbations, perturb)
        limitations += small
        tests, threshold, skipped = C.tcav_tests(net, concept_sets, x, labels, {c: names.index(c) for c in classes},
                                                 layers, rng, size, p.randoms, p.alpha, p.batch_size)
        limitations += skipped
        table = []
        for t in tests:
            r, suffix = t.score, "" if t.score.layer == layers[0] else f"@{t.score.layer}"
            out.append(estimate(
                check=self.name, metric=f"tcav:{r.concept}:{t.cls}{suffix}", value=r.mean,
                interval=mean_interval(np.array(r.scores), uc.plan.confidence), n=len(r.scores), scope=scope,
                details={"p_value": r.p_value, "significant": t.significant, "null_mean": float(np.mean(
                    r.random_scores)), "layer": r.layer, "cav_accuracy": r.cav_accuracy, "items": t.items}))
            table.append({"concept": r.concept, "class": t.cls, "layer": r.layer, "tcav": round(r.mean, 3),
                          "null": round(float(np.mean(r.random_scores)), 3), "p_value": float(f"{r.p_value:.3g}"),
                          "significant": t.significant, "cav_accuracy": round(r.cav_accuracy, 3)})
        tests = len(concept_sets) * len(classes) * len(layers)
        n_sig = sum(r["significant"] for r in table)
        out.append(census(check=self.name, metric="concepts_significant", value=n_sig, n=len(table),
                               scope=scope, details={"significant": [f"{r['concept']}:{r['class']}" for r in table
                                                                     if r["significant"]]}))
        if table:
            C.draw(ctx.workdir / "concepts.png", table, threshold)
            artefacts.append(ctx.artefact(ctx.workdir / "concepts.png", "image"))

        # --- feature visualisation: classes, then the channels that carry the critical decision ---
        crit = names.index(uc.model.critical_class)
        sel = np.flatnonzero(preds == crit)
        channels = V.influential_channels(net, last_conv, x[sel if len(sel) else slice(None)][:64],
                                          torch.full((min(64, len(sel) or len(x)),), crit), p.channels) \
            if p.channels else []
        targets = list(range(len(names))) + [A.Neuron(last_conv, c) for c in channels]
        vis = V.visualise(net, targets, steps=p.steps, seed=ctx.seed)
        rows = [[imaging.to_uint8(vis[:len(names)], vr)[i] for i in range(len(names))]]
        if channels:
            rows.append([imaging.to_uint8(vis[len(names):], vr)[i] for i in range(len(channels))])
        imaging.save_png(ctx.workdir / "visualisation.png", imaging.tile(rows, scale=max(1, 128 // vis.shape[1])))
        artefacts.append(ctx.artefact(ctx.workdir / "visualisation.png", "image"))

        # --- what each channel sees: its map on one input, and the test inputs that excite it most ---
        top = {}
        if channels:
            tracker = V.TopActivating(net, last_conv, channels, p.top_images)
            for batch in ctx.batches(p.split):
                tracker.update(ctx.model.to_input(batch.images), batch.index)
            top = tracker.top()
            if uc.confidential:
                limitations.append("confidential use case: no activation maps or top-activating inputs (real "
                                   "inputs); channel visualisations only")
            else:
                self._channels(ctx, net, last_conv, channels, vis[len(names):], images[0], top, vr)
                artefacts.append(ctx.artefact(ctx.workdir / "channels.png", "image"))

        # --- the representation map ---
        summary_map = None
        if p.representation:
            summary_map = self._map(ctx, net, p, x, images, labels, preds, ids, meta, perts, names, limitations)
            if summary_map:
                artefacts.append(ctx.artefact(ctx.workdir / "representation.png", "image"))
        return CheckOutcome(
            check=self.name, measurements=out, artefacts=artefacts, limitations=limitations,
            summary={"tcav": table, "concepts": {k: len(v) for k, v in concept_sets.items()}, "classes": classes,
                     "layers": layers, "significance_threshold": threshold, "channels": channels,
                     "top_activating": {str(c): [int(i) for i, _ in v] for c, v in top.items()},
                     "representation": summary_map, "items": len(x)},
            validity=[
                f"{len(x)} items of the {p.split} split (seeded sample, seed {ctx.seed}); concepts of {size} "
                f"examples from that sample: metadata values, descriptor quartiles, perturbed items",
                f"TCAV (Kim et al. 2018) at layer(s) {layers}: sign-count scores of up to 50 items per explained "
                f"class against {p.randoms} random sets of {size} sample items; CAVs by a closed-form ridge "
                f"discriminant; two-sided t-test against {p.randoms} independent random-vs-random scores, "
                f"significant below "
                f"{p.alpha:g} / {max(1, tests)} tests (Bonferroni)",
                f"visualisations: {p.steps} Adam steps on a 1/f Fourier parameterisation with 2-pixel jitter; "
                f"channels: the {len(channels)} of layer {last_conv} with the largest mean gradient x activation "
                f"for {uc.model.critical_class}",
                "representation: UMAP (umap-learn, seeded, one thread) of the input of the last linear layer",
            ],
        )

    def _channels(self, ctx, net, layer, channels, vis, image, top, vr):
        """One row per channel: its visualisation, its activation map on one input, its top inputs."""
        _, module = net.layer(layer)
        maps = net.activations(module, ctx.model.to_input(image[None]))[0, channels].numpy()
        h, w = image.shape[:2]
        grey = V.normalise_maps(maps)
        up = [np.repeat(np.asarray(torch.nn.functional.interpolate(torch.from_numpy(g[None, None]).float(),
                                                                    size=(h, w), mode="nearest")[0, 0]).astype(
            np.uint8)[..., None], 3, axis=-1) for g in grey]
        wanted = {i for v in top.values() for i, _ in v}
        got = {}
        for batch in ctx.batches(self.params.split):
            for j, i in enumerate(batch.index):
                if int(i) in wanted:
                    got[int(i)] = batch.images[j]
        rows = []
        for k, ch in enumerate(channels):
            row = [imaging.to_uint8(vis[k:k + 1], vr)[0], up[k]]
            row += [imaging.to_uint8(got[i][None], vr)[0] for i, _ in top[ch] if i in got]
            rows.append(row)
        imaging.save_png(ctx.workdir / "channels.png", imaging.tile(rows, scale=max(1, 96 // h)))
        (ctx.workdir / "channels.txt").write_text(
            f"rows: channels {channels} of layer {layer}; columns: visualisation, activation map of the first "
            f"sample item, then the {self.params.top_images} test items that activate the channel most\n")

    def _map(self, ctx, net, p, x, images, labels, preds, ids, meta, perts, names, limitations):
        uc = ctx.use_case
        name = p.perturbation or next(iter(p.concepts.perturbations), None)
        pert = None
        if name:
            pert = perts[name]  # resolved and validated before any work
        feats = [R.features(net, x[s:s + p.batch_size]) for s in range(0, len(x), p.batch_size)]
        groups = {"clean": np.concatenate(feats)}
        kinds = ["clean"] * len(x)
        cls = [names[i] for i in labels]
        correct = ["correct" if a == b else "wrong" for a, b in zip(labels, preds)]
        paths_idx = []
        if pert is not None:
            grid = [a for a in (p.amplitudes or list(pert.grid)) if a > 0]
            top = max(grid)
            seeds = seeding.item_seeds(ctx.seed, self.name, ids, name)
            moved = pert.apply(images, top, seeds)
            mx = ctx.model.to_input(moved)
            groups["perturbed"] = np.concatenate([R.features(net, mx[s:s + p.batch_size])
                                                  for s in range(0, len(mx), p.batch_size)])
            mpred = ctx.model.logits(moved, ids).argmax(axis=1)
            kinds += [f"{name}@{top:g}"] * len(x)
            cls += cls
            correct += ["correct" if a == b else "wrong" for a, b in zip(labels, mpred)]
            paths_idx = list(range(min(p.paths, len(x))))
            for a in sorted(grid):
                groups[f"path@{a:g}"] = R.features(net, ctx.model.to_input(pert.apply(images[paths_idx], a,
                                                                                       seeds[paths_idx])))
        odd = ["not declared"] * len(kinds)
        if uc.odd is not None and uc.odd.descriptors:
            spec = SpecificationMonitor.from_odd(uc.odd.descriptors, tuple(uc.model.value_range))
            states = [spec.evaluate(images, meta).states.max(axis=1)]
            if pert is not None:
                states.append(spec.evaluate(moved, meta).states.max(axis=1))
            odd = [State(s).name.lower() for s in np.concatenate(states)]
        allf = np.concatenate(list(groups.values()))
        if len(allf) < R.MIN_POINTS:
            limitations.append(f"representation map not drawn: it needs at least {R.MIN_POINTS} points, "
                               f"got {len(allf)}")
            return None
        xy = R.embed(allf, ctx.seed)
        n_pts = len(kinds)
        paths = []
        if paths_idx:
            path_xy = xy[n_pts:].reshape(-1, len(paths_idx), 2)  # (amplitudes, paths, 2)
            paths = [np.concatenate([xy[i][None], path_xy[:, k]]) for k, i in enumerate(paths_idx)]
        palette = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b"]
        panels = {"class": (cls, {c: palette[i % len(palette)] for i, c in enumerate(names)}),
                  "correctness": (correct, {"correct": "#2ca02c", "wrong": "#d62728"}),
                  "ODD (specification)": (odd, {"in": "#2ca02c", "near": "#ff7f0e", "out": "#d62728",
                                                "not declared": "#7f7f7f"}),
                  "perturbation": (kinds, {k: c for k, c in zip(dict.fromkeys(kinds), ["#1f77b4", "#d62728"])})}
        R.draw(ctx.workdir / "representation.png", xy[:n_pts], panels, paths,
               f"UMAP of penultimate activations ({len(x)} items" + (f", clean and {name}; paths: {len(paths)} items "
                                                                      "as the amplitude grows)" if pert else ")"))
        return {"points": n_pts, "perturbation": name, "paths": len(paths)}

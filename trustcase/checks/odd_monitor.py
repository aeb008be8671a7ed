"""The `odd_monitor` check: fits the ODD monitor and validates it on clean, perturbed and out-of-domain
inputs (science in `odd.monitor` and `odd.validation`).

A detector or a segmenter (tasks detection, segmentation): the specification's image descriptors as for any model,
and the learned monitor on the model's backbone features (`features(x)`, one Gaussian: an image has no one class; no
energy score without class logits; a segmenter without `features`: its per-pixel logits pooled, mean and max per
class); the accuracy figures are not measured (a detector has no one decision per image; a segmenter's image-level
decision would need a second forward pass the monitor does not make).

Curves: `odd_detection:<perturbation>` (stopped, alerted or stopped, model accuracy, accuracy on accepted
inputs vs amplitude, the ODD boundary marked) and `odd_roc` (ROC of each learned score).
Summary keys: `specification`, `feature_mode`, `calibration`, `clean` (state counts, reasons),
`perturbations` (per perturbation: unit, grid, boundary and its source, rates and reasons per amplitude),
`monitor_file`.
Findings: what the monitor stops; figure: the share stopped against amplitude, in units of each ODD boundary.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import field_validator, model_validator

from trustcase import seeding
from trustcase.checks import Check, CheckError, Context, Params, Produces, Unsupported
from trustcase.measurement import clopper_pearson, estimate, proportion
from trustcase.models.classifier import sha256_file
from trustcase.odd import monitor as odd
from trustcase.odd.specification import SpecResult
from trustcase.odd.validation import _Cell, derived_boundary, roc
from trustcase.robustness import perturbations as P
from trustcase.schemas import (
    CheckOutcome,
    Curve,
    CurveOverlay,
    Finding,
    Measurement,
    PerturbationScope,
    Scope,
    Series,
    Stage,
    Topic,
)

POOLED = {"detection": "detector", "segmentation": "segmenter"}  # tasks whose monitor pools one Gaussian


class OddParams(Params):
    perturbations: dict[str, list[float] | None] | None = None  # None: every registered one, default grid
    boundary: dict[str, float] = {}  # declared ODD limit (amplitude) per perturbation
    fit_split: str = "train"
    calibration_split: str = "validation"
    split: str = "test"
    scores: list[Literal["mahalanobis", "energy"]] = ["mahalanobis", "energy"]
    near_rate: float = 0.05
    out_rate: float = 0.001
    shrinkage: float | Literal["oas"] = "oas"
    rank: int | None = 128  # leading covariance directions kept exactly (None: all)

    @field_validator("perturbations")
    @classmethod
    def _known(cls, v):
        for name, grid in (v or {}).items():
            pert = P.get(name, (0.0, 255.0))  # names the known ones when unknown
            for a in grid or []:
                pert.validate(a)
        if v is not None and not v:
            raise ValueError("name at least one perturbation (or leave it out for all)")
        return v

    @field_validator("shrinkage")
    @classmethod
    def _shrink(cls, v):
        if v != "oas" and not 0 <= v <= 1:
            raise ValueError(f"shrinkage must be 'oas' or in [0, 1], got {v}")
        return v

    @field_validator("rank")
    @classmethod
    def _rank(cls, v):
        if v is not None and v < 1:
            raise ValueError("rank must be >= 1 (or null for the full covariance)")
        return v

    @model_validator(mode="after")
    def _coherent(self):
        if not 0 < self.out_rate < self.near_rate < 1:
            raise ValueError(f"need 0 < out_rate < near_rate < 1, got out_rate {self.out_rate}, "
                             f"near_rate {self.near_rate}")
        if not self.scores:
            raise ValueError("name at least one learned score")
        extra = set(self.boundary) - set(self.grids())
        if extra:
            raise ValueError(f"boundary names perturbations that are not swept: {sorted(extra)}")
        return self

    def grids(self) -> dict[str, list[float]]:
        chosen = self.perturbations if self.perturbations is not None else dict.fromkeys(P.PERTURBATIONS)
        return {n: sorted({0.0, *(P.PERTURBATIONS[n].grid if g is None else g)}) for n, g in chosen.items()}


class _Split:
    """Alternate items of one stream between fit and calibration when both use the same split."""

    def __init__(self, batches, keep: int):
        self.batches, self.keep = batches, keep

    def __iter__(self):
        for b in self.batches:
            sel = (b.index % 2) == self.keep
            if sel.any():
                labels = _pick(b.labels, sel) if isinstance(b.labels, list) else b.labels[sel]  # a detector's boxes
                yield type(b)(images=b.images[sel], labels=labels, ids=_pick(b.ids, sel),
                              meta={k: _pick(v, sel) for k, v in b.meta.items()},
                              index=b.index[sel])


class OddMonitor(Check):
    name = "odd_monitor"
    Params = OddParams
    stage = Stage.DEPLOYMENT
    tasks = frozenset({"classification", "detection", "segmentation"})
    not_tiled = ("the monitor is fitted on, and guards, inputs of the model's input size (one tile); a monitor of "
                 "whole images of any size is not built")

    @classmethod
    def produces(cls, params, use_case):
        """Metrics (scope: the split, no perturbation, unless said):
        - `false_alarm_rate`: share of clean in-ODD items stopped (OUT); `alert_rate`: share alerted or stopped.
        - `odd_share`: share of clean items inside the specification.
        - `accuracy_accepted` / `accuracy_stopped`: model accuracy on clean items the monitor lets through
          (IN or NEAR) / stops (OUT); the second only when some are stopped.
        - `detection_rate` / `detection_rate_alert`: share of inputs outside the ODD (every perturbation with a
          boundary, every amplitude beyond it) that are stopped / alerted or stopped; also per perturbation and
          amplitude beyond its boundary, under a perturbation scope.
        - per perturbation and amplitude (perturbation scope, amplitude 0 included): `stop_rate`, `alert_rate`,
          `accuracy`, `accuracy_accepted`, `accuracy_stopped`.
        - `auroc:<score>`, `fpr_at_95tpr:<score>` for each learned score and `learned` (their combined
          statistic): clean in-ODD items against inputs outside the ODD (descriptive: a requirement can only name
          a metric whose suffix is a class)."""
        clean = ["false_alarm_rate", "alert_rate", "odd_share", "accuracy_accepted", "accuracy_stopped",
                 "detection_rate", "detection_rate_alert", "auroc:*", "fpr_at_95tpr:*"]
        perturbed = ["stop_rate", "alert_rate", "accuracy", "accuracy_accepted", "accuracy_stopped", "detection_rate"]
        if use_case.task in POOLED:  # no one class per image to be right about
            clean, perturbed = ([m for m in ms if not m.startswith("accuracy")] for ms in (clean, perturbed))
        keys = list(params.perturbations) if params.perturbations is not None else ["*"]
        return [Produces(m, params.split) for m in clean] + [
            Produces(m, params.split, k) for k in keys for m in perturbed]

    def run(self, ctx: Context) -> CheckOutcome:
        p: OddParams = self.params
        uc, conf = ctx.use_case, ctx.use_case.plan.confidence
        if ctx.model.tabular and p.perturbations:
            raise Unsupported(f"{self.name}: the perturbations {sorted(p.perturbations)} act on images; the model "
                              "takes feature vectors (perturbations: {} validates the monitor on clean data)")
        for role in {p.fit_split, p.calibration_split, p.split}:
            if role not in ctx.data.roles:
                raise CheckError(f"{self.name}: split {role!r} is not in data.splits {ctx.data.roles}")
        try:
            spec = odd.SpecificationMonitor.from_odd(uc.odd.descriptors, uc.model.value_range)
        except odd.MonitorError as e:
            raise CheckError(f"{self.name}: {e}") from None
        limitations = []
        if not spec.limits:
            limitations.append("the use case declares no ODD descriptor: only the learned monitor decides")
        fit_b, cal_b = ctx.batches(p.fit_split), ctx.batches(p.calibration_split)
        if p.fit_split == p.calibration_split:
            fit_b, cal_b = _Split(fit_b, 0), _Split(ctx.batches(p.calibration_split), 1)
            limitations.append(f"fit and calibration share the {p.fit_split} split (alternate items)")
        try:
            monitor = odd.fit(ctx.model, sha256_file(uc.model.path), spec, fit_b, cal_b, p.scores,
                              p.near_rate, p.out_rate, p.shrinkage, p.rank)
        except odd.MonitorError as e:
            raise CheckError(f"{self.name}: {e}") from None
        pooled = uc.task in POOLED  # no one class per image: accuracy figures not measured
        if pooled:
            model = POOLED[uc.task]
            dropped = sorted(set(p.scores) - set(monitor.learned.scores))
            if dropped:
                limitations.append(f"learned score(s) {dropped} not applicable to a {model} (no class logits)")
            limitations.append({"detector": "a detector has no one decision per image",
                                "segmenter": "the monitor reads the segmenter's features, not its masks, so its "
                                             "image-level decision is not judged here"}[model]
                               + ": the accuracy figures are not measured")
            if monitor.feature_mode != "backbone":
                limitations.append(f"learned score on weaker features: {monitor.extractor.why}")
        elif monitor.feature_mode != "penultimate":
            limitations.append(f"learned scores on the logits only: {monitor.extractor.why}")
        info = monitor.learned.info
        if info.get("out_method") != "conformal":
            limitations.append(f"OUT threshold: {info.get('out_method')} (too few calibration items for an "
                               f"empirical {p.out_rate:g} false-alarm rate)")
        path = monitor.save(ctx.workdir / "monitor.safetensors")

        grids = {} if ctx.model.tabular else p.grids()  # the default sweep perturbs images
        clean, base = _Cell(), _Cell()
        cells = {n: [_Cell() for _ in g] for n, g in grids.items()}
        perts = {n: P.get(n, uc.model.value_range) for n in grids}
        for batch in ctx.batches(p.split):
            d = monitor.evaluate(batch.images, batch.meta)
            clean.add(d, None if pooled else batch.labels)
            inside = d.spec.states.max(axis=1, initial=0) < odd.State.OUT
            if not inside.any():
                continue
            imgs, labels = batch.images[inside], None if pooled else batch.labels[inside]
            ids = [i for i, k in zip(batch.ids, inside, strict=True) if k]
            meta = {k: _pick(v, inside) for k, v in batch.meta.items()}
            d0 = _subset(d, inside)
            base.add(d0, labels)
            for n, grid in grids.items():
                seeds = seeding.item_seeds(ctx.seed, self.name, ids, n)
                for j, a in enumerate(grid):
                    cells[n][j].add(d0 if a == 0 else monitor.evaluate(perts[n].apply(imgs, a, seeds), meta), labels)
        return self._outcome(ctx, p, monitor, path, grids, perts, clean, base, cells, conf, limitations)

    def _outcome(self, ctx, p, monitor, path, grids, perts, clean, base, cells, conf, limitations):
        out: list[Measurement] = []
        pooled = ctx.use_case.task in POOLED

        def m(metric, k, n, scope=None, amplitude=None, **details):
            if pooled and metric.startswith("accuracy"):
                return
            out.append(proportion(self.name, metric, k, n, conf, scope or Scope(split=p.split), amplitude,
                                  **details))

        m("false_alarm_rate", base.stopped, base.n)
        m("alert_rate", base.alerted, base.n)
        m("odd_share", base.n, clean.n)
        m("accuracy_accepted", clean.acc_correct, clean.acc_n)
        m("accuracy_stopped", clean.stop_correct, clean.stopped)
        if clean.stopped == 0 and not pooled:
            limitations.append(f"no clean {p.split} item was stopped: accuracy_stopped is measured under "
                               "perturbations only")
        summary = {"specification": [lim.to_dict() for lim in monitor.spec.limits],
                   "feature_mode": monitor.feature_mode, "calibration": monitor.learned.to_dict(),
                   "clean": {"items": clean.n, "in_odd": base.n, "stopped": clean.stopped, "alerted": clean.alerted,
                             "reasons": dict(clean.reasons)},
                   "perturbations": {}, "monitor_file": str(path.name)}
        curves, outside = [], {k: [] for k in [*p.scores, "learned"]}
        det_n = det_stop = det_alert = 0
        for n, grid in grids.items():
            cs = cells[n]
            frac_out = [c.spec_out / c.n if c.n else 0.0 for c in cs]
            bound = p.boundary.get(n, derived_boundary(grid, frac_out))
            source = "declared" if n in p.boundary else ("specification" if bound is not None else None)
            if bound is None:
                limitations.append(f"{n}: no declared boundary and the specification never excludes half the "
                                   f"items up to {grid[-1]:g} {perts[n].unit}: detection not counted for it")
            for a, c in zip(grid, cs, strict=True):
                sc = Scope(split=p.split, perturbation=PerturbationScope(name=n, max_amplitude=a))
                m("stop_rate", c.stopped, c.n, sc, a)
                m("alert_rate", c.alerted, c.n, sc, a)
                m("accuracy", c.correct, c.n, sc, a)
                m("accuracy_accepted", c.acc_correct, c.acc_n, sc, a)
                m("accuracy_stopped", c.stop_correct, c.stopped, sc, a)
                if bound is not None and a > bound:
                    m("detection_rate", c.stopped, c.n, sc, a)
                    det_n, det_stop, det_alert = det_n + c.n, det_stop + c.stopped, det_alert + c.alerted
                    for k in outside:
                        outside[k].append(c.score(k))

            def rate(attr, cs=cs):
                return [getattr(c, attr) / c.n if c.n else float("nan") for c in cs]

            bands = [clopper_pearson(c.stopped, c.n, conf) for c in cs]
            curves.append(Curve(
                id=f"odd_detection:{n}", title=f"ODD monitor under {n}: detection and model accuracy",
                x_label=f"{n} amplitude ({perts[n].unit})", y_label="share of inputs", x=grid,
                series={"stopped (OUT)": Series(y=rate("stopped"), lower=[b.lower for b in bands],
                                                upper=[b.upper for b in bands]),
                        "alerted or stopped (NEAR/OUT)": Series(y=rate("alerted")),
                        **({} if pooled else {
                            "model accuracy": Series(y=rate("correct")),
                            "accuracy on accepted inputs": Series(
                                y=[c.acc_correct / c.acc_n if c.acc_n else float("nan") for c in cs])})},
                x_marks={"ODD boundary": bound} if bound is not None else {},
            ))
            summary["perturbations"][n] = {
                "unit": perts[n].unit, "grid": grid, "boundary": bound, "boundary_source": source,
                "outside_specification": frac_out, "stop_rate": rate("stopped"), "alert_rate": rate("alerted"),
                "accuracy": None if pooled else rate("correct"),
                "reasons": [dict(c.reasons.most_common(5)) for c in cs]}
        m("detection_rate", det_stop, det_n)
        m("detection_rate_alert", det_alert, det_n)
        roc_series, fgrid = {}, np.linspace(0, 1, 51)
        for k, parts in outside.items():
            pos = np.concatenate(parts) if parts else np.empty(0)
            neg = base.score(k)
            if len(pos) == 0 or len(neg) == 0:
                continue
            auroc, fpr95, fpr, tpr = roc(neg, pos)
            out.append(estimate(check=self.name, metric=f"auroc:{k}", value=auroc, n=len(neg) + len(pos), interval=None,
                                   scope=Scope(split=p.split), details={"negatives": len(neg), "positives": len(pos)}))
            out.append(estimate(check=self.name, metric=f"fpr_at_95tpr:{k}", value=fpr95, n=len(neg), interval=None,
                                   scope=Scope(split=p.split)))
            roc_series[k] = Series(y=np.interp(fgrid, fpr, tpr).tolist())
        if roc_series:
            curves.append(Curve(id="odd_roc", title="Learned ODD scores: clean in-ODD vs outside the ODD",
                                x_label="false-alarm rate (clean in-ODD)", y_label="detection rate (outside the ODD)",
                                x=fgrid.tolist(), series=roc_series))
        if not det_n:
            limitations.append("no perturbed input is outside the ODD: detection rates and AUROC not measured")
        info = monitor.learned.info
        validity = [
            f"specification: {', '.join(monitor.spec.names) or 'none'} against the ranges of the use case's ODD",
            f"learned scores {monitor.learned.scores} on {monitor.feature_mode} features, fitted on "
            f"{info.get('n_fit', 0)} "
            f"in-specification {p.fit_split} items (shrinkage {info.get('shrinkage', 0):.3g}, rank "
            f"{info.get('rank')}), calibrated on {info['n_calibration']} held-out {p.calibration_split} items "
            f"at false-alarm rates NEAR {p.near_rate:g}, OUT {p.out_rate:g}",
            f"validated on {clean.n} {p.split} items ({base.n} inside the specification), {conf:.0%} Clopper-Pearson "
            f"intervals; perturbations applied in pixel space with seed {ctx.seed}",
            "outside the ODD: amplitudes beyond each perturbation's boundary "
            + ", ".join(f"{n} > {v['boundary']:g} ({v['boundary_source']})"
                        for n, v in summary["perturbations"].items() if v["boundary"] is not None),
            f"monitor file for model sha256 {monitor.model_sha256[:12]}…, schema version {odd.SCHEMA_VERSION}",
        ]
        whole = {m.metric: m for m in out if m.scope.perturbation is None and not m.scope.subgroup
                 and m.value is not None}
        said = [(key, text) for key, text in (
            ("detection_rate", f"The ODD monitor stops {{detection_rate}} of the inputs outside the ODD (n = "
                               f"{whole['detection_rate'].n if 'detection_rate' in whole else 0})."),
            ("false_alarm_rate", "It stops {false_alarm_rate} of the clean in-ODD inputs by mistake."),
            ("accuracy_accepted", "On the inputs it accepts the model is correct {accuracy_accepted} of the time."))
            if key in whole]
        detection = [c for c in curves if c.id.startswith("odd_detection:") and c.x_marks]
        return CheckOutcome(
            check=self.name, measurements=out, curves=curves, summary=summary, validity=validity,
            limitations=limitations, artefacts=[ctx.artefact(path, "monitor")],
            units={n: perts[n].unit for n in grids},
            findings=[Finding(topic=Topic.MONITOR, text=text, cites={key: whole[key]}) for key, text in said],
            figures=[CurveOverlay(
                title="ODD monitor: share stopped vs perturbation amplitude", scale_mark="ODD boundary",
                x_label="amplitude / amplitude at the ODD boundary", y_label="inputs stopped (%)",
                curves={c.id: c.id.removeprefix("odd_detection:").replace("_", " ") for c in detection},
                illustrates=["detection_rate", "detection_rate_alert"])] if detection else [],
            caveat="It holds for the monitor fitted to this model version, validated on held-out test items and on "
                   "synthetic perturbations beyond the ODD boundary.")


def _subset(d: odd.Decisions, sel: np.ndarray) -> odd.Decisions:
    """The decisions of the selected inputs (for the clean base of the sweep: no second model pass)."""
    spec = SpecResult({k: _pick(v, sel) for k, v in d.spec.values.items()}, d.spec.states[sel])
    return odd.Decisions(
        state=d.state[sel], spec=spec, spec_names=d.spec_names, limits=d.limits,
        learned_state=None if d.learned_state is None else d.learned_state[sel],
        scores={k: v[sel] for k, v in d.scores.items()},
        statistic=None if d.statistic is None else d.statistic[sel],
        logits=None if d.logits is None else d.logits[sel], learned=d.learned, class_names=d.class_names)


def _pick(values: list, sel: np.ndarray) -> list:
    return [x for x, s in zip(values, sel, strict=True) if s]


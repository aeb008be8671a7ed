"""Validation of the ODD monitor as evidence (AMLAS deployment stage): check `odd_monitor`.

Fits the learned monitor on `fit_split` (default train), calibrates its thresholds on the held-out
`calibration_split` (default validation; when both are the same split, items alternate between fit and
calibration), writes the fitted monitor file (artefact kind "monitor", `monitor.safetensors`), then
validates it on `split` (default test): clean, and under each perturbation swept past the ODD.

The base of the sweep is the clean test items the specification accepts (not OUT): the in-ODD inputs.
The ODD boundary of a perturbation is the amplitude declared in `boundary`, else the amplitude at which
half the perturbed in-ODD items leave the specification (linear between grid points); inputs perturbed
beyond it are "outside the ODD".

The check `odd_monitor` packs this validation as evidence (its measurements: `OddMonitor.produces`).
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from trustcase.measurement import auroc
from trustcase.odd import monitor as odd


class _Cell:
    """Counts for one (perturbation, amplitude): streamed, only per-item scalars kept (the learned scores)."""

    def __init__(self):
        self.n = self.stopped = self.alerted = self.correct = self.spec_out = 0
        self.acc_n = self.acc_correct = self.stop_correct = 0
        self.reasons: Counter = Counter()
        self.scores: dict[str, list[np.ndarray]] = {}

    def add(self, d: odd.Decisions, labels: np.ndarray | None):
        """`labels` None: a model without one decision per item to be right or wrong about (a detector)."""
        stop = d.state == odd.State.OUT
        self.n += len(d)
        self.stopped += int(stop.sum())
        self.alerted += int((d.state >= odd.State.NEAR).sum())
        self.acc_n += int((~stop).sum())
        if labels is not None:
            ok = d.prediction == labels
            self.correct += int(ok.sum())
            self.acc_correct += int(ok[~stop].sum())
            self.stop_correct += int(ok[stop].sum())
        spec_state = d.spec.states.max(axis=1, initial=0)
        self.spec_out += int((spec_state == odd.State.OUT).sum())
        for j, name in enumerate(d.spec_names):
            for level in (odd.State.NEAR, odd.State.OUT):
                k = int((d.spec.states[:, j] == level).sum())
                if k:
                    self.reasons[f"{name} {level.name}"] += k
        if d.learned_state is not None:
            for level in (odd.State.NEAR, odd.State.OUT):
                k = int((d.learned_state == level).sum())
                if k:
                    self.reasons[f"learned {level.name}"] += k
            for k, v in {**d.scores, "learned": d.statistic}.items():
                self.scores.setdefault(k, []).append(v)

    def score(self, name: str) -> np.ndarray:
        return np.concatenate(self.scores.get(name, [np.empty(0)]))


def roc(neg: np.ndarray, pos: np.ndarray) -> tuple[float, float, np.ndarray, np.ndarray]:
    """AUROC (ties count half), FPR at 95% TPR, and the ROC curve's (fpr, tpr) points."""
    if len(neg) == 0 or len(pos) == 0:
        return float("nan"), float("nan"), np.array([0.0, 1.0]), np.array([0.0, 1.0])
    area = auroc(neg, pos)
    thresholds = np.unique(np.concatenate([neg, pos]))[::-1]
    tpr = np.array([0.0, *[(pos >= t).mean() for t in thresholds]])
    fpr = np.array([0.0, *[(neg >= t).mean() for t in thresholds]])
    fpr95 = float(fpr[np.argmax(tpr >= 0.95)])
    return area, fpr95, fpr, tpr


def derived_boundary(grid: list[float], outside: list[float]) -> float | None:
    """Amplitude at which half the perturbed in-ODD items leave the specification (linear between points)."""
    for j in range(1, len(grid)):
        if outside[j] >= 0.5:
            a0, a1, y0, y1 = grid[j - 1], grid[j], outside[j - 1], outside[j]
            return float(a1 if y1 == y0 else a0 + (0.5 - y0) * (a1 - a0) / (y1 - y0))
    return None









"""Plots drawn from evidence records only (never from live models), saved as PNG: every check's curves and
figures by their type, whichever check declared them."""

from __future__ import annotations

import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from trustcase.schemas import (  # noqa: E402
    Assessment,
    CheckOutcome,
    ConfusionMatrix,
    Curve,
    CurveOverlay,
    Histograms,
    Measurement,
    ReliabilityDiagram,
)

COLOURS = {"PASS": "#1a7f37", "FAIL": "#cf222e", "INCONCLUSIVE": "#9a6700"}


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110, metadata={"Software": None})  # no timestamps: same input, same bytes
    plt.close(fig)
    return path


def confusion(f: ConfusionMatrix, path: Path) -> Path:
    cm, names = f.counts, f.classes
    fig, ax = plt.subplots(figsize=(3.6, 3.2))
    ax.imshow(cm, cmap="Blues")
    for i, row in enumerate(cm):
        for j, v in enumerate(row):
            ax.text(j, i, str(v), ha="center", va="center", color="black", fontsize=11)
    ax.set_xticks(range(len(names)), names)
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f.title)
    return _save(fig, path)


def reliability(f: ReliabilityDiagram, path: Path) -> Path:
    edges = f.edges
    centres = [(lo + hi) / 2 for lo, hi in zip(edges[:-1], edges[1:], strict=True)]
    keep = [i for i, c in enumerate(f.count) if c > 0]
    fig, ax = plt.subplots(figsize=(3.8, 3.2))
    ax.plot([0, 1], [0, 1], "--", color="grey", lw=1, label="perfect calibration")
    ax.bar([centres[i] for i in keep], [f.accuracy[i] for i in keep], width=edges[1] - edges[0],
           alpha=0.6, edgecolor="black", label="accuracy in bin")
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_title(f.title)
    ax.legend(fontsize=7, loc="upper left")
    return _save(fig, path)


def histograms(f: Histograms, path: Path) -> Path | None:
    if not f.histograms:
        return None
    props = f.histograms
    fig, axes = plt.subplots(1, len(props), figsize=(3.3 * len(props), 2.8))
    axes = axes if len(props) > 1 else [axes]
    for ax, (name, h) in zip(axes, props.items(), strict=True):
        for role, counts in h.counts.items():
            total = max(sum(counts), 1)
            ax.stairs([c / total for c in counts], h.edges, label=role)
        ax.set_title(name)
        ax.set_ylabel("share of split")
        ax.legend(fontsize=7)
    return _save(fig, path)


def figure(o: CheckOutcome, f, path: Path) -> Path | None:
    """One figure a check declared, drawn by its type."""
    if isinstance(f, ConfusionMatrix):
        return confusion(f, path)
    if isinstance(f, ReliabilityDiagram):
        return reliability(f, path)
    if isinstance(f, Histograms):
        return histograms(f, path)
    return overlay(f, [c for c in o.curves if c.id in f.curves], path)


def curve(c: Curve, path: Path) -> Path:
    """Any check's curve, drawn generically: series with their bands, vertical and horizontal markers."""
    fig, ax = plt.subplots(figsize=(5.2, 3.4))
    for name, s in c.series.items():
        n = min(len(c.x), len(s.y))  # a malformed curve is drawn as far as it goes, never crashes the report
        line, = ax.plot(c.x[:n], s.y[:n], marker="o" if n <= 30 else None, ms=3, label=name)
        if s.lower is not None and s.upper is not None:
            k = min(n, len(s.lower), len(s.upper))
            ax.fill_between(c.x[:k], s.lower[:k], s.upper[:k], color=line.get_color(), alpha=0.2)
    for label, x in c.x_marks.items():
        ax.axvline(x, color="black", ls=":", lw=1)
        ax.annotate(label, (x, 1), xycoords=("data", "axes fraction"), fontsize=7, rotation=90, ha="right", va="top")
    for label, y in c.y_marks.items():
        ax.axhline(y, color="black", ls="--", lw=1)
        ax.annotate(label, (1, y), xycoords=("axes fraction", "data"), fontsize=7, ha="right", va="bottom")
    if c.log_x:
        ax.set_xscale("log")
    ax.set_xlabel(c.x_label)
    ax.set_ylabel(c.y_label)
    ax.set_title(c.title, fontsize=10)
    if c.series:
        ax.legend(fontsize=7)
    return _save(fig, path)


def curve_key(check: str, curve_id: str) -> str:
    return "curve_" + re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{check}__{curve_id}")


def figure_key(outcome: int, figure: int) -> str:
    """The image key of the figure-th figure of the outcome-th outcome of the assessment."""
    return f"figure_{outcome}_{figure}"


def draw_all(a: Assessment, out: Path, failures: list[str] | None = None) -> dict[str, Path]:
    """Every plot the record allows; one that cannot be drawn (malformed record) is noted in `failures`."""
    failures = [] if failures is None else failures
    found: dict[str, Path | None] = {}

    def attempt(key: str, draw) -> None:
        try:
            found[key] = draw()
        except Exception as e:  # noqa: BLE001  one malformed record must not cost the other plots
            plt.close("all")
            failures.append(f"plot {key} not drawn ({type(e).__name__}: {e}); its tables still hold the numbers")

    for j, o in enumerate(a.outcomes):
        for c in o.curves:
            key = curve_key(o.check, c.id)
            attempt(key, lambda c=c, key=key: curve(c, out / f"{key}.png"))
        for i, f in enumerate(o.figures):
            key = figure_key(j, i)
            attempt(key, lambda o=o, f=f, key=key: figure(o, f, out / f"{key}.png"))
    return {k: v for k, v in found.items() if v is not None}


def claim_sweep(title: str, x_label: str, y_label: str, ms: list[Measurement], threshold: float, claimed: float,
                held: float | None, percent: bool, path: Path) -> Path:
    """One claim's metric over its whole amplitude grid: the band, the threshold, the claimed amplitude and the
    amplitude up to which the claim holds."""
    scale = 100.0 if percent else 1.0
    x = [m.amplitude or 0.0 for m in ms]
    y = [scale * m.value if m.value is not None else float("nan") for m in ms]
    fig, ax = plt.subplots(figsize=(4.6, 2.5))
    line, = ax.plot(x, y, marker="o", ms=3, color="#0969da", label="measured")
    if all(m.interval for m in ms):
        ax.fill_between(x, [scale * m.interval.lower for m in ms], [scale * m.interval.upper for m in ms],
                        color=line.get_color(), alpha=0.2, label="confidence interval")
    ax.axhline(scale * threshold, color=COLOURS["FAIL"], ls="--", lw=1, label="required")
    ax.axvspan(min(x), claimed, color="#8c959f", alpha=0.12, lw=0, label="claimed range")
    if held is not None and held < claimed - 1e-12:
        ax.axvline(held, color="black", ls=":", lw=1)
        ax.annotate("holds up to", (held, 0.02), xycoords=("data", "axes fraction"), fontsize=7, rotation=90,
                    ha="right", va="bottom")
    ax.set_xlabel(x_label, fontsize=8)
    ax.set_ylabel(y_label + (" (%)" if percent else ""), fontsize=8)
    ax.set_title(title, fontsize=9)
    ax.tick_params(labelsize=7)
    ax.legend(fontsize=6, loc="best")
    return _save(fig, path)


def overlay(f: CurveOverlay, curves: list[Curve], path: Path) -> Path | None:
    """The first series of each curve in percent, its x divided by its `scale_mark` (1 = the mark)."""
    usable = [c for c in curves if c.x_marks.get(f.scale_mark) and c.series]
    if not usable:
        return None
    fig, ax = plt.subplots(figsize=(4.6, 2.5))
    for c in usable:
        b = c.x_marks[f.scale_mark]
        s = next(iter(c.series.values()))
        n = min(len(c.x), len(s.y))
        ax.plot([v / b for v in c.x[:n]], [100 * v for v in s.y[:n]], marker="o", ms=3, label=f.curves[c.id])
    ax.axvline(1.0, color="black", ls=":", lw=1)
    ax.annotate(f.scale_mark, (1.0, 0.02), xycoords=("data", "axes fraction"), fontsize=7, rotation=90,
                ha="right", va="bottom")
    ax.set_xlabel(f.x_label, fontsize=8)
    ax.set_ylabel(f.y_label, fontsize=8)
    ax.set_title(f.title, fontsize=9)
    ax.tick_params(labelsize=7)
    ax.legend(fontsize=6, loc="best")
    return _save(fig, path)

"""Is an attribution map evidence? Faithfulness, robustness, sanity and location, per method.

Saliency maps can look right and be wrong, so each method of `attribution.METHODS` is measured:

- deletion / insertion (Petsiuk et al. 2018): remove (insert) pixels from the most relevant down,
  replacing them by (taking them from) the baseline, and follow the target probability; the area under
  the curve is low for deletion and high for insertion when the map is faithful. A random ordering
  gives the chance level (the `random` series).
- infidelity and max-sensitivity (captum.metrics, Yeh et al. 2019): how well attributions predict the
  output change under Gaussian input noise (normalised, lower is better), and how much the map moves
  under a small uniform perturbation of the input (lower is better).
- the model-randomisation sanity check (Adebayo et al. 2018): convolution / linear weights are
  re-drawn from the output down (cascading) and the Spearman rank correlation between the original
  and the randomised maps (absolute values) is measured; a method whose maps barely change explains the
  input, not the model, and fails (correlation above `sanity_max_correlation`).
- where the model looks vs where it should (`region`): the share of positive relevance inside the
  region of interest (relevance mass, Arras et al. 2022) and the share of items whose most relevant
  pixel lies inside it (pointing game); the region's share of the image is the chance level.

The check `explainability` measures every method this way (its measurements: `Explainability.produces`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import numpy as np
import torch
from captum.metrics import infidelity, sensitivity_max
from pydantic import BaseModel, ConfigDict, Field, model_validator
from scipy import stats

from trustcase.errors import CheckError
from trustcase.explain import attribution as A
from trustcase.explain import imaging
from trustcase.registry import resolve
from trustcase.schemas import Interval
from trustcase.seeding import content_id, item_seed


def mean_interval(values: np.ndarray, confidence: float) -> Interval | None:
    """Student-t interval of a mean (None for fewer than two values)."""
    v = np.asarray(values, np.float64)
    v = v[np.isfinite(v)]
    if len(v) < 2:
        return None
    half = float(stats.t.ppf(0.5 + confidence / 2, len(v) - 1) * v.std(ddof=1) / np.sqrt(len(v)))
    return Interval(lower=float(v.mean()) - half, upper=float(v.mean()) + half, confidence=confidence, method="t")


# --- faithfulness --------------------------------------------------------------------------------

def _order(heatmaps: np.ndarray, seed: int) -> np.ndarray:
    """Pixel ranks per item (0 = most relevant); ties broken at random so flat maps score as chance."""
    flat = heatmaps.reshape(len(heatmaps), -1)
    # ties broken per item, seeded by its map: an item's order does not depend on the other items of the batch
    tie = np.array([np.random.default_rng(item_seed(seed, "deletion_insertion", content_id(m), "ties")).random(
        flat.shape[1]) for m in flat]).reshape(flat.shape)
    order = np.lexsort((tie, -flat), axis=-1)
    ranks = np.empty_like(order)
    np.put_along_axis(ranks, order, np.arange(flat.shape[1])[None].repeat(len(flat), 0), axis=1)
    return ranks


def deletion_insertion(net: A.Network, x: torch.Tensor, target: torch.Tensor, heatmaps: np.ndarray,
                       baseline: float | torch.Tensor, steps: int = 20, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Target probability as the most relevant pixels are deleted / inserted: two (B, steps + 1) arrays."""
    if heatmaps.shape != (x.shape[0], *x.shape[2:]):
        raise ValueError(f"heatmaps of shape {heatmaps.shape} do not match inputs {tuple(x.shape)}")
    b, c, h, w = x.shape
    ranks = torch.from_numpy(_order(heatmaps, seed))  # (B, HW)
    counts = torch.round(torch.linspace(0, h * w, steps + 1)).long()
    base = torch.as_tensor(baseline, dtype=x.dtype).expand_as(x)
    dele, ins = np.zeros((b, steps + 1)), np.zeros((b, steps + 1))
    per = max(1, A.MAX_EVAL_ELEMENTS // (2 * (steps + 1) * x[0].numel()))
    with torch.no_grad():
        for s in range(0, b, per):
            sl = slice(s, s + per)
            gone = (ranks[sl, None, :] < counts[None, :, None]).float().view(-1, steps + 1, 1, h, w)  # (b, S, 1, H, W)
            xi, bi = x[sl, None], base[sl, None]
            d = xi * (1 - gone) + bi * gone
            i = bi * (1 - gone) + xi * gone
            both = torch.cat([d, i]).reshape(-1, c, h, w)
            p = net.probabilities(both).reshape(2, -1, steps + 1, net.model.n_classes)
            t = target[sl]
            dele[sl] = p[0, torch.arange(len(t)), :, t].numpy()
            ins[sl] = p[1, torch.arange(len(t)), :, t].numpy()
    return dele, ins


def auc(curves: np.ndarray) -> np.ndarray:
    """Area under curves sampled on [0, 1] at equal steps, per row."""
    return np.trapezoid(curves, dx=1.0 / (curves.shape[1] - 1), axis=1)


def as_input_shape(maps: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Single-channel maps spread over the input channels, so that sums over features are preserved."""
    return maps.expand_as(x) / x.shape[1] if maps.shape[1] == 1 and x.shape[1] > 1 else maps


def infidelity_of(net: A.Network, x: torch.Tensor, target: torch.Tensor, maps: torch.Tensor, noise: float,
                  samples: int, seed: int) -> np.ndarray:
    """captum infidelity (normalised) per item under Gaussian noise of std `noise` (normalised input units)."""
    def perturb(inputs):
        eps = torch.randn_like(inputs) * noise
        return eps, inputs - eps

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        out = infidelity(net.forward, perturb, x, as_input_shape(maps, x), target=target, n_perturb_samples=samples,
                         max_examples_per_batch=int(np.clip(A.MAX_EVAL_ELEMENTS // x[0].numel(), len(x),
                                                            len(x) * samples)),
                         normalize=True)
    return out.detach().numpy()


def sensitivity_of(explain: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x: torch.Tensor,
                   target: torch.Tensor, radius: float, samples: int, seed: int) -> np.ndarray:
    """captum max-sensitivity per item: the largest relative change of the map within an L-inf ball."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        def fn(inp, target):
            # a tuple: captum iterates the unperturbed explanation as a tuple of inputs (a bare tensor
            # would be read as one input per item, every item compared with the first one's map)
            return (explain(inp[0] if isinstance(inp, tuple) else inp, target),)

        out = sensitivity_max(fn, x, perturb_radius=radius,
                              n_perturb_samples=samples, max_examples_per_batch=max(1, len(x)), target=target)
    return out.detach().numpy()


def mu_fidelity(net: A.Network, x: torch.Tensor, target: torch.Tensor, heatmaps: np.ndarray,
                baseline: float | torch.Tensor, cells: int = 8, subset: float = 0.2, samples: int = 32,
                seed: int = 0) -> np.ndarray:
    """MuFidelity (Bhatt et al. 2020) per item: the Pearson correlation, over random subsets S of grid cells
    (each kept out with probability `subset`), between the relevance in S and the drop of the target
    probability when S is replaced by the baseline. 1: the map predicts every drop; 0: it predicts none."""
    b, c, h, w = x.shape
    seg = imaging.grid_segments(h, w, cells)[0, 0].numpy()
    rng = np.random.default_rng(seed)
    out = rng.random((samples, cells * cells)) < subset  # the same subsets for every item
    hm = np.asarray(heatmaps, np.float64).reshape(b, -1)
    in_cell = np.stack([np.bincount(seg.ravel(), hm[i], minlength=cells * cells) for i in range(b)])  # (B, cells^2)
    relevance = in_cell @ out.T  # (B, samples)
    masks = torch.from_numpy(out[:, seg].astype(np.float32))[:, None]  # (samples, 1, h, w): 1 = removed
    base = torch.as_tensor(baseline, dtype=x.dtype).expand(1, c, h, w)
    rows = torch.arange(b)
    drops = np.zeros((b, samples))
    per = max(1, A.MAX_EVAL_ELEMENTS // (b * x[0].numel()))
    with torch.no_grad():
        p0 = net.probabilities(x)[rows, target]
        for s in range(0, samples, per):
            m = masks[s:s + per][None]  # (1, k, 1, h, w)
            inputs = (x[:, None] * (1 - m) + base[:, None] * m).reshape(-1, c, h, w)
            p = net.probabilities(inputs).reshape(b, m.shape[1], -1)[rows, :, target]
            drops[:, s:s + per] = (p0[:, None] - p).numpy()
    return np.array([_pearson(r, d) for r, d in zip(relevance, drops)])


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a - a.mean(), b - b.mean()
    den = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / den) if den > 0 else float("nan")


def stability(explain: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x: torch.Tensor, target: torch.Tensor,
              radius: float, samples: int, seed: int) -> np.ndarray:
    """Relative change of the map, ||phi(x + d) - phi(x)|| / ||phi(x)||, for `samples` draws of d uniform in
    the L-inf ball of `radius`: (B, samples). Its mean per item is the Average Stability (Xplique; lower is
    better), its maximum the max-sensitivity of Yeh et al. 2019."""
    gens = [torch.Generator().manual_seed(item_seed(seed, "stability", content_id(v), "noise")) for v in x]
    ref = explain(x, target).flatten(1)
    norm = ref.norm(dim=1)
    out = np.zeros((len(x), samples))
    for k in range(samples):  # each item's draws from its own generator: the same in any batch
        d = (torch.stack([torch.rand(x.shape[1:], generator=g) for g in gens]).to(x.dtype) * 2 - 1) * radius
        out[:, k] = ((explain(x + d, target).flatten(1) - ref).norm(dim=1) / norm.clamp(min=1e-30)).numpy()
    out[(norm == 0).numpy()] = np.nan  # an empty map has no relative change: undefined, not infinite
    return out


def complexity(heatmaps: np.ndarray) -> np.ndarray:
    """Entropy of the absolute map as a distribution over pixels, divided by its maximum log(pixels)
    (Bhatt et al. 2020): 0 when one pixel holds all relevance, 1 when relevance is uniform (nan: empty map)."""
    a = np.abs(np.asarray(heatmaps, np.float64)).reshape(len(heatmaps), -1)
    total = a.sum(axis=1, keepdims=True)
    p = a / np.where(total > 0, total, 1)
    ent = -(p * np.log(np.where(p > 0, p, 1))).sum(axis=1)
    return np.where(total[:, 0] > 0, ent / np.log(a.shape[1]), np.nan)


def sparseness(heatmaps: np.ndarray) -> np.ndarray:
    """Gini index of the absolute map (Chalasani et al. 2020): 0 for a uniform map, (n - 1) / n when one pixel
    holds all relevance (nan: empty map)."""
    a = np.sort(np.abs(np.asarray(heatmaps, np.float64)).reshape(len(heatmaps), -1), axis=1)
    n, total = a.shape[1], a.sum(axis=1)
    k = np.arange(1, n + 1)
    gini = ((2 * k - n - 1) * a).sum(axis=1) / (n * np.where(total > 0, total, 1))
    return np.where(total > 0, gini, np.nan)


def spearman_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman rank correlation of each row of a with the same row of b."""
    ra = stats.rankdata(a.reshape(len(a), -1), axis=1)
    rb = stats.rankdata(b.reshape(len(b), -1), axis=1)
    ra -= ra.mean(axis=1, keepdims=True)
    rb -= rb.mean(axis=1, keepdims=True)
    den = np.sqrt((ra * ra).sum(axis=1) * (rb * rb).sum(axis=1))
    return np.where(den > 0, (ra * rb).sum(axis=1) / np.where(den > 0, den, 1), 1.0)


def cascade(total: int) -> list[int]:
    """How many top layers to randomise at each step of the sanity check: the top one, half, all."""
    return sorted({1, max(1, total // 2), total}) if total else []


# --- where the model looks -----------------------------------------------------------------------

class Region(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    """Where the evidence for the decision should be: a rule, a box, or a partner's function.

    - rule "interior": the image without a border of `border` (fraction of each side), e.g. the cell
      area of a solar cell, not its edge;
    - rule "box": `box` = [x0, y0, x1, y1] as fractions of width and height;
    - rule "function": `function` = 'module:function', called as f(images (B,H,W,C), ids, meta) and
      returning boolean masks (B, H, W), e.g. read from annotation files.
    """

    rule: Literal["interior", "box", "function"] = "interior"
    border: float = Field(0.1, ge=0, lt=0.5)
    box: tuple[float, float, float, float] | None = None
    function: str | None = None
    description: str = ""

    @model_validator(mode="after")
    def _coherent(self) -> Region:
        if self.rule == "box":
            if self.box is None:
                raise ValueError("rule 'box' needs box: [x0, y0, x1, y1] (fractions)")
            x0, y0, x1, y1 = self.box
            if not (0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1):
                raise ValueError(f"box {list(self.box)} must satisfy 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1")
        if self.rule == "function" and not self.function:
            raise ValueError("rule 'function' needs function: 'module:function'")
        return self

    def label(self) -> str:
        if self.description:
            return self.description
        if self.rule == "interior":
            return f"the image without a {self.border:.0%} border"
        if self.rule == "box":
            return f"the box {list(self.box)} (fractions of width, height)"
        return f"masks from {self.function}"

    def masks(self, images: np.ndarray, ids: list[str], meta: dict[str, list[str]]) -> np.ndarray:
        b, h, w = images.shape[:3]
        if self.rule == "function":
            function = resolve(self.function, what="region function", error=CheckError)
            m = np.asarray(function(images, ids, meta), dtype=bool)
            if m.shape != (b, h, w):
                raise ValueError(f"region function {self.function} returned masks of shape {m.shape}, "
                                 f"expected {(b, h, w)}")
            return m
        if self.rule == "interior":
            x0 = y0 = self.border
            x1 = y1 = 1 - self.border
        else:
            x0, y0, x1, y1 = self.box
        rows = (np.arange(h) + 0.5) / h
        cols = (np.arange(w) + 0.5) / w
        inside = ((rows >= y0) & (rows <= y1))[:, None] & ((cols >= x0) & (cols <= x1))[None]
        return np.broadcast_to(inside, (b, h, w)).copy()


def relevance_mass(heatmaps: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """Share of positive relevance inside the mask, per item (nan when a map has no positive relevance)."""
    pos = np.maximum(heatmaps, 0).reshape(len(heatmaps), -1)
    total = pos.sum(axis=1)
    inside = (pos * masks.reshape(len(masks), -1)).sum(axis=1)
    return np.where(total > 0, inside / np.where(total > 0, total, 1), np.nan)


def pointing_game(heatmaps: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """Whether the most relevant pixel lies inside the mask, per item."""
    flat = heatmaps.reshape(len(heatmaps), -1)
    return masks.reshape(len(masks), -1)[np.arange(len(flat)), flat.argmax(axis=1)]


# --- the check -----------------------------------------------------------------------------------


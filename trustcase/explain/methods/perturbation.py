"""Perturbation methods: the model's answers to masked inputs, no gradients (so black boxes too): occlusion,
RISE, Sobol indices, and local linear surrogates on superpixels (LIME, Kernel SHAP)."""

from __future__ import annotations

import math
import warnings
from typing import ClassVar, Literal

import numpy as np
import torch
from captum._utils.models.linear_model import LinearModel
from captum.attr import KernelShap, Lime, Occlusion
from pydantic import Field
from scipy.stats import qmc
from torch import nn

from trustcase.explain import ExplainError
from trustcase.explain.attribution import Attribution, Method, Options, _base_seed, _chunk
from trustcase.explain.imaging import grid_segments, superpixels
from trustcase.seeding import content_id, item_seed


class OcclusionMethod(Method):
    name = "occlusion"
    needs_gradients = False

    class Options(Options):
        window: int = Field(8, ge=1, description="side of the occluding square, in pixels")
        stride: int = Field(4, ge=1)

    @classmethod
    def fits(cls, options, input_shape):
        if len(input_shape) == 3 and options.window > min(input_shape[1:]):
            h, w = input_shape[1:]
            raise ExplainError(f"occlusion window {options.window} px is larger than the image ({h}x{w}): at most "
                               f"{min(h, w)}")

    def attribute(self, x, target, baseline):
        o = self.options
        c = x.shape[1]
        maps = Occlusion(self.net.forward).attribute(
            x, sliding_window_shapes=(c, o.window, o.window), strides=(c, o.stride, o.stride), baselines=baseline,
            target=target, perturbations_per_eval=_chunk(x[0].numel(), len(x)))
        return Attribution(maps)


class RiseMethod(Method):
    """RISE: the saliency of a pixel is the expected class probability over random masks that keep it."""

    name = "rise"
    needs_gradients = False

    class Options(Options):
        masks: int = Field(500, ge=1, le=100_000)
        cells: int = Field(8, ge=2, description="mask grid resolution (cells per side)")
        keep: float = Field(0.5, gt=0, lt=1, description="probability that a cell is kept")

    def masks(self, n: int, h: int, w: int, gen: torch.Generator) -> torch.Tensor:
        o = self.options
        ch, cw = math.ceil(h / o.cells), math.ceil(w / o.cells)
        grid = (torch.rand(n, 1, o.cells, o.cells, generator=gen) < o.keep).float()
        up = nn.functional.interpolate(grid, size=((o.cells + 1) * ch, (o.cells + 1) * cw), mode="bilinear",
                                       align_corners=False)
        dy = torch.randint(0, ch, (n,), generator=gen)
        dx = torch.randint(0, cw, (n,), generator=gen)
        rows = (dy[:, None] + torch.arange(h)[None])[:, :, None].expand(n, h, w)
        cols = (dx[:, None] + torch.arange(w)[None])[:, None, :].expand(n, h, w)
        return up[torch.arange(n)[:, None, None], 0, rows, cols]  # (n, h, w): random shifts of the smooth grid

    def attribute(self, x, target, baseline):
        o = self.options
        b, c, h, w = x.shape
        gen = torch.Generator().manual_seed(_base_seed())  # the same masks for every item and batch
        sal = torch.zeros(b, h, w)
        per = max(1, min(o.masks, _chunk(x[0].numel(), b)))
        rows = torch.arange(b)
        with torch.no_grad():
            done = 0
            while done < o.masks:
                m = self.masks(min(per, o.masks - done), h, w, gen)
                mm = m[None, :, None]  # (1, n, 1, h, w)
                inputs = (x[:, None] * mm + baseline * (1 - mm)).reshape(-1, c, h, w)
                p = self.net.score(inputs).reshape(b, len(m), -1)[rows, :, target]  # (b, n)
                sal += torch.einsum("bn,nhw->bhw", p, m)
                done += len(m)
        return Attribution((sal / (o.masks * o.keep))[:, None])


def _ridge_fit(model: LinearModel, dataloader, construct_kwargs: dict, **_) -> dict:
    """Closed-form weighted ridge regression for captum's interpretable models (no sklearn, deterministic)."""
    xs, ys, ws = [], [], []
    for data in dataloader:
        xs.append(data[0].double())
        ys.append(data[1].double().reshape(len(data[0]), -1))
        ws.append(data[2].double().reshape(-1) if len(data) == 3 else torch.ones(len(data[0]), dtype=torch.double))
    x, y, w = torch.cat(xs), torch.cat(ys), torch.cat(ws)
    a = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], dim=1)  # intercept column, not penalised
    reg = construct_kwargs.get("alpha", 1e-3) * torch.eye(a.shape[1], dtype=a.dtype)
    reg[-1, -1] = 0
    aw = a * w[:, None]
    coef = torch.linalg.lstsq(a.T @ aw + reg, aw.T @ y).solution  # (features + 1, outputs)
    model._construct_model_params(norm_type=None, weight_values=coef[:-1].T.float(),
                                  bias_value=coef[-1].float().reshape(1, -1).squeeze(0))
    return {}


class _Surrogate(Method):
    """A local linear surrogate on superpixels, fitted per item (its own segments and its own seed)."""

    needs_gradients = False
    ridge: ClassVar[float] = 1e-3

    class Options(Options):
        samples: int = Field(200, ge=2, le=100_000)
        segments: Literal["slic", "quickshift", "grid"] = "slic"
        superpixels: int = Field(50, ge=2, description="SLIC / quickshift: about this many superpixels")
        compactness: float = Field(0.1, gt=0, description="SLIC: shape regularity against intensity (image in [0, 1])")
        cells: int = Field(8, ge=2, description="grid: cells per side")

    def explainer(self):
        raise NotImplementedError

    def segments(self, x: torch.Tensor) -> torch.Tensor:
        o = self.options
        if o.segments == "grid":
            return grid_segments(x.shape[2], x.shape[3], o.cells).expand(len(x), 1, -1, -1)
        segs = superpixels(x, o.segments, o.superpixels, o.compactness)
        flat = segs.flatten(1).amax(dim=1) < 2  # fewer than 3 superpixels (e.g. pure noise): the grid instead
        segs[flat] = grid_segments(x.shape[2], x.shape[3], o.cells)[0]
        return segs

    def attribute(self, x, target, baseline):
        o = self.options
        segs, base, explainer = self.segments(x), _base_seed(), self.explainer()
        maps = []
        for i in range(len(x)):
            torch.manual_seed(item_seed(base, self.name, content_id(x[i]), "samples"))
            maps.append(explainer.attribute(
                x[i:i + 1], target=target[i:i + 1], baselines=baseline, n_samples=o.samples,
                feature_mask=segs[i:i + 1].expand(1, x.shape[1], -1, -1), perturbations_per_eval=_chunk(x[0].numel())))
        return Attribution(torch.cat(maps))

    def surrogate(self) -> LinearModel:
        return LinearModel(train_fn=_ridge_fit, alpha=self.ridge)


class LimeMethod(_Surrogate):
    name = "lime"
    ridge = 1.0

    def explainer(self):
        return Lime(self.net.forward, interpretable_model=self.surrogate())


class KernelShapMethod(_Surrogate):
    name = "kernel_shap"

    def explainer(self):
        ks = KernelShap(self.net.forward)
        ks.interpretable_model = self.surrogate()
        return ks


class SobolMethod(Method):
    """Sobol attribution (Fel et al. 2021): total Sobol indices of the target score with respect to the
    intensities of a grid of mask cells, from quasi-Monte-Carlo designs (scrambled Sobol sequence, Jansen
    estimator). Each cell's pixels are x * m + baseline * (1 - m) for its mask value m in [0, 1]."""

    name = "sobol"
    needs_gradients = False

    class Options(Options):
        cells: int = Field(8, ge=1, description="mask grid (cells per side)")
        designs: int = Field(32, ge=2, le=65_536, description="quasi-Monte-Carlo designs N (a power of 2): "
                                                              "N x (cells^2 + 2) model calls per item")
        logits: bool = Field(False, description="follow the target logit instead of its probability")

    def attribute(self, x, target, baseline):
        o = self.options
        b, c, h, w = x.shape
        d, n = o.cells * o.cells, o.designs
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*balance properties of Sobol")
            design = qmc.Sobol(2 * d, scramble=True, seed=_base_seed()).random(n)
        a_, b_ = design[:, :d], design[:, d:]
        mixed = np.repeat(a_[None], d, axis=0)  # C_i: A with column i taken from B
        mixed[np.arange(d), :, np.arange(d)] = b_.T
        cells = torch.from_numpy(np.concatenate([a_, b_, mixed.reshape(-1, d)])).float()  # (N (d + 2), d)
        seg = grid_segments(h, w, o.cells)[0, 0]  # (h, w) cell of each pixel
        base = torch.as_tensor(baseline, dtype=x.dtype).expand(1, c, h, w)
        score = self.net.forward if o.logits else self.net.score
        y = torch.zeros(b, len(cells))
        per = max(1, _chunk(x[0].numel()))
        with torch.no_grad():
            for i in range(b):
                for s in range(0, len(cells), per):
                    m = cells[s:s + per][:, seg][:, None]  # (k, 1, h, w)
                    y[i, s:s + per] = score(x[i:i + 1] * m + base * (1 - m))[:, target[i]]
        fa, fb, fc = y[:, :n], y[:, n:2 * n], y[:, 2 * n:].reshape(b, d, n)
        var = torch.cat([fa, fb], dim=1).var(dim=1)
        total = ((fa[:, None] - fc) ** 2).mean(dim=2) / 2 / torch.where(var > 0, var, torch.ones_like(var))[:, None]
        return Attribution(total[:, seg][:, None])

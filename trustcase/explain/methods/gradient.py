"""Gradient methods: the gradient of the target at the input, plain, times the input, integrated along a
path from the baseline, or averaged under input noise (SmoothGrad, its square, its variance)."""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from captum.attr import InputXGradient, IntegratedGradients, NoiseTunnel, Saliency
from pydantic import Field

from trustcase.explain.attribution import Attribution, Method, Options, _base_seed, _chunk
from trustcase.seeding import content_id, item_seed


class SaliencyMethod(Method):
    name = "saliency"

    class Options(Options):
        abs: bool = True

    def attribute(self, x, target, baseline):
        return Attribution(Saliency(self.net.forward).attribute(x, target=target, abs=self.options.abs))


class IntegratedGradientsMethod(Method):
    name = "integrated_gradients"

    class Options(Options):
        n_steps: int = Field(32, ge=1, le=10_000)
        method: Literal["gausslegendre", "riemann_trapezoid", "riemann_middle"] = "gausslegendre"

    def attribute(self, x, target, baseline):
        o = self.options
        ig = IntegratedGradients(self.net.forward)
        maps, delta = ig.attribute(x, baselines=baseline, target=target, n_steps=o.n_steps, method=o.method,
                                   internal_batch_size=_chunk(x[0].numel()), return_convergence_delta=True)
        return Attribution(maps, delta)


class SmoothGradMethod(Method):
    name = "smoothgrad"

    class Options(Options):
        samples: int = Field(16, ge=1, le=10_000)
        noise_level: float = Field(0.15, gt=0, le=1, description="noise std as a fraction of the input range")

    nt_type: ClassVar[str] = "smoothgrad"
    absolute: ClassVar[bool] = True

    def attribute(self, x, target, baseline):
        o = self.options
        nt = NoiseTunnel(Saliency(self.net.forward))
        base = _base_seed()
        maps = []
        for j in range(len(x)):  # each item's noise from (seed, its content): the same in any batch
            torch.manual_seed(item_seed(base, self.name, content_id(x[j]), "noise"))
            maps.append(nt.attribute(x[j:j + 1], nt_type=self.nt_type, nt_samples=o.samples,
                                     stdevs=o.noise_level * self.net.input_range, target=target[j:j + 1],
                                     nt_samples_batch_size=min(o.samples, _chunk(x[0].numel())), abs=self.absolute))
        return Attribution(torch.cat(maps))


class VarGradMethod(SmoothGradMethod):
    """VarGrad (Adebayo et al. 2018): the variance of the gradient under input noise."""

    name = "vargrad"
    nt_type = "vargrad"
    absolute = False


class SmoothGradSquaredMethod(VarGradMethod):
    """SmoothGrad-squared, also called SquareGrad (Hooker et al. 2019): the mean squared gradient under noise."""

    name = "smoothgrad_squared"
    nt_type = "smoothgrad_sq"


class InputXGradientMethod(Method):
    name = "input_x_gradient"

    def attribute(self, x, target, baseline):
        return Attribution(InputXGradient(self.net.forward).attribute(x, target=target))

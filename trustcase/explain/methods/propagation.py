"""Propagation rules: the backward pass with its own rule at each layer (guided backpropagation,
deconvolution, DeepLIFT and its SHAP average, layer-wise relevance propagation)."""

from __future__ import annotations

import copy
from collections import OrderedDict
from typing import ClassVar, Literal

import torch
from captum.attr import LRP, Deconvolution, DeepLift, DeepLiftShap, GuidedBackprop
from captum.attr._utils.lrp_rules import Alpha1_Beta0_Rule, EpsilonRule, GammaRule
from pydantic import Field
from torch import nn

from trustcase.errors import Unsupported
from trustcase.explain.attribution import Attribution, Method, Options, _base_seed, _batched, _chunk
from trustcase.explain.network import Network, Readout


class GuidedBackpropMethod(Method):
    """Guided backpropagation (Springenberg et al. 2015): only positive gradients pass the ReLUs backwards."""

    name = "guided_backprop"
    explainer: ClassVar[type] = GuidedBackprop

    def attribute(self, x, target, baseline):
        return Attribution(self.explainer(self.net.module).attribute(x, target=target))


class DeconvolutionMethod(GuidedBackpropMethod):
    """DeconvNet (Zeiler and Fergus 2014): the ReLUs applied to the backward signal, not the forward one."""

    name = "deconvolution"
    explainer = Deconvolution


class DeepLiftMethod(Method):
    """DeepLIFT rescale rule (Shrikumar et al. 2017): contributions relative to the baseline, summing to the
    difference of the outputs."""

    name = "deep_lift"

    def attribute(self, x, target, baseline):
        maps, delta = DeepLift(self.net.module).attribute(x, baselines=baseline, target=target,
                                                          return_convergence_delta=True)
        return Attribution(maps, delta)


class DeepLiftShapMethod(Method):
    """DeepLIFT averaged over a distribution of references (Lundberg and Lee 2017): the baseline plus Gaussian
    noise, the same references for every item."""

    name = "deep_lift_shap"

    class Options(Options):
        references: int = Field(8, ge=2, le=1000)
        noise_level: float = Field(0.1, ge=0, le=1, description="reference noise std, fraction of the input range")

    def attribute(self, x, target, baseline):
        o = self.options
        gen = torch.Generator().manual_seed(_base_seed())
        refs = torch.as_tensor(baseline, dtype=x.dtype).expand(1, *x.shape[1:]) + \
            o.noise_level * self.net.input_range * torch.randn(o.references, *x.shape[1:], generator=gen)
        dls = DeepLiftShap(self.net.module)
        return Attribution(_batched(lambda xs, ts: dls.attribute(xs, baselines=refs, target=ts), x, target,
                                    _chunk(x[0].numel(), o.references)))


_WEIGHTED = ("Conv2d", "Linear")


def _fold(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """A convolution followed by an eval-mode batch norm, as one convolution (the same function)."""
    out = copy.deepcopy(conv)
    scale = (bn.weight if bn.affine else torch.ones_like(bn.running_var)) / torch.sqrt(bn.running_var + bn.eps)
    shift = bn.bias if bn.affine else torch.zeros_like(bn.running_mean)
    bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
    with torch.no_grad():
        out.weight = nn.Parameter(conv.weight * scale[:, None, None, None])
        out.bias = nn.Parameter((bias - bn.running_mean) * scale + shift)
    return out.eval()


class LrpMethod(Method):
    """Layer-wise relevance propagation (Bach et al. 2015) on captum's LRP: one rule everywhere, or a composite
    rule per layer type (Montavon et al. 2019: gamma in convolutions, epsilon in dense layers). A batch norm
    after a convolution is folded into it (canonisation); pooling and other batch-norm layers take the epsilon
    rule, ReLU / dropout pass relevance through; any other layer is refused with its name. With epsilon -> 0
    on a bias-free ReLU network, LRP equals Gradient x Input."""

    name = "lrp"

    class Options(Options):
        rule: Literal["epsilon", "gamma", "z_plus", "composite"] = "epsilon"  # the steadiest on the demo model
        epsilon: float = Field(0.25, gt=0, description="stabiliser of the epsilon rule (0.25: Montavon et al. 2019)")
        gamma: float = Field(0.25, ge=0)
        composite: dict[Literal["Conv2d", "Linear"], Literal["epsilon", "gamma", "z_plus"]] = {
            "Conv2d": "gamma", "Linear": "epsilon"}

    def __init__(self, net, options):
        super().__init__(net, options)
        self.view = self._view(net.module)

    def _rule(self, kind: str):
        o = self.options
        name = (o.composite.get(kind, "epsilon") if o.rule == "composite" else o.rule) if kind in _WEIGHTED \
            else "epsilon"
        return {"epsilon": lambda: EpsilonRule(o.epsilon), "gamma": lambda: GammaRule(o.gamma),
                "z_plus": Alpha1_Beta0_Rule}[name]()

    def _view(self, module: nn.Module) -> nn.Module:
        """A copy captum's LRP accepts: Flatten + Linear merged, each layer given its rule."""
        view = copy.deepcopy(module)
        for container in [m for m in view.modules() if isinstance(m, nn.Sequential)]:
            # dropout (eval) and identity layers do nothing: left out, so that Flatten meets its Linear
            items = [(n, m) for n, m in container.named_children() if not isinstance(m, (nn.Dropout, nn.Identity))]
            merged, i = OrderedDict(), 0
            while i < len(items):
                (n, m), nxt = items[i], items[i + 1][1] if i + 1 < len(items) else None
                if isinstance(m, nn.Conv2d) and isinstance(nxt, nn.BatchNorm2d):
                    merged[n] = _fold(m, nxt)  # canonisation: relevance is not divided by a batch-norm shift
                    i += 2
                    continue
                if isinstance(m, nn.Flatten) and m.start_dim == 1 and isinstance(nxt, nn.Linear):
                    merged[items[i + 1][0]] = Readout.of(nxt)
                    i += 2
                    continue
                merged[n] = m
                i += 1
            for n in list(container._modules):
                del container._modules[n]
            for n, m in merged.items():
                container.add_module(n, m)
        self._attach(view)  # every layer has a rule, or the method is refused now
        return view.eval()

    def _attach(self, view: nn.Module) -> None:
        for name, m in view.named_modules():
            if list(m.children()):
                continue
            kind = "Linear" if isinstance(m, nn.Linear) else type(m).__name__
            if kind in ("ReLU", "Tanh"):
                continue
            if kind in ("Conv2d", "Linear", "MaxPool2d", "AvgPool2d", "AdaptiveAvgPool2d", "BatchNorm2d"):
                m.rule = self._rule(kind)
            else:
                raise Unsupported(f"LRP has no rule for layer {name!r} ({Network.kind(m)})")

    def attribute(self, x, target, baseline):
        self._attach(self.view)  # captum removes the rules after each call
        return Attribution(LRP(self.view).attribute(x, target=target))

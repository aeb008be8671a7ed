"""The solar-cell classifier: a small CNN for 64x64 grey electroluminescence images."""

from __future__ import annotations

import torch
from torch import nn

from trustcase.models import lipschitz_layers as lip


def block(cin: int, cout: int, lipschitz: bool, size: int) -> list[nn.Module]:
    if lipschitz:
        # 1-Lipschitz in L2 (trustcase.models.lipschitz_layers): conv / its operator norm on the size x size
        # input, GroupSort (MaxMin) for the activation, 2 x average pooling; no BatchNorm (its scale is free)
        return [lip.LipschitzConv2d(cin, cout, 3, (size, size), padding=1), lip.GroupSort(2), lip.ScaledAvgPool2d(2)]
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(), nn.MaxPool2d(2)]


class SolarCNN(nn.Sequential):
    """Four conv blocks and a linear head. lipschitz=True: every layer 1-Lipschitz (an orthonormal head), so the
    logit map is 1-Lipschitz in the model's input and the Lipschitz check certifies it almost exactly."""

    def __init__(self, width: int = 16, lipschitz: bool = False, classes: int = 2, size: int = 64):
        layers = []
        for i, (cin, cout) in enumerate([(1, width), (width, 2 * width), (2 * width, 4 * width),
                                         (4 * width, 4 * width)]):
            layers += block(cin, cout, lipschitz, size // 2 ** i)
        features = 4 * width * (size // 16) ** 2  # four 2x2 poolings
        if lipschitz:
            super().__init__(*layers, nn.Flatten(), lip.BjorckLinear(features, classes))
        else:
            super().__init__(*layers, nn.Flatten(), nn.Dropout(0.2), nn.Linear(features, classes))


class StridedCNN(nn.Sequential):
    """Certifiable by design: three stride-2 4x4 convolutions and a small dense head, no pooling and no
    BatchNorm. Max pooling relaxes loosely (a max is a tree of ReLUs to a verifier) and a BatchNorm's scale
    widens interval bounds; this shape is what interval-bound training (Gowal et al. 2018) trains well."""

    def __init__(self, width: int = 16, classes: int = 2, size: int = 64, hidden: int = 100):
        chans = [1, width, 2 * width, 2 * width]
        layers = []
        for cin, cout in zip(chans, chans[1:]):
            layers += [nn.Conv2d(cin, cout, 4, stride=2, padding=1), nn.ReLU()]
        super().__init__(*layers, nn.Flatten(), nn.Linear(chans[-1] * (size // 8) ** 2, hidden), nn.ReLU(),
                         nn.Linear(hidden, classes))


ARCHITECTURES = ("strided", "pooled")


def build(width: int = 16, lipschitz: bool = False, size: int = 64, arch: str = "pooled") -> nn.Module:
    """arch "pooled": conv-BN-ReLU-maxpool blocks; "strided": `StridedCNN`. lipschitz=True is its own
    (1-Lipschitz, pooled) architecture whatever `arch` says."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r} (one of {', '.join(ARCHITECTURES)})")
    if arch == "strided" and not lipschitz:
        return StridedCNN(width=width, size=size)
    return SolarCNN(width=width, lipschitz=lipschitz, size=size)


def export(model: nn.Module, path, input_shape=(1, 64, 64)) -> None:
    """TorchScript (traced in eval mode): loads without this module and without pickle."""
    model = lip.bake(model)  # 1-Lipschitz layers as plain Conv2d / Linear with their certified weights
    with torch.no_grad():
        traced = torch.jit.trace(model, torch.zeros(1, *input_shape))
    traced.save(str(path))

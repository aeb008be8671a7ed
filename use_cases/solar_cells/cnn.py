"""The solar-cell classifier: a small CNN for 64x64 grey electroluminescence images."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm


def block(cin: int, cout: int, lipschitz: bool) -> list[nn.Module]:
    conv = nn.Conv2d(cin, cout, 3, padding=1, bias=lipschitz)
    if lipschitz:
        # spectrally normalised convs and no BatchNorm: a robust-by-design variant
        return [spectral_norm(conv), nn.ReLU(), nn.MaxPool2d(2)]
    return [conv, nn.BatchNorm2d(cout), nn.ReLU(), nn.MaxPool2d(2)]


class SolarCNN(nn.Sequential):
    def __init__(self, width: int = 16, lipschitz: bool = False, classes: int = 2, size: int = 64):
        layers = []
        for cin, cout in [(1, width), (width, 2 * width), (2 * width, 4 * width), (4 * width, 4 * width)]:
            layers += block(cin, cout, lipschitz)
        head = nn.Linear(4 * width * (size // 16) ** 2, classes)  # four 2x2 poolings
        super().__init__(*layers, nn.Flatten(), nn.Dropout(0.2), spectral_norm(head) if lipschitz else head)


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
    (spectrally normalised, pooled) architecture whatever `arch` says."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r} (one of {', '.join(ARCHITECTURES)})")
    if arch == "strided" and not lipschitz:
        return StridedCNN(width=width, size=size)
    return SolarCNN(width=width, lipschitz=lipschitz, size=size)


def export(model: nn.Module, path, input_shape=(1, 64, 64)) -> None:
    """TorchScript (traced in eval mode): loads without this module and without pickle."""
    model.eval()
    if any(hasattr(m, "parametrizations") for m in model.modules()):
        # bake parametrisations (spectral norm) into plain weights before tracing
        from torch.nn.utils import parametrize

        for m in model.modules():
            if hasattr(m, "parametrizations"):
                for name in list(m.parametrizations):
                    parametrize.remove_parametrizations(m, name, leave_parametrized=True)
    with torch.no_grad():
        traced = torch.jit.trace(model, torch.zeros(1, *input_shape))
    traced.save(str(path))

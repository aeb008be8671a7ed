"""Layers that are 1-Lipschitz in L2, for a partner's training script, and the certified operator norm of a
convolution they (and the Lipschitz certificate) rest on.

- `LipschitzConv2d`: a zero-padded Conv2d divided by its operator norm ON THE INPUT SIZE (not the norm of the
  kernel reshaped as a matrix, which does not bound a convolution). While training, the norm is estimated by
  one power iteration per step on the convolution operator itself (a persistent vector of the input's shape,
  as torch's spectral_norm does for a matrix; Gouk et al. 2021); `bake` divides by a certified bound instead
  (`conv2d_norm`, Sedghi et al. 2019: the largest singular value of the per-frequency channel matrices of the
  circular convolution on the padded size, which bounds the zero-padded one), so the exported layer is a
  plain Conv2d of norm at most 1 (a few % below on small inputs, where the zero padding matters most).
  At most 1 on every machine: the certified norm carries its float64 rounding error (`certification.rounding`)
  and the division leaves room for the float32 rounding of the exported weight (`unit_norm`).
  Chosen over Cayley / SOC / BCOP convolutions: those are orthogonal for circular padding or as a series of
  convolutions, not as one exportable zero-padded Conv2d; dividing by the certified norm is correct as
  exported and costs two small convolutions per training step. The price: only the largest singular value
  is 1, so the layer is not gradient-norm preserving as an orthogonal one would be.
- `BjorckLinear`: a Linear whose weight is orthonormalised by Bjorck iterations (Anil et al. 2019): every
  singular value 1, so the layer is 1-Lipschitz and preserves the gradient's norm.
- `GroupSort`: sorts the channels in groups (group 2 = MaxMin): a permutation of its input at every point,
  so 1-Lipschitz and gradient-norm preserving (Anil et al. 2019).
- `ScaledAvgPool2d`: k x average pooling over disjoint k x k windows: each output is the window's sum / k,
  a row of norm 1, and disjoint rows are orthogonal, so the map has norm 1 (plain averaging has 1 / k).
`bake(model)` turns a model of these layers into plain torch layers (Conv2d, Linear) with the normalised
weights, GroupSort and ScaledAvgPool2d kept: what `torch.jit.trace` exports and `models.anatomy` reads.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from trustcase.certification.rounding import U32, U64, fft_error, svd_error, widen


def conv2d_norm(weight: torch.Tensor, in_hw: tuple[int, int], stride=(1, 1), padding=(0, 0), dilation=(1, 1),
                groups: int = 1) -> float:
    """Upper bound of the L2 operator norm of a zero-padded Conv2d on inputs of size in_hw.

    The zero-padded convolution is embed -> circular convolution on N >= H + 2p -> select, so its
    norm is at most the circular one, which is exact in the Fourier domain. A stride s is handled
    exactly by the polyphase form (N a multiple of s): a stride-s circular convolution is a stride-1
    one on N / s with s_h * s_w times more input channels, the tap at offset k d going to phase
    (k d) mod s, position (k d) // s.

    The float64 result is widened by its rounding error: the FFT over the P = mh mw points errs by at most
    fft_error(P) ||y||_F = fft_error(P) sqrt(P) ||w||_F (Parseval), and ||w||_F <= sqrt(groups r) sigma (r the
    rank of a channel matrix: some frequency holds at least the mean energy), so each channel matrix moves by
    at most fft_error(P) sqrt(P groups r) sigma in norm; its SVD by svd_error of its size.
    """
    w = weight.detach().double()
    cout, cin_g, kh, kw = w.shape
    (sh, sw), (dh, dw) = stride, dilation
    hp, wp = in_hw[0] + 2 * padding[0], in_hw[1] + 2 * padding[1]
    if dh * (kh - 1) + 1 > hp or dw * (kw - 1) + 1 > wp:
        raise ValueError(f"kernel {kh}x{kw} (dilation {dilation}) is larger than the padded input {hp}x{wp}")
    mh, mw = -(-hp // sh), -(-wp // sw)  # N / s, with N the padded size rounded up to a multiple of s
    poly = torch.zeros(cout, cin_g, sh, sw, mh, mw, dtype=torch.float64)
    for a in range(kh):
        for b in range(kw):
            oh, ow = a * dh, b * dw
            poly[:, :, oh % sh, ow % sw, oh // sh, ow // sw] += w[:, :, a, b]
    spectrum = torch.fft.fft2(poly.reshape(cout, cin_g * sh * sw, mh, mw))
    best = 0.0
    per = cout // groups
    for g in range(groups):  # block-diagonal over groups
        block = spectrum[g * per:(g + 1) * per].permute(2, 3, 0, 1).reshape(mh * mw, per, cin_g * sh * sw)
        best = max(best, float(torch.linalg.svdvals(block)[:, 0].max()))
    rows, cols = per, cin_g * sh * sw
    fft = fft_error(mh * mw) * (mh * mw * groups * min(rows, cols)) ** 0.5
    return widen(widen(best, svd_error(rows, cols)), fft)


def matrix_norm(w: torch.Tensor) -> float:
    """Upper bound of the spectral norm of a matrix: its float64 SVD widened by the SVD's rounding error."""
    m = w.detach().double().reshape(w.shape[0], -1)
    return widen(float(torch.linalg.matrix_norm(m, ord=2)), svd_error(*m.shape)) if m.numel() else 0.0


def unit_norm(w: torch.Tensor, norm) -> torch.Tensor:
    """The float32 weight w / b whose operator (its norm bounded above by `norm`) has norm <= 1 exactly.

    Rounding w / b to float32 moves each entry by at most (U32 + 2 U64) |w / b| (the float64 division, then
    the cast), plus 2^-149 for an entry rounded to a float32 subnormal: the operator becomes A + E with
    ||E|| <= || |E| || <= (U32 + 2 U64) norm(|w|) / b + numel 2^-149 (the norm is monotone on non-negative
    operators, and each entry of A is one kernel tap). So b = (norm(w) + (U32 + 2 U64) norm(|w|)) / (1 - numel
    2^-149), times 1 + 8 U64 for the float64 roundings of b itself.
    """
    w = w.detach().double()
    b = (norm(w) + (U32 + 2 * U64) * norm(w.abs())) / (1 - w.numel() * 2.0 ** -149) * (1 + 8 * U64)
    return (w / b).float()


class LipschitzConv2d(nn.Conv2d):
    """A zero-padded Conv2d of operator norm <= 1 on inputs of `in_size` (H, W): weight / ||conv||."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, in_size: tuple[int, int],
                 stride: int = 1, padding: int = 0, bias: bool = True):
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=bias)
        self.in_size = tuple(in_size)
        u = torch.randn(1, in_channels, *self.in_size, generator=torch.Generator().manual_seed(0))
        self.register_buffer("u", u / u.norm())

    def _apply_conv(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, weight, None, self.stride, self.padding, self.dilation, self.groups)

    def sigma(self) -> torch.Tensor:
        """The operator norm by power iteration (one step per training call), differentiable in the weight."""
        if self.training:
            with torch.no_grad():
                v = self._apply_conv(self.u, self.weight)
                u = torch.nn.grad.conv2d_input(self.u.shape, self.weight, v / v.norm(), self.stride, self.padding,
                                               self.dilation, self.groups)
                self.u.copy_(u / u.norm())
        return self._apply_conv(self.u, self.weight).norm()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[-2:]) != self.in_size:
            raise ValueError(f"LipschitzConv2d normalised for inputs {self.in_size}, got {tuple(x.shape[-2:])}")
        return F.conv2d(x, self.weight / self.sigma(), self.bias, self.stride, self.padding, self.dilation,
                        self.groups)

    def baked(self) -> nn.Conv2d:
        """A plain Conv2d divided by the certified norm bound on `in_size`: norm <= 1."""
        conv = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, stride=self.stride,
                         padding=self.padding, bias=self.bias is not None)
        def norm(w: torch.Tensor) -> float:
            return conv2d_norm(w, self.in_size, self.stride, self.padding, self.dilation, self.groups)

        with torch.no_grad():
            conv.weight.copy_(unit_norm(self.weight, norm))
            if self.bias is not None:
                conv.bias.copy_(self.bias)
        return conv.eval()


def bjorck(w: torch.Tensor, iterations: int = 15) -> torch.Tensor:
    """The nearest matrix with orthonormal rows (or columns): Bjorck-Bowie iterations from w / ||w||_F
    (every singular value <= 1, so the iteration converges)."""
    tall = w.shape[0] > w.shape[1]
    q = (w.T if tall else w) / w.norm()
    for _ in range(iterations):
        q = 1.5 * q - 0.5 * (q @ q.T) @ q
    return q.T if tall else q


class BjorckLinear(nn.Linear):
    """A Linear layer with orthonormal rows (or columns): all singular values 1."""

    iterations = 15

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, bjorck(self.weight, self.iterations), self.bias)

    def baked(self) -> nn.Linear:
        """A plain Linear: Bjorck run to convergence in float64, divided by its certified spectral norm (<= 1)."""
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        q = bjorck(self.weight.detach().double(), 100)
        with torch.no_grad():
            lin.weight.copy_(unit_norm(q, matrix_norm))
            if self.bias is not None:
                lin.bias.copy_(self.bias)
        return lin.eval()


class GroupSort(nn.Module):
    """Sort the channels (dim 1) in groups of `group` (2: MaxMin). A permutation at every point: 1-Lipschitz."""

    def __init__(self, group: int = 2):
        super().__init__()
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(1, (-1, self.group)).sort(dim=2).values.flatten(1, 2)


class ScaledAvgPool2d(nn.Module):
    """k x average pooling over disjoint k x k windows: norm 1 in L2 (each output = window sum / k)."""

    def __init__(self, kernel_size: int = 2):
        super().__init__()
        self.kernel_size = kernel_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(x, self.kernel_size) * float(self.kernel_size)


def bake(model: nn.Module) -> nn.Module:
    """A copy of `model` in eval mode with every LipschitzConv2d / BjorckLinear replaced by its plain, certified
    form (what gets traced and exported)."""
    model = copy.deepcopy(model).eval()

    def swap(parent: nn.Module) -> None:
        for name, child in parent.named_children():
            if isinstance(child, LipschitzConv2d | BjorckLinear):
                setattr(parent, name, child.baked())
            else:
                swap(child)

    if isinstance(model, LipschitzConv2d | BjorckLinear):
        return model.baked().eval()
    swap(model)
    return model

"""Lipschitz certification against exact answers: spectral norms, dense convolution matrices, gradient ascent."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from trustcase.certification import lipschitz as L
from trustcase.certification.rounding import gamma, svd_error
from trustcase.checks import Context, build
from trustcase.data.streaming import DataSource
from trustcase.models.loading import load_classifier
from trustcase.schemas import CheckSpec, load_use_case


def dense(conv: nn.Module, shape: tuple[int, ...]) -> torch.Tensor:
    """The convolution as a matrix on inputs of `shape`, column by column."""
    n = math.prod(shape)
    eye = torch.eye(n, dtype=torch.float64).view(n, *shape)
    with torch.no_grad():
        return conv.double()(eye).reshape(n, -1).T


def test_linear_layer_bound_is_its_spectral_norm():
    torch.manual_seed(0)
    for shape in [(7, 5), (3, 40), (1, 9)]:
        layer = nn.Linear(shape[1], shape[0]).eval()
        exact = torch.linalg.matrix_norm(layer.weight.double(), 2).item()
        # the same SVD, widened by its error bound svd_error (>= 9 u here) and a few roundings more
        for m in (layer, torch.jit.trace(layer, torch.zeros(1, shape[1]))):
            assert exact < L.upper_bound(m, (shape[1],)) <= exact * (1 + 2 * svd_error(*shape))


# (cin, cout, kernel, stride, padding, dilation, groups, size): 'same'-padded layers of realistic shape
SAME = [(2, 3, 3, 1, 1, 1, 1, 8), (2, 3, 3, 2, 1, 1, 1, 8), (3, 4, 3, 1, 1, 1, 1, 12), (2, 4, 4, 2, 1, 1, 1, 8),
        (4, 4, 3, 1, 1, 1, 2, 10), (3, 2, 3, 3, 0, 1, 1, 9), (4, 2, 1, 1, 0, 1, 1, 5)]
# small inputs, valid or dilated convolutions: the circular embedding is looser there
OTHER = [(2, 4, 3, 1, 2, 2, 2, 6), (1, 4, 5, 1, 0, 1, 1, 8), (2, 2, 3, 2, 2, 2, 1, 9), (2, 3, 3, 1, 1, 1, 1, 6)]


@pytest.mark.parametrize("cfg", SAME + OTHER)
def test_conv_bound_is_above_the_dense_operator_norm(cfg):
    cin, cout, k, s, p, d, g, hw = cfg
    torch.manual_seed(hash(cfg) % 1000)
    conv = nn.Conv2d(cin, cout, k, stride=s, padding=p, dilation=d, groups=g, bias=True).eval()
    bare = nn.Conv2d(cin, cout, k, stride=s, padding=p, dilation=d, groups=g, bias=False)
    bare.weight.data.copy_(conv.weight.data)
    matrix = dense(bare, (cin, hw, hw))
    exact = torch.linalg.matrix_norm(matrix, 2).item()
    bound = L.upper_bound(conv, (cin, hw, hw))
    assert bound >= exact * (1 - svd_error(*matrix.shape))
    tolerance = 1.10 if cfg in SAME else 1.6  # the stated tightness
    assert bound <= exact * tolerance
    traced = torch.jit.trace(conv, torch.zeros(1, cin, hw, hw))
    # the same layer norm; the two compositions' margins differ by a few roundings
    assert L.upper_bound(traced, (cin, hw, hw)) == pytest.approx(bound, rel=gamma(16))


def test_batchnorm_is_folded_into_the_convolution_exactly():
    torch.manual_seed(1)
    conv, bn = nn.Conv2d(2, 3, 3, padding=1, bias=False), nn.BatchNorm2d(3)
    bn.running_var.uniform_(0.1, 3.0)
    bn.running_mean.uniform_(-1, 1)
    bn.weight.data.uniform_(-2, 2)
    model = nn.Sequential(conv, bn).eval()
    with torch.no_grad():  # affine map: the norm of its linear part
        affine = dense(model, (2, 8, 8)) - model.double()(torch.zeros(1, 2, 8, 8, dtype=torch.float64)).reshape(-1, 1)
    exact = torch.linalg.matrix_norm(affine, 2).item()
    bound = L.upper_bound(model.float(), (2, 8, 8))
    assert exact * (1 - svd_error(*affine.shape)) <= bound <= exact * 1.10
    # folded: tighter than the product of the two norms, but for the folded weight's entrywise rounding
    # (FOLDED |w|, so FOLDED || |w| || at most) and the float32 BatchNorm scale of `separate` (gamma_4 in float32)
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    folded = conv.weight.double() * scale.double().view(-1, 1, 1, 1)
    separate = L.conv2d_norm(conv.weight, (8, 8), padding=(1, 1)) * float(scale.abs().max().detach())
    room = L.FOLDED * L.conv2d_norm(folded.abs(), (8, 8), padding=(1, 1)) + gamma(4, 2.0 ** -24) * separate
    assert bound <= (separate + room) * (1 + gamma(8))


class Residual(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(),
                                  nn.Conv2d(c, c, 3, padding=1))

    def forward(self, x):
        return torch.relu(x + self.body(x))


def random_cnn(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    c = 4
    model = nn.Sequential(
        nn.Conv2d(1, c, 3, padding=1), nn.BatchNorm2d(c), nn.LeakyReLU(0.1),
        nn.MaxPool2d(3, stride=1, padding=1),  # overlapping windows
        Residual(c), nn.AvgPool2d(2), Residual(c), nn.MaxPool2d(2),
        nn.Flatten(), nn.Dropout(0.3), nn.Linear(c * 4 * 4, 3),
    )
    for m in model.modules():  # non-trivial running statistics
        if isinstance(m, nn.BatchNorm2d):
            m.running_var.uniform_(0.2, 2.0)
            m.running_mean.uniform_(-0.5, 0.5)
            m.weight.data.uniform_(0.5, 1.5)
    return model.eval()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bound_is_never_below_the_gradient_ascent_lower_bound(seed):
    model = random_cnn(seed)
    bound = L.analyse(model, (1, 16, 16))
    x = torch.rand(16, 1, 16, 16, generator=torch.Generator().manual_seed(seed))
    lower = L.empirical_lower_bound(model, x, steps=60, seed=seed)
    assert 0 < lower <= bound.total
    assert bound.body is not None and bound.head is not None  # the last layer is Linear: pairwise radii
    # the ratio is finite and the ascent found something: not a vacuous comparison
    assert bound.total / lower < 1e4


def test_residual_addition_composes_as_one_plus_branch():
    torch.manual_seed(3)
    block = Residual(2).eval()
    bound = L.analyse(block, (2, 8, 8))
    body = L.analyse(block.body, (2, 8, 8)).total
    # 1 + body, but for the two compositions' margins (gamma of at most 2 roundings per node, 32 nodes)
    assert bound.total == pytest.approx(1 + body, rel=gamma(64))


def test_unsupported_layer_is_named():
    class Square(nn.Module):
        def forward(self, x):
            return x * x

    with pytest.raises(L.LipschitzError, match="mul"):
        L.upper_bound(nn.Sequential(nn.Linear(3, 3), Square()).eval(), (3,))
    with pytest.raises(L.LipschitzError, match="Upsample"):
        L.upper_bound(nn.Sequential(nn.Upsample(scale_factor=2), nn.Flatten()).eval(), (1, 4, 4))
    traced = torch.jit.trace(nn.Sequential(nn.Conv2d(1, 2, 3), nn.Upsample(scale_factor=2)).eval(),
                             torch.zeros(1, 1, 8, 8))
    with pytest.raises(L.LipschitzError, match="Upsample"):
        L.upper_bound(traced, (1, 8, 8))


def test_training_mode_and_bad_shapes_are_errors():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(2 * 6 * 6, 2))
    with pytest.raises(L.LipschitzError, match="training mode"):
        L.upper_bound(model, (1, 8, 8))
    with pytest.raises(L.LipschitzError, match="does not fit"):
        L.upper_bound(model.eval(), (1, 9, 9))


def test_pairwise_radius_is_exact_for_a_linear_model():
    torch.manual_seed(4)
    model = nn.Linear(6, 3).eval()
    bound = L.analyse(model, (6,))
    x = torch.randn(20, 6)
    with torch.no_grad():
        z = model(x).numpy()
    r = L.certified_radii(z, bound)
    w = model.weight.detach().double().numpy()
    y = z.argmax(1)
    for i in range(len(x)):
        # exact distance to the nearest decision boundary of a linear classifier
        zi = z[i].astype(np.float64)  # the logits as given; the gaps in float64 (in float32 they would round)
        exact = min((zi[y[i]] - zi[j]) / np.linalg.norm(w[y[i]] - w[j]) for j in range(3) if j != y[i])
        # never beyond the exact distance (computed with gamma_{6 + 3} rounding), and short of it by the
        # margins only: the radius's own gamma_{6 + 6}, the head's SVD margin and the body's composition
        assert exact * (1 - 2 * svd_error(3, 6) - gamma(24)) <= r[i] <= exact * (1 + gamma(9))
    # the generic form is never larger than the pairwise one (both shrunk by their own roundings)
    generic = L.certified_radii(z, L.Bound(total=bound.total))
    assert np.all(generic <= r * (1 + gamma(24)))


def test_the_check_on_the_tiny_solar_model(tiny_case, tmp_path):
    uc = load_use_case(tiny_case)
    check = build(CheckSpec(check="lipschitz", params={"ascent_points": 8, "ascent_steps": 10, "radii": [0.0, 0.01]}))
    ctx = Context(use_case=uc, model=load_classifier(uc.model), data=DataSource(uc.data, 0), seed=0,
                  workdir=tmp_path / "checks" / "lipschitz")
    out = check(ctx)
    m = {x.metric: x for x in out.measurements if x.scope.perturbation is None}
    assert out.stage == "formal"
    assert m["lipschitz_upper_bound"].value >= m["lipschitz_lower_bound"].value > 0
    curve = sorted((x.amplitude, x.value) for x in out.measurements if x.metric == "lipschitz_certified_accuracy")
    acc = [v for _, v in curve]
    assert acc == sorted(acc, reverse=True)
    # the requested radii, plus any radius a requirement of the use case names (C1: 0.001)
    assert {0.0, 0.01} <= {a for a, _ in curve}
    assert (tmp_path / "checks" / "lipschitz" / "items.csv").is_file()
    assert any("L2" in v for v in out.validity)
    with pytest.raises(Exception, match="radii"):
        build(CheckSpec(check="lipschitz", params={"radii": [-1.0]}))



def test_concatenation_numbers_and_residual_branches_compose_exactly():
    class Cat(nn.Module):
        def forward(self, x):
            return torch.cat([2.0 * x, x * 3.0], dim=1)

    # two disjoint places: the squares of the branch constants add, sqrt(2^2 + 3^2), exactly the map's norm
    assert L.upper_bound(Cat().eval(), (4,)) == pytest.approx(math.sqrt(13), rel=gamma(16))

    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4, bias=False)

        def forward(self, x):
            return torch.sub(x, torch.relu(self.lin(x)), alpha=0.5)

    torch.manual_seed(5)
    res = Residual().eval()
    norm = torch.linalg.matrix_norm(res.lin.weight.double(), 2).item()
    assert L.upper_bound(res, (4,)) == pytest.approx(1 + 0.5 * norm, rel=1e-12)  # sum of the branches

    class Permuted(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(12, 3)

        def forward(self, x):
            return self.lin(x.permute(0, 2, 1).flatten(1))

    per = Permuted().eval()
    norm = torch.linalg.matrix_norm(per.lin.weight.double(), 2).item()
    assert L.upper_bound(per, (3, 4)) == pytest.approx(norm, rel=1e-12)  # a permutation has norm 1

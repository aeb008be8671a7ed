"""Bound propagation on the layer graph: sound on random CNNs (BatchNorm, pooling, residuals), CROWN never
looser than IBP, alpha-CROWN never looser than CROWN, and verdicts that agree with an exact mixed-integer
program (scipy.optimize.milp, big-M from the bounds) on tiny ReLU networks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.optimize import Bounds, LinearConstraint, milp
from torch import nn

from trustcase.certification import graph as G
from trustcase.certification import propagation as P
from trustcase.certification.local_robustness import decide


class Residual(nn.Module):
    def __init__(self, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.conv1 = nn.Conv2d(1, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.conv2 = nn.Conv2d(3, 3, 3, padding=1, stride=1, dilation=1)
        self.pool = nn.MaxPool2d(2)
        self.avg = nn.AvgPool2d(2)
        self.conv3 = nn.Conv2d(3, 4, 2, stride=2, groups=1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        h = torch.relu(self.bn(self.conv1(x)))
        h = h + torch.relu(self.conv2(h))  # residual
        h = self.avg(self.pool(h))  # 8x8 -> 4x4 -> 2x2
        h = torch.relu(self.conv3(h))  # 1x1
        return self.fc(h.flatten(1))


def random_cnn(seed: int) -> nn.Module:
    net = Residual(seed)
    with torch.no_grad():  # non-trivial running statistics
        net.bn.running_mean.uniform_(-0.5, 0.5)
        net.bn.running_var.uniform_(0.5, 2.0)
        net.bn.weight.uniform_(0.5, 1.5)
        net.bn.bias.uniform_(-0.3, 0.3)
    return net.eval()


def tiny_conv(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 2, 3, stride=2), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(2, 4), nn.ReLU(), nn.Linear(4, 3)).eval()


def tiny_dense(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3)).eval()


@pytest.mark.parametrize("seed", range(3))
def test_bounds_contain_every_sampled_output_and_tighten_in_order(seed):
    net = random_cnn(seed)
    g = G.from_model(net, (1, 8, 8))
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 1, 8, 8, generator=gen, dtype=torch.float64)
    eps = 0.05
    C = torch.tensor([[1.0, -1.0, 0.0], [0.0, 1.0, -1.0], [-1.0, 0.0, 1.0]], dtype=torch.float64)
    r = {m: P.lower_bound(g, x - eps, x + eps, C, m).lower[0] for m in P.METHODS}
    assert (r["crown"] >= r["ibp"] - 1e-9).all()
    assert (r["alpha-crown"] >= r["crown"] - 1e-12).all()
    probe = x + eps * (2 * torch.rand(10_000, 1, 8, 8, generator=gen, dtype=torch.float64) - 1)
    with torch.no_grad():
        y = net.double()(probe)
    spec = y @ C.T
    assert (spec.min(0).values >= r["alpha-crown"] - 1e-9).all()
    # and the intermediate bounds hold every node's value
    values = g.forward(probe, keep=True)
    bounds = P.intermediate(g, x - eps, x + eps)
    for v, (lo, hi) in zip(values, bounds, strict=True):
        assert (v >= lo - 1e-9).all() and (v <= hi + 1e-9).all()


class Joined(nn.Module):
    """Two branches concatenated along the channels, a scaled residual subtraction and a permutation."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(1, 2, 3, padding=1), nn.Conv2d(1, 1, 3, padding=1)
        self.head = nn.Linear(3 * 5 * 5, 3)

    def forward(self, x):
        y = torch.cat([torch.relu(self.a(x)), self.b(x) * 0.5], dim=1)  # (B, 3, 5, 5)
        y = torch.sub(y, torch.relu(y), alpha=0.25)
        return self.head(y.permute(0, 1, 3, 2).flatten(1))


@pytest.mark.parametrize("seed", range(2))
def test_concatenations_and_permutations_are_bounded_soundly(seed):
    torch.manual_seed(seed)
    net = Joined().eval()
    g = G.from_model(net, (1, 5, 5))
    assert any(isinstance(mp, G.Place) for n in g.nodes for mp in n.maps)
    gen = torch.Generator().manual_seed(seed)
    x, eps = torch.randn(1, 1, 5, 5, generator=gen, dtype=torch.float64), 0.1
    C = torch.tensor([[1.0, -1.0, 0.0], [0.0, 1.0, -1.0]], dtype=torch.float64)
    r = {m: P.lower_bound(g, x - eps, x + eps, C, m).lower[0] for m in P.METHODS}
    assert (r["crown"] >= r["ibp"] - 1e-9).all()
    probe = x + eps * (2 * torch.rand(5000, 1, 5, 5, generator=gen, dtype=torch.float64) - 1)
    with torch.no_grad():
        spec = net.double()(probe) @ C.T
    assert (spec.min(0).values >= r["alpha-crown"] - 1e-9).all()


def _matrix(mp, in_shape) -> np.ndarray:
    n = int(np.prod(in_shape))
    eye = torch.eye(n, dtype=torch.float64).view(n, *in_shape)
    return mp.forward(eye).reshape(n, -1).T.numpy()


def milp_margin(g: G.Graph, lo: np.ndarray, hi: np.ndarray, c: int, j: int) -> float:
    """min over the box of y_c - y_j, exactly: each unstable ReLU y = relu(z) with l < 0 < u is encoded by a
    binary a and y >= 0, y >= z, y <= z - l (1 - a), y <= u a."""
    bounds = P.intermediate(g, torch.from_numpy(lo)[None], torch.from_numpy(hi)[None])
    offset, size = [], 0
    for node in g.nodes:
        offset.append(size)
        size += int(np.prod(node.shape))
    extra = {k: size + sum(int(np.prod(g.nodes[r].shape)) for r in g.relus if r < k) for k in g.relus}
    total = size + sum(int(np.prod(g.nodes[r].shape)) for r in g.relus)
    rows, lb_r, ub_r = [], [], []

    def row(coefs: dict[int, float], low: float, high: float) -> None:
        v = np.zeros(total)
        for i, a in coefs.items():
            v[i] += a
        rows.append(v)
        lb_r.append(low)
        ub_r.append(high)

    var_lo = np.full(total, -np.inf)
    var_hi = np.full(total, np.inf)
    integrality = np.zeros(total)
    var_lo[:len(lo.ravel())], var_hi[:len(lo.ravel())] = lo.ravel(), hi.ravel()
    for k, node in enumerate(g.nodes[1:], start=1):
        n = int(np.prod(node.shape))
        if node.kind == "affine":
            mats = [_matrix(mp, g.nodes[i].shape) for i, mp in zip(node.inputs, node.maps, strict=True)]
            bias = np.zeros(n) if node.bias is None else node.bias.numpy().ravel()
            for o in range(n):
                coefs = {offset[k] + o: -1.0}
                for i, m in zip(node.inputs, mats, strict=True):
                    for q in np.flatnonzero(m[o]):
                        coefs[offset[i] + q] = coefs.get(offset[i] + q, 0.0) + m[o, q]
                row(coefs, -bias[o], -bias[o])
        else:
            src = node.inputs[0]
            lo_z, hi_z = (t[0].numpy().ravel() for t in bounds[src])
            for o in range(n):
                y, z, a = offset[k] + o, offset[src] + o, extra[k] + o
                var_lo[a], var_hi[a] = 0, 1
                if lo_z[o] >= 0:
                    row({y: 1.0, z: -1.0}, 0, 0)
                elif hi_z[o] <= 0:
                    row({y: 1.0}, 0, 0)
                else:
                    integrality[a] = 1
                    row({y: 1.0}, 0, np.inf)
                    row({y: 1.0, z: -1.0}, 0, np.inf)
                    row({y: 1.0, z: -1.0, a: -lo_z[o]}, -np.inf, -lo_z[o])
                    row({y: 1.0, a: -hi_z[o]}, -np.inf, 0)
    obj = np.zeros(total)
    out = offset[-1]
    obj[out + c], obj[out + j] = 1.0, -1.0
    res = milp(obj, constraints=LinearConstraint(np.array(rows), lb_r, ub_r), integrality=integrality,
               bounds=Bounds(var_lo, var_hi))
    assert res.success, res.message
    return float(res.fun)


@pytest.mark.parametrize("make,shape", [(tiny_dense, (3,)), (tiny_conv, (1, 6, 6))])
def test_verdicts_agree_with_the_exact_mixed_integer_program(make, shape):
    seen = set()
    for seed in range(3):
        net = make(seed)
        g = G.from_model(net, shape)
        rng = np.random.default_rng(seed)
        for _ in range(2):
            x = torch.from_numpy(rng.normal(size=(1, *shape)))
            with torch.no_grad():
                c = int(net(x.float()).argmax())
            for eps in (0.02, 0.1, 0.5, 2.0):
                # no deadline: branch and bound is complete on these tiny networks (at most 2^12 ReLU patterns;
                # three inputs split until CROWN decides, the margin being non-zero), so load cannot change a verdict
                out = decide(g, net, x, x - eps, x + eps, c, timeout=math.inf)
                exact = min(milp_margin(g, (x - eps)[0].numpy(), (x + eps)[0].numpy(), c, j)
                            for j in range(3) if j != c)
                seen.add(out["verdict"])
                if out["verdict"] == "verified":
                    assert exact > 0, (seed, eps, exact)
                    assert out["margin"] <= exact + 1e-6  # a lower bound of the true margin
                elif out["verdict"] == "falsified":
                    assert exact <= 1e-6, (seed, eps, exact)
    assert {"verified", "falsified"} <= seen


def test_a_layer_it_cannot_bound_is_named_with_its_type_and_position():
    net = nn.Sequential(nn.Linear(3, 4), nn.Sigmoid(), nn.Linear(4, 2)).eval()
    with pytest.raises(G.GraphError, match=r"layer 1 '1' \(Sigmoid\)"):
        G.from_model(net, (3,))


def test_nan_weights_are_refused_before_any_work():
    net = tiny_dense(0)
    with torch.no_grad():
        net[2].weight[0, 0] = float("nan")
    with pytest.raises(G.GraphError, match=r"layer 2 '2' \(Linear\): weight holds NaN"):
        G.from_model(net, (3,))
    from trustcase.certification.local_robustness import change_property
    from trustcase.certification.properties import check_property

    prop = change_property("p", np.zeros(3), np.ones(3), 0, 3)
    with pytest.raises(ValueError, match=r"2.weight holds NaN"):
        check_property(net, prop)  # refused before any work: no search starts


def test_a_budget_of_zero_is_an_error():
    net = tiny_dense(0)
    g = G.from_model(net, (3,))
    x = torch.zeros(1, 3)
    with pytest.raises(ValueError, match="timeout must be > 0"):
        decide(g, net, x, x - 0.1, x + 0.1, 0, timeout=0)


def test_vnnlib_box_properties_on_an_image_model(tmp_path):
    from trustcase.certification.properties import check_property
    from trustcase.certification.vnnlib import read_vnnlib

    net = tiny_conv(1)
    x = torch.zeros(1, 1, 6, 6)
    with torch.no_grad():
        y = net(x)[0]
    c = int(y.argmax())

    def prop(eps: float, name: str):
        lines = [f"(declare-const X_{i} Real)" for i in range(36)] + [f"(declare-const Y_{j} Real)" for j in range(3)]
        lines += [f"(assert (>= X_{i} {-eps}))\n(assert (<= X_{i} {eps}))" for i in range(36)]
        others = " ".join(f"(and (>= Y_{j} Y_{c}))" for j in range(3) if j != c)
        lines.append(f"(assert (or {others}))")  # violated: another class scores at least as high
        path = tmp_path / f"{name}.vnnlib"
        path.write_text("\n".join(lines))
        return read_vnnlib(path)

    # no deadline: ReLU splitting is complete on this network (12 ReLUs), the falsifier's samples and steps are
    # counted, so the verdicts are the same at any load
    small = check_property(net, prop(0.01, "small"), timeout=math.inf, shape=(1, 6, 6))
    large = check_property(net, prop(3.0, "large"), timeout=math.inf, shape=(1, 6, 6))
    assert small["verdict"] == "holds" and "layer graph" in small["method"]
    assert large["verdict"] == "violated"
    cx = torch.tensor(large["counterexample"]["x"]).view(1, 1, 6, 6)
    with torch.no_grad():
        z = net(cx)[0]
    assert (z[[j for j in range(3) if j != c]] >= z[c]).any()


def test_neurons_with_disjoint_inputs_share_a_backward_pass_with_the_same_bounds(monkeypatch):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Conv2d(3, 3, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 8 * 8, 3)).eval()
    g = G.from_model(net, (1, 16, 16))
    assert P._spacing(g, 5) is not None  # the second convolution's neurons can be grouped
    x = torch.randn(2, 1, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    grouped = P.intermediate(g, x - 0.1, x + 0.1)
    monkeypatch.setattr(P, "_spacing", lambda g, k: None)
    single = P.intermediate(g, x - 0.1, x + 0.1)
    for (a_lo, a_hi), (b_lo, b_hi) in zip(grouped, single, strict=True):
        assert torch.allclose(a_lo, b_lo, atol=1e-9) and torch.allclose(a_hi, b_hi, atol=1e-9)


def _robust_rows(c: int) -> list:
    """"Some class j != c scores >= c" as conjunctions of one row each: y_c - y_j <= 0."""
    rows = []
    for j in range(3):
        if j != c:
            a = np.zeros((1, 3))
            a[0, c], a[0, j] = 1.0, -1.0
            rows.append((a, np.zeros(1)))
    return rows


def test_beta_crown_branch_and_bound_agrees_with_the_exact_program():
    """ReLU splitting with beta-CROWN (the search high-dimensional inputs get): "holds" only where the exact
    program proves the margin positive, "violated" only with a counterexample a forward pass confirms, and it
    decides balls alpha-CROWN alone leaves open."""
    from trustcase.certification.bab import split_relus

    cases = [(tiny_conv(2), (1, 6, 6), 2, eps) for eps in (0.3, 0.5, 0.8)]
    cases += [(tiny_dense(seed), (3,), seed, eps) for seed in range(4) for eps in (0.3, 0.6, 1.0, 2.0)]
    beyond_alpha, verdicts = 0, []
    for net, shape, seed, eps in cases:
        g = G.from_model(net, shape)
        x = torch.from_numpy(np.random.default_rng(seed).normal(size=(1, *shape)))
        with torch.no_grad():
            c = int(net(x.float()).argmax())
        lo, hi = (x - eps)[0].numpy().ravel(), (x + eps)[0].numpy().ravel()

        def candidate(xs: np.ndarray, c=c, net=net, shape=shape):
            with torch.no_grad():
                z = net(torch.from_numpy(xs).float().view(len(xs), *shape))
            bad = (z >= z[:, c:c + 1]).sum(1) > 1  # another class ties or wins
            return xs[int(torch.nonzero(bad)[0])] if bad.any() else None

        # no deadline: a domain budget, so the verdict is the same on any machine at any load
        out = split_relus(g, lo, hi, _robust_rows(c), math.inf, candidate=candidate, max_domains=4000)
        exact = min(milp_margin(g, (x - eps)[0].numpy(), (x + eps)[0].numpy(), c, j) for j in range(3) if j != c)
        verdicts.append(out.verdict)
        if out.verdict == "holds":
            assert exact > 0, (seed, eps, exact)
            C = torch.zeros(2, 3, dtype=torch.float64)
            C[:, c] = 1.0
            C[torch.arange(2), [j for j in range(3) if j != c]] = -1.0
            beyond_alpha += bool((P.lower_bound(g, x - eps, x + eps, C, "alpha-crown").lower <= 0).any())
        elif out.verdict == "violated":
            assert exact <= 1e-6, (seed, eps, exact)
            assert np.all(out.counterexample >= lo) and np.all(out.counterexample <= hi)
        else:
            assert out.reason
            assert abs(exact) < 1e-3, (seed, eps, exact, out.reason)  # only a knife-edge may stay open
    assert beyond_alpha >= 1 and {"holds", "violated"} <= set(verdicts)


@pytest.mark.parametrize("seed", range(3))
def test_split_decisions_only_tighten_and_stay_sound(seed):
    """A child of a ReLU split (the neuron's pre-activation >= 0 or <= 0) is bounded with its decisions as
    beta-CROWN terms: never looser than its parent (so what the parent proves stays proved), and still below
    every sampled output of the inputs that meet its decisions."""
    from trustcase.certification import bab

    net = tiny_dense(seed)
    g = G.from_model(net, (3,))
    x = torch.from_numpy(np.random.default_rng(seed).normal(size=(1, 3)))
    lo, hi = x - 1.0, x + 1.0
    spec = bab._Specification(_robust_rows(0), mix=False)
    pre = sorted({g.nodes[r].inputs[0] for r in g.relus})
    bounds = P.intermediate(g, lo, hi, "crown")
    splits = {j: torch.zeros(1, *g.nodes[j].shape, dtype=torch.float64) for j in pre}
    lower, lam, scores, alphas, betas = bab._optimise(g, lo, hi, spec, bounds, splits, {}, {}, 20,
                                                      math.inf)  # 20 iterations, no deadline
    root = bab._Domains(splits, bounds, alphas, betas, lower, scores, lam)
    fast = G.astype(g, torch.float32)  # the children search alpha and beta in float32, bound in float64
    # split the two neurons of largest score, one after the other: four grandchildren
    d = root
    for _ in range(2):
        flat = torch.cat([d.scores[j].flatten(1) for j in pre], 1)
        kids = bab._branch(g, pre, d, flat.argmax(1))
        n = len(kids)
        low, lam, scores, alphas, betas = bab._optimise(g, lo.expand(n, 3), hi.expand(n, 3), spec, kids.bounds,
                                                        kids.splits, kids.alphas, kids.betas, 20,
                                                        math.inf, kids.lower, fast)
        assert torch.all(low >= kids.lower)  # children: at least the parent's bound, row by row
        d = bab._Domains(kids.splits, kids.bounds, alphas, betas, low, scores, lam)
    xs = lo + (hi - lo) * torch.rand(50000, 3, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    values = g.forward(xs, keep=True)
    margins = values[-1] @ spec.A.T - spec.b  # (samples, rows)
    for i in range(len(d)):
        meets = torch.ones(len(xs), dtype=torch.bool)
        for j, s in d.splits.items():
            z = values[j].flatten(1)
            s = s[i].flatten()
            meets &= ((z * s) >= 0).all(1) | (s == 0).all()
        if meets.any():
            assert torch.all(d.lower[i] <= margins[meets].min(0).values + 1e-9), i


# --- certified training of the solar-cell use case (its train.py) ----------------------------------------

def _solar_train():
    from conftest import load_train_module

    return load_train_module()


def test_the_training_interval_bounds_are_sound_and_at_least_as_tight_as_ibp_on_the_graph():
    """train.interval_margins (the bound the certified training minimises) contains every sampled margin and
    is never looser than the verifier's IBP bound of the same margins (it folds the last layer in)."""
    train = _solar_train()
    torch.manual_seed(0)
    net = train.cnn.StridedCNN(width=4, size=16, hidden=8).eval()
    g = G.from_model(net, (1, 16, 16))
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.normal(size=(3, 1, 16, 16))).float()
    y = torch.tensor([0, 1, 1])
    eps = 0.05
    with torch.no_grad():
        bound = train.interval_margins(net, x - eps, x + eps, y)  # (3, 2) upper bounds of z_j - z_y
        pts = x[:, None] + eps * (2 * torch.rand(3, 2000, 1, 16, 16) - 1)
        z = net(pts.reshape(-1, 1, 16, 16)).reshape(3, 2000, 2)
    margins = z - z.gather(2, y.view(3, 1, 1).expand(3, 2000, 1))
    assert (margins.amax(1) <= bound + 1e-5).all()
    assert (bound[torch.arange(3), y] == 0).all()
    C = torch.zeros(3, 2, 2, dtype=torch.float64)  # rows z_j - z_y
    C[torch.arange(3), :, :] = torch.eye(2, dtype=torch.float64)
    C[torch.arange(3), :, y] -= 1.0
    ibp = -P.lower_bound(g, x.double() - eps, x.double() + eps, -C, "ibp").lower  # the same by the graph's IBP
    assert (bound <= ibp + 1e-5).all()


def test_certified_training_makes_the_network_verifiable_where_plain_training_does_not(tmp_path):
    """The same strided CNN on the same 300 ELPV cells (32x32), trained with and without interval bounds:
    at 1 grey level the verifier proves at least half of 20 test cells of the first, more than of the second."""
    from conftest import tiny_use_case, write_yaml

    from trustcase.data.streaming import DataSource
    from trustcase.models.loading import load_classifier
    from trustcase.schemas import load_use_case

    train = _solar_train()
    proved = {}
    for eps in (0.0, 2.0):
        path = tmp_path / f"m{eps:g}.pt"
        yml = write_yaml(tmp_path / f"m{eps:g}.yaml", tiny_use_case(tmp_path, path))
        train.train(path, epochs=4, width=4, use_case=yml, limit=300, log=lambda *_: None, arch="strided",
                    ibp_eps=eps)
        uc = load_use_case(yml)
        clf = load_classifier(uc.model)
        g = G.from_model(clf.module, clf.spec.input_shape)
        batch = next(DataSource(uc.data, 0, uc.model).stream("test").batches(20))
        preds = clf.logits(batch.images).argmax(1)
        verdicts = []
        for i, (img, c) in enumerate(zip(batch.images, preds, strict=True)):
            box = [clf.to_input(np.clip(img + d, 0, 255)[None]).double() for d in (0.0, -1.0, 1.0)]
            # no deadline and no branch and bound (max_split=0): IBP, the attack, CROWN and alpha-CROWN, each a fixed
            # number of steps, decide, so the count is the same at any load
            verdicts.append(decide(g, clf.module, *box, int(c), timeout=math.inf, item_seed=i, max_split=0)["verdict"])
        proved[eps] = verdicts.count("verified")
    assert proved[2.0] >= 10 and proved[2.0] > proved[0.0], proved


def test_domains_bounded_apart_join_with_the_betas_each_batch_had():
    """Two batches of ReLU-split domains may carry beta (and alpha) for different nodes: beta exists only where that
    batch split something. Joining them fills the missing ones with zeros (sound: any beta >= 0, alpha in [0, 1]);
    it once raised KeyError on VNN-COMP oval21 cifar_deep_kw."""
    from trustcase.certification.bab import _Domains

    def part(n, beta_nodes):
        b = [(torch.zeros(n, 3), torch.ones(n, 3))]
        return _Domains({1: torch.zeros(n, 3)}, b, {2: torch.ones(n, 1, 3)},
                        {j: torch.full((n, 1, 3), 0.5) for j in beta_nodes}, torch.zeros(n, 1),
                        {1: torch.zeros(n, 3)}, torch.zeros(n, 3))

    joined = _Domains.cat([part(2, [1]), part(3, [])])
    assert len(joined) == 5 and set(joined.betas) == {1}
    assert torch.equal(joined.betas[1][:2], torch.full((2, 1, 3), 0.5))
    assert torch.equal(joined.betas[1][2:], torch.zeros(3, 1, 3))
    assert set(_Domains.cat([part(2, []), part(1, [1])]).betas) == {1}

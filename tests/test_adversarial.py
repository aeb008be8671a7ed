"""Adversarial attacks: exact answers on linear models (through a non-trivial normalisation), then a
small trained CNN: attacks reduce its accuracy, PGD is at least as strong as FGSM, balls are respected.
The attack engine (`auto`: FGSM, then PGD, then APGD) against exact answers: linear classifiers, whose minimal
adversarial distance has a closed form, with 2 and 4 classes, under L-inf and L2; never weaker than PGD or
FGSM on any item of the small CNN; Square on a black box; the same evidence at any batch size."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_sweep import synthetic_case

from trustcase.checks import CheckError, Context, Unsupported, build
from trustcase.checks.adversarial import AdversarialParams
from trustcase.data.streaming import DataSource, Item
from trustcase.models.classifier import Classifier
from trustcase.robustness import attacks as adv
from trustcase.schemas import CheckSpec, Verdict
from trustcase.seeding import item_seeds
from trustcase.testing import black_box_of
from trustcase.verdicts import judge

VR = (0.0, 255.0)
NORMALISATION = {"mean": [0.5], "std": [0.25]}  # x_model = p / 63.75 - 2: the gradient scale is 1 / 63.75


class Linear(torch.nn.Module):
    """logits = [0, w . x + b] on the normalised input: the decision boundary is a hyperplane."""

    def __init__(self, w: torch.Tensor, b: float):
        super().__init__()
        self.w, self.b = w, b

    def forward(self, x):
        f = x.flatten(1) @ self.w + self.b
        return torch.stack([torch.zeros_like(f), f], dim=1)


def linear_setup(n: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(16, generator=g)
    x = 128 + 10 * (torch.rand(n, 4, 4, 1, generator=g) - 0.5)
    uc = synthetic_case(size=4, normalisation=NORMALISATION)
    w_pix = w / 63.75  # gradient of the margin w.r.t. pixel values
    b = float(-(w * (128 / 63.75 - 2)).sum()) - 2.0
    clf = Classifier(uc.model, module=Linear(w, b).eval())
    margin = clf.forward(clf.to_input(x))[:, 1]  # < 0: class 0, correct
    y = torch.zeros(n, dtype=torch.long)
    return clf, x, y, -margin, w_pix


def seeds(n: int) -> np.ndarray:
    return item_seeds(0, "test", range(n), "attack")


def test_linear_model_minimal_distances_match_the_closed_form():
    clf, x, y, margin, w_pix = linear_setup()
    assert (margin > 0).all()
    for norm, dual in (("l2", w_pix.norm(p=2)), ("linf", w_pix.norm(p=1))):
        truth = (margin / dual).numpy()
        found = adv.minimal_distance("pgd", clf, x, y, norm, VR, max_distance=float(truth.max() * 2),
                                     search_steps=12, budget=adv.Budget(10, 2.5, 1), seeds=seeds(len(x)))
        # a witness exists at each distance found: it can never be below the true minimum
        assert (found >= truth * (1 - 1e-4)).all(), norm
        assert found == pytest.approx(truth, rel=0.02), norm


def test_fgsm_is_exact_on_a_linear_model_under_linf():
    clf, x, y, margin, w_pix = linear_setup()
    d = (margin / w_pix.norm(p=1)).numpy()
    eps = float(np.median(d))
    x_adv, fooled = adv.attack("fgsm", clf, x, y, torch.full((len(x),), eps), "linf", VR, adv.Budget(1, 1.0, 1),
                               seeds(len(x)))
    clear = np.abs(d - eps) > 1e-3 * eps
    assert np.array_equal(fooled.numpy()[clear], (d < eps)[clear])
    assert (x_adv - x).abs().amax() <= eps + 1e-4


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_attacks_stay_in_their_ball_and_in_the_value_range(norm):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(16, 2))
    uc = synthetic_case(size=4)
    clf = Classifier(uc.model, module=net.eval())
    x = torch.cat([torch.zeros(4, 4, 4, 1), 255 * torch.ones(4, 4, 4, 1), 255 * torch.rand(8, 4, 4, 1)])
    y = torch.tensor([0, 1] * 8)
    eps = torch.linspace(5, 120, len(x))
    for kind in ("fgsm", "pgd", "apgd", "auto", *(("square",) if norm == "linf" else ())):
        x_adv, _ = adv.attack(kind, clf, x, y, eps, norm, VR, adv.Budget(7, 2.5, 2, apgd_steps=20, queries=50),
                              seeds(len(x)))
        assert (adv.norms(x_adv - x, norm) <= eps * (1 + 1e-5) + 1e-4).all()
        assert x_adv.min() >= 0 and x_adv.max() <= 255
    x0 = torch.full((5, 3, 3), 100.0)
    z = x0 + torch.randn(5, 3, 3) * 50
    for e in (0.5, 10.0):
        eps = torch.full((5, 1, 1), e)
        lo, hi = (x0 - eps, x0 + eps) if norm == "linf" else (torch.zeros_like(x0), torch.full_like(x0, 255.0))
        p = adv.project(x0, z, lo, hi, eps, norm)
        assert (adv.norms(p - x0, norm) <= e * (1 + 1e-5) + 1e-4).all()
        assert torch.allclose(adv.project(x0, p, lo, hi, eps, norm), p)  # a projection is idempotent


# --- a small trained CNN -------------------------------------------------------------------------------


class StripeSplit:
    """12x12 grey stripes: class 0 horizontal, class 1 vertical, random phase and contrast, mild noise."""

    def __init__(self, split: str, n: int = 96, offset: int = 0):
        self.n, self.offset = n, offset

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> Item:
        rng = np.random.default_rng(i + self.offset)
        label = i % 2
        t = np.arange(12)
        wave = np.sin(2 * np.pi * (t / 4 + rng.random()))
        img = np.tile(wave[:, None], (1, 12)) if label == 0 else np.tile(wave[None, :], (12, 1))
        img = 128 + 60 * (0.7 + 0.3 * rng.random()) * img + rng.normal(0, 4, (12, 12))
        return Item(image=np.clip(img, 0, 255).astype(np.float32), label=label, id=f"s{i}")


@pytest.fixture(scope="module")
def stripes_model():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 6, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(6, 6, 3),
                              torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(6, 2))
    uc = synthetic_case(loader="test_adversarial:StripeSplit", size=12, normalisation=NORMALISATION)
    clf = Classifier(uc.model, module=net)
    train = StripeSplit("train", n=200, offset=10_000)
    items = [train[i] for i in range(len(train))]
    x = torch.as_tensor(np.stack([it.image for it in items]))[..., None]
    y = torch.tensor([it.label for it in items])
    opt = torch.optim.Adam(net.parameters(), lr=0.02)
    for _ in range(60):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(clf.to_input(x)), y).backward()
        opt.step()
    net.eval()
    return clf


def run_check(clf, tmp_path, requirements=(), **params):
    uc = synthetic_case(requirements, loader="test_adversarial:StripeSplit", size=12, normalisation=NORMALISATION)
    ctx = Context(use_case=uc, model=clf, data=DataSource(uc.data, 0), seed=0, workdir=tmp_path / "adversarial")
    check = build(CheckSpec(check="adversarial", params=params))
    return check(ctx), uc


def accuracies(out, attack):
    ms = sorted((m for m in out.measurements if m.metric == "adversarial_accuracy"
                 and m.scope.perturbation.name == attack), key=lambda m: m.amplitude)
    return [m.amplitude for m in ms], [m.value for m in ms]


def test_attacks_reduce_the_accuracy_of_a_trained_model_and_pgd_beats_fgsm(stripes_model, tmp_path):
    claim = {"id": "R-adv", "text": "robust", "metric": "accuracy", "comparator": ">=", "threshold": 0.9,
             "scope": {"perturbation": {"name": "pgd_linf", "max_amplitude": 4}}}
    out, uc = run_check(stripes_model, tmp_path, [claim], attacks=["fgsm_linf", "pgd_linf", "pgd_l2"],
                        linf=[2, 8, 48], l2=[20, 80, 400], max_items=32, steps=5, search_steps=4)
    eps, fgsm = accuracies(out, "fgsm_linf")
    _, pgd = accuracies(out, "pgd_linf")
    assert eps == [0, 2, 8, 48]
    assert fgsm[0] == pgd[0] >= 0.95  # the model learnt the task
    assert pgd[-1] < 0.5 and pgd[-1] < pgd[0]
    assert all(p <= f for p, f in zip(pgd, fgsm, strict=True))
    _, l2 = accuracies(out, "pgd_l2")
    assert l2[-1] < l2[0]
    success = next(m for m in out.measurements if m.metric == "attack_success_rate" and m.amplitude == 48
                   and m.scope.perturbation.name == "pgd_linf")
    assert success.value == pytest.approx(1 - pgd[-1] / pgd[0], abs=1e-9)  # every item was correct clean

    d = out.summary["pgd_linf"]["distance"]
    assert 0 < d["q10"] <= d["median"] <= d["q90"] <= d["max_distance"] == 96
    median = next(m for m in out.measurements if m.metric == "adversarial_distance_median.pgd_linf")
    assert median.interval.lower <= median.value <= median.interval.upper and median.n == 32
    assert not median.scope.perturbation
    curve = next(c for c in out.curves if c.id == "adversarial_pgd_linf")
    assert set(curve.series) == {"accuracy", "recall:defective"} and curve.series["accuracy"].y == pgd
    assert curve.x == [0, 2, 8, 48] and curve.x_marks == {"R-adv claimed up to": 4}
    assert "distance" not in out.summary["fgsm_linf"]  # minimal distances are searched with PGD only

    assert any("EMPIRICAL" in v and "upper bound" in v for v in out.validity)
    assert any("pixel units of [0, 255]" in v for v in out.validity)
    (evidence,) = judge(uc.requirements, [out])
    worst = min(v for e, v in zip(eps, pgd, strict=True) if e <= 4)
    assert evidence.value == worst
    assert evidence.verdict is Verdict.FAIL if worst < 0.9 else evidence.verdict in (Verdict.PASS, Verdict.INCONCLUSIVE)
    assert evidence.details["amplitudes"] == [0.0, 2.0]


def test_the_attack_engine_is_at_least_as_strong_as_fgsm_and_pgd(stripes_model, tmp_path):
    out, _ = run_check(stripes_model, tmp_path, attacks=["fgsm_linf", "pgd_linf", "apgd_linf"], linf=[2, 8, 16, 24],
                       max_items=32, steps=10, restarts=2, apgd_steps=50, distance=False)
    _, fgsm = accuracies(out, "fgsm_linf")
    _, pgd = accuracies(out, "pgd_linf")
    _, apgd = accuracies(out, "apgd_linf")
    assert apgd[0] == pgd[0] >= 0.95
    assert all(a <= min(p, f) for a, p, f in zip(apgd, pgd, fgsm, strict=True)), (apgd, pgd, fgsm)
    assert apgd[-1] < apgd[0]


def test_square_attacks_a_black_box(stripes_model, tmp_path):
    box = black_box_of(stripes_model)
    out, _ = run_check(box, tmp_path, attacks=["square_linf"], linf=[48], max_items=16, queries=50, distance=False)
    _, acc = accuracies(out, "square_linf")
    assert acc[1] < acc[0]  # forward passes alone break it


def test_deterministic_and_sharded_per_attack(stripes_model, tmp_path):
    params = {"attacks": ["pgd_l2", "fgsm_l2"], "l2": [40], "max_items": 16, "steps": 3, "search_steps": 2}
    a, _ = run_check(stripes_model, tmp_path / "a", **params)
    b, _ = run_check(stripes_model, tmp_path / "b", batch_size=5, **params)
    assert [m.value for m in a.measurements] == [m.value for m in b.measurements]
    shards = build(CheckSpec(check="adversarial", params=params)).shards()
    assert [s.params.attacks for s in shards] == [["pgd_l2"], ["fgsm_l2"]]


def test_black_boxes_and_bad_parameters_are_refused(tmp_path):
    uc = synthetic_case(size=12)
    eager = Classifier(uc.model, module=torch.nn.Sequential(torch.nn.Flatten(), torch.nn.LazyLinear(2)))
    ctx = Context(use_case=uc, model=black_box_of(eager), data=DataSource(uc.data, 0), seed=0,  # the real BlackBox
                  workdir=tmp_path / "adversarial")
    with pytest.raises(Unsupported, match="needs gradients"):
        build(CheckSpec(check="adversarial"))(ctx)
    for params, message in (({"attacks": []}, "at least one attack"), ({"linf": [-1.0]}, "finite and > 0"),
                            ({"attacks": ["pgd_l3"]}, "Input should be 'fgsm_linf'"), ({"l2": []}, "empty"),
                            ({"max_distance": {"l1": 3}}, "max_distance")):
        with pytest.raises(CheckError, match=message):
            build(CheckSpec(check="adversarial", params=params), 0)


def test_default_epsilons_follow_the_value_range():
    p = AdversarialParams()
    assert p.epsilons("linf", (0, 255)) == [0.0, 0.5, 1.0, 2.0, 4.0, 8.0]
    assert p.epsilons("linf", (0, 1)) == pytest.approx([0.0, 0.5 / 255, 1 / 255, 2 / 255, 4 / 255, 8 / 255], abs=1e-6)
    assert p.epsilons("l2", (-1, 1)) == [0.0, 0.1, 0.2, 0.5, 1.0, 2.0]


def test_censored_distances_count_the_items_not_fooled_at_the_cap():
    """Exact: items not fooled within the search (inf) stand at the cap and are counted; the quantiles are
    distances some item has (inverted CDF), the median the same value `quantile_interval` gives."""
    d = np.array([0.4, np.inf, 0.1, 0.3, np.inf, 0.2, 0.5, 0.6, 0.7, 0.8])
    capped, stats = adv.censored_distances(d, 1.0)
    np.testing.assert_array_equal(capped, [0.4, 1.0, 0.1, 0.3, 1.0, 0.2, 0.5, 0.6, 0.7, 0.8])
    assert stats == {"median": 0.5, "q10": 0.1, "q90": 1.0, "max_distance": 1.0, "censored": 2}
    assert adv.quantile_interval(capped, adv.DISTANCE_QUANTILES["median"], 0.95)[0] == stats["median"]


def test_quantile_interval_is_distribution_free():
    rng = np.random.default_rng(0)
    hits = 0
    for _ in range(200):
        v, iv = adv.quantile_interval(rng.exponential(size=50), 0.5, 0.95)
        hits += iv.lower <= np.log(2) <= iv.upper
        assert iv.lower <= v <= iv.upper
    assert hits / 200 >= 0.92


# --- the attack engine ---------------------------------------------------------------------------------


def robust_count(kind, clf, x, y, eps, norm, **budget):
    b = {"steps": 10, "step_size": 2.5, "restarts": 2, "apgd_steps": 100} | budget
    x_adv, fooled = adv.attack(kind, clf, x, y, torch.full((len(x),), eps), norm, VR, adv.Budget(**b), seeds(len(x)))
    assert (adv.norms(x_adv - x, norm) <= eps * (1 + 1e-5) + 1e-4).all()  # every witness is in its ball
    assert torch.equal(fooled, clf.forward(clf.to_input(x_adv)).argmax(1) != y)  # and re-checked
    return int((~fooled).sum()), fooled  # items the attack did not fool


def test_apgd_checkpoints_are_the_papers():
    # Croce & Hein 2020: p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06), w_j = ceil(p_j N)
    assert adv.checkpoints(100) == [0, 22, 41, 57, 70, 80, 87, 93, 99]


@pytest.mark.parametrize("kind", ["apgd", "auto"])
@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_engine_finds_the_exact_adversarial_accuracy_of_a_linear_model(norm, kind):
    clf, x, y, margin, w_pix = linear_setup(n=40, seed=3)
    d = (margin / (w_pix.norm(p=1) if norm == "linf" else w_pix.norm(p=2))).numpy()  # closed-form distances
    for q in (0.25, 0.5, 0.75):
        eps = float(np.quantile(d, q))
        exact = int((d >= eps).sum())  # robust items: no point of their ball crosses the hyperplane
        robust, fooled = robust_count(kind, clf, x, y, eps, norm, steps=3, restarts=1)
        assert exact <= robust <= exact + 1, (q, robust, exact)  # the exact answer within one item
        assert not fooled.numpy()[d > eps * (1 + 1e-4)].any()  # never a counterexample beyond the distance


class Multiclass(torch.nn.Module):
    def __init__(self, w: torch.Tensor, b: torch.Tensor):
        super().__init__()
        self.w, self.b = w, b

    def forward(self, x):
        return x.flatten(1) @ self.w.T + self.b


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_engine_finds_the_exact_adversarial_accuracy_with_four_classes(norm):
    """Linear logits z = W x + b: item i is fooled within eps iff min_j (z_y - z_j) / ||w_y - w_j||_* <= eps
    (dual norm: L1 for L-inf, L2 for L2). The nearest class is rarely the runner-up, so the targeted runs
    matter."""
    g = torch.Generator().manual_seed(1)
    w, b = torch.randn(4, 16, generator=g), torch.randn(4, generator=g)
    uc = synthetic_case(size=4, normalisation=NORMALISATION)
    clf = Classifier(uc.model.model_copy(update={"class_names": ["a", "b", "c", "d"], "critical_class": "a"}),
                     module=Multiclass(w, b).eval())
    x = 128 + 20 * (torch.rand(60, 4, 4, 1, generator=g) - 0.5)
    z = clf.forward(clf.to_input(x)).detach()
    y = z.argmax(1)
    w_pix = w / 63.75  # the normalisation's scale
    p = 1 if norm == "linf" else 2
    gaps = (z.gather(1, y[:, None]) - z) / (w_pix[y][:, None, :] - w_pix[None]).norm(p=p, dim=2).clamp_min(1e-12)
    d = gaps.masked_fill(torch.nn.functional.one_hot(y, 4).bool(), float("inf")).amin(1).numpy()
    for q in (0.3, 0.6):
        eps = float(np.quantile(d, q))
        exact = int((d >= eps).sum())
        robust, _ = robust_count("auto", clf, x, y, eps, norm, steps=3, restarts=1, apgd_steps=50)
        assert exact <= robust <= exact + 1, (q, robust, exact)


def test_engine_is_never_weaker_than_pgd_or_fgsm_on_any_item(stripes_model):
    split = StripeSplit("test", n=40)
    items = [split[i] for i in range(len(split))]
    x = torch.as_tensor(np.stack([it.image for it in items]))[..., None]
    y = torch.tensor([it.label for it in items])
    for norm, eps in (("linf", 20.0), ("linf", 32.0), ("l2", 150.0), ("l2", 300.0)):
        runs = {k: robust_count(k, stripes_model, x, y, eps, norm, apgd_steps=50) for k in ("fgsm", "pgd", "auto")}
        acc, fooled = {k: r[0] for k, r in runs.items()}, {k: r[1] for k, r in runs.items()}
        assert not ((fooled["fgsm"] | fooled["pgd"]) & ~fooled["auto"]).any(), (norm, eps)  # per item
        assert acc["auto"] <= min(acc["pgd"], acc["fgsm"]) < len(x), (norm, eps, acc)
        if eps in (32.0, 300.0):  # where PGD's 10 small steps stall, APGD goes on (measured: 12 vs 20 and 18)
            assert acc["auto"] < acc["pgd"], (norm, eps, acc)


def test_square_fools_a_linear_black_box():
    clf, x, y, margin, w_pix = linear_setup(n=24, seed=5)
    box = black_box_of(clf)
    d = (margin / w_pix.norm(p=1)).numpy()
    eps = float(np.quantile(d, 0.5)) * 1.5
    x_adv, fooled = adv.attack("square", box, x, y, torch.full((len(x),), eps), "linf", VR,
                               adv.Budget(1, 2.5, 1, queries=100), seeds(len(x)))
    assert fooled.float().mean() >= 0.25  # forward passes alone break the items within reach
    assert not fooled.numpy()[d > eps * (1 + 1e-4)].any()  # and never one out of reach
    assert (adv.norms(x_adv - x, "linf") <= eps + 1e-4).all()


def test_engine_gives_the_same_evidence_at_any_batch_size(stripes_model, tmp_path):
    params = {"attacks": ["auto_linf"], "linf": [8], "max_items": 12, "steps": 3, "apgd_steps": 20,
              "restarts": 2, "search_steps": 2}
    a, _ = run_check(stripes_model, tmp_path / "a", **params)
    b, _ = run_check(stripes_model, tmp_path / "b", batch_size=5, **params)
    assert [m.value for m in a.measurements] == [m.value for m in b.measurements]
    assert any("upper bounds of robust accuracy" in v and "re-checked" in v for v in a.validity)
    assert any("APGD" in v and "margin to the other class" in v for v in a.validity)
    assert a.summary["auto_linf"]["apgd_steps"] == 20


def test_attack_region_decides_boxes_of_a_linear_model_exactly():
    """The verifier's interface: any box, no ball. For f(x) = w.x + b the least margin over a box is at its corner
    sign(-w): an item is fooled iff that corner's margin is negative, and every witness lies in its box."""
    g = torch.Generator().manual_seed(7)
    w, b = torch.randn(16, generator=g), 0.3
    net = Linear(w, b).eval()
    x = torch.randn(40, 16, generator=g) * 0.1 + 0.2 * w / w.norm()  # class 1 (f > 0) with margins to spare
    label = torch.ones(40, dtype=torch.long)
    width = torch.linspace(0.01, 0.6, 40)[:, None].expand(40, 16)
    lo, hi = x - width * torch.rand(40, 16, generator=g), x + width * torch.rand(40, 16, generator=g)
    assert (net(x)[:, 1] > 0).all()
    worst = torch.where(w > 0, lo, hi) @ w + b  # the least margin over each box
    clear = worst.abs() > 1e-4
    budget = adv.Budget(steps=3, restarts=1, apgd_steps=30)
    for kind in ("pgd", "apgd", "auto"):
        x_adv, fooled = adv.attack_region(kind, net, x, label, lo, hi, budget, hit=adv._fooled)
        assert torch.equal(fooled[clear], (worst < 0)[clear]), kind
        assert ((x_adv >= lo) & (x_adv <= hi)).all()
        assert torch.equal(adv._fooled(net(x_adv), label), fooled)  # each witness, and only they, fooled


def test_attack_region_attacks_a_custom_output_condition_within_a_budget():
    """A property's falsifier through the one engine: the loss is the excess of output 0 over a threshold, the hit
    rule "output 0 >= threshold", the label unused. For a linear map the largest output 0 over a box is at its
    corner sign(w0): the condition is reachable exactly when that corner reaches the threshold."""
    g = torch.Generator().manual_seed(11)
    net = torch.nn.Linear(6, 2).eval()
    w0, b0 = net.weight.detach()[0], float(net.bias.detach()[0])
    x = torch.randn(30, 6, generator=g)
    width = torch.linspace(0.05, 2.0, 30)[:, None] * torch.rand(30, 6, generator=g)
    lo, hi = x - width, x + width
    top = torch.where(w0 > 0, hi, lo) @ w0 + b0  # the largest output 0 over each box
    level = float(torch.quantile(top, 0.5))
    clear = (top - level).abs() > 1e-3
    label = torch.zeros(30, dtype=torch.long)

    def loss(out, _):
        return out[:, 0] - level

    def hit(out, _):
        return out[:, 0] >= level

    for kind, budget in (("pgd", adv.Budget(steps=20, step_size=2.5, restarts=1, decay=True)),
                         ("apgd", adv.Budget(restarts=1, apgd_steps=30)), ("auto", adv.Budget(restarts=1))):
        x_adv, fooled = adv.attack_region(kind, net, x, label, lo, hi, budget, hit=hit, loss=loss)
        assert torch.equal(fooled[clear], (top >= level)[clear]), kind
        assert ((x_adv >= lo) & (x_adv <= hi)).all()
        with torch.no_grad():
            assert torch.equal(hit(net(x_adv), label), fooled), kind  # each witness, and only they, meet it
    # a spent budget starts no step: nothing is attacked
    x_adv, fooled = adv.attack_region("auto", net, x, label, lo, hi, adv.Budget(deadline=0.0), hit=hit, loss=loss)
    assert not fooled.any() and torch.equal(x_adv, x)


def test_random_starts_follow_the_item_not_its_position():
    x = torch.randn(5, 3, 4, 4, generator=torch.Generator().manual_seed(2))
    lo, hi = x - 0.5, x + 0.5
    s = adv._seeds(x, None, "pgd")
    assert np.array_equal(adv._seeds(x.flip(0), None, "pgd"), s[::-1])  # default: from each item's content
    a = adv.random_point(x, lo, hi, None, "linf", s, restart=1)
    b = adv.random_point(x.flip(0), lo.flip(0), hi.flip(0), None, "linf", s[::-1], restart=1)
    assert torch.equal(a, b.flip(0)) and ((a >= lo) & (a <= hi)).all()
    assert not torch.equal(a, adv.random_point(x, lo, hi, None, "linf", s, restart=2))

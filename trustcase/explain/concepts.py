"""Concept tests (TCAV, Kim et al. 2018) on captum's `concept` module: does a decision depend on a concept?

A concept is a set of inputs that share it (e.g. dark cells, blurred cells, mono cells); a concept activation
vector (CAV) is the normal of a linear boundary between the concept's activations at a layer and those of a
random set of inputs. The TCAV score of a class is the share of its inputs whose class logit grows along the
CAV. One CAV proves nothing (a random set gives a score too), so, as in the paper, the concept is set against
k different random sets, k independent pairs of other random sets give the null distribution, and a two-sided
t-test says whether the concept's scores differ from chance.

    results = tcav(net, {"dark": dark_x, "blurred": blurred_x}, randoms, inputs, target=1, layers=["8"])

Concepts need no new labels when they come from the use case's own data (`concept_sets`: metadata values,
descriptor quartiles, perturbed items), and `tcav_tests` runs TCAV for several classes and layers with a
Bonferroni-corrected significance level over all its tests.

The CAVs are fitted by a closed-form ridge discriminant (deterministic: no SGD, no hidden random state), on
two thirds of the examples, its accuracy measured on the rest.
"""

from __future__ import annotations

import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from captum.concept import TCAV, Concept
from captum.concept._utils.classifier import Classifier
from scipy import stats

from trustcase.data import images as I
from trustcase.explain.network import Network

# descriptor bins: (image property, quantile of the sample, side)
BINS = {"dark": ("brightness", 0.25, "low"), "bright": ("brightness", 0.75, "high"),
        "low_contrast": ("contrast", 0.25, "low"), "high_contrast": ("contrast", 0.75, "high")}
MIN_EXAMPLES = 6  # a concept with fewer examples is not tested


class RidgeCav(Classifier):
    """A linear boundary between two concepts in closed form: ridge regression of the labels +-1, solved in the
    dual (examples are few, activations can be wide)."""

    def __init__(self, ridge: float = 1e-2):
        self.ridge, self.w, self.labels = ridge, None, None

    def train_and_eval(self, dataloader, **kwargs):
        xs, ys = zip(*[(x.flatten(1).double(), y) for x, y in dataloader], strict=True)
        x, y = torch.cat(xs), torch.cat(ys).long()
        self.labels = sorted(set(y.tolist()))
        sign = torch.where(y == self.labels[-1], 1.0, -1.0).double()
        test = torch.arange(len(x)) % 3 == 2  # every third example held out, in the order given
        xt, st = x[~test], sign[~test]
        mu = xt.mean(dim=0)
        xc = xt - mu
        gram = xc @ xc.T
        scale = float(gram.diagonal().mean()) or 1.0
        alpha = torch.linalg.solve(gram + self.ridge * scale * torch.eye(len(xc), dtype=gram.dtype), st - st.mean())
        self.w = (xc.T @ alpha).float()
        pred = torch.where((x[test] - mu).float() @ self.w > 0, 1.0, -1.0)
        return {"accs": (pred == sign[test].float()).float().mean() if test.any() else torch.tensor(float("nan"))}

    def weights(self):
        return torch.stack([-self.w, self.w])

    def classes(self):
        return self.labels


@dataclass
class ConceptScore:
    concept: str
    layer: str
    scores: list[float]  # TCAV score against each random set
    random_scores: list[float]  # random set 0 against each other random set: the null
    cav_accuracy: float
    p_value: float

    @property
    def mean(self) -> float:
        return float(np.mean(self.scores))


def tcav(net: Network, concepts: dict[str, torch.Tensor], randoms: list[torch.Tensor], inputs: torch.Tensor,
         target: int, layers: list[str], batch_size: int = 32) -> list[ConceptScore]:
    """TCAV scores of `target` for each concept and layer, with the t-test against random concepts.

    concepts: normalised inputs (N, C, H, W) per concept; randoms: 2 k random sets (k >= 3): each concept is set
    against the first k, and the null pairs random set k + i with random set i (independent pairs);
    inputs: the items whose decision is explained (typically of class `target`)."""
    if len(randoms) < 6 or len(randoms) % 2:
        raise ValueError(f"TCAV needs an even number (at least 6) of random sets for its t-test, got {len(randoms)}")
    for name in layers:
        net.layer(name)  # an unknown layer is an error naming the valid ones
    runs = len(randoms) // 2

    def concept(i: int, name: str, x: torch.Tensor) -> Concept:
        return Concept(i, name, [x[s:s + batch_size] for s in range(0, len(x), batch_size)])

    named = [concept(i, n, x) for i, (n, x) in enumerate(concepts.items())]
    rnd = [concept(len(named) + j, f"random_{j}", x) for j, x in enumerate(randoms)]
    against, reference = rnd[:runs], rnd[runs:]
    # captum orders a pair by concept id: the reference sets have higher ids, so the null score is read at 1
    experiments = [[c, r] for c in named for r in against] + [[r, q] for r, q in zip(against, reference)]
    with tempfile.TemporaryDirectory() as cache, warnings.catch_warnings():  # captum caches CAVs on disk
        warnings.filterwarnings("ignore", message=".*(did not already require gradients|Setting forward)")
        t = TCAV(net.module, layers, classifier=RidgeCav(), save_path=cache + "/")
        out = t.interpret(inputs, experimental_sets=experiments, target=target)

    def key(c: Concept, r: Concept) -> str:
        return f"{c.id}-{r.id}"

    def score(c: Concept, r: Concept, layer: str, which: int = 0) -> float:
        return float(out[key(c, r)][layer]["sign_count"][which])  # share of inputs whose logit grows along it

    def accuracy(c: Concept, layer: str) -> float:
        return float(np.mean([float(t.cavs[key(c, r)][layer].stats["accs"]) for r in against]))

    results = []
    for layer in layers:
        null = [score(r, q, layer, 1) for r, q in zip(against, reference)]
        for c in named:
            s = [score(c, r, layer) for r in against]
            with warnings.catch_warnings():  # identical scores on one side: scipy warns, the test still holds
                warnings.simplefilter("ignore", RuntimeWarning)
                p = float(stats.ttest_ind(s, null).pvalue) if np.std(s) + np.std(null) > 0 else \
                    (1.0 if np.mean(s) == np.mean(null) else 0.0)
            results.append(ConceptScore(c.name, layer, s, null, accuracy(c, layer), p))
    return results


def concept_sets(x: torch.Tensor, images: np.ndarray, meta: dict[str, list], rng: np.random.Generator, size: int,
                 metadata: list[str], descriptors: list[str], perturbations: dict[str, float],
                 perturb: Callable[[str, float, np.ndarray], torch.Tensor]
                 ) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Concepts from a sample (normalised inputs `x` of pixel `images`, their metadata), at most `size` examples
    each, drawn by `rng`: one per value of each `metadata` field, one per descriptor bin (`BINS`), and one per
    perturbation at its amplitude (`perturb(name, amplitude, positions)`: those sample items perturbed,
    normalised). Returns the sets and the limitations: a concept with too few examples is left out, said."""
    sets: dict[str, torch.Tensor] = {}
    for field in metadata:
        for value in sorted(set(map(str, meta[field]))):
            sel = np.flatnonzero(np.array([str(v) == value for v in meta[field]]))
            sets[f"{field}={value}"] = x[rng.permutation(sel)[:size]]
    props = {"brightness": I.brightness(images), "contrast": I.contrast(images)}
    for b in descriptors:
        prop, q, side = BINS[b]
        cut = np.quantile(props[prop], q)
        sel = np.flatnonzero(props[prop] <= cut if side == "low" else props[prop] >= cut)
        sets[b] = x[rng.permutation(sel)[:size]]
    for name, amp in perturbations.items():
        sets[f"{name}@{amp:g}"] = perturb(name, amp, rng.permutation(len(images))[:size])
    small = [k for k, v in sets.items() if len(v) < MIN_EXAMPLES]
    return ({k: v for k, v in sets.items() if k not in small},
            [f"concept {k}: only {len(sets[k])} examples in the sample; not tested" for k in small])


@dataclass
class ConceptTest:
    """One concept against one class at one layer: its TCAV scores, and whether the test is significant at the
    family-wise level (Bonferroni over every test of the run)."""

    cls: str
    score: ConceptScore
    significant: bool
    items: int  # items of the class whose decision is explained


def tcav_tests(net: Network, sets: dict[str, torch.Tensor], x: torch.Tensor, labels: np.ndarray,
                  classes: dict[str, int], layers: list[str], rng: np.random.Generator, size: int, randoms: int,
                  alpha: float, batch_size: int = 32, max_inputs: int = 50
                  ) -> tuple[list[ConceptTest], float, list[str]]:
    """TCAV of every concept for each class (up to `max_inputs` sample items of it, drawn by `rng`) at each layer,
    against `randoms` random sets of `size` sample items (and as many for the null). Returns the tests, the
    per-test significance threshold (alpha / tests) and the limitations (a class with too few items)."""
    random_sets = [x[rng.permutation(len(x))[:size]] for _ in range(2 * randoms)]
    threshold = alpha / max(1, len(sets) * len(classes) * len(layers))
    out, limitations = [], []
    for cls, t in classes.items():
        inputs = x[rng.permutation(np.flatnonzero(labels == t))[:max_inputs]]
        if len(inputs) < 2:
            limitations.append(f"TCAV for {cls}: fewer than 2 {cls} items in the sample")
            continue
        out += [ConceptTest(cls, r, bool(r.p_value < threshold), len(inputs))
                for r in tcav(net, sets, random_sets, inputs, t, layers, batch_size)]
    return out, threshold, limitations


def draw(path, table: list[dict], threshold: float) -> None:
    """TCAV scores per concept (bars) beside the random-vs-random mean (ticks); * marks a significant test."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(4.0, 0.7 * len(table) + 1.5), 3.4))
    pos = np.arange(len(table))
    ax.bar(pos, [r["tcav"] for r in table], color=["#1f77b4" if r["significant"] else "#c7c7c7" for r in table])
    ax.scatter(pos, [r["null"] for r in table], marker="_", s=300, color="black", label="random concepts (mean)")
    for i, r in enumerate(table):
        if r["significant"]:
            ax.text(i, r["tcav"] + 0.02, "*", ha="center", fontsize=12)
    ax.set_xticks(pos, [f"{r['concept']}\n{r['class']}@{r['layer']}" for r in table], fontsize=7, rotation=30,
                  ha="right")
    ax.set_ylim(0, 1.1)
    ax.set_ylabel("TCAV score")
    ax.set_title(f"Concept tests (* significant, p < {threshold:.2g}, two-sided t-test)", fontsize=9)
    ax.legend(fontsize=7, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

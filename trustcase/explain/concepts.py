"""Concept tests (TCAV, Kim et al. 2018) on captum's `concept` module: does a decision depend on a concept?

A concept is a set of inputs that share it (e.g. dark cells, blurred cells, mono cells); a concept activation
vector (CAV) is the normal of a linear boundary between the concept's activations at a layer and those of a
random set of inputs. The TCAV score of a class is the share of its inputs whose class logit grows along the
CAV. One CAV proves nothing (a random set gives a score too), so, as in the paper, the concept is set against
k different random sets, k independent pairs of other random sets give the null distribution, and a two-sided
t-test says whether the concept's scores differ from chance.

    results = tcav(net, {"dark": dark_x, "blurred": blurred_x}, randoms, inputs, target=1, layers=["8"])

The CAVs are fitted by a closed-form ridge discriminant (deterministic: no SGD, no hidden random state), on
two thirds of the examples, its accuracy measured on the rest.
"""

from __future__ import annotations

import tempfile
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from captum.concept import TCAV, Concept
from captum.concept._utils.classifier import Classifier
from scipy import stats

from trustcase.explain.network import Network


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

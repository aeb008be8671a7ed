"""Branch and bound on ReLUs for what the bounds alone leave open (high-dimensional inputs: images).

A domain is the input box plus split decisions "pre-activation >= 0" or "<= 0" on some unstable ReLUs. The
decisions are carried into the bounds: the split neuron's pre-activation bounds are clamped (its ReLU becomes
linear) and every later bound is recomputed by CROWN; a domain whose bounds contradict its decisions is
empty. The neuron split next is the unstable one with the loosest relaxation (largest -l u / (u - l)); the
open domains are bounded many at a time (batched). Without beta-CROWN's multipliers the decisions do not
constrain the input itself, so a domain with every ReLU decided may stay open: the answer is then unknown,
with that reason, never a wrong proof.
"""

from __future__ import annotations

import math
import time

import torch

from trustcase.certification import propagation as P
from trustcase.certification.graph import Graph


def split_relus(g: Graph, lo: torch.Tensor, hi: torch.Tensor, C: torch.Tensor, deadline: float, margin: float,
                batch: int = 16, max_domains: int = 100_000) -> tuple[bool, int, str]:
    """(proved, domains bounded, reason): is C y > margin on every input of the box [lo, hi] (1, *shape)?"""
    pre = sorted({g.nodes[r].inputs[0] for r in g.relus})
    open_: list[list[tuple[int, int, float]]] = [[]]  # per domain: (node, flat index, +1 / -1)
    done = 0
    while open_:
        if time.perf_counter() > deadline:
            return False, done, f"budget exhausted with {len(open_)} ReLU-split domains open"
        if done > max_domains:
            return False, done, f"more than {max_domains} domains"
        take, open_ = open_[:batch], open_[batch:]
        n = len(take)
        splits = {}
        for i, decisions in enumerate(take):
            for node, idx, sign in decisions:
                s = splits.setdefault(node, torch.zeros(n, math.prod(g.nodes[node].shape), dtype=torch.float64))
                s[i, idx] = sign
        splits = {k: v.view(n, *g.nodes[k].shape) for k, v in splits.items()}
        r = P.lower_bound(g, lo.expand(n, *lo.shape[1:]), hi.expand(n, *hi.shape[1:]), C, "crown", splits=splits)
        done += n
        for i, decisions in enumerate(take):
            empty = any(bool((r.bounds[k][0][i] > r.bounds[k][1][i]).any()) for k in pre)
            if empty or bool((r.lower[i] > margin).all()):
                continue
            best, pick = 0.0, None
            for k in pre:
                lb, ub = r.bounds[k][0][i].flatten(), r.bounds[k][1][i].flatten()
                area = torch.where((lb < 0) & (ub > 0), -lb * ub / (ub - lb).clamp_min(1e-30), 0.0)
                j = int(area.argmax())
                if float(area[j]) > best:
                    best, pick = float(area[j]), (k, j)
            if pick is None:
                return False, done, "a domain with every ReLU decided is still open (no beta-CROWN multipliers)"
            open_ += [[*decisions, (*pick, 1.0)], [*decisions, (*pick, -1.0)]]
    return True, done, ""

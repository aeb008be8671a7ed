"""Formal property checks (VNN-LIB) on ReLU networks: falsify, or prove, within a time budget.

`check_property(module, property, timeout)` returns a verdict:
- `violated`: a counterexample found by sampling (half of it on the faces of the box, where the extremes
  of a piecewise-linear network sit), by the attack engine's PGD (`attacks.attack_region` with the
  property's margin as its loss and "meets a conjunction" as its hit rule) from the best samples, at a
  corner or centre of an open box of the branch and bound, or by the same PGD inside the open boxes during
  it, and RE-CHECKED by a plain float32 forward pass of the model before it is reported;
- `holds`: proved by sound bound propagation on the model's layer graph (`bab.decide`: CROWN, alpha-CROWN,
  float64, every bound clearing its own rounding: `bab.MARGIN_RULE`) over the whole input region, splitting the
  input box (few inputs) or the ReLUs (beta-CROWN, many inputs) until every part is refuted;
- `unknown`: the budget ran out (or the network cannot be bounded) with neither.
"holds" is never returned after a counterexample has been seen, since proof and search share one result.

The check `formal_properties` packs the verdicts as evidence.
Property paths may use ${TRUSTCASE_ACASXU} (default: <repo>/../shared/acasxu) and other environment
variables.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import torch

from trustcase import clock
from trustcase.certification import graph as G
from trustcase.certification.bab import decide
from trustcase.certification.vnnlib import Property
from trustcase.robustness.attacks import Budget, attack_region
from trustcase.seeding import item_seeds, torch_threads

ACASXU_DEFAULT = Path(__file__).resolve().parents[2].parent / "shared" / "acasxu"


def acasxu_root() -> Path:
    """The ACAS Xu reference data: $TRUSTCASE_ACASXU, else <repo>/../shared/acasxu."""
    return Path(os.environ.get("TRUSTCASE_ACASXU") or ACASXU_DEFAULT)


def expand(path: str) -> Path:
    """Environment variables in a configured path; ${TRUSTCASE_ACASXU} has its default."""
    text = re.sub(r"\$\{?TRUSTCASE_ACASXU\}?", str(acasxu_root()).replace("\\", "/"), path)
    return Path(os.path.expandvars(text)).expanduser()


def _outputs(forward, x: torch.Tensor, sign: float) -> torch.Tensor:
    out = forward(x)
    return out * sign if sign != 1 else out


def plain_check(forward, prop: Property, x: np.ndarray, sign: float = 1.0) -> tuple[np.ndarray, np.ndarray] | None:
    """The first x that is a counterexample by a plain float32 forward pass: (x, y), else None."""
    x = np.asarray(x, np.float32)
    with torch.no_grad():
        y = _outputs(forward, torch.from_numpy(x), sign).double().numpy()
    bad = prop.violated_by(x.astype(np.float64), y)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        return x[i], y[i]
    return None


def box32(lower: np.ndarray, upper: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """The float32 box inside [lower, upper] (rounded inwards: a float32 corner is still in the region)."""
    lo, hi = lower.astype(np.float32), upper.astype(np.float32)
    lo = np.where(lo < lower, np.nextafter(lo, np.float32(np.inf)), lo)
    hi = np.where(hi > upper, np.nextafter(hi, np.float32(-np.inf)), hi)
    return torch.from_numpy(lo), torch.from_numpy(hi)


def _loss(y: torch.Tensor, region, push: float = 1e-4) -> torch.Tensor:
    """0 exactly when y meets one of the region's conjunctions with `push` to spare: per conjunction the sum
    of its unmet rows' excess (a margin loss: every unmet row pulls, not only the worst), the least of them."""
    per = [torch.relu(y @ torch.from_numpy(c.A).to(y).T - torch.from_numpy(c.b).to(y) + push).sum(dim=1)
           for c in region.outputs]
    return torch.stack(per, 1).min(dim=1).values


def pgd(forward, prop: Property, region, x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, steps: int,
        deadline: float, sign: float = 1.0, seed: int = 0):
    """The attack engine's PGD (`attacks.attack_region`) on the property's output condition: from each row of x
    inside its own box [lo, hi] (rows of lo/hi, or one box for all), sign steps from 2% of the box's width
    down to 0.01% (large first steps leave the good start, small last ones settle: N_5,3 property 2), the
    margin loss `_loss` decreased, an item hit when it meets a conjunction; the first hit a plain float32
    forward pass confirms, as (x, y), else None."""
    n = len(x)
    lo, hi = lo.expand_as(x), hi.expand_as(x)
    adv, hit = attack_region(
        "pgd", lambda z: _outputs(forward, z, sign), x, torch.zeros(n, dtype=torch.long), lo, hi,
        Budget(steps=steps, step_size=0.04 * steps, restarts=1, decay=True, deadline=deadline),
        seeds=item_seeds(seed, "falsify", range(n), "pgd"),
        loss=lambda y, _: -_loss(y.double(), region), hit=lambda y, _: _loss(y.double(), region, push=0.0) == 0)
    return plain_check(forward, prop, adv[hit].detach().numpy(), sign) if hit.any() else None


def falsify(forward, prop: Property, deadline: float, seed: int = 0, sign: float = 1.0, samples: int = 16384,
            restarts: int = 512, steps: int = 60, gradients: bool = True):
    """Sampling (uniform, half of it on the faces), then PGD on the margin loss from the `restarts` best samples
    of each input box;
    a counterexample confirmed by a plain float32 forward pass, or None."""
    g = torch.Generator().manual_seed(seed)
    for region in prop.regions:
        if not region.outputs:
            continue
        lo, hi = box32(region.lower, region.upper)
        x = lo + (hi - lo) * torch.rand(samples, len(lo), generator=g)
        # half of them on faces (each coordinate at a bound with probability 0.2): a ReLU network is piecewise
        # linear, so the extremes of the output condition sit on faces and corners of the box
        snap = torch.rand(x.shape, generator=g)
        snap[: samples // 2] = 0.5
        x = torch.where(snap < 0.1, lo, torch.where(snap > 0.9, hi, x))
        found = plain_check(forward, prop, x.numpy(), sign)
        if found is not None:
            return found
        if not gradients or clock.now() > deadline:
            continue
        with torch.no_grad():
            loss = _loss(_outputs(forward, x, sign).double(), region)
        found = pgd(forward, prop, region, x[loss.argsort()[:restarts]].clone(), lo, hi, steps, deadline, sign, seed)
        if found is not None:
            return found
    return None


def box_search(forward, prop: Property, region, sign: float = 1.0, boxes: int = 256, steps: int = 20):
    """Falsification inside the open boxes of a branch and bound (most promising first): PGD from each box's
    centre and two random points, projected on the box. Returns search(lo, hi) for `bab.split_inputs`."""
    g = torch.Generator().manual_seed(1)

    def search(lo: np.ndarray, hi: np.ndarray):
        lo_t, hi_t = (v.repeat(3, 1) for v in box32(lo[:boxes], hi[:boxes]))
        x = lo_t + (hi_t - lo_t) * torch.rand(lo_t.shape, generator=g)
        x[: len(x) // 3] = (lo_t + hi_t)[: len(x) // 3] / 2
        return pgd(forward, prop, region, x, lo_t, hi_t, steps, float("inf"), sign)

    return search


def single_thread():
    """Small tensors: one thread is many times faster than several fighting over shared cores."""
    return torch_threads(1)


def check_property(module, prop: Property, timeout: float = 60.0, seed: int = 0, sign: float = 1.0,
                   shape: tuple[int, ...] | None = None) -> dict:
    """Verdict on one property for one network (normalised inputs -> outputs Y; sign=-1 if it outputs -Y).

    `shape`: the model's input shape when it is not flat (an image model: the property's inputs are its
    pixels in the model's normalised input, flattened in (C, H, W) order)."""
    if timeout <= 0:
        raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
    if isinstance(module, torch.nn.Module):  # refused before any work, named
        for name, t in [*module.named_parameters(), *module.named_buffers()]:
            if t.is_floating_point() and not torch.isfinite(t).all():
                raise ValueError(f"the network's {name} holds NaN or infinite values")
    with single_thread():
        return _check(module, prop, timeout, seed, sign, shape)


def _check(module, prop: Property, timeout: float, seed: int, sign: float, shape=None) -> dict:
    t0 = clock.now()
    deadline = t0 + timeout
    model = module.float() if isinstance(module, torch.nn.Module) and not isinstance(
        module, torch.jit.ScriptModule) else module
    forward = model if shape is None else (lambda x: model(x.reshape(len(x), *shape)))

    def result(verdict: str, found=None, boxes: int = 0, method: str = "", reason: str = "") -> dict:
        cx = None if found is None else {"x": found[0].astype(float).tolist(), "y": found[1].astype(float).tolist()}
        return {"property": prop.name, "verdict": verdict, "counterexample": cx, "method": method, "boxes": boxes,
                "seconds": round(clock.now() - t0, 4), "reason": reason}

    black_box = not isinstance(module, torch.nn.Module)  # predictions only: sampled, never differentiated or bounded
    # a quick search first: most violated properties fall to it in well under a second
    found = falsify(forward, prop, min(deadline, t0 + max(1.0, 0.1 * timeout)), seed, sign, steps=50,
                    gradients=not black_box)
    if found is not None:
        return result("violated", found, method="falsification (sampling + PGD), re-checked by a forward pass")
    if black_box:
        found = falsify(forward, prop, deadline, seed + 1, sign, samples=65536, gradients=False)
        if found is not None:
            return result("violated", found, method="falsification by sampling, re-checked by a forward pass")
        return result("unknown", reason="a black box answers predictions only: sampled, it cannot be bounded")
    try:
        g = G.from_model(module, shape or (prop.n_inputs,))
    except G.GraphError as e:
        found = falsify(forward, prop, deadline, seed + 1, sign, samples=65536, steps=500)
        if found is not None:
            return result("violated", found, method="falsification, re-checked by a forward pass")
        return result("unknown", reason=f"cannot bound the network: {e}")
    boxes, reasons, methods, float32 = 0, [], set(), True
    for region in prop.regions:
        if not region.outputs:
            continue

        def candidate(xs: np.ndarray, region=region):
            xs = np.clip(xs, region.lower, region.upper)
            return plain_check(forward, prop, xs, sign)

        out = decide(g, region.lower, region.upper, [(c.A * sign, c.b) for c in region.outputs], deadline,
                     candidate=candidate, search=box_search(forward, prop, region, sign))
        boxes += out.boxes
        methods.add(out.method)
        float32 = float32 and out.covers_float32
        if out.verdict == "violated":
            return result("violated", out.counterexample, boxes, f"{out.method}, re-checked by a forward pass")
        if out.verdict == "unknown":
            reasons.append(out.reason)
            break
    if not reasons:
        covered = "covered" if float32 else "not covered: holds for the network in exact arithmetic"
        return result("holds", boxes=boxes, method="; ".join(sorted(methods))
                      + f" (float64, bounds clearing their own rounding; the float32 forward error {covered})")
    found = falsify(forward, prop, deadline + 0.1 * timeout, seed + 1, sign, steps=200)  # last look, little time
    if found is not None:
        return result("violated", found, boxes, "falsification (sampling + PGD), re-checked by a forward pass")
    return result("unknown", boxes=boxes, reason="; ".join(reasons))


# --- the check ---------------------------------------------------------------------------------




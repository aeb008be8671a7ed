"""Formal property checks (VNN-LIB) on ReLU networks: falsify, or prove, within a time budget.

`check_property(module, property, timeout)` returns a verdict:
- `violated`: a counterexample found by uniform sampling or projected gradient descent inside the input
  box, or at a corner picked by the bounds, and RE-CHECKED by a plain float32 forward pass of the model
  before it is reported;
- `holds`: proved by sound bound propagation (CROWN linear relaxation with interval bounds, float64,
  margin 1e-7) over the whole input region, splitting the box until every part is refuted;
- `unknown`: the budget ran out (or the network cannot be bounded) with neither.
"holds" is never returned after a counterexample has been seen, since proof and search share one result.

Check `formal_properties` (stage "formal"): one measurement per property, metric
`property_holds.<file stem>` (e.g. `property_holds.prop_1`), value 1 (holds), 0 (violated) or NaN
(unknown), on scope {split}; plus `properties_holding` (fraction proved) and `properties_violated`
(count). Requirements: `metric: property_holds.prop_1, comparator: ">=", threshold: 1`.
Summary keys: properties (name -> verdict, seconds, boxes, counterexample, reason), timeout, outputs.
Property paths may use ${TRUSTCASE_ACASXU} (default: <repo>/../shared/acasxu) and other environment
variables.
"""

from __future__ import annotations

import os
import re
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from trustcase.certification import bounds as B
from trustcase.certification.vnnlib import Property

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


def _objective(y: torch.Tensor, region) -> torch.Tensor:
    """<= 0 exactly when y meets one of the region's conjunctions (min over them of the worst row)."""
    per = [(y @ torch.from_numpy(c.A).to(y) .T - torch.from_numpy(c.b).to(y)).max(dim=1).values
           for c in region.outputs]
    return torch.stack(per, 1).min(dim=1).values


def falsify(forward, prop: Property, deadline: float, seed: int = 0, sign: float = 1.0, samples: int = 4096,
            restarts: int = 64, steps: int = 100, gradients: bool = True):
    """Uniform sampling then projected gradient descent inside each input box; verified counterexample or None."""
    g = torch.Generator().manual_seed(seed)
    for region in prop.regions:
        if not region.outputs:
            continue
        lo = torch.from_numpy(region.lower).float()
        hi = torch.from_numpy(region.upper).float()
        x = lo + (hi - lo) * torch.rand(samples, len(lo), generator=g)
        found = plain_check(forward, prop, x.numpy(), sign)
        if found is not None:
            return found
        if not gradients or time.perf_counter() > deadline:
            continue
        with torch.no_grad():
            score = _objective(_outputs(forward, x, sign).double(), region)
        x = x[score.argsort()[:restarts]].clone()
        width = hi - lo
        for t in range(steps):
            if time.perf_counter() > deadline:
                break
            x.requires_grad_(True)
            obj = _objective(_outputs(forward, x, sign).double(), region)
            (grad,) = torch.autograd.grad(obj.sum(), x)
            step = 0.1 * width * (1 - t / steps) + 1e-4 * width
            with torch.no_grad():
                x = torch.minimum(torch.maximum(x - step * grad.sign(), lo), hi)
            found = plain_check(forward, prop, x.detach().numpy(), sign)
            if found is not None:
                return found
            x = x.detach()
    return None


@contextmanager
def single_thread():
    """Small tensors: one thread is many times faster than several fighting over shared cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


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
    t0 = time.perf_counter()
    deadline = t0 + timeout
    model = module.float() if isinstance(module, torch.nn.Module) and not isinstance(
        module, torch.jit.ScriptModule) else module
    forward = model if shape is None else (lambda x: model(x.reshape(len(x), *shape)))

    def result(verdict: str, found=None, boxes: int = 0, method: str = "", reason: str = "") -> dict:
        cx = None if found is None else {"x": found[0].astype(float).tolist(), "y": found[1].astype(float).tolist()}
        return {"property": prop.name, "verdict": verdict, "counterexample": cx, "method": method, "boxes": boxes,
                "seconds": round(time.perf_counter() - t0, 4), "reason": reason}

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
        layers = B.linearise(module)
    except B.BoundsError:
        return _check_graph(module, forward, prop, deadline, seed, sign, shape, result)
    if sign != 1:
        last = layers[-1]
        layers[-1] = B.Affine(last.W * sign, last.b * sign)
    boxes, reasons = 0, []
    for region in prop.regions:
        if not region.outputs:
            continue

        def candidate(xs: np.ndarray, region=region):
            xs = np.clip(xs, region.lower, region.upper)
            return plain_check(forward, prop, xs, sign)

        out = B.prove(layers, region.lower, region.upper, [(c.A, c.b) for c in region.outputs], deadline,
                      candidate=candidate)
        boxes += out.boxes
        if out.verdict == "violated":
            return result("violated", out.counterexample, boxes, "bound-guided corner, re-checked by a forward pass")
        if out.verdict == "unknown":
            reasons.append(out.reason)
            break
    if not reasons:
        return result("holds", boxes=boxes, method="CROWN + interval bounds with input splitting (float64)")
    found = falsify(forward, prop, deadline + 0.1 * timeout, seed + 1, sign, steps=200)  # last look, little time
    if found is not None:
        return result("violated", found, boxes, "falsification (sampling + PGD), re-checked by a forward pass")
    return result("unknown", boxes=boxes, reason="; ".join(reasons))


def _check_graph(module, forward, prop: Property, deadline: float, seed: int, sign: float, shape, result) -> dict:
    """Any other ReLU network (image CNNs): alpha-CROWN on its layer graph over each region, no splitting."""
    from trustcase.certification import graph as G
    from trustcase.certification import propagation as P

    try:
        g = G.from_model(module, shape or (prop.n_inputs,))
    except G.GraphError as e:
        found = falsify(forward, prop, deadline, seed + 1, sign, samples=65536, steps=500)
        if found is not None:
            return result("violated", found, method="falsification, re-checked by a forward pass")
        return result("unknown", reason=f"cannot bound the network: {e}")
    in_shape = g.nodes[0].shape
    for region in prop.regions:
        for conj in region.outputs:
            lo = torch.from_numpy(region.lower).double().view(1, *in_shape)
            hi = torch.from_numpy(region.upper).double().view(1, *in_shape)
            A = torch.from_numpy(conj.A).double() * sign  # rows on Y = sign * outputs
            r = P.lower_bound(g, lo, hi, A, "alpha-crown", deadline=deadline)
            if not (r.lower[0] - torch.from_numpy(conj.b) > B.TOLERANCE).any():
                found = falsify(forward, prop, deadline, seed + 1, sign, steps=200)
                if found is not None:
                    return result("violated", found, method="falsification (sampling + PGD), re-checked by a "
                                                            "forward pass")
                return result("unknown", reason="alpha-CROWN on the layer graph could not refute a conjunction "
                                                "(no input splitting for this network)")
    return result("holds", method="alpha-CROWN on the layer graph (float64), every conjunction refuted")


# --- the check ---------------------------------------------------------------------------------




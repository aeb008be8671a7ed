"""One network file and one VNN-LIB property decided as the VNN-COMP harness asks: holds / violated / unknown.

`load(path, input_shape)` reads a network (ONNX through `onnx_graph`, checked against onnxruntime; TorchScript
through `graph.from_model`; `.nnet`), `read_property` maps the property's X_0..X_{n-1} onto the network's input
shape in row-major order (sizes checked against the network), and `solve` decides it within a budget:

- low-dimensional inputs (at most `LOW_DIM`) of a Linear/ReLU chain: `properties.check_property`, the input
  splitting branch and bound of ACAS Xu;
- any other graph: per input box, a property whose disjuncts are single rows `a_k y <= b_k` (every
  robustness property of the competitions) becomes "output 0 stays strictly above outputs 1..m" of the graph
  extended by one affine node (0, b_k - a_k y), which is what `local_robustness.decide` answers (IBP, the
  attack engine, CROWN, alpha-CROWN, ReLU branch and bound); disjuncts of several rows are each refuted by
  alpha-CROWN (some row's lower bound above its bound) after a search for a counterexample.

A counterexample is reported only after onnxruntime on the original file (for ONNX; the plain module
otherwise) confirms it: its output meets the unsafe condition exactly, and the graph's output agrees within
`TOLERANCE` (the competition's 1e-4). `result_file` writes the competition's answer: `sat` with the
assignment `((X_0 v) ... (Y_0 v))`, `unsat`, `unknown` or `timeout`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from trustcase import clock
from trustcase.certification import graph as G
from trustcase.certification.vnnlib import Property, read_vnnlib

LOW_DIM = 16  # inputs up to which the input box is split (ACAS Xu: 5); above it, ReLUs are split
MAX_SPLIT = 1 << 30  # unstable ReLUs up to which branch and bound is tried: always (the budget is the limit)
TOLERANCE = 1e-4  # |graph - onnxruntime| allowed on a counterexample's outputs, as the competition re-checks
VERDICT_FILE = {"violated": "sat", "holds": "unsat", "unknown": "unknown", "timeout": "timeout"}


class InstanceError(G.GraphError):
    """A network file and property that do not go together (sizes, shapes), named."""


@dataclass
class Network:
    """A network ready to be decided: its layer graph, a differentiable forward pass and the re-check."""

    path: Path
    graph: G.Graph | None  # None: not boundable as a graph (a .nnet chain is decided by input splitting)
    input_shape: tuple[int, ...]
    output_size: int
    module: torch.nn.Module | None = None  # the torch module when there is one (TorchScript, .nnet)
    onnx: object | None = None  # onnx_graph.OnnxNetwork
    _session: object | None = field(default=None, repr=False)

    @property
    def n_inputs(self) -> int:
        return math.prod(self.input_shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Outputs (N, m) of inputs (N, ...) in float32, differentiable (attacks)."""
        x = x.reshape(len(x), *self.input_shape)
        if self.module is not None:
            return self.module(x.float()).reshape(len(x), -1)
        return self.graph.forward(x).float().reshape(len(x), -1)

    def reference(self, x: np.ndarray) -> np.ndarray:
        """The outputs the competition would compute: onnxruntime on the original file, else the module."""
        x = np.asarray(x, np.float32).reshape(-1, *self.input_shape)
        if self.onnx is not None:
            if self._session is None:
                self._session = self.onnx.session()
            return self.onnx.run(x, self._session)
        with torch.no_grad():
            return self.module(torch.from_numpy(x)).double().reshape(len(x), -1).numpy()


def load(path: str | Path, input_shape: tuple[int, ...] | None = None) -> Network:
    """An ONNX (.onnx), TorchScript (.pt) or .nnet network; `input_shape` (no batch) for a TorchScript model
    whose first layer does not tell it (a Conv2d gives the channels, square images the rest)."""
    from trustcase.certification.nnet import load_network
    from trustcase.certification.onnx_graph import read_onnx

    path = Path(path)
    if path.suffix == ".onnx":
        net = read_onnx(path)
        return Network(path, net.graph, net.input_shape, net.output_size, onnx=net)
    module = load_network(path)  # .nnet or TorchScript (named errors)
    if path.suffix == ".nnet":
        return _torch_network(path, module, (module[0].in_features,))
    shape = tuple(input_shape) if input_shape else _shape_of(module, path)
    if 0 in shape:  # an image model: H and W once the property says how many inputs there are
        return Network(path, None, shape, 0, module=module)
    return _torch_network(path, module, shape)


def _torch_network(path: Path, module: torch.nn.Module, shape: tuple[int, ...]) -> Network:
    from trustcase.certification.nnet import NetworkFormatError

    try:
        with torch.no_grad():
            out = module(torch.zeros(1, *shape))
    except Exception as e:  # noqa: BLE001 - the model refuses the shape: say which, on one line
        why = (str(e).strip().splitlines() or [type(e).__name__])[-1][:160]
        raise NetworkFormatError(f"{path}: the model does not take inputs of shape {shape} ({why}); give "
                                 "--input-shape") from None
    try:
        g = G.from_model(module, shape)
    except G.GraphError:
        g = None  # a Linear/ReLU chain is still decided by input splitting; anything else is unknown, named
    return Network(path, g, shape, int(out[0].numel()), module=module)


def _shape_of(module: torch.nn.Module, path: Path) -> tuple[int, ...]:
    """The input shape of a TorchScript model from its first layer (Linear: its features; Conv2d: its channels
    and a square image, completed once the property's size is known)."""
    for m in module.modules():
        if isinstance(m, torch.jit.ScriptModule):
            if m.original_name == "Linear":
                return (int(m.weight.shape[1]),)
            if m.original_name == "Conv2d":
                return (int(m.weight.shape[1]), 0, 0)  # H, W from the property
        elif isinstance(m, torch.nn.Linear):
            return (m.in_features,)
        elif isinstance(m, torch.nn.Conv2d):
            return (m.in_channels, 0, 0)
    raise InstanceError(f"{path}: cannot tell the model's input shape from its first layer; give --input-shape")


def read_property(path: str | Path, net: Network) -> Property:
    """The property, its X_i and Y_j counted against the network's inputs and outputs (both numbers named).
    A TorchScript image model of unknown height and width takes the square image the property's inputs make."""
    if 0 in net.input_shape:
        n, c = read_vnnlib(path).n_inputs, net.input_shape[0]
        side = math.isqrt(n // c)
        if c * side * side != n:
            raise InstanceError(f"{Path(path).name}: {n} inputs are not {c} square channels of the model; give "
                                "--input-shape")
        net.__dict__.update(_torch_network(net.path, net.module, (c, side, side)).__dict__)
    return read_vnnlib(path, n_inputs=net.n_inputs, n_outputs=net.output_size)


def _confirmed(net: Network, prop: Property, x: np.ndarray):
    """(x, y) if onnxruntime (or the module) on the original network confirms x as a counterexample, else None."""
    x = np.asarray(x, np.float32).reshape(1, -1)
    y = net.reference(x)
    if not prop.violated_by(x.astype(np.float64), y)[0]:
        return None
    if net.graph is not None:
        with torch.no_grad():
            mine = net.graph.forward(torch.from_numpy(x).double().reshape(1, *net.input_shape)).reshape(1, -1)
        if float(np.abs(mine.numpy() - y).max()) > TOLERANCE:
            return None
    return x[0], y[0]


def solve(net: Network, prop: Property, timeout: float, seed: int = 0) -> dict:
    """holds / violated / unknown for one property, within `timeout` seconds (one result record)."""
    from trustcase.certification.properties import box32, single_thread

    if timeout <= 0:
        raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
    t0 = clock.now()
    deadline = t0 + timeout

    def result(verdict, found=None, method="", reason=""):
        cx = None if found is None else {"x": found[0].astype(float).tolist(), "y": found[1].astype(float).tolist()}
        return {"property": prop.name, "verdict": verdict, "counterexample": cx, "method": method,
                "seconds": round(clock.now() - t0, 4), "reason": reason}

    with single_thread():
        if net.n_inputs <= LOW_DIM and (module := _chain(net)) is not None:
            return _split_inputs(net, module, prop, timeout, seed, result)
        if net.graph is None:
            return result("unknown", reason="the network cannot be bounded as a layer graph")
        reasons = []
        regions = [r for r in prop.regions if r.outputs]
        for i, region in enumerate(regions):
            share = (deadline - clock.now()) / (len(regions) - i)
            if share <= 0:
                reasons.append("budget exhausted before every input box was looked at")
                break
            lo, hi = (t.reshape(1, *net.input_shape) for t in box32(region.lower, region.upper))
            if all(len(c.b) == 1 for c in region.outputs):
                verdict, found, how = _rows(net, prop, region, lo, hi, share, seed)
            else:
                verdict, found, how = _conjunctions(net, prop, region, lo, hi, clock.now() + share, seed)
            if verdict == "violated":
                return result("violated", found, how)
            if verdict == "unknown":
                reasons.append(how)
        if reasons:
            return result("unknown", reason="; ".join(reasons))
        return result("holds", method="every disjunct refuted on every input box (layer graph, float64)")


def _chain(net: Network):
    """A low-dimensional network as a torch module for `properties.check_property` (ONNX: a Linear/ReLU chain
    read by `nnet.read_onnx`, e.g. ACAS Xu), else None."""
    from trustcase.certification.nnet import NetworkFormatError, read_onnx

    if net.onnx is None:
        return net.module
    try:
        return read_onnx(net.path)
    except NetworkFormatError:
        return None


def _split_inputs(net: Network, module, prop: Property, timeout: float, seed: int, result) -> dict:
    from trustcase.certification.properties import check_property

    r = check_property(module, prop, timeout=timeout, seed=seed, shape=None if net.onnx else net.input_shape)
    if r["verdict"] == "violated":
        found = _confirmed(net, prop, np.asarray(r["counterexample"]["x"]))
        if found is None:
            return result("unknown", reason="a counterexample of the torch chain was not confirmed by onnxruntime")
        return result("violated", found, r["method"] + "; confirmed by onnxruntime")
    return result(r["verdict"], method=r["method"], reason=r["reason"])


def _rows(net: Network, prop: Property, region, lo, hi, timeout: float, seed: int):
    """Disjuncts a_k y <= b_k: 'output 0 above outputs 1..m' of the graph extended by (0, b_k - a_k y)."""
    from trustcase.certification.local_robustness import decide

    A = np.concatenate([c.A for c in region.outputs])
    b = np.concatenate([c.b for c in region.outputs])
    m, out = A.shape
    W = torch.zeros(m + 1, out, dtype=torch.float64)
    W[1:] = -torch.from_numpy(A)
    bias = torch.cat([torch.zeros(1, dtype=torch.float64), torch.from_numpy(b).double()])
    last = len(net.graph.nodes) - 1
    g = G.Graph([*net.graph.nodes, G.Node("affine", "unsafe rows", (m + 1,), [last], [G.Dense(W)], bias)])
    A32, b32 = torch.from_numpy(A).float(), torch.from_numpy(b).float()

    def forward(x):
        y = net.forward(x)
        return torch.cat([torch.zeros(len(y), 1, dtype=y.dtype), b32 - y @ A32.T], 1)

    r = decide(g, forward, (lo + hi) / 2, lo, hi, 0, timeout, seed=seed, max_split=MAX_SPLIT)
    if r["verdict"] == "verified":
        return "holds", None, r["method"]
    if r["verdict"] == "falsified":
        found = _confirmed(net, prop, r["counterexample"])
        if found is not None:
            return "violated", found, r["method"] + "; confirmed by onnxruntime"
        return "unknown", None, "a counterexample of the graph was not confirmed on the original network"
    return "unknown", None, r.get("reason", "")


def _conjunctions(net: Network, prop: Property, region, lo, hi, deadline: float, seed: int):
    """Disjuncts of several rows: a search for a counterexample, then the engine's branch and bound
    (`bab.decide`) on the disjunction of conjunctions (a box or domain is refuted when, for every conjunction,
    some row's lower bound exceeds its bound)."""
    from trustcase.certification import bab
    from trustcase.certification.properties import falsify

    found = falsify(net.forward, prop, min(deadline, clock.now() + 0.2 * (deadline - clock.now())),
                    seed, samples=256, restarts=32, steps=100)
    if found is not None and (found := _confirmed(net, prop, found[0])) is not None:
        return "violated", found, "falsification (sampling + PGD), confirmed by onnxruntime"
    def candidate(xs: np.ndarray):  # points the bounds point to: the graph's verdict first, then onnxruntime
        with torch.no_grad():
            y = net.forward(torch.from_numpy(xs).float()).double().numpy()
        bad = np.flatnonzero(prop.violated_by(xs, y))
        return next((f for i in bad[:8] if (f := _confirmed(net, prop, xs[i])) is not None), None)

    out = bab.decide(net.graph, lo.double().flatten().numpy(), hi.double().flatten().numpy(),
                     [(c.A, c.b) for c in region.outputs], deadline, candidate=candidate)
    if out.verdict == "violated":
        return "violated", out.counterexample, f"{out.method}, confirmed by onnxruntime"
    return out.verdict, None, out.method if out.verdict == "holds" else out.reason


def result_text(record: dict, timeout: float) -> str:
    """The competition's result file: sat + the assignment of every X_i and Y_j, unsat, unknown, or timeout
    (unknown after using up the budget)."""
    timed_out = record["verdict"] == "unknown" and record["seconds"] >= 0.95 * timeout
    verdict = "timeout" if timed_out else record["verdict"]
    text = VERDICT_FILE[verdict]
    if verdict == "violated":
        cx = record["counterexample"]
        pairs = [f"(X_{i} {float(v)!r})" for i, v in enumerate(cx["x"])] + \
                [f"(Y_{j} {float(v)!r})" for j, v in enumerate(cx["y"])]
        text += "\n(" + "\n".join(pairs) + ")"
    return text + "\n"

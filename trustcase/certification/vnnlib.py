"""VNN-LIB reader (the SMT-LIB subset of neural-network verification) as the competitions write it:
`declare-const X_i/Y_j Real`, `assert` of `<=`, `>=`, `<`, `>` between linear terms (numbers, variables,
`+`, `-`, `*` by a constant), `and`, `or` nested in any way: a disjunction of conjunctions of output
constraints (several `(and ...)` in one `(or ...)`), several input boxes (a top-level `or` over inputs).
Comments start with `;`; a `.vnnlib.gz` file is read directly. The inputs X_0..X_{n-1} are the network's
input tensor flattened in row-major order (an image (C, H, W): X_{c H W + h W + w}); the outputs Y_j its
flattened outputs. Given the network's sizes, a property declaring other counts is an error stating both.

A file describes the UNSAFE set: a point of the input region whose output satisfies the output
condition is a counterexample. The asserts are put in disjunctive normal form and grouped by input
box: `Property.regions` is a list of (box, [output conjunction A y <= b, ...]); the property is
violated iff some region holds an x with A f(x) <= b for some of its conjunctions. Anything else
(`not`, `=>`, `=`, non-linear terms, input constraints that are not bounds) is an error naming it.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from trustcase.errors import UserError


class VnnlibError(UserError, ValueError):
    """An unsupported or malformed construct, with the file and line."""


@dataclass
class Conjunction:
    """A y <= b (rows with strict[k] are A_k y < b_k)."""

    A: np.ndarray
    b: np.ndarray
    strict: np.ndarray

    def satisfied(self, y: np.ndarray, tol: float = 0.0) -> np.ndarray:
        """Which outputs (N, m) satisfy every row (tol > 0 only makes the test stricter)."""
        v = y @ self.A.T - self.b
        ok = np.where(self.strict, v < -tol, v <= -tol)
        return ok.all(axis=1)


@dataclass
class Region:
    lower: np.ndarray
    upper: np.ndarray
    outputs: list[Conjunction] = field(default_factory=list)  # a disjunction


@dataclass
class Property:
    name: str
    n_inputs: int
    n_outputs: int
    regions: list[Region]

    def violated_by(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Which (x, y) pairs are counterexamples: x in a region's box and y meets one of its conjunctions."""
        bad = np.zeros(len(x), bool)
        for r in self.regions:
            inside = np.all((x >= r.lower) & (x <= r.upper), axis=1)
            for c in r.outputs:
                bad |= inside & c.satisfied(y)
        return bad


TOKEN = re.compile(r"\(|\)|[^\s()]+")
VAR = re.compile(r"^([XY])_(\d+)$")


def _tokens(text: str, name: str):
    for lineno, line in enumerate(text.splitlines(), 1):
        for tok in TOKEN.findall(line.split(";", 1)[0]):
            yield tok, lineno


def _parse(text: str, name: str) -> list:
    stack: list[list] = [[]]
    for tok, line in _tokens(text, name):
        if tok == "(":
            stack.append([("@line", line)])
        elif tok == ")":
            if len(stack) == 1:
                raise VnnlibError(f"{name}:{line}: unbalanced ')'")
            done = stack.pop()
            stack[-1].append(done)
        else:
            stack[-1].append((tok, line))
    if len(stack) != 1:
        raise VnnlibError(f"{name}: unbalanced '(' (missing {len(stack) - 1} closing parenthesis)")
    return stack[0]


def _line(expr) -> int:
    return expr[0][1] if isinstance(expr, list) and expr else (expr[1] if isinstance(expr, tuple) else 0)


def _head(expr) -> str:
    if not isinstance(expr, list) or len(expr) < 2 or not isinstance(expr[1], tuple):
        raise VnnlibError(f"line {_line(expr)}: expected an operator application")
    return expr[1][0]


class _Reader:
    def __init__(self, name: str):
        self.name = name
        self.n_x = self.n_y = 0
        self.declared: set[str] = set()

    def error(self, expr, what: str) -> VnnlibError:
        return VnnlibError(f"{self.name}:{_line(expr)}: {what}")

    def term(self, expr) -> tuple[dict[str, float], float]:
        """A linear term: ({variable: coefficient}, constant)."""
        if isinstance(expr, tuple):
            tok = expr[0]
            if tok in self.declared:
                return {tok: 1.0}, 0.0
            try:
                return {}, float(tok)
            except ValueError:
                raise self.error(expr, f"unknown symbol {tok!r}") from None
        op, args = _head(expr), expr[2:]
        parts = [self.term(a) for a in args]
        if op == "+" or (op == "-" and len(parts) >= 2):
            coef: dict[str, float] = {}
            const = 0.0
            for i, (c, k) in enumerate(parts):
                sign = -1.0 if op == "-" and i > 0 else 1.0
                for v, a in c.items():
                    coef[v] = coef.get(v, 0.0) + sign * a
                const += sign * k
            return coef, const
        if op == "-" and len(parts) == 1:
            return {v: -a for v, a in parts[0][0].items()}, -parts[0][1]
        if op == "*" and len(parts) == 2 and (not parts[0][0] or not parts[1][0]):
            (c, k), (c2, k2) = parts if not parts[0][0] else parts[::-1]
            return {v: a * k for v, a in c2.items()}, k * k2
        raise self.error(expr, f"unsupported term ({op} ...): only linear terms are supported")

    def formula(self, expr) -> list[list[tuple]]:
        """DNF: a list of conjunctions, each a list of atoms (coef, const, op) meaning coef.v + const op 0."""
        op = _head(expr)
        args = expr[2:]
        if op == "and":
            out = [[]]
            for a in args:
                out = [x + y for x, y in itertools.product(out, self.formula(a))]
            return out
        if op == "or":
            return [c for a in args for c in self.formula(a)]
        if op in ("<=", ">=", "<", ">"):
            if len(args) != 2:
                raise self.error(expr, f"({op} ...) needs two arguments, got {len(args)}")
            (c1, k1), (c2, k2) = self.term(args[0]), self.term(args[1])
            coef = dict(c1)
            for v, a in c2.items():
                coef[v] = coef.get(v, 0.0) - a
            # a - b <= 0 for <= / <; b - a <= 0 for >= / >
            if op in (">=", ">"):
                coef, const = {v: -a for v, a in coef.items()}, k2 - k1
            else:
                const = k1 - k2
            return [[(coef, const, "<" if op in ("<", ">") else "<=", _line(expr))]]
        raise self.error(expr, f"unsupported construct ({op} ...); supported: and, or, <=, >=, <, >")


def parse_vnnlib(text: str, name: str = "<vnnlib>", n_inputs: int | None = None,
                 n_outputs: int | None = None) -> Property:
    reader = _Reader(name)
    asserts = []
    for form in _parse(text, name):
        if not isinstance(form, list):
            raise reader.error(form, f"unexpected symbol {form[0]!r} at top level")
        op = _head(form)
        if op == "declare-const":
            if len(form) != 4 or form[3][0] != "Real":
                raise reader.error(form, "declare-const needs a name and the sort Real")
            var = form[2][0]
            m = VAR.match(var)
            if not m:
                raise reader.error(form, f"variable {var!r}: only X_i (inputs) and Y_j (outputs) are supported")
            idx = int(m.group(2)) + 1
            if m.group(1) == "X":
                reader.n_x = max(reader.n_x, idx)
            else:
                reader.n_y = max(reader.n_y, idx)
            reader.declared.add(var)
        elif op == "assert":
            if len(form) != 3:
                raise reader.error(form, "assert takes one formula")
            asserts.append(form[2])
        else:
            raise reader.error(form, f"unsupported command ({op} ...); supported: declare-const, assert")
    for what, declared, size in (("inputs (X_i)", reader.n_x, n_inputs), ("outputs (Y_j)", reader.n_y, n_outputs)):
        if size is not None and declared != size:
            raise VnnlibError(f"{name}: the property declares {declared} {what}, the network has {size}")
    n_x, n_y = n_inputs or reader.n_x, n_outputs or reader.n_y
    if not n_x or not n_y:
        raise VnnlibError(f"{name}: declares no X_i inputs or no Y_j outputs")
    dnf = [[]]
    for a in asserts:
        dnf = [x + y for x, y in itertools.product(dnf, reader.formula(a))]
    regions: dict[tuple, Region] = {}
    for conj in dnf:
        lo, hi = np.full(n_x, -np.inf), np.full(n_x, np.inf)
        rows, rhs, strict = [], [], []
        for coef, const, op, line in conj:
            xs = {v: a for v, a in coef.items() if v.startswith("X") and a != 0}
            ys = {v: a for v, a in coef.items() if v.startswith("Y") and a != 0}
            if xs and ys:
                raise VnnlibError(f"{name}:{line}: a constraint mixing inputs and outputs is not supported")
            if xs:
                if len(xs) != 1:
                    raise VnnlibError(f"{name}:{line}: linear input constraints are not supported, only bounds")
                (v, a), = xs.items()
                i, bound = int(v[2:]), -const / a  # a x + const <= 0
                if a > 0:
                    hi[i] = min(hi[i], bound)
                else:
                    lo[i] = max(lo[i], bound)
            elif ys:
                row = np.zeros(n_y)
                for v, a in ys.items():
                    row[int(v[2:])] += a
                rows.append(row)
                rhs.append(-const)
                strict.append(op == "<")
            elif not (const < 0 or (op == "<=" and const == 0)):
                break  # a false constant constraint: this disjunct is empty
        else:
            missing = [f"X_{i}" for i in range(n_x) if not (np.isfinite(lo[i]) and np.isfinite(hi[i]))]
            if missing:
                raise VnnlibError(f"{name}: input {missing[0]} has no lower or upper bound")
            if np.any(lo > hi):
                continue  # empty box
            key = (tuple(lo), tuple(hi))
            region = regions.setdefault(key, Region(lo, hi))
            region.outputs.append(Conjunction(np.array(rows).reshape(-1, n_y), np.array(rhs), np.array(strict, bool)))
    return Property(name=name, n_inputs=n_x, n_outputs=n_y, regions=list(regions.values()))


def read_vnnlib(path: str | Path, n_inputs: int | None = None, n_outputs: int | None = None) -> Property:
    path = Path(path)
    try:
        if path.suffix == ".gz":
            import gzip

            with gzip.open(path, "rt") as f:
                text = f.read()
        else:
            text = path.read_text()
    except (OSError, UnicodeDecodeError, EOFError) as e:
        raise VnnlibError(f"cannot read {path}: {e}") from None
    return parse_vnnlib(text, path.name, n_inputs, n_outputs)

"""One protocol for every check, one registry: adding a check is one module here and one entry point.

A check is constructed from its validated params, may split itself into shards (for fan-out),
and runs on a `Context` (model, data, seed, a folder for its artefacts). It streams the data it
needs batch by batch and returns a `CheckOutcome`. It never logs anywhere: flows do that.
"""

from __future__ import annotations

import fnmatch
import hashlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from pydantic import BaseModel, ConfigDict, ValidationError

from trustcase.data.streaming import DataSource
from trustcase.errors import CheckError, Unsupported, UserError, validation_message
from trustcase.models.classifier import Classifier
from trustcase.registry import Registry, RegistryError
from trustcase.schemas import Artefact, CheckOutcome, CheckSpec, Requirement, Stage, UseCase

__all__ = ["REGISTRY", "Check", "CheckError", "Context", "Params", "Produces", "Unsupported", "build", "build_plan",
           "check_class"]


@dataclass(frozen=True)
class Produces:
    """Measurements a check will emit, declared before it runs, so the preflight can tell a claim that nothing
    measures. `metric` and `split` are shell patterns ("recall:*", "*" for every split); `perturbation` names
    the perturbation scope ("*": any, None: unperturbed); `subgroups`: also per categorical metadata value."""

    metric: str
    split: str = "*"
    perturbation: str | None = None
    subgroups: bool = False

    def covers(self, r: Requirement) -> bool:
        p = r.scope.perturbation
        return (fnmatch.fnmatchcase(r.metric, self.metric) and fnmatch.fnmatchcase(r.scope.split, self.split)
                and (self.perturbation == "*" or (p.name if p else None) == self.perturbation)
                and (self.subgroups or not r.scope.subgroup))




FILE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".npy", ".npz")


def artefact_name(item: str, suffix: str) -> str:
    """The file name of an item's artefact, built here only: the item id without its file extension, every
    character a file system may refuse as '_', then `suffix` ('cell0058.png' gives 'cell0058.png' for
    '.png' and 'cell0058.npy' for '.npy', never 'cell0058.png.png')."""
    stem = str(item)
    for s in FILE_SUFFIXES:
        if stem.lower().endswith(s) and len(stem) > len(s):
            stem = stem[: -len(s)]
            break
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in stem) + suffix


class Params(BaseModel):
    # a NaN or infinite parameter (a sigma, an epsilon, a timeout) is refused before any work starts
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


def seeded_sample(seed: int, positions, k: int | None) -> set[int]:
    """k of the item positions, drawn with the check's seed (all when k is None or not smaller): the one rule for a
    check's sample of a split, or of a pool of its items (e.g. those with something to explain)."""
    import numpy as np

    positions = [int(i) for i in positions]
    return set(positions if k is None or k >= len(positions) else
               np.random.default_rng(seed).choice(positions, k, replace=False).tolist())


@dataclass
class Context:
    use_case: UseCase
    model: Classifier
    data: DataSource
    seed: int
    workdir: Path  # this check's own folder for artefacts

    def artefact(self, path: Path, kind: str = "file") -> Artefact:
        """Declare a file this check wrote, with its hash; the path is relative to the checks/ folder."""
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        return Artefact(path=str(path.relative_to(self.workdir.parent)), sha256=digest, kind=kind)

    def batches(self, role: str = "test", batch_size: int | None = None):
        return self.data.stream(role).batches(batch_size)

    def sample(self, role: str, k: int | None, batch_size: int | None = None) -> set[int]:
        """A seeded sample of k item positions of a split (all when k is None or larger), the same at any batch size:
        a split is often ordered (by class), so its first k items would not represent it."""
        return seeded_sample(self.seed, [int(i) for b in self.batches(role, batch_size) for i in b.index], k)

    def claimed(self, metric: str, perturbation: str) -> list[float]:
        """Amplitudes (e.g. radii) that requirements on `metric` claim up to: always measured exactly, so no
        claim reads a grid neighbour."""
        return [r.scope.perturbation.max_amplitude for r in self.use_case.requirements
                if r.metric == metric and r.scope.perturbation and r.scope.perturbation.name == perturbation]


class Check:
    name: ClassVar[str]
    Params: ClassVar[type[Params]] = Params
    needs_gradients: ClassVar[bool] = False
    stage: ClassVar[Stage] = Stage.TESTING  # the AMLAS stage its evidence supports
    tasks: ClassVar[frozenset[str]] = frozenset({"classification"})  # use-case tasks it is taught (trustcase.tasks)
    # under `fit: tiles` the model takes whole images of any size through its tiler (`tasks.segmentation_tiles`):
    # True when this check's evidence is computed on those whole images; else it is not applicable, `not_tiled` why
    whole_images: ClassVar[bool] = False
    not_tiled: ClassVar[str] = "it is not taught whole images of any size read through the model's tiles"

    def __init__(self, params: Params):
        self.params = params

    def shards(self) -> list[Check]:
        """Independent parts for fan-out (e.g. one per perturbation). Default: the whole check."""
        return [self]

    @classmethod
    def produces(cls, params: Params, use_case: UseCase) -> list[Produces] | None:
        """What this check measures with these params: the preflight judges claims by it, the conformance suite
        requires it. None (declares nothing): the preflight exempts only the claims such a check could cover."""
        return None

    @property
    def key(self) -> str:
        """Identifies this shard's work for caching."""
        return f"{self.name}:{self.params.model_dump_json()}"

    def run(self, ctx: Context) -> CheckOutcome:
        raise NotImplementedError

    def __call__(self, ctx: Context) -> CheckOutcome:
        if ctx.use_case.task not in self.tasks:
            raise Unsupported(f"{self.name} is not taught the {ctx.use_case.task} task yet (it measures "
                              f"{' and '.join(sorted(self.tasks))} models); not applicable")
        if getattr(ctx.model, "tiling", None) is not None and not self.whole_images:
            raise Unsupported(f"{self.name} under fit: tiles: {self.not_tiled}; not applicable")
        if self.needs_gradients and not ctx.model.differentiable:
            raise Unsupported(f"{self.name} needs gradients; the model is a black box")
        ctx.workdir.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        out = self.run(ctx)
        return out.model_copy(update={"duration_s": time.perf_counter() - t0, "stage": Stage(self.stage)})


REGISTRY = Registry("trustcase.checks", Check, "check")


def check_class(name: str) -> type[Check]:
    try:
        return REGISTRY.resolve(name)
    except RegistryError as e:
        raise CheckError(str(e)) from None


def build(spec: CheckSpec, index: int | None = None) -> Check:
    """Validate a plan entry into a check, before any work starts."""
    where = f"plan.checks[{index}]" if index is not None else "check"
    try:
        cls = check_class(spec.check)
        if cls.stage not in set(Stage):
            raise CheckError(f"{spec.check} declares the unknown AMLAS stage {cls.stage!r} "
                             f"(one of {', '.join(Stage)})")
        return cls(cls.Params.model_validate(spec.params))
    except ValidationError as e:
        raise CheckError(f"{where} ({spec.check}).params: {validation_message(e)}") from None
    except UserError as e:  # a check's own refusal of its parameters; anything else is a bug, not the plan's
        raise CheckError(f"{where}: {e}") from None


def build_plan(use_case: UseCase) -> list[Check]:
    """Every problem of the plan at once, as one error."""
    checks, problems = [], []
    for i, spec in enumerate(use_case.plan.checks):
        try:
            checks.append(build(spec, i))
        except CheckError as e:
            problems.append(str(e))
    if problems:
        raise CheckError("\n".join(problems))
    return checks

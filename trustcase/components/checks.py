"""One protocol for every check, one registry: adding a method is one class and one `@register`.

A check is constructed from its validated params, may split itself into shards (for fan-out),
and runs on a `Context` (model, data, seed, a folder for its artefacts). It streams the data it
needs batch by batch and returns a `CheckOutcome`. It never logs anywhere: flows do that.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from pydantic import BaseModel, ConfigDict, ValidationError

from trustcase.components.data import DataSource, resolve
from trustcase.components.models import Classifier
from trustcase.schemas import Artefact, CheckOutcome, CheckSpec, UseCase


class CheckError(Exception):
    """A user error in a check's configuration (unknown name, bad params), found before work starts."""


class Unsupported(Exception):
    """The check cannot run on this model or data (e.g. needs gradients of a black box); says why."""


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


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


class Check:
    name: ClassVar[str]
    Params: ClassVar[type[Params]] = Params
    needs_gradients: ClassVar[bool] = False
    stage: ClassVar[str] = "testing"  # the AMLAS stage its evidence supports

    def __init__(self, params: Params):
        self.params = params

    def shards(self) -> list[Check]:
        """Independent parts for fan-out (e.g. one per perturbation). Default: the whole check."""
        return [self]

    @property
    def key(self) -> str:
        """Identifies this shard's work for caching."""
        return f"{self.name}:{self.params.model_dump_json()}"

    def run(self, ctx: Context) -> CheckOutcome:
        raise NotImplementedError

    def __call__(self, ctx: Context) -> CheckOutcome:
        if self.needs_gradients and not ctx.model.differentiable:
            raise Unsupported(f"{self.name} needs gradients; the model is a black box")
        ctx.workdir.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        out = self.run(ctx)
        return out.model_copy(update={"duration_s": time.perf_counter() - t0, "stage": self.stage})


REGISTRY: dict[str, type[Check]] = {}


def register(cls: type[Check]) -> type[Check]:
    if cls.name in REGISTRY and REGISTRY[cls.name] is not cls:
        raise ValueError(f"check {cls.name!r} is registered twice")
    REGISTRY[cls.name] = cls
    return cls


def _load_builtin_checks() -> None:
    # importing the modules registers their checks
    from trustcase.components import (  # noqa: F401
        adversarial,
        attribution_quality,
        blackbox,
        data_quality,
        lipschitz,
        local_robustness,
        odd_validation,
        performance,
        properties,
        root_causes,
        smoothing,
        sweep,
    )


def check_class(name: str) -> type[Check]:
    _load_builtin_checks()
    if name in REGISTRY:
        return REGISTRY[name]
    if ":" in name:
        cls = resolve(name)
        if not (isinstance(cls, type) and issubclass(cls, Check)):
            raise CheckError(f"{name!r} is not a trustcase Check class")
        return cls
    raise CheckError(f"unknown check {name!r}; known: {sorted(REGISTRY)}")


def build(spec: CheckSpec, index: int | None = None) -> Check:
    """Validate a plan entry into a check, before any work starts."""
    where = f"plan.checks[{index}]" if index is not None else "check"
    try:
        cls = check_class(spec.check)
        return cls(cls.Params.model_validate(spec.params))
    except ValidationError as e:
        msgs = "; ".join(f"{'.'.join(map(str, x['loc']))}: {x['msg']}" for x in e.errors())
        raise CheckError(f"{where} ({spec.check}).params: {msgs}") from None
    except (CheckError, ValueError) as e:
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

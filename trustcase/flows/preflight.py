"""The one preflight of `trustcase validate` and `trustcase assess`: every problem of a use case that can be
found before work starts, all reported at once, each with its line in the YAML file.

Beyond the schema: the plan's checks and their parameters; every claim measured by some check of the plan
(`Check.produces`; see `claims` for a partner check that declares nothing); the ODD descriptors known; the
model file loads (without unpickling unless allowed) and fits the classes on a probe input; loaders, factories
and partner references import with the use case's folder on the path, and their parameters fit the function's
signature and type hints; the first item of each split reads and meets the model's input contract.
"""

from __future__ import annotations

import difflib
import fnmatch
import inspect
import sys
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pydantic import TypeAdapter, ValidationError

from trustcase.checks import REGISTRY, Check, CheckError, Produces, check_class
from trustcase.data.streaming import DataError, DataSource, Rejected, expected_shape, judge_item
from trustcase.errors import UserError, validation_message, validation_problems
from trustcase.models.classifier import ModelError
from trustcase.models.loading import BLACK_BOXES
from trustcase.odd.monitor import MonitorError
from trustcase.odd.specification import Limit
from trustcase.registry import resolve
from trustcase.reports.compliance import own_catalogue_problems
from trustcase.schemas import Problem, UseCase, UseCaseError, parse_use_case
from trustcase.schemas.loading import locator
from trustcase.schemas.use_case import SEEDS
from trustcase.tasks import task_of

Add = Callable[[tuple, str], None]


def import_paths(uc: UseCase, use_case_path: str | Path) -> None:
    """The use case's folder and data.path first on sys.path: loaders, model factories and partner checks
    beside the use case import, whichever is loaded first."""
    for folder in (uc.data.path, Path(use_case_path).resolve().parent):
        if folder is not None and str(folder) not in sys.path:
            sys.path.insert(0, str(folder))


def preflight(use_case_path: str | Path, seed: int | None = None) -> UseCase:
    """The validated use case, or `UseCaseError` carrying every problem found. `seed` (as `--seed`) picks the
    same capped subset of each split as the assessment will."""
    path = Path(use_case_path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UseCaseError(path, [Problem("", None, f"cannot read the file: {e}")]) from None
    uc = parse_use_case(text, path.resolve())  # the schema first: nothing below can trust a broken file
    if seed is not None and not 0 <= seed < SEEDS:
        raise UseCaseError(path, [Problem("--seed", None, f"{seed} is not a seed: expected 0 <= seed < 2**32")])
    at = locator(text)
    problems: list[Problem] = []

    def add(loc: tuple, message: str) -> None:
        problems.append(at(loc, message))

    import_paths(uc, path)
    source = data_source(uc, uc.plan.seed if seed is None else seed)  # its splits read once, by plan and data
    produced = plan(uc, add, tiled(source))
    claims(uc, produced, add)
    descriptors(uc, add)
    for message in own_catalogue_problems(uc):  # the use case's own objectives, read like the built-in ones
        add(("compliance",), message)
    model(uc, add)
    data(uc, source, add)
    if problems:
        raise UseCaseError(path, problems)
    return uc


@dataclass(frozen=True)
class Declared:
    """What one check of the plan declares it measures; `produces` None: it declares nothing."""

    name: str
    params: object
    produces: list[Produces] | None
    # what it would measure but cannot here, and why (a check not taught whole images under fit: tiles)
    idle: tuple[list[Produces], str] | None = None


def plan(uc: UseCase, add: Add, tiled: bool = False) -> list[Declared]:
    """Each check built from its parameters, with what it declares it measures (`tiled`: the data are read by
    tiles, where only the checks taught whole images measure anything)."""
    out = []
    for i, spec in enumerate(uc.plan.checks):
        loc = ("plan", "checks", i)
        try:
            cls: type[Check] = check_class(spec.check)
        except CheckError as e:
            add((*loc, "check"), str(e))
            continue
        try:
            params = cls.Params.model_validate(spec.params)
            cls(params)
        except ValidationError as e:
            for where, msg in validation_problems(e):
                add((*loc, "params", *where), msg)
            continue
        except UserError as e:  # a check's own refusal of its parameters
            add((*loc, "params"), str(e))
            continue
        for where, msg in split_names(params, uc):
            add((*loc, "params", *where), msg)
        # a check not taught the use case's task measures nothing for it (it says so at run time)
        produces = cls.produces(params, uc) if uc.task in cls.tasks else []
        if tiled and not cls.whole_images and produces:  # not applicable at run time (Check.__call__)
            out.append(Declared(spec.check, params, [], (produces, cls.not_tiled)))
            continue
        out.append(Declared(spec.check, params, produces))
    return out


def data_source(uc: UseCase, seed: int) -> DataSource | DataError:
    """The use case's data as the assessment reads them, or why its loader cannot be found (`data` says it)."""
    try:
        return DataSource(uc.data, seed, uc.model)
    except DataError as e:
        return e


def tiled(source: DataSource | DataError) -> bool:
    """Whether the loader reads the splits by tiles (`fit: tiles`); a loader that cannot be called says so in
    `data` below."""
    try:
        return isinstance(source, DataSource) and source.tiling() is not None
    except DataError:  # the partner's loader raised: `data` reports it at its line
        return False


SPLIT_PARAMETERS = ("split", "splits", "reference", "held_out")  # and any "*_split" / "*_splits"


def split_names(params: object, uc: UseCase) -> list[tuple[tuple, str]]:
    """A check parameter that names splits (SPLIT_PARAMETERS, or named "*_split" / "*_splits"), given in the plan,
    names roles of data.splits: a typo would be an INCONCLUSIVE claim or a failure after the run. Defaults are the
    check's own (it says at run time when its default split is missing)."""
    roles, out = list(uc.data.splits), []
    for name in sorted(getattr(params, "model_fields_set", ())):
        if not (name in SPLIT_PARAMETERS or name.endswith(("_split", "_splits"))):
            continue
        value = getattr(params, name)
        named = [((name,), value)] if isinstance(value, str) else \
            [((name, j), v) for j, v in enumerate(value)] if isinstance(value, list | tuple) else []
        for where, v in named:
            if isinstance(v, str) and v not in roles:
                near = difflib.get_close_matches(v, roles, n=1)
                out.append((where, f"{name}: {v!r} is not a split of data.splits ({', '.join(roles)})"
                                   + (f"; did you mean {near[0]!r}?" if near else "")))
    return out


def claims(uc: UseCase, produced: list[Declared], add: Add) -> None:
    """Every requirement (mandatory or not) is measured by some check of the plan, in its scope.

    A partner check that declares nothing (`produces` None) might measure what a claim needs, but only a claim it
    could cover is exempted: one on a metric some check declares (a check of the plan, or a registered check
    with its default parameters) and on a split the partner reads (its `split` parameter, any split without
    one). A metric no check declares is a typo or a partner's own figure: an error either way, fixed by
    spelling it right or by declaring it in the partner's `produces`.
    """
    declared = [p for d in produced if d.produces is not None for p in d.produces]
    silent = [d for d in produced if d.produces is None]
    known = declared + (registered(uc) if silent else [])
    metrics = sorted({p.metric for p in known if not any(c in p.metric for c in "*?[")})
    for i, r in enumerate(uc.requirements):
        if any(p.covers(r) for p in declared):
            continue
        loc = ("requirements", i)
        same = [p for p in declared if fnmatch.fnmatchcase(r.metric, p.metric)]
        heard_of = any(fnmatch.fnmatchcase(r.metric, p.metric) for p in known)
        reach = [d.name for d in silent if _reads(d.params, r.scope.split)]
        if heard_of and reach:
            continue  # a partner check that declares nothing may measure it there
        pert = r.scope.perturbation
        claim = f"claim {r.id}: "
        idle = [d for d in produced if d.idle and any(p.covers(r) for p in d.idle[0])]
        if idle:
            add((*loc, "metric"), f"{claim}{r.metric} is measured only by " + "; ".join(
                f"{d.name}, not applicable under fit: tiles ({d.idle[1]})" for d in idle))
        elif not same:
            near = difflib.get_close_matches(r.metric, metrics, n=3)
            quiet = (f" ({', '.join(d.name for d in silent)} declares nothing it measures: a metric of its own "
                     "must be declared in its Check.produces)" if silent else "")
            add((*loc, "metric"), f"{claim}no check of the plan measures {r.metric!r}"
                + (f"; did you mean {' or '.join(map(repr, near))}?" if near else "") + quiet)
        elif pert and not any(p.perturbation in (pert.name, "*") for p in same):
            names = sorted({p.perturbation for p in same if p.perturbation})
            add((*loc, "scope", "perturbation", "name"),
                f"{claim}no check of the plan measures {r.metric} under perturbation {pert.name!r}"
                + (f"; it is measured under {names}" if names else "; it is measured without perturbation only"))
        elif not pert and all(p.perturbation is not None for p in same):
            add((*loc, "scope"), f"{claim}{r.metric} is only measured under a perturbation: name it in "
                                 "scope.perturbation")
        elif not any(fnmatch.fnmatchcase(r.scope.split, p.split) for p in same):
            add((*loc, "scope", "split"), f"{claim}{r.metric} is measured on split(s) "
                                          f"{sorted({p.split for p in same})}, not {r.scope.split!r}")
        else:
            add((*loc, "scope"), f"{claim}no check of the plan measures {r.metric} on {r.scope.label()}")


def _reads(params: object, split: str) -> bool:
    """Whether a check may read `split`: its `split` parameter (a name or names) says which; without one, any."""
    own = getattr(params, "split", None)
    if isinstance(own, str):
        return own == split
    return split in own if isinstance(own, list | tuple) else True


def registered(uc: UseCase) -> list[Produces]:
    """What every registered check declares with its default parameters: the metrics trustcase knows."""
    out = []
    for name in REGISTRY:
        try:
            cls = check_class(name)
            out += cls.produces(cls.Params(), uc) or []
        except Exception:  # noqa: BLE001  (a check whose parameters have no defaults, a partner's broken entry point)
            continue
    return out


def descriptors(uc: UseCase, add: Add) -> None:
    """Every ODD descriptor is one something measures (an image descriptor of the catalogue, a feature column)."""
    for i, d in enumerate(uc.odd.descriptors):
        try:
            limit = Limit.from_descriptor(d)
        except MonitorError as e:
            add(("odd", "descriptors", i, "name"), str(e))
            continue
        if limit.column is not None and len(uc.model.input_shape) == 1 and limit.column >= uc.model.input_shape[0]:
            add(("odd", "descriptors", i, "name"), f"feature column {limit.column} is beyond the model's "
                                                   f"{uc.model.input_shape[0]} input features")


def model(uc: UseCase, add: Add) -> None:
    spec = uc.model
    if spec.factory:
        try:
            factory = resolve(spec.factory, what="model factory", error=ModelError)
            if not add_arguments(factory, spec.factory_args, 0, ("model", "factory_args"), add):
                return  # building the module with arguments it does not take would only repeat the problem
        except ModelError as e:
            add(("model", "factory"), str(e))
            return
    if spec.format not in BLACK_BOXES and not Path(spec.path).is_file():
        add(("model", "path"), f"model file not found: {spec.path}")
        return
    try:
        task_of(uc).load_model(spec)  # probes it with one input of the declared contract, checks the task's output
    except (ModelError, DataError) as e:
        add(("model", "path"), str(e))
    except Exception as e:  # noqa: BLE001  (a partner's black box may raise anything while it loads)
        add(("model", "entry" if spec.entry else "path"), f"loading the model raised {type(e).__name__}: {e}")


def data(uc: UseCase, source: DataSource | DataError, add: Add) -> None:
    spec = uc.data
    if isinstance(source, DataError):
        add(("data", "loader"), str(source))
        return
    if not add_arguments(source.loader, spec.params, 1, ("data", "params"), add):
        return  # calling the loader with parameters it does not take would only repeat the problem
    first_meta: dict | None = None
    for role, name in spec.splits.items():
        loc = ("data", "splits", role)
        try:
            stream = source.stream(role)
        except DataError as e:
            add(loc, str(e))
            continue
        if len(stream) == 0:
            add(loc, f"split {role!r} ({source.call(name)}) is empty")
            continue
        if stream.tiling is not None and not tiles(uc, stream.tiling, add):
            return
        i = int(stream.positions[0])
        try:
            item = stream.split[i]
            image = judge_item(item.image, stream.expected)  # under fit: tiles a whole image of any size
            task_of(uc).judge_label(item.label, len(uc.model.class_names),
                                    image.shape[:2] if stream.tiling else expected_shape(uc.model)[:2])
        except Rejected as e:
            what = "has a label the task cannot use" if e.kind == "label" else "does not fit the model's input"
            add(loc, f"the first item of split {role!r} ({_name(stream.split, i)}) {what}: {e}")
            continue
        except Exception as e:  # noqa: BLE001  (the partner's loader)
            add(loc, f"reading the first item of split {role!r} ({_name(stream.split, i)}) raised "
                     f"{type(e).__name__}: {e}")
            continue
        if first_meta is None:
            first_meta = dict(item.meta or {})
    for j, d in enumerate(uc.odd.descriptors):
        if d.source == "metadata" and first_meta is not None and d.name not in first_meta:
            add(("odd", "descriptors", j, "name"), f"metadata descriptor {d.name!r} is in no item's metadata: the "
                                                   f"loader gives {sorted(first_meta) or 'none'}")


def tiles(uc: UseCase, tiling, add: Add) -> bool:
    """`fit: tiles`: the model segments (stitching needs per-pixel logits) and its input is one tile (the loader's
    size). False when it cannot be assessed by tiles."""
    if uc.task != "segmentation":
        add(("data", "params"), f"fit: tiles stitches per-pixel logits of a segmenter; this use case's task is "
                                f"{uc.task}: use fit: resize or pad")
        return False
    if tuple(uc.model.input_shape[1:]) != tuple(tiling.tile):
        add(("model", "input_shape"), f"{list(uc.model.input_shape)} is not one tile: the loader cuts tiles of "
                                      f"{tiling.tile[1]}x{tiling.tile[0]} px (fit: tiles, size {list(tiling.tile)})")
        return False
    return True


def _name(split, i: int) -> str:
    try:
        return str(split.name(i))
    except Exception:  # noqa: BLE001  (no `name`: the position locates it)
        return f"#{i}"


def add_arguments(fn, args: dict, skip: int, loc: tuple, add: Add) -> bool:
    """Check `args` against `fn`'s signature and type hints (its first `skip` parameters are supplied by
    trustcase); True when they fit."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return True  # a builtin without a signature: the call itself will tell
    try:
        hints = typing.get_type_hints(fn.__init__ if isinstance(fn, type) else fn)
    except Exception:  # noqa: BLE001  (an annotation that does not resolve: not checked)
        hints = {}
    params = list(sig.parameters.values())[skip:]
    named = {p.name: p for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    var_kw = any(p.kind is p.VAR_KEYWORD for p in params)
    title = getattr(fn, "__qualname__", repr(fn))
    ok = True
    for key, value in args.items():
        if key not in named:
            if not var_kw:
                add((*loc, key), f"{title} takes no parameter {key!r}; it takes {list(named)}")
                ok = False
            continue
        if key not in hints:
            continue
        try:
            adapter = TypeAdapter(hints[key])
        except Exception:  # noqa: BLE001  (a hint pydantic cannot check)
            continue
        try:
            adapter.validate_python(value)
        except ValidationError as e:
            hint = getattr(hints[key], "__name__", str(hints[key]))
            add((*loc, key), f"{value!r} does not fit {title}'s {key}: {hint} ({validation_message(e)})")
            ok = False
    for p in named.values():
        if p.default is p.empty and p.name not in args:
            add(loc, f"{title} needs parameter {p.name!r}")
            ok = False
    return ok

"""Read a use-case YAML file and report every problem at once, each with its line in the file."""

from __future__ import annotations

import inspect
import os
import pkgutil
import re
import sys
import typing
from dataclasses import dataclass
from pathlib import Path, PurePath

import yaml
from pydantic import ValidationError

from trustcase.errors import UserError, validation_problems
from trustcase.schemas.use_case import UseCase

MAX_DEPTH = 32  # a use case nests 6 deep; PyYAML composes recursively, so 20,000 brackets overflow the stack
MAX_BYTES = 4 << 20


@dataclass(frozen=True)
class Problem:
    location: str  # e.g. "requirements[2].threshold"
    line: int | None
    message: str

    def __str__(self) -> str:
        where = f"line {self.line}: " if self.line else ""
        return f"{where}{self.location or '<file>'}: {self.message}"


class UseCaseError(UserError):
    """A user error in a use-case file; carries every problem found."""

    def __init__(self, path: Path, problems: list[Problem]):
        self.path = path
        self.problems = problems
        super().__init__(f"{path}: {len(problems)} problem(s)\n" + "\n".join(f"  {p}" for p in problems))


def _node_at(root: yaml.Node | None, loc: tuple) -> yaml.Node | None:
    """The deepest YAML node along a pydantic error location, for its line number."""
    node = root
    for key in loc:
        if isinstance(node, yaml.MappingNode):
            nxt = next((v for k, v in node.value if k.value == key), None)
            if nxt is None:
                # unknown key: point at the key itself
                return next((k for k, _ in node.value if k.value == key), node)
            node = nxt
        elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
            node = node.value[key]
        else:
            break
    return node


def _loc_text(loc: tuple) -> str:
    out = ""
    for k in loc:
        out += f"[{k}]" if isinstance(k, int) else (f".{k}" if out else str(k))
    return out


def _resolve_paths(raw: dict, base: Path) -> list[tuple[tuple, str]]:
    """Relative paths in the file are relative to the file, not to where the command runs: model.path,
    data.path, and each data.params value the loader's signature declares a path (`path_parameters`:
    annotated Path / os.PathLike, or a str named like root / path / dir / file) that names a file or folder
    beside the YAML file; every other string is a value, left as written. A relative path that names something
    only under the working directory is a problem (it would make the result depend on where the command
    runs). A loader that cannot be imported here resolves nothing: the preflight reports it."""
    if isinstance(raw.get("compliance"), str) and not Path(raw["compliance"]).is_absolute():
        raw["compliance"] = str((base / raw["compliance"]).resolve())
    for section, key in (("model", "path"), ("data", "path")):
        part = raw.get(section)
        if isinstance(part, dict) and isinstance(part.get(key), str) and not Path(part[key]).is_absolute():
            part[key] = str((base / part[key]).resolve())
    problems = []
    data = raw.get("data") if isinstance(raw.get("data"), dict) else {}
    params = data.get("params")
    paths = None  # the loader is imported only if some value could be a relative path
    for k, v in (params.items() if isinstance(params, dict) else ()):
        if not isinstance(v, str) or not v.strip() or "\n" in v or len(v) > 4096 or Path(v).is_absolute():
            continue
        try:
            here, there = (base / v).exists(), Path(v).exists() and Path.cwd().resolve() != base
        except (OSError, ValueError):  # not a path at all (a NUL byte, a name too long)
            continue
        if here or there:
            paths = _path_parameters(data.get("loader"), data.get("path") or base) if paths is None else paths
            if k not in paths:
                continue
        if here:
            params[k] = str((base / v).resolve())
        elif there:
            problems.append((("data", "params", k), f"{v!r} exists under the working directory {Path.cwd()} but "
                                                    f"not beside the use-case file: relative paths are relative to "
                                                    f"the file's folder {base}"))
    return problems


# the built-in loaders, by reference (their module is science code: imported only when a path must be resolved)
BUILTIN_LOADERS = {"image_folder": "trustcase.data.streaming:ImageFolder"}
_PATH_NAME = re.compile(r"(^|_)(root|path|dir|directory|folder|file|filename)s?$")


def path_parameters(fn) -> set[str]:
    """The parameters of a loader (function or class) that name a file or folder: annotated `pathlib.Path` (or a
    subclass, `os.PathLike`, or a union holding one), or a `str` (or unannotated) parameter named like root / path
    / dir / folder / file (`data_dir`, `root`; not `folder_name`). Every other string is a value (`mode: tests`,
    `split: train`), never a path."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return set()
    try:
        hints = typing.get_type_hints(fn.__init__ if isinstance(fn, type) else fn)
    except Exception:  # noqa: BLE001  (an annotation that does not resolve: judged by its name)
        hints = {}

    def pathlike(h) -> bool:
        return (isinstance(h, type) and issubclass(h, (os.PathLike, PurePath))) or h is os.PathLike or \
            any(pathlike(a) for a in typing.get_args(h))

    def text(h) -> bool:
        return h is None or h is str or str in typing.get_args(h)

    return {name for name, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and (
        pathlike(hints.get(name)) or (text(hints.get(name)) and _PATH_NAME.search(name.lower())))}


def _path_parameters(loader, folder) -> set[str]:
    """The loader's path parameters; none when it cannot be imported here (the preflight reports why)."""
    if not isinstance(loader, str):
        return set()
    if str(folder) not in sys.path:  # where DataSource (registry.resolve) will import it from
        sys.path.insert(0, str(folder))
    try:
        return path_parameters(pkgutil.resolve_name(BUILTIN_LOADERS.get(loader, loader)))
    except Exception:  # noqa: BLE001  (a missing or broken loader is the preflight's located error)
        return set()


def _duplicate_keys(root: yaml.Node | None) -> list[Problem]:
    """Every key given twice in one mapping, with both lines (YAML keeps the last one silently: a second
    `confidentiality: public` would quietly undo the first)."""
    problems, todo = [], [((), root)]
    while todo:
        loc, node = todo.pop()
        if isinstance(node, yaml.MappingNode):
            seen: dict = {}
            for k, v in node.value:
                key = k.value if isinstance(k, yaml.ScalarNode) else None
                if key is not None and key in seen:
                    problems.append(Problem(_loc_text((*loc, key)), k.start_mark.line + 1,
                                            f"duplicate key {key!r}: given on line {seen[key]} and again on line "
                                            f"{k.start_mark.line + 1} (only one is allowed)"))
                elif key is not None:
                    seen[key] = k.start_mark.line + 1
                todo.append(((*loc, key), v))
        elif isinstance(node, yaml.SequenceNode):
            todo.extend(((*loc, i), v) for i, v in enumerate(node.value))
    return sorted(problems, key=lambda p: p.line or 0)


def _bounded(text: str) -> Problem | None:
    """Refuse, before composing, what would exhaust the parser: deep nesting, aliases (a few lines of
    aliases expand to gigabytes), huge files. The scanner is iterative: it sees every bracket safely."""
    if len(text) > MAX_BYTES:
        return Problem("", None, f"the file is {len(text)} characters; a use case is at most {MAX_BYTES}")
    depth = 0
    for token in yaml.scan(text, Loader=yaml.SafeLoader):
        if isinstance(token, (yaml.FlowSequenceStartToken, yaml.FlowMappingStartToken,
                              yaml.BlockSequenceStartToken, yaml.BlockMappingStartToken)):
            depth += 1
            if depth > MAX_DEPTH:
                return Problem("", token.start_mark.line + 1, f"nesting deeper than {MAX_DEPTH} levels")
        elif isinstance(token, (yaml.FlowSequenceEndToken, yaml.FlowMappingEndToken, yaml.BlockEndToken)):
            depth -= 1
        elif isinstance(token, yaml.AliasToken):
            return Problem("", token.start_mark.line + 1,
                           f"YAML alias *{token.value}: aliases are not allowed in a use-case file (write the value)")
    return None


def parse_use_case(text: str, path: Path) -> UseCase:
    try:
        bad = _bounded(text)
        if bad:
            raise UseCaseError(path, [bad])
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = mark.line + 1 if mark else None
        raise UseCaseError(path, [Problem("", line, f"invalid YAML: {getattr(e, 'problem', e)}")]) from None
    if not isinstance(raw, dict):
        raise UseCaseError(path, [Problem("", 1, "the file must be a mapping of use-case fields")])
    duplicates = _duplicate_keys(root)
    if duplicates:
        raise UseCaseError(path, duplicates)
    misplaced = _resolve_paths(raw, path.parent)
    if misplaced:
        raise UseCaseError(path, [Problem(_loc_text(loc), _line(root, loc), msg) for loc, msg in misplaced])
    try:
        uc = UseCase.model_validate(raw, context={"defer_cross": True})
    except ValidationError as e:
        raise UseCaseError(path, [Problem(_loc_text(loc), _line(root, loc), msg)
                                  for loc, msg in validation_problems(e)]) from None
    cross = uc.cross_problems()
    if cross:
        raise UseCaseError(path, [Problem(_loc_text(loc), _line(root, loc), msg) for loc, msg in cross])
    return uc


def _line(root: yaml.Node | None, loc: tuple) -> int | None:
    node = _node_at(root, loc)
    return node.start_mark.line + 1 if node is not None else None


def locator(text: str):
    """(loc, message) -> a `Problem` located in `text` (a file `parse_use_case` accepted): for the problems
    found after the schema (plan, files, imports, data)."""
    root = yaml.compose(text, Loader=yaml.SafeLoader)
    return lambda loc, message: Problem(_loc_text(tuple(loc)), _line(root, tuple(loc)), message)


def load_use_case(path: str | Path) -> UseCase:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UseCaseError(path, [Problem("", None, f"cannot read the file: {e}")]) from None
    return parse_use_case(text, path.resolve())

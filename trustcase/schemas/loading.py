"""Read a use-case YAML file and report every problem at once, each with its line in the file."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml
from pydantic import ValidationError

from trustcase.errors import UserError
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


def _resolve_paths(raw: dict, base: Path) -> None:
    """Relative paths in the file are relative to the file, not to where the command runs."""
    for section, key in (("model", "path"), ("data", "path")):
        part = raw.get(section)
        if isinstance(part, dict) and isinstance(part.get(key), str) and not Path(part[key]).is_absolute():
            part[key] = str((base / part[key]).resolve())


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
    _resolve_paths(raw, path.parent)
    try:
        uc = UseCase.model_validate(raw, context={"defer_cross": True})
    except ValidationError as e:
        problems = []
        for err in e.errors():
            loc = tuple(err["loc"])
            msg = err["msg"].removeprefix("Value error, ")
            problems.append(Problem(_loc_text(loc), _line(root, loc), msg))
        raise UseCaseError(path, problems) from None
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

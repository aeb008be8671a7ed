"""How a piece of work declines, shared by every layer (stdlib only, no layer above is imported), and how
its messages reach a reader.

Three kinds of failure, told apart by class, never by a list of names:
- `UserError`: something the user gave is wrong (a file, a parameter, a model, a folder, a run id). Its
  message names the problem and where it is; the CLI prints it on one line and exits 2, the flow logs it
  on one line. Every user-facing error class of the package derives from it (a partner's may too); those
  about a bad value (a perturbation's parameter, a network file) are also `ValueError`s, as Python's own are.
- `Unsupported`: nothing is wrong, but this work cannot serve this model or data (gradients of a black box,
  a layer a method has no rule for). The flow records the check as "not run" with the reason and goes on;
  the CLI, asked directly for such work, says so on one line and exits 2.
- anything else is an internal error: a bug, reported with its traceback in a log file.
"""

import re


class UserError(Exception):
    """A problem in what the user gave, with a message that names it and where it is (one line)."""


class CheckError(UserError):
    """A user error in a check's configuration (unknown name, bad params, a layer that does not exist),
    found before work starts."""


class Unsupported(Exception):
    """The work cannot run on this model or data (e.g. needs gradients of a black box); says why. Not a
    `UserError`: an expected decline, recorded as "not run", never a failed assessment."""


_NUMPY_SCALAR = re.compile(r"\bnp\.(?:u?int\d*|float\d*|bool_?|str_|bytes_|complex\d*)\(([^()]*)\)")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def validation_problems(e) -> list[tuple[tuple, str]]:
    """(location, message) of each problem of a pydantic `ValidationError`, worded for a reader (pydantic's
    "Value error, " prefix dropped); for callers that locate each problem (a YAML line, a plan entry)."""
    return [(tuple(d["loc"]), d["msg"].removeprefix("Value error, ")) for d in e.errors()]


def validation_message(e, whole: str = "value", limit: int | None = None) -> str:
    """A pydantic `ValidationError` as one line, 'where: message; where: message' (`whole` names a problem of
    the whole value, which has no location); at most `limit` problems, then how many more."""
    problems = validation_problems(e)
    shown = problems if limit is None else problems[:limit]
    text = "; ".join(f"{'.'.join(map(str, loc)) or whole}: {msg}" for loc, msg in shown)
    return text + (f" (and {len(problems) - len(shown)} more)" if len(shown) < len(problems) else "")


def plain(text: str) -> str:
    """A message as a reader writes its values (`0`, not `np.int64(0)`), without terminal colour codes."""
    return _NUMPY_SCALAR.sub(r"\1", _ANSI.sub("", text))

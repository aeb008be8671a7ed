"""The two ways a piece of work declines, shared by the science and the checks (no layer above is imported),
and how their messages reach a reader."""

import re


class CheckError(Exception):
    """A user error in a check's configuration (unknown name, bad params, a layer that does not exist),
    found before work starts."""


class Unsupported(Exception):
    """The work cannot run on this model or data (e.g. needs gradients of a black box); says why."""


_NUMPY_SCALAR = re.compile(r"\bnp\.(?:u?int\d*|float\d*|bool_?|str_|bytes_|complex\d*)\(([^()]*)\)")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def plain(text: str) -> str:
    """A message as a reader writes its values (`0`, not `np.int64(0)`), without terminal colour codes."""
    return _NUMPY_SCALAR.sub(r"\1", _ANSI.sub("", text))

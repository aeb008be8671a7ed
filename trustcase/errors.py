"""The two ways a piece of work declines, shared by the science and the checks (no layer above is imported)."""


class CheckError(Exception):
    """A user error in a check's configuration (unknown name, bad params, a layer that does not exist),
    found before work starts."""


class Unsupported(Exception):
    """The work cannot run on this model or data (e.g. needs gradients of a black box); says why."""

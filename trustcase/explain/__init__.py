"""Explanations of a model's decisions: attribution methods and their quality, concepts, visualisation, root causes.

A bad request of the package (an unknown layer, channel, class or option, an occlusion window larger than the
image) is an `ExplainError`, a user error found before any work; a method that cannot serve the model raises
`errors.Unsupported`."""

from trustcase.errors import UserError


class ExplainError(UserError, ValueError):
    """What was asked of an explanation does not fit the model (a layer, channel, position, class or option), with
    the valid ones named; raised before any work."""

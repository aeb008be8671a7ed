"""Evidence records -> safety argument -> HTML / PDF. Fed by evidence only, never by live models."""

from trustcase.reports.render import render

__all__ = ["render"]

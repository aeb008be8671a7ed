"""Evidence records -> safety argument -> HTML / PDF / evidence pack. Fed by evidence only, never by live models.

Entry points: `render` (everything the flow logs), `build_pack` / `verify_pack` (the evidence pack).
"""

from trustcase.reports.pack import PackError, Verification
from trustcase.reports.pack import build as build_pack
from trustcase.reports.pack import verify as verify_pack
from trustcase.reports.render import render

__all__ = ["PackError", "Verification", "build_pack", "render", "verify_pack"]

"""Evidence records -> safety argument -> HTML / PDF / evidence pack. Fed by evidence only, never by live models.

Entry points: `render` (everything the flow logs), `build_pack` / `verify_pack` (the evidence pack).
"""

from trustcase.reports.pack import Anchor, PackError, Verification, withheld
from trustcase.reports.pack import build as build_pack
from trustcase.reports.pack import digest as pack_digest
from trustcase.reports.pack import verify as verify_pack
from trustcase.reports.render import render

__all__ = ["Anchor", "PackError", "Verification", "build_pack", "pack_digest", "render", "verify_pack", "withheld"]

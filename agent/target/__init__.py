"""The target role: site B's half of replication (see ``server.py`` for the session)."""

from .group import NoConsistentState, SizeMismatch, TargetGroup
from .server import TargetSite

__all__ = ["NoConsistentState", "SizeMismatch", "TargetGroup", "TargetSite"]

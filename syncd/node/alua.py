"""The ALUA path state of a (host, volume) pair on one array, derived in one place."""

from __future__ import annotations

from ..nbd.export import (
    ALUA_ACTIVE_NON_OPTIMIZED,
    ALUA_ACTIVE_OPTIMIZED,
    ALUA_TRANSITIONING,
    ALUA_UNAVAILABLE,
)


def path_state(*, may_serve: bool, role: str, proximity: str = "all", transitioning: bool = False) -> int:
    """active/optimized when the host is proximal to this array's role (or 'all') and the array
    may serve; active/non-optimized when it may serve but is not proximal; transitioning during a
    role change; unavailable when it may not serve."""
    if transitioning:
        return ALUA_TRANSITIONING
    if not may_serve:
        return ALUA_UNAVAILABLE
    if proximity == "all" or proximity == role:
        return ALUA_ACTIVE_OPTIMIZED
    return ALUA_ACTIVE_NON_OPTIMIZED

"""The one place a test says it cannot run for lack of something (a tool, root, /dev/fuse,
O_DIRECT): it fails, naming what is missing and how to get it. Nothing is skipped, in CI or
elsewhere: a test that did not run is not a pass (``./scripts/setup`` installs the tools; the
root tests need root)."""

from __future__ import annotations

import pytest


def unavailable(msg: str, env: str = "SYNCD_REQUIRE_TOOLS") -> None:
    """Fail: ``msg`` names what is missing. ``env`` is the variable CI sets for this kind of
    requirement, named in the message for whoever runs the tests by hand."""
    pytest.fail(f"{msg}: this test must run here (CI sets {env}=1 and has it)")

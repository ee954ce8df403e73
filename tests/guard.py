"""The one place a test may give up for lack of something: it fails under CI (where
``.ci/run``/``scripts/test`` set ``SYNCD_REQUIRE_TOOLS=1``/``SYNCD_REQUIRE_ROOT=1``), and only
elsewhere skips."""

from __future__ import annotations

import os

import pytest


def unavailable(msg: str, env: str = "SYNCD_REQUIRE_TOOLS") -> None:
    if os.environ.get(env) == "1":
        pytest.fail(f"{msg} ({env}=1: this must run here)")
    pytest.skip(msg)

"""Unit-test fixtures: lines a test wants shown in the run's summary (even with -q)."""

from __future__ import annotations

import pytest

_SUMMARY: list[str] = []


@pytest.fixture
def model_summary() -> list[str]:
    """Append a line; it is printed at the end of the run (schedule counts of the model tests)."""
    return _SUMMARY


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    for line in _SUMMARY:
        terminalreporter.write_line(line)

"""The code base passes ruff with the project's configuration (pyproject.toml: pycodestyle,
pyflakes, isort, bugbear and the async rules: every wait is on an event, not a sleep loop)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_ruff_finds_nothing():
    p = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "--output-format", "concise",
                        "syncd", "tests", "bench"], cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr

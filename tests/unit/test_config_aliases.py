"""A YAML alias (`*data`) is a copy per use: `--set` on one stage's aliased section leaves the others alone."""

from __future__ import annotations

from pipeline.config import apply_overrides, load_yaml


def test_set_on_an_aliased_section_changes_only_that_stage(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text("stages:\n  a: {data: &data {limit: 1}}\n  b: {data: *data}\n  c: {<<: *data, extra: 2}\n")
    tree, sources = load_yaml(path)
    apply_overrides(tree, sources, ["stages.b.data.limit=8"])
    assert tree["stages"]["a"]["data"] == {"limit": 1} and tree["stages"]["b"]["data"] == {"limit": 8}
    assert tree["stages"]["c"] == {"limit": 1, "extra": 2}

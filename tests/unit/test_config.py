"""Config loading: overlays, overrides, and one clear line per kind of error."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from pipeline.config import ConfigError, apply_overrides, build, config_hash, load_yaml
from pipeline.recipe import load_recipe


@dataclass(kw_only=True)
class Inner:
    rate: float = 0.15
    mode: Literal["a", "b"] = "a"


@dataclass(kw_only=True)
class Outer:
    name: str
    steps: int = 10
    layers: list[int] = field(default_factory=list)
    inner: Inner = field(default_factory=Inner)
    worker: int = field(default=0, metadata={"hash": False})


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_overlay_and_override_precedence(tmp_path):
    write(tmp_path, "base.yaml", "a: {x: 1, y: 2, z: [1, 2]}\nb: base\n")
    write(tmp_path, "mid.yaml", "include: base.yaml\na: {y: 20}\n")
    top = write(tmp_path, "top.yaml", "include: [mid.yaml]\na: {z: [9]}\n")
    tree, sources = load_yaml(top)
    assert tree == {"a": {"x": 1, "y": 20, "z": [9]}, "b": "base"}
    assert sources[("a", "x")].endswith("base.yaml")
    assert sources[("a", "y")].endswith("mid.yaml")
    assert sources[("a", "z")].endswith("top.yaml")
    apply_overrides(tree, sources, ["a.y=300", "c.d=[1, 2]", "b=3e-4"])
    assert tree["a"]["y"] == 300 and tree["c"]["d"] == [1, 2]
    assert sources[("a", "y")] == "--set a.y=300"


def test_unknown_key_names_file_and_key(tmp_path):
    path = write(tmp_path, "c.yaml", "name: x\ninner: {rat: 0.2}\n")
    tree, sources = load_yaml(path)
    with pytest.raises(ConfigError) as err:
        build(Outer, tree, sources, origin_file=str(path))
    message = str(err.value)
    assert str(path) in message and "inner.rat" in message and "unknown key" in message
    assert "\n" not in message


def test_wrong_type_names_expected_type(tmp_path):
    path = write(tmp_path, "c.yaml", "name: x\nsteps: many\n")
    tree, sources = load_yaml(path)
    with pytest.raises(ConfigError, match=r"c\.yaml: steps: expected int, got 'many'"):
        build(Outer, tree, sources, origin_file=str(path))
    with pytest.raises(ConfigError, match=r"inner\.mode: expected one of 'a', 'b'"):
        build(Outer, {"name": "x", "inner": {"mode": "c"}})
    with pytest.raises(ConfigError, match=r"layers\.1: expected int"):
        build(Outer, {"name": "x", "layers": [1, "two"]})


def test_missing_required_field(tmp_path):
    path = write(tmp_path, "c.yaml", "steps: 3\n")
    tree, sources = load_yaml(path)
    with pytest.raises(ConfigError, match=r"c\.yaml: name: missing required field"):
        build(Outer, tree, sources, origin_file=str(path))


def test_override_error_points_at_flag(tmp_path):
    path = write(tmp_path, "c.yaml", "name: x\n")
    tree, sources = load_yaml(path)
    apply_overrides(tree, sources, ["steps=abc"])
    with pytest.raises(ConfigError, match=r"--set steps=abc: steps: expected int"):
        build(Outer, tree, sources, origin_file=str(path))


def test_bad_yaml_and_missing_file(tmp_path):
    path = write(tmp_path, "bad.yaml", "a: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_yaml(path)
    with pytest.raises(ConfigError, match="config file not found"):
        load_yaml(tmp_path / "nope.yaml")


def test_validation_in_post_init_is_a_config_error(tmp_path):
    path = write(tmp_path, "r.yaml", "stages:\n  numbers: {count: -1}\n")
    with pytest.raises(ConfigError, match=r"r\.yaml: stages\.numbers: count must be >= 0"):
        load_recipe(path)


def test_float_from_exponent_string_and_int_widening():
    assert build(Inner, {"rate": "3e-4"}).rate == pytest.approx(3e-4)
    assert build(Inner, {"rate": 1}).rate == 1.0


def test_config_hash_ignores_unhashed_fields():
    a, b = Outer(name="x", worker=0), Outer(name="x", worker=5)
    assert config_hash(a) == config_hash(b)
    assert config_hash(a) != config_hash(Outer(name="x", steps=11))


def test_unknown_stage_type(tmp_path):
    path = write(tmp_path, "r.yaml", "stages:\n  mystery: {}\n")
    with pytest.raises(ConfigError, match=r"stages\.mystery: unknown stage type 'mystery'"):
        load_recipe(path)


def test_every_shipped_yaml_loads_and_validates(repo):
    """Every recipe under configs/ validates; stage and DeepSpeed files parse (stage files are checked by type)."""
    import json

    import yaml

    from pipeline.config import load_yaml
    from pipeline.recipe import load_stage_file, parse

    files = sorted((repo / "configs").rglob("*.yaml"))
    assert files, "configs/ holds no YAML"
    for path in files:
        tree = yaml.safe_load(path.read_text()) or {}
        if "stages" in tree:
            load_recipe(path)
        elif path.parent.name == "stages":
            load_stage_file(path.stem, path)
        else:  # a base file that recipes include: its run/tracking/launch sections must validate
            merged, sources = load_yaml(path)
            parse({**merged, "stages": {"numbers": {}}}, sources, str(path))
    for path in sorted((repo / "configs").rglob("*.json")):
        json.loads(path.read_text())

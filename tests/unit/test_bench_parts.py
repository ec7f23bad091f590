"""The benchmark parts run: a part that breaks (a moved import, a Setup field it does not fill) is only seen by
someone running `distill bench`, so each CPU part's measuring code runs here at a tiny size."""

import math

import pytest


@pytest.mark.slow
def test_general_bench_measures_every_figure_at_a_tiny_size():
    from bench import general_bench

    figures = general_bench.run(sizes=(1, 2, 16))
    assert set(figures) >= {"cached_vs_online_share_of_ideal", "train_flops_vs_matmul", "trainer_tokens_per_s"}
    assert all(math.isfinite(v) and v > 0 for v in figures.values()), figures


@pytest.mark.slow
def test_cache_bench_measures_every_figure_at_a_tiny_size():
    from bench import cache_bench

    figures = cache_bench.run(quick=True, lines=80)
    assert set(figures) >= {"cache_write_vs_forward", "cache_bytes_per_token"}
    assert all(math.isfinite(v) and v > 0 for v in figures.values()), figures


@pytest.mark.slow
@pytest.mark.parametrize("part, size", [("shard_bench", {"lines": 300}), ("data_bench", {"lines": 1500}),
                                        ("task_bench", {"steps": 3})])
def test_other_parts_measure_their_figures_at_a_tiny_size(part, size):
    import importlib

    from bench import suite

    figures = importlib.import_module(f"bench.{part}").run(quick=True, **size)
    assert all(isinstance(v, (int, float)) and math.isfinite(v) for v in figures.values()), figures
    promised = {key for key in suite.KEYS if key in figures}
    assert promised or part == "shard_bench", f"{part} gives none of the suite's keys"

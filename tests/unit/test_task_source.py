"""Task data read relative to an upstream stage (data.source), e.g. the wordnet stage's TSVs."""

from pathlib import Path
from types import SimpleNamespace

from formats.taskdata import TaskData, load_task, with_source


def test_paths_join_the_source_stage_folder(tmp_path):
    (tmp_path / "train.tsv").write_text("sentence\tlabel\na dog\tnoun.animal\nto run\tverb.motion\n")
    (tmp_path / "dev.tsv").write_text("sentence\tlabel\na cat\tnoun.animal\n")
    data = TaskData(task="custom", source="@wordnet", train="train.tsv", dev="dev.tsv",
                    text_columns=["sentence"], label_column="label", metrics=["accuracy"])
    ctx = SimpleNamespace(input_dir=lambda name: tmp_path if name == "data.source" else None)
    resolved = with_source(data, ctx)
    assert Path(resolved.train) == tmp_path / "train.tsv"
    train, dev = load_task(resolved)
    assert train.label_names == ["noun.animal", "verb.motion"] and list(dev.labels) == [0]
    assert with_source(TaskData(train="x.tsv"), ctx).train == "x.tsv"

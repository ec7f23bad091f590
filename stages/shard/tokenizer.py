"""Tokenizer training for the `shard` stage: a SentencePiece model wrapped as a `transformers` fast tokenizer.

The trained model is written as a fast tokenizer (tokenizer.json with a Unigram model built from the
SentencePiece pieces and scores), so `AutoTokenizer.from_pretrained` loads it without our code and
without the `sentencepiece` package; `spm.model` is kept beside it for reference.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Literal

from pipeline.config import ConfigError

SPECIALS = {"pad": "[PAD]", "unk": "[UNK]", "cls": "[CLS]", "sep": "[SEP]", "mask": "[MASK]"}
"""BERT-style special tokens every tokenizer the pipeline uses must have."""


@dataclass(kw_only=True)
class TrainTokenizer:
    """Train a SentencePiece tokenizer on a sample of the corpus instead of using an existing one."""

    vocab_size: int = 8000
    """Number of pieces, special tokens included."""
    model_type: Literal["unigram"] = "unigram"
    """SentencePiece algorithm (Unigram converts exactly to a `tokenizers` model)."""
    sample_lines: int = 100_000
    """Train on the first this many cleaned training documents."""
    character_coverage: float = 0.9995
    """Share of characters the vocabulary must cover; rarer ones become [UNK]."""
    lowercase: bool = True
    """Lower-case text before training and tokenizing (an uncased model)."""
    seed: int = 0
    """SentencePiece's random seed (training is single-threaded so the model is reproducible)."""

    def __post_init__(self):
        if self.vocab_size < 16:
            raise ValueError(f"vocab_size must be >= 16, got {self.vocab_size}")
        if self.sample_lines < 1:
            raise ValueError(f"sample_lines must be >= 1, got {self.sample_lines}")
        if not 0.5 < self.character_coverage <= 1.0:
            raise ValueError(f"character_coverage must be in (0.5, 1], got {self.character_coverage}")


def train_sentencepiece(lines: Iterable[str], spec: TrainTokenizer, out_dir: Path):
    """Train SentencePiece on `lines`, save it to `out_dir` as a fast tokenizer; return the loaded tokenizer."""
    import sentencepiece as spm

    # Train on text normalised exactly as the fast tokenizer will normalise it, so the two agree.
    normalizer = _normalizer(spec.lowercase)
    sample = [normalizer.normalize_str(line) for _, line in zip(range(spec.sample_lines), lines)]
    if not sample:
        raise ConfigError("train_tokenizer: no training documents to learn a vocabulary from")
    out_dir.mkdir(parents=True, exist_ok=True)
    # Trained into memory: a model_prefix path would be stored in the model and differ between run dirs.
    model = io.BytesIO()
    spm.set_random_generator_seed(spec.seed)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sample), model_writer=model, vocab_size=spec.vocab_size,
            model_type=spec.model_type, character_coverage=spec.character_coverage,
            normalization_rule_name="identity",
            pad_id=0, unk_id=1, bos_id=-1, eos_id=-1, pad_piece=SPECIALS["pad"], unk_piece=SPECIALS["unk"],
            control_symbols=[SPECIALS["cls"], SPECIALS["sep"], SPECIALS["mask"]],
            num_threads=1, minloglevel=2, hard_vocab_limit=False,
        )
    except RuntimeError as err:
        raise ConfigError(f"train_tokenizer: SentencePiece training failed: {str(err).splitlines()[0]}") from None
    (out_dir / "spm.model").write_bytes(model.getvalue())
    processor = spm.SentencePieceProcessor(model_proto=model.getvalue())
    fast = wrap_sentencepiece(processor, lowercase=spec.lowercase)
    fast.save_pretrained(str(out_dir))
    return fast


def _normalizer(lowercase: bool):
    from tokenizers import Regex, normalizers

    steps = [normalizers.NFKC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Strip()]
    return normalizers.Sequence(steps + ([normalizers.Lowercase()] if lowercase else []))


def wrap_sentencepiece(processor, *, lowercase: bool):
    """A `PreTrainedTokenizerFast` that segments exactly like the SentencePiece Unigram `processor`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = [(processor.id_to_piece(i), processor.get_score(i)) for i in range(processor.get_piece_size())]
    tokenizer = Tokenizer(models.Unigram(vocab, unk_id=processor.unk_id(), byte_fallback=False))
    tokenizer.normalizer = _normalizer(lowercase)
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    cls, sep = SPECIALS["cls"], SPECIALS["sep"]
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{cls} $A {sep}", pair=f"{cls} $A:0 {sep}:0 $B:1 {sep}:1",
        special_tokens=[(cls, processor.piece_to_id(cls)), (sep, processor.piece_to_id(sep))],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token=SPECIALS["pad"], unk_token=SPECIALS["unk"], cls_token=cls,
        sep_token=sep, mask_token=SPECIALS["mask"], model_max_length=1 << 20,
        model_input_names=["input_ids", "token_type_ids", "attention_mask"],
    )

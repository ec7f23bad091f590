"""Teacher models: where a stage finds one, how it is loaded frozen, and its masked-LM outputs.

A model role in a config has two fields, exactly one of which is set: `teacher` (an upstream stage such as
"@teacher_adapt", whose model sits in `<stage>/model`) and `teacher_path` (a local or `pkg:` folder).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.config import ConfigError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
"""Teacher precisions a config may name (and "auto": bf16 on a GPU that supports it, fp32 elsewhere)."""

ATTENTION = "sdpa"
"""Attention kernel of every model we load or build: scores the losses need are recomputed from the query/key
projections by `kd.introspect.AttentionCapture`, for the mapped layers only, so no layer runs eager attention."""


def pick_device(name: str, world=None) -> torch.device:
    """The device `name` ("auto", "cpu", "cuda", "cuda:i") means for this process: cuda:LOCAL_RANK for "auto"
    (with a GPU) and "cuda", so several processes on one node take one GPU each; no GPU for "cuda" is a
    ConfigError."""
    from pipeline.train import device

    return device.use(device.resolve(name, world))


def teacher_dtype(name: str, device: torch.device) -> torch.dtype:
    """The dtype of a teacher precision name on `device` ("auto": bf16 on a GPU that supports it, else fp32)."""
    from pipeline.train import device as devices

    return DTYPES[devices.precision(name, device)]


def place(teacher, device: torch.device, dtype: str):
    """A frozen teacher on `device` in precision `dtype`, eval mode, no grad (never given to the engine)."""
    teacher.to(device=device, dtype=teacher_dtype(dtype, device))
    teacher.eval()
    teacher.requires_grad_(False)
    return teacher


def load_masked_lm(folder: Path, *, dtype: str = "fp32", device: str | torch.device = "cpu", frozen: bool = True):
    """`AutoModelForMaskedLM` from a local folder (a missing MLM head is initialised); frozen and in eval mode."""
    import transformers

    transformers.logging.set_verbosity_error()  # "newly initialised head" is expected for encoders
    try:
        model = transformers.AutoModelForMaskedLM.from_pretrained(
            str(folder), dtype=teacher_dtype(dtype, torch.device(device)), attn_implementation=ATTENTION,
            use_safetensors=True)
    except (OSError, ValueError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ConfigError(f"{folder}: cannot load as a masked-LM teacher ({first})") from None
    model.to(device)
    if frozen:
        model.eval()
        model.requires_grad_(False)
    return model


def check_tokenizer(folder: Path, tokenizer: Any, model: Any) -> None:
    """ConfigError when the teacher's own tokenizer (if it has one) or vocab size does not fit the corpus."""
    if model.config.vocab_size < len(tokenizer):
        raise ConfigError(f"{folder}: teacher vocab {model.config.vocab_size} < corpus tokenizer {len(tokenizer)}; "
                          "shard the corpus with the teacher's tokenizer")
    if (Path(folder) / "tokenizer.json").is_file() or (Path(folder) / "vocab.txt").is_file():
        from transformers import AutoTokenizer

        own = AutoTokenizer.from_pretrained(str(folder))
        if own.get_vocab() != tokenizer.get_vocab():
            raise ConfigError(f"{folder}: the teacher's tokenizer differs from the corpus tokenizer; "
                              "shard the corpus with the teacher's tokenizer")


def masked_lm_logits(model: Any, batch: dict[str, torch.Tensor], rows: torch.Tensor, cols: torch.Tensor,
                     *, cls_hidden: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Logits [n, vocab] at (rows, cols) only, and optionally the [CLS] state of every layer [B, layers+1, H].

    BERT-style models run the LM head on the masked positions alone (the head costs about as much as a
    6-layer hidden-384 encoder over the whole vocab); other models fall back to full logits and a gather.
    """
    head = getattr(model, "cls", None)
    if head is not None and getattr(model, "base_model", None) is not model:
        out = model.base_model(**batch, output_hidden_states=cls_hidden)
        logits = head(out.last_hidden_state[rows, cols])
    else:
        out = model(**batch, output_hidden_states=cls_hidden)
        logits = out.logits[rows, cols]
    states = torch.stack([h[:, 0] for h in out.hidden_states], dim=1) if cls_hidden else None
    return logits, states


TARGET_ROWS = 32
"""Rows of logits per pass in `teacher_targets`: 32 x a 30k vocabulary (~4 MB) stays in cache across the
normaliser, top-k and tempered sums, about 1.8x faster on a CPU than whole-batch passes through memory."""


def teacher_targets(logits: torch.Tensor, k: int, uniforms: np.ndarray | None = None, *,
                    sample_temperature: float = 1.0, tail_temperatures: tuple[float, ...] = ()) -> dict[str, np.ndarray]:
    """What the cache keeps of logits [n, vocab]: top-k log-probs (fp16, descending) and ids, tail log-mass,
    with `tail_temperatures` the tempered tail at each of them (`tail_logmass_t`, [n, len]), and with
    `uniforms` [n, s] in [0, 1) that many ids drawn from softmax(logits / sample_temperature), as distinct
    ids with counts. Each row's targets depend on that row alone; rows go through in blocks of TARGET_ROWS.
    """
    parts = [_block_targets(logits[start:start + TARGET_ROWS], k,
                            None if uniforms is None else uniforms[start:start + TARGET_ROWS],
                            sample_temperature, tail_temperatures)
             for start in range(0, max(len(logits), 1), TARGET_ROWS)]
    return {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}


def _block_targets(logits: torch.Tensor, k: int, uniforms: np.ndarray | None, sample_temperature: float,
                   tail_temperatures: tuple[float, ...]) -> dict[str, np.ndarray]:
    scores = logits.float()
    lse = torch.logsumexp(scores, dim=-1, keepdim=True)
    top_scores, top_ids = scores.topk(k, dim=-1, sorted=True)
    top_logp = top_scores - lse
    out = {"topk_ids": top_ids.cpu().numpy(), "topk_logp": top_logp.cpu().numpy().astype(np.float16),
           "tail_logmass": _tail_logmass(scores, lse, top_logp, top_ids)}
    if tail_temperatures:
        out["tail_logmass_t"] = _tempered_tails(scores, lse, top_logp, top_ids, tail_temperatures)
    if uniforms is not None:
        tempered = scores / sample_temperature  # x / 1.0 == x: T=1 draws are the same bytes as before
        cdf = torch.exp(tempered - torch.logsumexp(tempered, dim=-1, keepdim=True)).double().cumsum(dim=-1)
        values = torch.from_numpy(uniforms).to(cdf.device) * cdf[:, -1:]
        draws = torch.searchsorted(cdf, values).clamp_(max=scores.shape[-1] - 1).cpu().numpy()
        out["sampled_ids"], out["sampled_counts"] = _distinct_with_counts(draws)
    return out


def _tempered_tails(scores: torch.Tensor, lse: torch.Tensor, top_logp: torch.Tensor, top_ids: torch.Tensor,
                    temperatures: tuple[float, ...]) -> np.ndarray:
    """[n, len(temperatures)] float32: log sum over the ids outside the top-k of p_v^(1/T), for each T.

    The whole sum less the top-k's, log(e^A - e^B) = A + log1p(-e^(B - A)): one pass over the vocabulary per T.
    Rows whose tail is under TEMPERED_EXACT_BELOW of the tempered mass (where that difference loses precision) sum
    the tail's own terms instead; floored at log of fp32's smallest normal so an empty or underflowing tail
    stays finite (its weight is then below 1e-38 of the top-1's).
    """
    floor = float(np.log(np.finfo(np.float32).tiny))
    tails = []
    for t in temperatures:
        whole = (torch.logsumexp(scores / t, dim=-1) - lse[:, 0] / t).double()
        top = torch.logsumexp(top_logp.double() / t, dim=-1)
        share = (-torch.expm1(top - whole)).clamp_(min=0.0)  # the tail's share of the tempered mass
        tail = whole + torch.log(share)
        tiny = torch.nonzero(share < TEMPERED_EXACT_BELOW).flatten()
        if tiny.numel():
            logp = (scores[tiny] - lse[tiny]) / t
            tail[tiny] = logp.scatter_(-1, top_ids[tiny], -torch.inf).logsumexp(-1).double()
        tails.append(tail.clamp_(min=floor))
    return torch.stack(tails, dim=-1).cpu().numpy().astype(np.float32)


EXACT_TAIL_BELOW = 1e-3
"""Tail mass under which 1 - sum(top-k) is too imprecise and the tail is summed directly."""

TEMPERED_EXACT_BELOW = 1e-2
"""Tempered-tail share under which the fp32 whole-vocabulary sum less the top-k's is too imprecise (its
relative error is ~1e-6 / share) and the tail is summed directly."""


def _tail_logmass(scores: torch.Tensor, lse: torch.Tensor, top_logp: torch.Tensor, top_ids: torch.Tensor) -> np.ndarray:
    """log of the probability mass outside the top-k, to fp32 relative precision.

    1 - sum(top-k) in fp64 is exact to ~1e-7 absolute (the error of the fp32 log-normaliser), which is
    plenty unless the tail is tiny; only those rows pay a second pass over the vocab, summing the small
    probabilities themselves.
    """
    tail = (1.0 - top_logp.double().exp().sum(dim=-1)).clamp_(min=0.0)
    tiny = torch.nonzero(tail < EXACT_TAIL_BELOW).flatten()
    if tiny.numel():
        probs = torch.exp(scores[tiny] - lse[tiny]).scatter_(-1, top_ids[tiny], 0.0)
        tail[tiny] = probs.sum(dim=-1).double()
    return tail.clamp_(min=float(torch.finfo(torch.float32).tiny)).log().cpu().numpy().astype(np.float32)


def _distinct_with_counts(draws: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows of draws [n, s] as ascending distinct ids [n, s] with counts, padded with id 0 and count 0.

    Row-wise `np.unique`, for all rows at once: sort each row, mark where a new id starts, and count runs.
    """
    ordered = np.sort(draws, axis=1)
    starts = np.ones(ordered.shape, dtype=bool)
    starts[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    slot = np.cumsum(starts, axis=1) - 1  # which distinct id of its row each draw belongs to
    rows = np.broadcast_to(np.arange(ordered.shape[0])[:, None], ordered.shape)
    ids = np.zeros_like(draws)
    ids[rows[starts], slot[starts]] = ordered[starts]
    flat = (rows * ordered.shape[1] + slot).ravel()
    counts = np.bincount(flat, minlength=ordered.size).reshape(ordered.shape).astype(np.int64)
    return ids, counts


def masked_forward(teacher, batch: dict[str, torch.Tensor], *, hidden: bool = False):
    """The frozen teacher's logits at the masked positions and (optionally) all hidden states."""
    with torch.no_grad():
        out = teacher.base_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                 token_type_ids=batch["token_type_ids"], output_hidden_states=hidden)
        logits = teacher.cls(out.last_hidden_state[batch["rows"], batch["cols"]])
    return logits.float(), (out.hidden_states if hidden else None)


def masked_logits(teacher, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The teacher's logits at the masked positions."""
    return masked_forward(teacher, batch)[0]

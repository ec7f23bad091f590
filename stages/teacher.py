"""Teacher models: where a stage finds one, how it is loaded frozen, and its masked-LM outputs.

A model role in a config has two fields, exactly one of which is set: `teacher` (an upstream stage such as
"@teacher_adapt", whose model sits in `<stage>/model`) and `teacher_path` (a local or `pkg:` folder).
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.assets import resolve_asset
from pipeline.config import ConfigError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
"""Teacher precisions a config may name."""
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt")


def check_model_fields(ref: str | None, path: str | None, role: str = "teacher") -> None:
    """ValueError unless exactly one of `<role>` (upstream stage) and `<role>_path` (folder) is set."""
    if (ref is None) == (path is None):
        raise ValueError(f"set exactly one of {role} (an upstream stage, e.g. \"@teacher_adapt\") "
                         f"and {role}_path (a local or pkg: folder)")


def model_dir(ctx: Any, ref: str | None, path: str | None, role: str = "teacher") -> Path:
    """The folder holding the model of a role: the upstream stage's `model_dir`, or the resolved path."""
    if ref is not None:
        upstream = ctx.input_manifest(role)
        return ctx.input_dir(role) / upstream.extra.get("model_dir", "model")
    return resolve_asset(path)


def default_teacher_id(ref: str | None, path: str | None) -> str:
    """A readable id from the config: the upstream stage name, else the model folder's package or name."""
    if ref is not None:
        text = ref.lstrip("@").rstrip("/")
    elif path.startswith("pkg:"):
        text = path[4:].split("/")[0]
    else:
        text = Path(path).name
    return re.sub(r"[^A-Za-z0-9_.-]", "_", text) or "teacher"


def weights_sha256(folder: Path) -> str:
    """One sha256 over the model's weight files (name and content hash of each, sorted)."""
    from pipeline.manifest import sha256_file

    files = sorted(p for p in Path(folder).iterdir() if p.suffix in WEIGHT_SUFFIXES and p.is_file())
    if not files:
        raise ConfigError(f"{folder}: no weight files (*.safetensors) in the teacher folder")
    digest = hashlib.sha256()
    for f in files:
        digest.update(f"{f.name}:{sha256_file(f)}\n".encode())
    return digest.hexdigest()


def pick_device(name: str) -> torch.device:
    """"auto" is the GPU when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r}: no GPU visible here (use device: cpu or auto)")
    return torch.device(name)


def load_masked_lm(folder: Path, *, dtype: str = "fp32", device: str | torch.device = "cpu", frozen: bool = True):
    """`AutoModelForMaskedLM` from a local folder (a missing MLM head is initialised); frozen and in eval mode."""
    import transformers

    transformers.logging.set_verbosity_error()  # "newly initialised head" is expected for encoders
    try:
        model = transformers.AutoModelForMaskedLM.from_pretrained(
            str(folder), dtype=DTYPES[dtype], attn_implementation="eager", use_safetensors=True)
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


def teacher_targets(logits: torch.Tensor, k: int, uniforms: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """What the cache keeps of logits [n, vocab]: top-k log-probs (fp16, descending) and ids, tail log-mass,
    and with `uniforms` [n, s] in [0, 1) that many ids drawn from the softmax, as distinct ids with counts.

    """
    scores = logits.float()
    lse = torch.logsumexp(scores, dim=-1, keepdim=True)
    top_scores, top_ids = scores.topk(k, dim=-1, sorted=True)
    top_logp = top_scores - lse
    out = {"topk_ids": top_ids.cpu().numpy(), "topk_logp": top_logp.cpu().numpy().astype(np.float16),
           "tail_logmass": _tail_logmass(scores, lse, top_logp, top_ids)}
    if uniforms is not None:
        cdf = torch.exp(scores - lse).double().cumsum(dim=-1)
        values = torch.from_numpy(uniforms).to(cdf.device) * cdf[:, -1:]
        draws = torch.searchsorted(cdf, values).clamp_(max=scores.shape[-1] - 1).cpu().numpy()
        out["sampled_ids"], out["sampled_counts"] = _distinct_with_counts(draws)
    return out


EXACT_TAIL_BELOW = 1e-3
"""Tail mass under which 1 - sum(top-k) is too imprecise and the tail is summed directly."""


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
    """Rows of draws [n, s] as ascending distinct ids [n, s] with counts, padded with id 0 and count 0."""
    ids = np.zeros_like(draws)
    counts = np.zeros(draws.shape, dtype=np.int64)
    for row, values in enumerate(draws):
        unique, count = np.unique(values, return_counts=True)
        ids[row, :unique.size], counts[row, :unique.size] = unique, count
    return ids, counts


def _length_batches(lengths: np.ndarray, batch_tokens: int) -> list[np.ndarray]:
    """Indices grouped into batches of similar length, each at most `batch_tokens` padded tokens."""
    order = np.argsort(lengths, kind="stable")
    batches, current = [], []
    for i in order:
        if current and (len(current) + 1) * lengths[i] > batch_tokens:
            batches.append(np.array(current))
            current = []
        current.append(i)
    return batches + ([np.array(current)] if current else [])


def _pad(arrays: list[np.ndarray], value: int, device) -> torch.Tensor:
    longest = max(a.size for a in arrays)
    out = np.full((len(arrays), longest), value, dtype=np.int64)
    for row, a in enumerate(arrays):
        out[row, :a.size] = a
    return torch.from_numpy(out).to(device)


@torch.inference_mode()
def shard_records(samples: list, masker: Any, model: Any, config: Any, *, device, pad_id: int,
                  vocab_size: int) -> tuple[list, dict]:
    """Cache records (in corpus order) and integer stats for one corpus shard's samples."""
    from stages.cache_format import CacheRecord
    from stages.masking import sample_rng

    masked = [masker(s) for s in samples]
    found: dict[int, dict] = {}
    for batch in _length_batches(np.array([m.input_ids.size for m in masked]), config.batch_tokens):
        group = [masked[i] for i in batch]
        ids = _pad([m.input_ids for m in group], pad_id, device)
        types = _pad([m.token_type_ids if m.token_type_ids is not None else np.zeros(m.input_ids.size, np.int64)
                      for m in group], 0, device)
        rows = torch.from_numpy(np.concatenate([np.full(m.positions.size, r) for r, m in enumerate(group)])).to(device)
        cols = torch.from_numpy(np.concatenate([m.positions for m in group])).to(device)
        batch_inputs = {"input_ids": ids, "attention_mask": _attention(group, ids), "token_type_ids": types}
        logits, cls = masked_lm_logits(model, batch_inputs,
                                       rows, cols, cls_hidden=config.cls_hidden)
        uniforms = None
        if config.sampled:
            uniforms = np.concatenate([sample_rng(masker.spec.mask_seed, m.key, "sampled").random((m.positions.size, config.sampled))
                                       for m in group])
        targets = teacher_targets(logits[:, :vocab_size], config.k, uniforms)
        bounds = np.concatenate([[0], np.cumsum([m.positions.size for m in group])])
        for r, i in enumerate(batch):
            part = {name: value[bounds[r]:bounds[r + 1]] for name, value in targets.items()}
            if cls is not None:
                part["cls_hidden"] = cls[r].float().cpu().numpy().astype(np.float16)
            found[int(i)] = part
    records = [CacheRecord(key=m.key, positions=m.positions, **found[i]) for i, m in enumerate(masked)]
    stats = {"samples": len(records), "tokens": int(sum(s.input_ids.size for s in samples)),
             "masked": int(sum(m.positions.size for m in masked)),
             "top1_correct": int(sum((r.topk_ids[:, 0] == m.labels).sum() for r, m in zip(records, masked)))}
    return records, stats


def _attention(group: list, ids: torch.Tensor) -> torch.Tensor:
    """1 on each sample's real tokens, 0 on padding (by length, since a masked input may hold pad ids)."""
    lengths = torch.tensor([m.input_ids.size for m in group], device=ids.device)
    return (torch.arange(ids.shape[1], device=ids.device)[None, :] < lengths[:, None]).long()

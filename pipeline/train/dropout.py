"""Dropout with cheaper masks for CPU training: one 16-bit draw per element, four to a 64-bit random number.

Why: on the CPU, torch's `bernoulli_` draws one random number per element in a single thread, and dropout
forces scaled-dot-product attention onto its math path, which draws its own masks the same way. In the
general bench's student step that was 41 ms of about 0.5 s. `torch.randint` fills 64-bit numbers four times
faster per element, and a 16-bit threshold keeps each element with probability 1 - p to within 2^-16.

`use_fast_dropout(model)` swaps every `nn.Dropout` of `model` for `FastDropout` with the same `p` and points its
transformers at the "distill_sdpa" attention: SDPA itself when nothing is dropped (evaluation, p = 0) or off
the CPU, else the same math with a `fast_dropout` mask. Saved models are unaffected (dropout has no weights,
and the attention implementation is not written to config.json).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

ATTENTION = "distill_sdpa"
_LEVELS = 1 << 16


def keep_mask(shape: torch.Size, p: float, device: torch.device) -> Tensor:
    """A bool mask of `shape`, each element True with probability 1 - round(p * 2^16) / 2^16, from the default
    generator of `device` (seeded and checkpointed like every other draw)."""
    count = shape.numel()
    words = torch.randint(-(1 << 63), (1 << 63) - 1, ((count + 3) // 4,), dtype=torch.int64, device=device)
    draws = words.view(torch.int16)[:count].view(shape)
    return draws >= round(p * _LEVELS) - _LEVELS // 2


class _Dropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, p: float) -> Tensor:
        keep = keep_mask(x.shape, p, x.device)
        scale = _LEVELS / (_LEVELS - round(p * _LEVELS))  # 1 / (1 - p) for the p the mask draws
        ctx.save_for_backward(keep)
        ctx.scale = scale
        return x * keep * scale

    @staticmethod
    def backward(ctx, grad: Tensor):
        (keep,) = ctx.saved_tensors
        return grad * keep * ctx.scale, None


def fast_dropout(x: Tensor, p: float, training: bool = True) -> Tensor:
    """Inverted dropout of `x` with a `keep_mask`; identity when not training or p == 0."""
    if not training or p == 0.0:
        return x
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability must be in [0, 1), got {p}")
    return _Dropout.apply(x, p)


class FastDropout(nn.Dropout):
    """`nn.Dropout` (same `p`, same `training` switch) drawing its mask with `keep_mask`."""

    def forward(self, x: Tensor) -> Tensor:
        return fast_dropout(x, self.p, self.training)


def attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
              dropout: float = 0.0, scaling: float | None = None, **kwargs):
    """The transformers attention interface: SDPA unless it would drop on the CPU, then its math with
    `fast_dropout` on the probabilities. Returns ([B, L, heads, head_size], None) like SDPA's."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if dropout == 0.0 or query.device.type != "cpu":
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    scores = query @ key.transpose(-1, -2) * (query.shape[-1] ** -0.5 if scaling is None else scaling)
    if attention_mask is not None:
        scores = scores + attention_mask if attention_mask.dtype != torch.bool \
            else scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
    probs = fast_dropout(torch.softmax(scores, dim=-1), dropout)
    return (probs @ value).transpose(1, 2).contiguous(), None


def _register() -> None:
    """The attention function, and SDPA's mask builder under the same name: transformers builds no padding mask
    at all for an attention implementation that has no mask function registered."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    AttentionInterface.register(ATTENTION, attention)
    AttentionMaskInterface.register(ATTENTION, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])


def use_fast_dropout(model: nn.Module) -> nn.Module:
    """Swap `model`'s dropout modules for `FastDropout` and its SDPA transformers for "distill_sdpa", in place.
    Transformers on another attention implementation (eager, flash) keep it; returns `model`."""
    _register()
    for parent in model.modules():
        for name, child in list(parent.named_children()):
            if type(child) is nn.Dropout:
                setattr(parent, name, FastDropout(child.p, inplace=child.inplace))
    for sub in model.modules():
        config = getattr(sub, "config", None)
        if getattr(config, "_attn_implementation", None) == "sdpa" and hasattr(sub, "set_attn_implementation"):
            sub.set_attn_implementation(ATTENTION)
    return model

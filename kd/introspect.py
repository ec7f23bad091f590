"""Capture what TinyBERT and MiniLM losses need from a Hugging Face BERT without editing its code.

Forward hooks on each layer's query/key(/value) `nn.Linear` record their outputs; the pre-softmax scores
QK^T/sqrt(d) are recomputed from them. This works whatever attention kernel the model runs (eager, SDPA,
flash), so the student can keep the fast kernel, and the captured tensors stay in the autograd graph, so a
loss on the student's scores trains it.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def _self_attentions(bert_model: nn.Module) -> list[nn.Module]:
    """The self-attention module of every layer of a BertModel or a model wrapping one."""
    base = getattr(bert_model, "base_model", bert_model)
    encoder = getattr(base, "encoder", None)
    if encoder is None or not hasattr(encoder, "layer"):
        raise ValueError(f"{type(bert_model).__name__} is not a BERT-style model (no encoder.layer)")
    return [layer.attention.self for layer in encoder.layer]


class AttentionCapture:
    """Context manager recording each layer's query/key (and value) projections during forward passes.

    with AttentionCapture(model, keep_qkv=True) as capture:
        model(input_ids, attention_mask=mask)
        scores = capture.scores(mask)      # per layer [B, h, L, L]
        q, k, v = capture.qkv[-1]          # last layer, each [B, L, width]

    Each forward pass overwrites the previous one's tensors; the hooks are removed on exit. With `layers`
    (0-based layer indices) only those layers are hooked and `scores`/`qkv` cover only them, in ascending
    order: a loss on some layers pays for their scores alone, and the model keeps its SDPA kernel throughout.
    """

    def __init__(self, bert_model: nn.Module, *, keep_qkv: bool = False, layers=None):
        every = _self_attentions(bert_model)
        self.layers = sorted(set(range(len(every)) if layers is None else layers))
        if any(not 0 <= i < len(every) for i in self.layers):
            raise ValueError(f"layers {self.layers}: the model has {len(every)} layers (0-based indices)")
        self._attentions = [every[i] for i in self.layers]
        self._keep_qkv = keep_qkv
        self._handles: list = []
        self._outputs: list[dict[str, Tensor]] = [{} for _ in self._attentions]

    def __enter__(self) -> "AttentionCapture":
        names = ("query", "key", "value") if self._keep_qkv else ("query", "key")
        for store, attention in zip(self._outputs, self._attentions):
            for name in names:
                self._handles.append(getattr(attention, name).register_forward_hook(self._recorder(store, name)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    @staticmethod
    def _recorder(store: dict, name: str):
        def hook(module, inputs, output):
            store[name] = output
        return hook

    def _recorded(self, index: int, name: str) -> Tensor:
        try:
            return self._outputs[index][name]
        except KeyError:
            raise RuntimeError("AttentionCapture: no forward pass recorded yet (run the model inside `with`)") from None

    @property
    def num_heads(self) -> list[int]:
        """Attention heads of each layer."""
        return [attention.num_attention_heads for attention in self._attentions]

    def scores(self, attention_mask: Tensor | None = None) -> list[Tensor]:
        """Pre-softmax attention scores QK^T/sqrt(d) of every hooked layer, [B, h, L, L].

        With `attention_mask` ([B, L], 1 for real tokens) the padded keys hold the dtype's minimum, as in
        Hugging Face's eager attention, so softmax of these scores is its attention probabilities.
        """
        return [self.score(layer, attention_mask) for layer in self.layers]

    def score(self, layer: int, attention_mask: Tensor | None = None) -> Tensor:
        """The scores of one hooked layer (0-based index in the model), computed only when asked."""
        if layer not in self.layers:
            raise ValueError(f"layer {layer} is not hooked (hooked: {self.layers})")
        index = self.layers.index(layer)
        attention = self._attentions[index]
        q, k = self._recorded(index, "query"), self._recorded(index, "key")
        heads, size = attention.num_attention_heads, attention.attention_head_size
        qh = q.view(*q.shape[:2], heads, size).transpose(1, 2)
        kh = k.view(*k.shape[:2], heads, size).transpose(1, 2)
        layer_scores = qh @ kh.transpose(-1, -2) / math.sqrt(size)
        if attention_mask is not None:
            padded = ~attention_mask.bool()[:, None, None, :]
            layer_scores = layer_scores.masked_fill(padded, torch.finfo(layer_scores.dtype).min)
        return layer_scores

    @property
    def qkv(self) -> list[tuple[Tensor, Tensor, Tensor]]:
        """(query, key, value) projections per layer, each [B, L, width]; needs keep_qkv=True."""
        if not self._keep_qkv:
            raise RuntimeError("AttentionCapture: qkv needs keep_qkv=True")
        return [tuple(self._recorded(i, name) for name in ("query", "key", "value"))
                for i in range(len(self._attentions))]

"""Head and FFN-neuron importance, rewiring and structured cutting of a BERT classifier.

Importance (Michel et al. 2019, "Are sixteen heads really better than one?"; DynaBERT, Hou et al. 2020,
sec. 3.1): a mask of ones multiplies every attention head's output and every FFN neuron's activation; the
importance of a head or neuron is |d loss / d mask| accumulated over batches, i.e. how much the loss would
move if that unit were scaled away. The masks are forward pre-hooks on the two projections that read the
heads (`attention.output.dense`) and the neurons (`output.dense`), so any attention kernel works.

`reorder` permutes each layer's heads and neurons so the most important come first (DynaBERT's network
rewiring); the function the model computes is unchanged. `shrink` keeps chosen heads, neurons and layers.

`activation_importance` needs no loss and no gradient (Minitron, Muralidharan et al. 2024, "Compact Language
Models via Pruning and Knowledge Distillation", sec. 2.2): a hidden (residual) channel's importance is the mean
|LayerNorm output| in that channel, summed over every LayerNorm (embeddings' and each layer's two); a head's is
the mean L2 norm of its attention output (the input of `attention.output.dense`); an FFN neuron's the mean
|activation| (the input of `output.dense`). Means are over the non-padding tokens. `top_indices` keeps the
highest-scoring ones in ascending index order, so a student cut with them keeps the teacher's layout.

A limit of plain Hugging Face BERT, stated once here: the attention width is tied to the hidden width
(head size = hidden_size / num_attention_heads), so a BERT cannot have fewer heads than hidden_size / head
size without changing its hidden size. `shrink` therefore cuts FFN neurons and layers into real smaller
matrices, but a dropped head stays in place with zero query/key/value weights and a zero output block: it
contributes exactly nothing, the folder loads anywhere, yet its attention FLOPs remain. FFN widths must be
uniform across layers as well (one `intermediate_size`): when the kept counts differ, every layer is cut to
the largest count and the shorter layers are padded with zero neurons (gelu(0) = 0: again exact).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from torch import nn


def encoder_layers(model: nn.Module) -> nn.ModuleList:
    """The transformer layers of a BERT model or of a model built on one (`base_model`)."""
    return getattr(model, "base_model", model).encoder.layer


def head_size(model: nn.Module) -> int:
    """Features per attention head."""
    return model.config.hidden_size // model.config.num_attention_heads


def _scale_input(mask: torch.Tensor, groups: int):
    """A forward pre-hook multiplying the last input dimension by `mask` repeated over `groups` features."""
    def hook(_module, args):
        x = args[0]
        return (x * mask.repeat_interleave(groups).to(x.dtype),) + tuple(args[1:])
    return hook


def head_neuron_importance(model: nn.Module, batches: Iterable, loss_fn: Callable) -> tuple[torch.Tensor, torch.Tensor]:
    """(heads [L, H], neurons [L, I]): |d loss / d mask| summed over `batches` (dicts of model inputs).

    `loss_fn(output, batch)` returns the scalar loss of one batch (the task loss for DynaBERT). The model is run
    in eval mode (no dropout) on the device its parameters are on; its weights and training mode are restored
    and no parameter gradient is left behind.
    """
    layers = encoder_layers(model)
    param = next(model.parameters())
    count, heads, d = len(layers), model.config.num_attention_heads, head_size(model)
    neurons = layers[0].intermediate.dense.out_features
    head_mask = torch.ones(count, heads, device=param.device, dtype=param.dtype, requires_grad=True)
    neuron_mask = torch.ones(count, neurons, device=param.device, dtype=param.dtype, requires_grad=True)
    hooks = []
    for i, layer in enumerate(layers):
        hooks.append(layer.attention.output.dense.register_forward_pre_hook(_scale_input(head_mask[i], d)))
        hooks.append(layer.output.dense.register_forward_pre_hook(_scale_input(neuron_mask[i], 1)))
    head_total, neuron_total = torch.zeros_like(head_mask), torch.zeros_like(neuron_mask)
    was_training, wanted = model.training, {p: p.requires_grad for p in model.parameters()}
    model.eval()
    try:
        for p in model.parameters():
            p.requires_grad_(False)  # gradients of the masks only
        for batch in batches:
            batch = {k: v.to(param.device) if torch.is_tensor(v) else v for k, v in batch.items()}
            inputs = {k: v for k, v in batch.items() if k != "labels"}
            loss = loss_fn(model(**inputs), batch)
            g_heads, g_neurons = torch.autograd.grad(loss, (head_mask, neuron_mask))
            head_total += g_heads.abs()
            neuron_total += g_neurons.abs()
    finally:
        for h in hooks:
            h.remove()
        for p, flag in wanted.items():
            p.requires_grad_(flag)
        model.train(was_training)
    return head_total.detach(), neuron_total.detach()


@dataclass(frozen=True)
class ActivationImportance:
    """Minitron's activation-based scores of a BERT: hidden channels [H], heads [L, heads], neurons [L, I]."""

    channels: torch.Tensor
    heads: torch.Tensor
    neurons: torch.Tensor


def activation_importance(model: nn.Module, batches: Iterable) -> ActivationImportance:
    """Mean activation magnitudes over the non-padding tokens of `batches` (dicts with `input_ids` and optionally
    `attention_mask`, `token_type_ids`); the model runs in eval mode without gradients, its mode is restored."""
    base = getattr(model, "base_model", model)
    layers, d = base.encoder.layer, head_size(model)
    heads = model.config.num_attention_heads
    norms = [base.embeddings.LayerNorm] + [n for layer in layers
                                            for n in (layer.attention.output.LayerNorm, layer.output.LayerNorm)]
    param = next(model.parameters())
    channels = torch.zeros(model.config.hidden_size, dtype=torch.float64)
    head_sum = torch.zeros(len(layers), heads, dtype=torch.float64)
    neuron_sum = torch.zeros(len(layers), layers[0].intermediate.dense.out_features, dtype=torch.float64)
    valid: list[torch.Tensor] = []  # this batch's [B, S, 1] token mask, read by the hooks

    def masked_sum(x: torch.Tensor) -> torch.Tensor:  # [B, S, ...] -> [...], padding left out
        mask = valid[0].reshape(valid[0].shape + (1,) * (x.dim() - 3))
        return (x.double() * mask).sum(dim=(0, 1)).cpu()

    def add_channels(_module, _args, out):
        channels.add_(masked_sum(out.abs()))

    def add_heads(i):
        def hook(_module, args):
            x = args[0]
            head_sum[i] += masked_sum(x.reshape(*x.shape[:2], heads, d).norm(dim=-1))
        return hook

    def add_neurons(i):
        def hook(_module, args):
            neuron_sum[i] += masked_sum(args[0].abs())
        return hook

    hooks = [n.register_forward_hook(add_channels) for n in norms]
    for i, layer in enumerate(layers):
        hooks.append(layer.attention.output.dense.register_forward_pre_hook(add_heads(i)))
        hooks.append(layer.output.dense.register_forward_pre_hook(add_neurons(i)))
    tokens, was_training = 0, model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in batches:
                ids = batch["input_ids"].to(param.device)
                mask = batch.get("attention_mask")
                mask = torch.ones_like(ids) if mask is None else mask.to(param.device)
                types = batch.get("token_type_ids")
                valid[:] = [mask[..., None].double()]
                base(input_ids=ids, attention_mask=mask,
                     token_type_ids=None if types is None else types.to(param.device))
                tokens += int(mask.sum())
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    if tokens == 0:
        raise ValueError("activation importance needs at least one non-padding token")
    return ActivationImportance(channels=channels / tokens, heads=head_sum / tokens, neurons=neuron_sum / tokens)


def top_indices(scores: torch.Tensor, count: int) -> torch.Tensor:
    """The `count` highest-scoring indices, ascending (ties keep the lower index: a stable sort)."""
    if not 1 <= count <= scores.numel():
        raise ValueError(f"cannot keep {count} of {scores.numel()}")
    order = torch.sort(scores.detach().cpu(), descending=True, stable=True).indices
    return torch.sort(order[:count]).values


def head_rows(order: torch.Tensor, d: int) -> torch.Tensor:
    """Feature indices of the heads in `order` (each head is `d` consecutive features)."""
    return (order[:, None] * d + torch.arange(d, device=order.device)).reshape(-1)


def _take(linear: nn.Linear, index: torch.Tensor, dim: int) -> None:
    """Keep (and order) `index` along output rows (dim 0, with the bias) or input columns (dim 1), in place."""
    with torch.no_grad():
        index = index.to(linear.weight.device)
        linear.weight = nn.Parameter(linear.weight.index_select(dim, index).contiguous(),
                                     requires_grad=linear.weight.requires_grad)
        if dim == 0 and linear.bias is not None:
            linear.bias = nn.Parameter(linear.bias.index_select(0, index).contiguous(),
                                       requires_grad=linear.bias.requires_grad)
        linear.out_features, linear.in_features = linear.weight.shape


def _select_heads(layer: nn.Module, rows: torch.Tensor) -> None:
    attn = layer.attention.self
    for proj in (attn.query, attn.key, attn.value):
        _take(proj, rows, 0)
    _take(layer.attention.output.dense, rows, 1)


def _select_neurons(layer: nn.Module, index: torch.Tensor) -> None:
    _take(layer.intermediate.dense, index, 0)
    _take(layer.output.dense, index, 1)


def reorder(model: nn.Module, heads: torch.Tensor, neurons: torch.Tensor) -> None:
    """Permute every layer's heads and FFN neurons in place, most important (largest score) first.

    `heads` [L, H] and `neurons` [L, I] are importance scores (`head_neuron_importance`). Ties keep their
    original order (a stable sort), so equal scores leave the model as it is.
    """
    d = head_size(model)
    for i, layer in enumerate(encoder_layers(model)):
        head_order = torch.sort(heads[i].detach().cpu(), descending=True, stable=True).indices
        _select_heads(layer, head_rows(head_order, d))
        neuron_order = torch.sort(neurons[i].detach().cpu(), descending=True, stable=True).indices
        _select_neurons(layer, neuron_order)


def _zero_dropped_heads(layer: nn.Module, kept: list[int], total: int, d: int) -> None:
    """Heads not in `kept` contribute nothing: zero value rows (and q/k, so no stale weights are shipped)."""
    dropped = [h for h in range(total) if h not in set(kept)]
    if not dropped:
        return
    rows = head_rows(torch.tensor(dropped), d)
    attn = layer.attention.self
    with torch.no_grad():
        for proj in (attn.query, attn.key, attn.value):
            proj.weight[rows] = 0
            proj.bias[rows] = 0
        layer.attention.output.dense.weight[:, rows] = 0


def _pad_neurons(layer: nn.Module, keep: list[int], width: int) -> None:
    """Cut the FFN to `keep`, then pad with zero neurons up to `width` (uniform intermediate_size)."""
    index = torch.tensor(keep + [keep[0] if keep else 0] * (width - len(keep)), dtype=torch.long)
    _select_neurons(layer, index)
    if width > len(keep):
        with torch.no_grad():
            layer.intermediate.dense.weight[len(keep):] = 0
            layer.intermediate.dense.bias[len(keep):] = 0
            layer.output.dense.weight[:, len(keep):] = 0


def shrink(model: nn.Module, heads: list[list[int]], neurons: list[list[int]], layers: list[int] | None = None):
    """A smaller copy of `model` keeping, per layer, the heads `heads[i]` and FFN neurons `neurons[i]`, and only the
    `layers` (0-based, in order; default all). `heads` / `neurons` are indexed by the ORIGINAL layer index.

    FFN neurons and layers become smaller matrices and `config` follows (`intermediate_size`,
    `num_hidden_layers`); dropped heads are zeroed in place because HF BERT ties head count to hidden size,
    and uneven neuron counts are zero-padded to the largest (see the module docstring). `model` is unchanged.
    """
    source_layers = encoder_layers(model)
    count = len(source_layers)
    layers = list(range(count)) if layers is None else list(layers)
    if len(heads) != count or len(neurons) != count:
        raise ValueError(f"heads and neurons need one list per layer ({count}), got {len(heads)} and {len(neurons)}")
    if not layers or any(not 0 <= i < count for i in layers) or len(set(layers)) != len(layers):
        raise ValueError(f"layers must be distinct indices in 0..{count - 1}, got {layers}")
    total, d = model.config.num_attention_heads, head_size(model)
    for i in layers:
        if not heads[i] or any(not 0 <= h < total for h in heads[i]):
            raise ValueError(f"layer {i}: heads must be a non-empty list of indices in 0..{total - 1}, got {heads[i]}")
        neurons_total = source_layers[i].intermediate.dense.out_features
        if any(not 0 <= n < neurons_total for n in neurons[i]):
            raise ValueError(f"layer {i}: neurons must be indices in 0..{neurons_total - 1}")
    small = copy.deepcopy(model)
    kept = nn.ModuleList([encoder_layers(small)[i] for i in layers])
    getattr(small, "base_model", small).encoder.layer = kept
    width = max(len(neurons[i]) for i in layers)
    if width == 0:
        raise ValueError("neurons: every kept layer has an empty FFN; keep at least one neuron somewhere")
    for layer, i in zip(kept, layers):
        _zero_dropped_heads(layer, heads[i], total, d)
        _pad_neurons(layer, list(neurons[i]), width)
    small.config.num_hidden_layers = len(layers)
    small.config.intermediate_size = width
    for j, layer in enumerate(kept):  # a cache (decoder use) indexes layers by position
        layer.attention.self.layer_idx = j
    return small

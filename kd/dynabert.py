"""DynaBERT (Hou et al. 2020): one BERT classifier whose width and depth can be cut at chosen multipliers.

After rewiring (`kd.importance.reorder`: most important heads and FFN neurons first), the sub-network at
width multiplier w keeps the first round(w*H) heads and round(w*I) FFN neurons of every layer, and at depth
multiplier d keeps round(d*L) layers, dropping them in the paper's LayerDrop-style "every other" pattern:
layer floor(i / d) for i = 0 .. round(d*L)-1 (d = 0.5 keeps 0, 2, 4, ...; d = 0.75 drops every fourth).

`forward(model, width, depth, **inputs)` runs that sub-network by slicing: the kept layers are a view of the
model's own layers and the kept heads / neurons are leading slices of its own weights passed through
`torch.func.functional_call`, so Hugging Face's forward runs on genuinely smaller matrices and gradients
reach the shared weights. `cut(model, width, depth)` is the same sub-network as a standalone plain BERT
(`kd.importance.shrink`). Both are tensors in, tensors out and device-agnostic.

Training losses are the paper's: soft cross-entropy of the logits, and MSE of the embeddings and of every
kept layer's hidden state against the teacher's layer it stands for (regression tasks: MSE of the outputs).
"""

from __future__ import annotations

import copy
import math
from typing import NamedTuple

import torch
from torch import nn
from torch.func import functional_call

from kd import losses
from kd.importance import encoder_layers, head_size, shrink


def kept_layers(num_layers: int, depth: float) -> list[int]:
    """0-based indices of the layers the depth multiplier keeps (the paper's pattern, see the module doc)."""
    count = max(1, math.floor(depth * num_layers + 0.5))
    return [min(num_layers - 1, math.floor(i / depth + 1e-9)) for i in range(count)]


def kept_units(total: int, width: float) -> int:
    """How many heads (or FFN neurons) of `total` the width multiplier keeps (at least one)."""
    return max(1, math.floor(width * total + 0.5))


def _view(model: nn.Module, layers: list[int]) -> nn.Module:
    """A shallow copy of `model` whose encoder holds only `layers`: same parameter objects, nothing copied."""
    def shallow(module):
        twin = copy.copy(module)
        twin._modules = dict(module._modules)  # own child table, so re-pointing a child leaves `module` alone
        return twin

    view, prefix = shallow(model), model.base_model_prefix
    base = shallow(model.base_model)
    encoder = shallow(base.encoder)
    encoder.layer = nn.ModuleList([model.base_model.encoder.layer[i] for i in layers])
    base.encoder = encoder
    view._modules[prefix] = base
    return view


def _sliced(model: nn.Module, layers: list[int], heads: int, neurons: int) -> dict[str, torch.Tensor]:
    """Leading slices of the kept layers' attention and FFN weights, named as in the view of `layers`."""
    rows = heads * head_size(model)
    out, prefix = {}, model.base_model_prefix
    full = encoder_layers(model)
    for j, i in enumerate(layers):
        layer, name = full[i], f"{prefix}.encoder.layer.{j}."
        for proj in ("query", "key", "value"):
            linear = getattr(layer.attention.self, proj)
            out[f"{name}attention.self.{proj}.weight"] = linear.weight[:rows]
            out[f"{name}attention.self.{proj}.bias"] = linear.bias[:rows]
        out[f"{name}attention.output.dense.weight"] = layer.attention.output.dense.weight[:, :rows]
        out[f"{name}intermediate.dense.weight"] = layer.intermediate.dense.weight[:neurons]
        out[f"{name}intermediate.dense.bias"] = layer.intermediate.dense.bias[:neurons]
        out[f"{name}output.dense.weight"] = layer.output.dense.weight[:, :neurons]
    return out


class Output(NamedTuple):
    """A sub-network's logits and, when asked, its embeddings and each kept layer's output."""

    logits: torch.Tensor
    hidden_states: list[torch.Tensor] | None


def _recording(model: nn.Module, layers: list[int], into: list) -> list:
    """Forward hooks appending the embeddings and the kept layers' outputs to `into` (our own hooks, not
    `output_hidden_states`: transformers installs its capture hooks once per model object, and the views
    here are new objects over the same layers)."""
    def keep(_module, _args, output):
        into.append(output[0] if isinstance(output, tuple) else output)

    base = model.base_model
    return [base.embeddings.register_forward_hook(keep)] + \
        [base.encoder.layer[i].register_forward_hook(keep) for i in layers]


def forward(model: nn.Module, width: float, depth: float, *, hidden: bool = False, **inputs) -> Output:
    """The model's output at (width, depth), by slicing its weights; `hidden` also records the hidden states."""
    layers = kept_layers(len(encoder_layers(model)), depth)
    states: list[torch.Tensor] = []
    hooks = _recording(model, layers, states) if hidden else []
    try:
        if width == 1.0 and depth == 1.0:
            logits = model(**inputs).logits
        else:
            heads = kept_units(model.config.num_attention_heads, width)
            neurons = kept_units(encoder_layers(model)[0].intermediate.dense.out_features, width)
            logits = functional_call(_view(model, layers), _sliced(model, layers, heads, neurons), args=(),
                                     kwargs=inputs, strict=False).logits
    finally:
        for h in hooks:
            h.remove()
    return Output(logits, states if hidden else None)


def cut(model: nn.Module, width: float, depth: float) -> nn.Module:
    """The sub-network at (width, depth) as a standalone plain BERT (a copy; `model` is unchanged)."""
    count = len(encoder_layers(model))
    heads = list(range(kept_units(model.config.num_attention_heads, width)))
    neurons = list(range(kept_units(encoder_layers(model)[0].intermediate.dense.out_features, width)))
    return shrink(model, [heads] * count, [neurons] * count, kept_layers(count, depth))


def distill_loss(student_out, teacher_logits: torch.Tensor, teacher_hidden: list[torch.Tensor], layers: list[int],
                 mask: torch.Tensor, *, temperature: float = 1.0, regression: bool = False) -> dict[str, torch.Tensor]:
    """DynaBERT's loss of one sub-network: {logits, hidden, total}. `teacher_hidden` is the teacher's embeddings
    and every layer's output (hidden_states of a full-depth model); the student's j-th kept layer, `layers[j]`,
    learns the teacher's layer `layers[j]`, its embeddings the teacher's embeddings."""
    if regression:
        logit_loss = nn.functional.mse_loss(student_out.logits.float(), teacher_logits.float())
    else:
        logit_loss = losses.task_soft_ce(student_out.logits, teacher_logits, temperature)
    hidden = losses.hidden_mse(student_out.hidden_states[0], teacher_hidden[0], mask)
    for j, i in enumerate(layers):
        hidden = hidden + losses.hidden_mse(student_out.hidden_states[j + 1], teacher_hidden[i + 1], mask)
    return {"logits": logit_loss, "hidden": hidden, "total": logit_loss + hidden}


def teacher_targets(teacher: nn.Module, width: float, **inputs) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(logits, embeddings + every layer's output) of a frozen teacher at `width` and full depth, no gradient."""
    with torch.no_grad():
        out = forward(teacher, width, 1.0, hidden=True, **inputs)
    return out.logits.detach(), [h.detach() for h in out.hidden_states]


def grid_loss(student: nn.Module, grid: list[tuple[float, float]], targets: dict, *, temperature: float = 1.0,
              regression: bool = False, **inputs) -> dict[str, torch.Tensor]:
    """The summed DynaBERT loss of every (width, depth) sub-network of `grid` on one batch, with its parts.

    `targets[width]` is the teacher's (logits, hidden states) for that width (`teacher_targets`); summing the
    sub-networks' losses before one backward gives the gradients DynaBERT accumulates one sub-network at a time.
    """
    count = len(encoder_layers(student))
    parts = {"logits": 0.0, "hidden": 0.0, "total": 0.0}
    for width, depth in grid:
        out = forward(student, width, depth, hidden=True, **inputs)
        logits, hidden = targets[width]
        one = distill_loss(out, logits, hidden, kept_layers(count, depth), inputs["attention_mask"],
                           temperature=temperature, regression=regression)
        parts = {k: parts[k] + v for k, v in one.items()}
    return parts


def active_parameters(model: nn.Module, width: float, depth: float) -> int:
    """Parameters the sub-network at (width, depth) computes with (embeddings, pooler and classifier included)."""
    layers = encoder_layers(model)
    kept = kept_layers(len(layers), depth)
    heads = kept_units(model.config.num_attention_heads, width)
    neurons = kept_units(layers[0].intermediate.dense.out_features, width)
    full_layer = sum(p.numel() for p in layers[0].parameters())
    total = sum(p.numel() for p in model.parameters()) - len(layers) * full_layer
    hidden, rows = model.config.hidden_size, (model.config.num_attention_heads - heads) * head_size(model)
    cut_neurons = layers[0].intermediate.dense.out_features - neurons
    per_layer = full_layer - 3 * rows * (hidden + 1) - hidden * rows - cut_neurons * (hidden + 1) - hidden * cut_neurons
    return total + len(kept) * per_layer


class SubNetwork(nn.Module):
    """The sub-network at (width, depth) of a DynaBERT model as a module: `forward(**inputs).logits`, for the
    shared evaluation and latency code."""

    def __init__(self, model: nn.Module, width: float, depth: float):
        super().__init__()
        self.model, self.width, self.depth = model, width, depth

    def forward(self, **inputs) -> Output:
        return forward(self.model, self.width, self.depth, **inputs)

"""Pruning as tensor code: which weights are pruned, magnitude masks, head/neuron masks, keeping masks applied.

What is pruned: the Linear weight matrices inside the encoder's transformer layers (`encoder.layer.N.`):
query, key, value, attention output, intermediate and output dense of every layer. Embeddings, biases,
LayerNorms, the pooler and the classifier stay dense (Chen et al. 2020 prune the same matrices; the
embeddings are a lookup table, not a matmul, and pruning them saves no compute).

A mask is a bool tensor shaped like its weight, True where the weight is kept. Masks only ever shrink:
magnitude pruning ranks the kept weights by |w| and removes the smallest, so a weight pruned in one round
stays pruned in every later one (iterative magnitude pruning, Frankle & Carbin 2019).
"""

from __future__ import annotations

import re
from typing import Literal

import torch
from torch import Tensor, nn

LAYER = re.compile(r"(?:^|\.)encoder\.layer\.(\d+)\.")
"""The encoder layer index inside a parameter name (BERT family: `bert.encoder.layer.3.attention...`)."""
ATTENTION_IN = ("attention.self.query", "attention.self.key", "attention.self.value")
"""Per-head rows: head h owns rows h*d .. (h+1)*d of these weights."""
ATTENTION_OUT = "attention.output.dense"
"""Per-head columns."""
FFN_IN, FFN_OUT = "intermediate.dense", "output.dense"
"""Neuron j is row j of the intermediate weight and column j of the output weight."""


def layer_of(name: str) -> int:
    """The encoder layer a prunable weight belongs to."""
    found = LAYER.search(name)
    if found is None:
        raise ValueError(f"{name}: not inside an encoder layer")
    return int(found.group(1))


def prunable(model: nn.Module) -> dict[str, nn.Parameter]:
    """The weights pruning acts on, by state-dict name: every Linear weight inside an encoder layer."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and LAYER.search(name + "."):
            out[f"{name}.weight"] = module.weight
    if not out:
        raise ValueError(f"{type(model).__name__}: no Linear weights under encoder.layer.N (not a BERT-style encoder)")
    return out


def _keep_largest(scores: Tensor, prune: int) -> Tensor:
    """Flat bool mask keeping all but the `prune` lowest scores (ties broken by position: deterministic)."""
    keep = torch.ones(scores.numel(), dtype=torch.bool, device=scores.device)
    if prune > 0:
        keep[torch.argsort(scores, stable=True)[:prune]] = False
    return keep


def magnitude_masks(weights: dict[str, Tensor], sparsity: float, *, scope: Literal["global", "layer"] = "global",
                    masks: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
    """Keep-masks with `sparsity` of the entries pruned, the lowest |w| first.

    scope "global": one ranking over all the weights (layers end up with different sparsities);
    scope "layer": every weight matrix pruned to `sparsity` on its own (so every encoder layer is too).
    `masks` (the previous round's) stay pruned: their entries rank below every kept weight.
    """
    if not 0 <= sparsity < 1:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    scores = {}
    for name, weight in weights.items():
        score = weight.detach().abs().float().flatten()
        if masks is not None:
            score = torch.where(masks[name].flatten().to(score.device), score, torch.full_like(score, -1.0))
        scores[name] = score
    if scope == "layer":
        return {name: _keep_largest(s, round(sparsity * s.numel())).view_as(weights[name])
                for name, s in scores.items()}
    flat = torch.cat([s.cpu() for s in scores.values()])
    keep = _keep_largest(flat, round(sparsity * flat.numel())).split([s.numel() for s in scores.values()])
    return {name: k.view_as(weights[name]).to(weights[name].device) for name, k in zip(scores, keep)}


def structured_masks(weights: dict[str, Tensor], heads: list[list[int]], neurons: list[list[int]],
                     head_size: int) -> dict[str, Tensor]:
    """Element keep-masks for keeping the attention heads `heads[l]` and FFN neurons `neurons[l]` of layer l.

    A removed head loses its rows of query/key/value and its columns of the attention output; a removed
    neuron its intermediate row and output column. The masked model computes what the model shrunk to those
    heads and neurons computes (the biases left behind only feed rows whose outputs are cut).
    """
    out = {}
    for name, weight in weights.items():
        layer, mask = layer_of(name), torch.zeros_like(weight, dtype=torch.bool)
        rows = [r for h in heads[layer] for r in range(h * head_size, (h + 1) * head_size)]
        if any(f"{part}.weight" in name for part in ATTENTION_IN):
            mask[rows, :] = True
        elif f"{ATTENTION_OUT}.weight" in name:
            mask[:, rows] = True
        elif f"{FFN_IN}.weight" in name:
            mask[neurons[layer], :] = True
        elif f"{FFN_OUT}.weight" in name:
            mask[:, neurons[layer]] = True
        else:
            raise ValueError(f"{name}: structured pruning knows BERT's attention and FFN weights only")
        out[name] = mask
    return out


def keep_most_important(scores: Tensor, keep: int, alive: list[int]) -> list[int]:
    """Indices of the `keep` highest `scores` among `alive` (ascending): a pruned head or neuron never returns."""
    if not 1 <= keep <= len(alive):
        raise ValueError(f"cannot keep {keep} of {len(alive)} units")
    alive_t = torch.tensor(alive, dtype=torch.long)
    order = torch.argsort(scores.detach().float().cpu()[alive_t], descending=True, stable=True)
    return sorted(alive_t[order[:keep]].tolist())


def round_sparsities(target: float, mode: Literal["oneshot", "iterative"], rate: float) -> list[float]:
    """The sparsity after each round: one round at `target`, or `rate` of the remaining weights pruned per
    round (1 - (1 - rate)^r) until `target`, the last round stopping exactly there."""
    if mode == "oneshot":
        return [target]
    out, current = [], 0.0
    while current < target - 1e-9:
        current = min(target, 1 - (1 - current) * (1 - rate))
        out.append(round(current, 12))
    return out


@torch.no_grad()
def apply_masks(params: dict[str, Tensor], masks: dict[str, Tensor]) -> None:
    """Set every pruned weight to exactly 0 (in place)."""
    for name, param in params.items():
        param.masked_fill_(~masks[name].to(param.device), 0.0)


def mask_gradients(params: dict[str, nn.Parameter], masks: dict[str, Tensor]) -> list:
    """Zero the gradient of every pruned weight as it is computed (so clipping and Adam's moments see only
    the kept ones); return the hook handles."""
    handles = []
    for name, param in params.items():
        keep = masks[name].to(param.device)
        handles.append(param.register_hook(lambda grad, keep=keep: grad.masked_fill(~keep, 0.0)))
    return handles


def sparsity_of(masks: dict[str, Tensor]) -> float:
    """Share of the prunable entries that are pruned."""
    total = sum(m.numel() for m in masks.values())
    return 1 - sum(int(m.sum()) for m in masks.values()) / max(total, 1)


def layer_sparsity(masks: dict[str, Tensor]) -> dict[int, float]:
    """Share pruned per encoder layer (over that layer's prunable matrices)."""
    kept: dict[int, list[int]] = {}
    for name, mask in masks.items():
        counts = kept.setdefault(layer_of(name), [0, 0])
        counts[0] += int(mask.sum())
        counts[1] += mask.numel()
    return {layer: 1 - k / n for layer, (k, n) in sorted(kept.items())}


def zeros_per_layer(state: dict[str, Tensor]) -> dict[int, float]:
    """Measured share of exact zeros per encoder layer over its Linear weights in a saved state dict (the
    exported model's sparsity, read back from its tensors rather than from the masks)."""
    counts: dict[int, list[int]] = {}
    for name, tensor in state.items():
        if name.endswith(".weight") and tensor.ndim == 2 and LAYER.search(name):
            entry = counts.setdefault(layer_of(name), [0, 0])
            entry[0] += int((tensor == 0).sum())
            entry[1] += tensor.numel()
    return {layer: z / n for layer, (z, n) in sorted(counts.items())}

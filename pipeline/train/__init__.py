"""The one trainer's parts: the engine (the only DeepSpeed import), rank helpers, checkpoints, preemption."""

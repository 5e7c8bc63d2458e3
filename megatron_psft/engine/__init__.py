"""The engine: one optimizer step and the forward-only passes through Megatron-Core's schedules, evaluation, DDP and the optimizer, and when a run stops."""

"""PSFT's policy side: the per-token objectives (PSFT and its baselines), the old policy and its round schedule, MoE routing record and replay."""

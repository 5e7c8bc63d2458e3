"""What a run reports: metrics and their exact reductions, the metrics logger, timers and the profiler, memory, progress bars, run_config.json and the clipped-token counts."""

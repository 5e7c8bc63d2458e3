"""Reports read after (or beside) training, never imported by it: the metrics plot and the clipped-token report."""

"""clipped_tokens.jsonl, the per-step counts of the tokens PSFT clips: its line format and the writer the
trainer uses. ``megatron_psft.train --log-clipped-tokens`` writes the file next to the metrics file, one
line per optimizer step: ``{"step": 7, "clipped": {"<token id>": count, ...}, "response": {...}}``
("clipped": response tokens whose ratio p_new/p_old exceeded 1+eps_high; "response": all response
tokens). The report that reads it is :mod:`megatron_psft.reports.clipped_tokens`, outside the training path.
"""

import json
import os
from typing import Dict, Optional, Sequence

from megatron_psft.observability.logger import drop_steps_after

FILE_NAME = "clipped_tokens.jsonl"  # the trainer writes it in the metrics file's directory


# --- the file: one line per step --------------------------------------------------------------------

def path_next_to(metrics_file: str) -> str:
    """Where the trainer writes the clipped-token counts of a run whose metrics go to `metrics_file`."""
    return os.path.join(os.path.dirname(os.path.abspath(metrics_file)), FILE_NAME)


def _nonzero_counts(counts) -> Dict[str, int]:
    values = counts.tolist() if hasattr(counts, "tolist") else list(counts)
    return {str(token_id): int(count) for token_id, count in enumerate(values) if count}


def format_step_line(step: int, clipped_counts: Sequence, response_counts: Sequence) -> str:
    """One step's line, newline included. The counts are indexed by token id (a vocabulary-long tensor
    or sequence, as the loss's token histograms are); ids never counted are left out."""
    return json.dumps({"step": step, "clipped": _nonzero_counts(clipped_counts),
                       "response": _nonzero_counts(response_counts)}) + "\n"


class ClippedTokensWriter:
    """Appends one line per step to `path`. When the run resumes from the checkpoint of step
    `resumed_step`, the lines of later steps (logged before the interruption, to be trained again)
    are dropped first, so each step appears once."""

    def __init__(self, path: str, resumed_step: Optional[int] = None):
        if resumed_step is not None:
            drop_steps_after(path, resumed_step)
        self.file = open(path, "a")

    def write(self, step: int, clipped_counts: Sequence, response_counts: Sequence) -> None:
        """`step`: the optimizer step just trained, numbered from 1 as in metrics.jsonl. Flushed at once,
        so the report can read a running job's file."""
        self.file.write(format_step_line(step, clipped_counts, response_counts))
        self.file.flush()

    def close(self) -> None:
        self.file.close()

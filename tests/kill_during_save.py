"""Train as ``-m megatron_psft.train`` does, but SIGKILL rank RANK at the save point POINT, as a node
failure would (no cleanup): ``kill_during_save.py POINT RANK [trainer flags...]``. The crash-consistency
test launches it with torchrun; the hook is installed here, not in the trainer.

A ``background_*`` point is reached in the rank's checkpoint writer (--async-save): there the writer
kills its rank and then goes on as a long write would, so a writer that outlived its rank is seen."""

import os
import signal
import sys
import time

from megatron_psft import checkpoint
from megatron_psft.train import main


def install(point: str, rank: int) -> None:
    def kill_here(reached: str) -> None:
        if reached != point or int(os.environ["RANK"]) != rank:  # RANK: the writer has no process group
            return
        if reached.startswith("background_"):
            os.kill(os.getppid(), signal.SIGKILL)
            time.sleep(120)
        os.kill(os.getpid(), signal.SIGKILL)

    checkpoint.SAVE_POINT_HOOKS.append(kill_here)


if __name__ == "__main__":
    install(sys.argv[1], int(sys.argv[2]))
    main(sys.argv[3:])

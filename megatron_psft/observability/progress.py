"""Progress of long offline work (preprocessing, checkpoint conversion, reports): a live bar on a
terminal, nothing otherwise.

The bar (count / total, rate, ETA: tqdm's) is drawn on stderr only when stderr is a terminal, so a
log file never gets its carriage-return redraws. The tools print their own periodic lines for logs
when no bar is shown (``active`` is False), and their final summary either way. Without tqdm there
is no bar, and the tools print as they do into a log.
"""

import os
import sys
from typing import Callable, Optional, TextIO, Union


def is_terminal(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty(), or a closed stream
        return False


def count_lines(path: str) -> int:
    """The lines of a file (a last line without a newline counts too), read in 1 MiB blocks."""
    count, last = 0, b"\n"
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            count += block.count(b"\n")
            last = block[-1:]
    return count + (last != b"\n")


class ProgressBar:
    """A bar on `stream` (sys.stderr, as it is when the bar is made) if that is a terminal; else inert.

    `total` may be a function, called only when a bar is drawn (counting a file's lines costs a
    read of the file). Use it as a context manager, or close() it, before printing a summary.
    """

    def __init__(self, desc: str, total: Union[None, int, Callable[[], int]] = None, unit: str = "it",
                 unit_scale: bool = False, stream: Optional[TextIO] = None):
        self.stream = sys.stderr if stream is None else stream
        self._bar = None
        if not is_terminal(self.stream):
            return
        try:
            from tqdm import tqdm
        except ImportError:
            return
        try:  # the size when the bar starts; tqdm draws nothing on a terminal that reports none (a bare pty)
            columns, lines = os.get_terminal_size(self.stream.fileno())
        except (AttributeError, OSError, ValueError):
            columns = lines = 0
        self._bar = tqdm(total=total() if callable(total) else total, desc=desc, unit=unit, unit_scale=unit_scale,
                         file=self.stream, ncols=columns or 80, nrows=lines or 24, leave=False)

    @property
    def active(self) -> bool:
        """Whether a bar is shown (the caller's periodic lines are for when it is not)."""
        return self._bar is not None

    def update(self, n: int = 1, status: Optional[str] = None) -> None:
        """Advance by `n`; `status`, if given, replaces the text after the counts (e.g. the current stage)."""
        if self._bar is not None:
            if status is not None:
                self._bar.set_postfix_str(status, refresh=False)
            self._bar.update(n)

    def write(self, text: str, file: Optional[TextIO] = None) -> None:
        """Print a line to `file` (default: the bar's stream) without tearing the bar."""
        file = self.stream if file is None else file
        if self._bar is None:
            print(text, file=file, flush=True)
        else:
            self._bar.write(text, file=file)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> "ProgressBar":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

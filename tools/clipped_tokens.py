"""Report which tokens PSFT clips most: megatron_psft.reports.clipped_tokens from a checkout (installed, the same
command is ``megatron-psft-clipped-tokens``). ``--help`` gives the flags; docs/metrics.md the file it reads."""

import os
import sys

try:
    from megatron_psft.reports.clipped_tokens import main
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from megatron_psft.reports.clipped_tokens import main

if __name__ == "__main__":
    main()

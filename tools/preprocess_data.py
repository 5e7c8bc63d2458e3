"""Tokenize chat data (JSONL, parquet, a `datasets` directory) into memory-mappable SFT samples:
megatron_psft.data.preprocess from a checkout (installed, the same command is ``megatron-psft-preprocess``).
``--help`` gives the flags; docs/data.md the formats."""

import os
import sys

try:
    from megatron_psft.data.preprocess import main
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from megatron_psft.data.preprocess import main

if __name__ == "__main__":
    main()

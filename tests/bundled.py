"""The bundled chat data, preprocessed with the bundled tokenizer, for tests that train."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ASSETS = os.path.join(ROOT, "megatron_psft", "assets")


def preprocess_bundled_data(output_prefix: str, seq_length: int, jsonl: str = None) -> str:
    """Run tools/preprocess_data.py on the bundled data (or on `jsonl`) with the bundled tokenizer; returns
    `output_prefix`."""
    subprocess.run([sys.executable, os.path.join(ROOT, "tools", "preprocess_data.py"),
                    "--input", jsonl or os.path.join(ASSETS, "chat_data.jsonl"), "--output-prefix", output_prefix,
                    "--tokenizer", os.path.join(ASSETS, "tokenizer"), "--seq-length", str(seq_length)],
                   check=True, capture_output=True)
    return output_prefix

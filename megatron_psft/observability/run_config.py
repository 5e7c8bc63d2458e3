"""``SAVE/run_config.json``: what produced a run, next to its checkpoints, as plain JSON (no pickle):
the run's configuration, Megatron-Core's TransformerConfig, the package versions and the git revision."""

import dataclasses
import json
import os
import platform as python_platform
import subprocess
from typing import Optional

import torch

FILE_NAME = "run_config.json"
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _jsonable(value):
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return repr(value)  # dtypes, functions, enums: readable, not loadable


def git_revision() -> Optional[str]:
    """The checkout's commit (with ``-dirty`` when it has changes), or None outside a git checkout."""
    try:
        revision = subprocess.run(["git", "-C", _ROOT, "rev-parse", "HEAD"], capture_output=True, text=True,
                                  timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", _ROOT, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return revision + ("-dirty" if dirty else "")


def versions(platform) -> dict:
    import megatron.core

    import megatron_psft

    return {"megatron_psft": megatron_psft.__version__, "megatron_core": megatron.core.__version__,
            "torch": torch.__version__, "transformer_engine": platform.transformer_engine,
            "python": python_platform.python_version(), "cuda": torch.version.cuda}


def run_config(config, transformer_config, platform, world_size: int) -> dict:
    return {
        "config": config.to_dict(),
        "args": config.flat(),  # the same settings by key (the flags' destinations), as Megatron-LM records args
        "world_size": world_size,
        "transformer_config": {field.name: _jsonable(getattr(transformer_config, field.name))
                               for field in dataclasses.fields(transformer_config)},
        "platform": platform.describe(),
        "versions": versions(platform),
        "git_revision": git_revision(),
    }


def write_run_config(directory: str, config: dict) -> str:
    """Write (atomically) DIRECTORY/run_config.json."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, FILE_NAME)
    with open(path + ".tmp", "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    os.replace(path + ".tmp", path)
    return path

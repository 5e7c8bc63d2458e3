"""cpu_compat's fences: it refuses megatron-core versions it was not tested with, and refuses to run
when CUDA is available. Neither check patches anything, so both are safe in the test process."""

import os
import subprocess
import sys

import pytest
import torch

from megatron_psft.platform import cpu_compat


def test_tested_versions_cover_both_ci_legs():
    assert {"0.16.1", "0.19.2"} <= set(cpu_compat.TESTED_MEGATRON_CORE)


def test_refuses_untested_megatron_core_version():
    # A fresh interpreter: apply() must raise before it patches anything, and this process may
    # already have applied the layer (then apply() returns early without checking).
    script = (
        "import megatron.core\n"
        "megatron.core.__version__ = '0.15.0'\n"
        "from megatron_psft.platform import cpu_compat\n"
        "try:\n"
        "    cpu_compat.apply()\n"
        "except RuntimeError as error:\n"
        "    print('REFUSED:', error)\n"
        "    raise SystemExit(3 if cpu_compat._applied else 0)\n"
        "raise SystemExit('cpu_compat.apply() accepted megatron-core 0.15.0')\n"
    )
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, (result.stdout + result.stderr)[-1500:]
    message = result.stdout.split("REFUSED:", 1)[1]
    assert "0.15.0" in message
    for version in cpu_compat.TESTED_MEGATRON_CORE:
        assert version in message


@pytest.mark.parametrize("version", ["0.15.0", "0.16.0", "0.17.0", "0.19.1", "0.19.3", "0.20.0", "0.19.2rc1"])
def test_version_check_refuses_untested_releases(version):
    with pytest.raises(RuntimeError, match="tested with megatron-core 0.16.1 and 0.19.2 only") as raised:
        cpu_compat.check_version(version)
    assert f"found {version}:" in str(raised.value)


def test_version_check_accepts_tested_releases_with_a_local_suffix():
    # 0.19.2 appends "+<git HEAD>" to __version__ when installed inside a git work tree.
    assert cpu_compat.check_version("0.16.1") == (0, 16)
    assert cpu_compat.check_version("0.19.2") == (0, 19)
    assert cpu_compat.check_version("0.19.2+7bf3670") == (0, 19)


def test_refuses_when_cuda_is_available(monkeypatch):
    monkeypatch.setattr(cpu_compat, "_applied", False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(RuntimeError, match="CUDA is available"):
        cpu_compat.apply()
    assert not cpu_compat._applied

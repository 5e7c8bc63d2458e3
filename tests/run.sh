#!/usr/bin/env bash
# The test command: the CPU tier of the suite, in a pinned environment created on first use.
#
#   bash tests/run.sh [LEG] [PYTEST ARGS...]
#     LEG: py311 (default: Python 3.11, megatron-core 0.16.1) or py312 (Python 3.12, 0.19.2);
#     see tools/setup_env.sh. Extra arguments go to pytest (e.g. -x, -k NAME, tests/test_data.py).
#
# CUDA is hidden, so the same suite runs on CPU through megatron_psft/platform/cpu_compat.py on a GPU
# machine too. tests/gpu is the GPU tier and has its own runner; it is not collected here.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
leg="${PSFT_LEG:-py311}"
case "${1:-}" in py311|py312|3.11|3.12) leg=$1; shift ;; esac
python=$(bash "$root/tools/setup_env.sh" "$leg")
cd "$root"
export CUDA_VISIBLE_DEVICES=""
# No path argument: pytest collects pytest.ini's testpaths (tests), less tests/gpu.
exec "$python" -m pytest -q -p no:cacheprovider --ignore=tests/gpu \
  -W ignore::UserWarning -W ignore::DeprecationWarning -W ignore::FutureWarning "$@"

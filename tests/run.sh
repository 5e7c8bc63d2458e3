#!/usr/bin/env bash
# The test command: sets up the pinned CPU environment if needed, then runs the whole suite.
# GPU-only tests (tests/gpu) skip themselves without CUDA.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
python=$(bash "$root/tools/setup_env.sh")
cd "$root"
exec "$python" -m pytest -q -p no:cacheprovider -W ignore::UserWarning -W ignore::DeprecationWarning -W ignore::FutureWarning tests "$@"

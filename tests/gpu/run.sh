#!/usr/bin/env bash
# The GPU tier, on one GPU: bf16 training on the local spec, save / resume == uninterrupted, and,
# where Transformer Engine is installed, the TE spec with grouped GEMM and FP8. It needs torch with
# CUDA, megatron-core and this repository; with MCORE_WHEEL=path/to/megatron_core-*.whl it installs
# that wheel into a temporary directory first (for a machine without a package index).
#
#   bash tests/gpu/run.sh [pytest args]
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
python=${PYTHON:-python3}
"$python" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'the GPU tier needs a CUDA GPU')"
if [ -n "${MCORE_WHEEL:-}" ]; then
  site=$(mktemp -d)
  "$python" -m pip install -q --no-index --no-deps --target "$site" "$MCORE_WHEEL"
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
cd "$root"
exec "$python" -m pytest -q -p no:cacheprovider -rs -W ignore::UserWarning -W ignore::DeprecationWarning \
  -W ignore::FutureWarning tests/gpu "$@"

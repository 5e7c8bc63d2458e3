#!/usr/bin/env bash
# Create (once) the pinned CPU environment in .venv and print its python. Idempotent and quiet when done.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv="${PSFT_VENV:-$root/.venv}"
stamp="$venv/.psft-requirements"
if [ ! -f "$stamp" ] || ! cmp -s "$stamp" "$root/requirements-cpu.txt"; then
  echo "[setup] creating $venv with requirements-cpu.txt (one time, ~1 min)" >&2
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --upgrade pip >&2 2>/dev/null || true
  "$venv/bin/pip" install -q -r "$root/requirements-cpu.txt" >&2
  "$venv/bin/pip" install -q --no-deps -e "$root" >&2
  cp "$root/requirements-cpu.txt" "$stamp"
fi
echo "$venv/bin/python"

#!/usr/bin/env bash
# Create (once) a pinned CPU environment and print its python. Idempotent and quiet when done.
#
#   bash tools/setup_env.sh [LEG]      LEG (or $PSFT_LEG): py311 (default) or py312
#     py311: .venv    from requirements-cpu.txt        Python 3.11, megatron-core 0.16.1, CPU torch
#     py312: .venv312 from requirements-cpu-py312.txt  Python 3.12, megatron-core 0.19.2, PyPI's
#            torch (the CUDA build: no CPU wheel for 3.12 is reachable; several GB, ~2 min)
#   PSFT_VENV overrides the environment's directory.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
leg="${1:-${PSFT_LEG:-py311}}"
case "$leg" in
  py311|3.11) version=3.11.7; venv_default=.venv;    requirements=requirements-cpu.txt ;;
  py312|3.12) version=3.12.1; venv_default=.venv312; requirements=requirements-cpu-py312.txt ;;
  *) echo "[setup] unknown leg '$leg' (py311 or py312)" >&2; exit 2 ;;
esac
venv="${PSFT_VENV:-$root/$venv_default}"
stamp="$venv/.psft-requirements"
pins() { grep -v '^[[:space:]]*\(#\|$\)' "$1"; }  # the requirement lines; comments do not count
if [ ! -x "$venv/bin/python" ] || [ ! -f "$stamp" ] || ! cmp -s <(pins "$stamp") <(pins "$root/$requirements"); then
  interpreter="$HOME/.pyenv/versions/$version/bin/python"
  if [ ! -x "$interpreter" ]; then
    interpreter=$(command -v "python${version%.*}") || {
      echo "[setup] no Python ${version%.*}: neither $HOME/.pyenv/versions/$version nor python${version%.*} on PATH" >&2
      exit 1
    }
  fi
  echo "[setup] creating or updating $venv ($leg) from $requirements" >&2
  start=$SECONDS
  "$interpreter" -m venv "$venv"
  "$venv/bin/python" -m pip install -q --upgrade pip >&2 2>/dev/null || true
  # No cache: the wheels would be stored twice (several GB for the py312 leg's torch).
  "$venv/bin/python" -m pip install -q --no-cache-dir -r "$root/$requirements" >&2
  "$venv/bin/python" -m pip install -q --no-cache-dir --no-deps -e "$root" >&2
  cp "$root/$requirements" "$stamp"
  echo "[setup] $venv ready in $((SECONDS - start)) s" >&2
fi
echo "$venv/bin/python"

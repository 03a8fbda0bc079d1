#!/usr/bin/env bash
# The README's test command: set-up (venv, torch CPU wheel, build), then pytest; then the
# vLLM tests (tests/vllm/) in their own environment (scripts/setup-vllm-env.sh makes it).
# Extra arguments go to the main pytest run, e.g. `bash scripts/test.sh -k merge -x`.
# BONESOUP_SKIP_VLLM=1 skips the vLLM stage (local iteration only; CI runs it).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup-env.sh"
cd "$ROOT"
"$PY" -m pytest -q "$@"
if [ "${BONESOUP_SKIP_VLLM:-0}" = "1" ]; then
  echo "[test] BONESOUP_SKIP_VLLM=1: the vLLM tests (tests/vllm/) were NOT run"
  exit 0
fi
source "$ROOT/scripts/setup-vllm-env.sh"
# One OpenMP thread per process: the tests start several engine processes on small machines.
OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" \
  exec "$VLLM_PY" -m pytest -q -p no:cacheprovider tests/vllm

#!/usr/bin/env bash
# The README's main command: set-up, then `bonesoup experiment --quick` on the
# embedded task (SFT, backbones, experts, value models trained in code on the
# CPU; no download, no GPU): Rewarded Soup vs Bone Soup vs MOD vs MAGE over an
# 11-point preference sweep, a table, out/experiment-quick/pareto.png and JSON.
# Extra arguments go to `bonesoup experiment` (e.g. drop the quick setting with
# `bash scripts/demo.sh --seed-mode train`; see `bonesoup experiment --help`).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup-env.sh"
cd "$ROOT"
exec "$PY" -m bonesoup experiment --quick "$@"

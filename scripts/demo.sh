#!/usr/bin/env bash
# The README's main command: set-up, then `bonesoup merge` on the embedded
# default (tiny backbones made in code, no download, no GPU). Extra arguments
# go to `bonesoup merge`.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup-env.sh"
cd "$ROOT"
exec "$PY" -m bonesoup merge "$@"

#!/usr/bin/env bash
# The README's test command: set-up (venv, torch CPU wheel, build), then pytest.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k merge -x`.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup-env.sh"
cd "$ROOT"
exec "$PY" -m pytest -q "$@"

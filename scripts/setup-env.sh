# Sourced by the README's commands: makes a venv with everything installed and
# the C++ extension built, then exports PY (its python). Idempotent and fast
# when nothing changed (a stamp holds the hash of the build inputs).
#
# torch: a CPU wheel, torch==2.13.0, unless the system python already imports
# a torch (a CUDA build on a GPU machine, say); then the venv sees that one.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${BONESOUP_VENV:-$ROOT/.venv}
SYS_PY=${PYTHON:-python3}

if [ ! -x "$VENV/bin/python" ]; then
  if "$SYS_PY" -c "import torch" >/dev/null 2>&1; then
    echo "[setup] using the system's torch ($("$SYS_PY" -c 'import torch; print(torch.__version__)'))"
    "$SYS_PY" -m venv --system-site-packages "$VENV"
  else
    "$SYS_PY" -m venv "$VENV"
  fi
fi
PY=$VENV/bin/python
export PY

inputs_hash=$(cd "$ROOT" && cat setup.py pyproject.toml requirements-dev.txt csrc/* | sha256sum | cut -c1-16)
stamp=$VENV/.bonesoup-setup-$inputs_hash
if [ -f "$stamp" ] && "$PY" -c "import soupkernels._C" >/dev/null 2>&1; then
  return 0 2>/dev/null || exit 0
fi

echo "[setup] installing into $VENV (first run: about a minute)"
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  "$PY" -m pip install -q torch==2.13.0
fi
"$PY" -m pip install -q -r "$ROOT/requirements-dev.txt"
# --no-build-isolation: the build requirements are already in the venv, so pip
# neither downloads them again nor (ever) a torch.
(cd "$ROOT" && "$PY" -m pip install -q --no-build-isolation --no-deps -e .)
rm -f "$VENV"/.bonesoup-setup-*
touch "$stamp"
echo "[setup] done: $("$PY" -c 'import torch, soupkernels as sk; print("torch", torch.__version__, "| cpu kernels:", sk.cpu_info())')"

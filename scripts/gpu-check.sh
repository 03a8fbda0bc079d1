#!/usr/bin/env bash
# One short, bounded GPU check of the project: the GPU-marked tests, then the
# GPU benchmarks, each under its own time limit (the limits add up to under
# 8 minutes on one H100/H200). For a CUDA machine that already has torch and
# triton (no network needed); the C++ extension is built only if a compiler
# and pybind11 are there (the GPU path does not need it).
#
#   bash scripts/gpu-check.sh OUT_DIR            # run; OUT_DIR gets *.json, *.log, summary.json
#   bash scripts/gpu-check.sh --dry-run OUT_DIR  # no GPU needed: checks every step's command line
#                                                # (the benchmarks' flags are parsed by their own
#                                                # argparse, the test selection is collected) and
#                                                # says what the real run would do here
#
# Python: $PYTHON, else the repo's .venv, else python3. A step that fails or
# times out is recorded in summary.json and the next one runs; the exit code
# is 0 when every step passed, 1 otherwise, 2 when there is no CUDA device.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DRY=0
if [[ "${1:-}" == "--dry-run" ]]; then DRY=1; shift; fi
if [[ $# -ne 1 || "$1" == -* ]]; then
  echo "usage: bash scripts/gpu-check.sh [--dry-run] OUT_DIR" >&2
  exit 64
fi
OUT="$1"
mkdir -p "$OUT" || { echo "gpu-check: cannot create OUT_DIR $OUT" >&2; exit 64; }
OUT="$(cd "$OUT" && pwd)"
if [[ -n "${PYTHON:-}" ]]; then PY="$PYTHON"
elif [[ -x "$ROOT/.venv/bin/python" ]]; then PY="$ROOT/.venv/bin/python"
else PY="python3"; fi
cd "$ROOT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
LOG="$OUT/gpu-check.log"
: > "$LOG"
log() { echo "[gpu-check $(date -u +%H:%M:%S)] $*" | tee -a "$LOG"; }

# ---------------------------------------------------------------- the plan
# Each step: name, time limit (s), command. Benchmarks write $OUT/<name>.json.
# The limits sum to 460 s; a step's limit is a bound, not its expected time.
B=benchmarks
STEPS=()
step() { STEPS+=("$1"$'\t'"$2"$'\t'"${*:3}"); }
step build 60 "$PY setup.py build_ext --inplace -q -j 4"
step tests 90 "$PY -m pytest -q -p no:cacheprovider -m gpu tests/test_merge.py tests/test_sampling.py tests/test_live.py tests/test_checkpoint_merge.py --junitxml=$OUT/tests.xml"
# merge at 256M and 1G elements (n = 3 + SFT, bf16) vs device-to-device copy; merge_many over Llama-2 7B's list vs one flat buffer
step bench_merge 60 "$PY $B/bench_merge.py --device cuda --n 3 --dtypes bf16 --sizes 268435456 1073741824 --repeats 5 --skip-naive-above 268435456 --many-shape llama-7b --json $OUT/bench_merge.json"
# LiveSoup re-merge of a 7B-shaped bf16 model, 3 backbones + SFT
step bench_remerge 100 "$PY $B/bench_remerge.py --shape llama-7b --dtype bf16 --n 3 --device cuda --repeats 5 --json $OUT/bench_remerge.json"
# guided sampling B = 1/8/64, V = 128256, M = 2/4, bf16: vs the input-read floor and the torch path
step bench_sampling 60 "$PY $B/bench_sampling.py --device cuda --B 1 8 64 --V 128256 --M 2 4 --dtype bf16 --repeats 5 --json $OUT/bench_sampling.json"
# a PPO step of a 124M policy (GPT-2 small shape; bf16 autocast, the trainer's default on CUDA)
step bench_ppo 90 "$PY $B/bench_ppo.py --preset gpt2 --device cuda --steps 2 --batch-size 64 --max-new-tokens 64 --json $OUT/bench_ppo.json"

# ------------------------------------------------------------- environment
"$PY" - "$OUT/env.json" > >(tee -a "$LOG") 2>&1 <<'EOF'
import json, platform, sys
info = {"python": sys.version.split()[0], "machine": platform.machine()}
try:
    import torch
    info.update(torch=torch.__version__, cuda=torch.cuda.is_available(),
                device=torch.cuda.get_device_name() if torch.cuda.is_available() else None)
except ImportError as exc:
    info.update(torch=None, cuda=False, error=str(exc))
try:
    import triton
    info["triton"] = triton.__version__
except ImportError:
    info["triton"] = None
json.dump(info, open(sys.argv[1], "w"), indent=2)
print("environment:", json.dumps(info))
EOF
HAS_CUDA="$("$PY" -c 'import json,sys; print(int(bool(json.load(open(sys.argv[1]))["cuda"])))' "$OUT/env.json" 2>/dev/null || echo 0)"
HAS_COMPILER=0
if command -v "${CXX:-c++}" >/dev/null 2>&1 && "$PY" -c "import pybind11" 2>/dev/null; then HAS_COMPILER=1; fi

# ----------------------------------------------------------------- dry run
if [[ $DRY -eq 1 ]]; then
  log "dry run: $((${#STEPS[@]})) steps, python $PY, CUDA here: $HAS_CUDA, compiler + pybind11: $HAS_COMPILER"
  printf '%s\n' "${STEPS[@]}" > "$OUT/plan.tsv"
  # Every benchmark's flags through its own argparse (the script is imported
  # and stopped right after parsing); the test step's selection collected.
  "$PY" - "$OUT/plan.tsv" "$OUT/dry-run.json" > >(tee -a "$LOG") 2>&1 <<'EOF'
import argparse, json, runpy, shlex, subprocess, sys

plan, report = sys.argv[1], sys.argv[2]
parsed = argparse.ArgumentParser.parse_args


class Parsed(Exception):
    pass


def stop_after_parsing(self, args=None, namespace=None):
    ns = parsed(self, args, namespace)  # a bad flag exits here with argparse's message (status 2)
    raise Parsed(vars(ns))


argparse.ArgumentParser.parse_args = stop_after_parsing
results, ok = [], True
for line in open(plan):
    name, limit, cmd = line.rstrip("\n").split("\t")
    argv = shlex.split(cmd)
    entry = {"step": name, "limit_s": int(limit), "command": cmd}
    if len(argv) > 1 and argv[1].endswith(".py") and argv[1].startswith("benchmarks/"):
        sys.argv = argv[1:]
        try:
            runpy.run_path(argv[1], run_name="__main__")
            entry.update(ok=False, error="the script ran past argument parsing")
        except Parsed as p:
            entry.update(ok=True, flags=p.args[0])
            if "device" in p.args[0] and p.args[0]["device"] != "cuda":
                entry.update(ok=False, error=f"--device is {p.args[0]['device']!r}, not cuda")
        except SystemExit as e:
            entry.update(ok=False, error=f"argument parsing failed (exit {e.code})")
        except Exception as e:  # e.g. an import the script needs is missing here
            entry.update(ok=False, error=f"{type(e).__name__}: {e}")
    elif argv[1:3] == ["-m", "pytest"]:
        sel = [a for a in argv[3:] if not a.startswith("--junitxml") and a != "-q"]
        proc = subprocess.run([argv[0], "-m", "pytest", "--collect-only", "-q", *sel], capture_output=True, text=True)
        ids = [l for l in proc.stdout.splitlines() if "::" in l]
        entry.update(ok=proc.returncode == 0 and len(ids) > 0, collected=len(ids), tests=ids)
        if not entry["ok"]:
            entry["error"] = (proc.stdout + proc.stderr)[-1500:]
    else:
        entry.update(ok=True)
    ok &= entry["ok"]
    print(f"  {name:<15} {limit:>4} s  {'ok' if entry['ok'] else 'BAD: ' + entry.get('error', '')}  {cmd}")
    results.append(entry)
json.dump({"ok": ok, "steps": results, "limit_total_s": sum(r["limit_s"] for r in results)}, open(report, "w"), default=str,
          indent=2)
sys.exit(0 if ok else 1)
EOF
  rc=$?
  if [[ $rc -ne 0 ]]; then log "dry run FAILED: see $OUT/dry-run.json"; exit 1; fi
  if [[ $HAS_CUDA -eq 1 ]]; then
    log "dry run ok; a real run here would execute every step"
  else
    log "dry run ok; no CUDA device here: a real run would skip every step (exit 2)"
  fi
  exit 0
fi

# ---------------------------------------------------------------- real run
SUMMARY="$OUT/summary.tsv"
printf 'step\tstatus\tseconds\tlimit_s\n' > "$SUMMARY"
if [[ $HAS_CUDA -ne 1 ]]; then
  log "no CUDA device visible to torch: every step skipped"
  for s in "${STEPS[@]}"; do IFS=$'\t' read -r name limit _ <<< "$s"; printf '%s\tskipped (no CUDA)\t0\t%s\n' "$name" "$limit" >> "$SUMMARY"; done
  exit 2
fi
unset TRITON_INTERPRET  # the Triton kernels compile for the GPU
failed=0
for s in "${STEPS[@]}"; do
  IFS=$'\t' read -r name limit cmd <<< "$s"
  if [[ $name == build && $HAS_COMPILER -ne 1 ]]; then
    log "build: skipped (no C++ compiler or no pybind11; the GPU path does not need the extension)"
    printf '%s\tskipped (no compiler)\t0\t%s\n' "$name" "$limit" >> "$SUMMARY"
    continue
  fi
  log "$name (limit ${limit} s): $cmd"
  t0=$(date +%s)
  # shellcheck disable=SC2086  # the command line is word-split on purpose (no paths with spaces)
  timeout --kill-after=10 "$limit" $cmd > "$OUT/$name.log" 2>&1
  rc=$?
  dt=$(( $(date +%s) - t0 ))
  tail -n 25 "$OUT/$name.log" >> "$LOG"
  if [[ $rc -eq 0 ]]; then status=ok
  elif [[ $rc -eq 124 || $rc -eq 137 ]]; then status="timeout"; failed=1
  else status="failed (rc $rc)"; failed=1; fi
  log "$name: $status after ${dt} s"
  printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$dt" "$limit" >> "$SUMMARY"
done
"$PY" - "$SUMMARY" "$OUT/summary.json" <<'EOF'
import csv, json, sys
rows = list(csv.DictReader(open(sys.argv[1]), delimiter="\t"))
json.dump({"ok": all(r["status"] in ("ok", "skipped (no compiler)") for r in rows), "steps": rows},
          open(sys.argv[2], "w"), indent=2)
EOF
log "done: $(tr '\n' ' ' < "$SUMMARY")"
exit $failed

"""scripts/gpu-check.sh --dry-run: the GPU check parses, selects its commands and skips cleanly without CUDA.

The dry run feeds every benchmark command line to that benchmark's own
argparse and collects the test selection, so a renamed flag or a lost GPU
test fails here, on the CPU, instead of during scarce GPU minutes.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu-check.sh"
STEPS = ["build", "tests", "bench_merge", "bench_remerge", "bench_sampling", "bench_ppo"]


def _run(*args, tmp_path, env=None):
    env = dict(os.environ, PYTHON=sys.executable, **(env or {}))
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, capture_output=True, text=True, env=env,
                          timeout=240)


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_dry_run_checks_every_step(tmp_path):
    proc = _run("--dry-run", str(tmp_path / "out"), tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "dry-run.json").read_text())
    assert report["ok"] and [s["step"] for s in report["steps"]] == STEPS
    assert report["limit_total_s"] <= 480  # the whole check fits in 8 minutes
    by = {s["step"]: s for s in report["steps"]}
    # The benchmark flags, as each script's own argparse read them.
    m = by["bench_merge"]["flags"]
    assert m["device"] == "cuda" and m["sizes"] == [1 << 28, 1 << 30] and m["many_shape"] == "llama-7b"
    r = by["bench_remerge"]["flags"]
    assert (r["shape"], r["dtype"], r["n"]) == ("llama-7b", "bf16", 3)
    smp = by["bench_sampling"]["flags"]
    assert (smp["B"], smp["V"], smp["M"], smp["dtype"]) == ([1, 8, 64], [128256], [2, 4], "bf16")
    assert by["bench_ppo"]["flags"]["preset"] == "gpt2"
    for name in ("bench_merge", "bench_remerge", "bench_sampling", "bench_ppo"):
        assert by[name]["flags"]["json"] is not None, name
    # The GPU-marked tests, including the sampler's on CUDA tensors.
    tests = by["tests"]["tests"]
    assert any("test_cuda_backends_match_reference" in t for t in tests), tests
    assert any(t.startswith("tests/test_merge.py") for t in tests), tests
    if not json.loads((tmp_path / "out" / "env.json").read_text())["cuda"]:
        assert "a real run would skip every step" in proc.stdout


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_real_run_without_cuda_skips_cleanly(tmp_path):
    proc = _run(str(tmp_path / "out"), tmp_path=tmp_path, env={"CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = (tmp_path / "out" / "summary.tsv").read_text().splitlines()[1:]
    assert [r.split("\t")[0] for r in rows] == STEPS and all("skipped (no CUDA)" in r for r in rows)


def test_bad_usage_is_refused(tmp_path):
    proc = _run("--dry-run", tmp_path=tmp_path)
    assert proc.returncode == 64 and "usage: bash scripts/gpu-check.sh" in proc.stderr

"""Data parallel PPO: 2 gloo processes on loopback under torchrun stay in sync and match one process.

Both runs use the same global batch (16 rollouts, minibatches of 8). The
single process cuts each minibatch into 2 micro-batches of 4 and generates in
chunks of 8, so its micro-batches and generation batches are exactly the
ranks' (rank r: rows r*8..r*8+7). Sampling is seeded per rollout, so both runs
draw the same tokens; the gradients are sums of the same micro-batch
gradients (each rank's loss is scaled by the world size 2 and DDP divides by
2: powers of two, exact in floating point), so the parameters agree to
rounding of the gradient all-reduce. Tolerance 1e-6 absolute: tight enough
to catch any real difference (a wrong loss scale, a missing or duplicated
rollout, a different minibatch composition all give 1e-4 or more after one
step at lr 3e-4), loose enough for a reduction order that a different gloo
or BLAS build may use.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from ppo_task_fixtures import task_sft  # noqa: F401  (fixture)

WORKER = Path(__file__).resolve().parent / "ddp_ppo_worker.py"
TOL = 1e-6


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo",
               TOKENIZERS_PARALLELISM="false")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def _run(cmd, timeout=300):
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"


def test_two_gloo_processes_stay_in_sync_and_match_one_process(task_sft, tmp_path):
    from safetensors.torch import load_file

    steps = 3
    ddp_out, single_out = tmp_path / "ddp", tmp_path / "single"
    _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--nnodes", "1",
          "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), str(WORKER),
          "--sft", str(task_sft), "--out", str(ddp_out), "--steps", str(steps), "--grad-accum", "1"])
    _run([sys.executable, str(WORKER), "--sft", str(task_sft), "--out", str(single_out), "--steps", str(steps),
          "--grad-accum", "2", "--generation-batch-size", "8"])

    r0, r1 = load_file(ddp_out / "rank0.safetensors"), load_file(ddp_out / "rank1.safetensors")
    single = load_file(single_out / "rank0.safetensors")
    meta0 = json.loads((ddp_out / "rank0.json").read_text())
    meta_single = json.loads((single_out / "rank0.json").read_text())
    assert meta0["world"] == 2 and meta_single["world"] == 1
    # In sync: identical on both ranks after every step (DDP all-reduces, then the same optimiser step).
    assert meta0["rank_diff"] == [0.0] * steps
    assert all(torch.equal(r0[k], r1[k]) for k in r0)
    # The same rollouts: per-sample seeds make rank 0 + rank 1 draw what the single process draws.
    assert meta0["responses"] == meta_single["responses"]
    # The same update, to rounding.
    worst = max(float((r0[k] - single[k]).abs().max()) for k in single)
    assert worst <= TOL, f"DDP and single-process parameters differ by {worst:g} > {TOL:g}"
    for a, b in zip(meta0["records"], meta_single["records"]):
        for key in ("score", "kl", "entropy", "response_length", "value_loss", "policy_loss"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), key
    # And training did move the parameters (the comparison above is not of two untouched models).
    from bonesoup.train.ppo.checkpoint_training import load_policy

    sft_model, _ = load_policy(task_sft)
    start = dict(sft_model.named_parameters())
    assert max(float((single[f"policy.{k}"] - v.detach()).abs().max()) for k, v in start.items()) > 1e-4

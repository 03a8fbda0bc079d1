"""PPO step throughput: rollout tokens/s and training tokens/s, CPU or GPU, in one process.

    python benchmarks/bench_ppo.py                       # the embedded task's tiny policy, CPU
    python benchmarks/bench_ppo.py --quick               # the same, 2 measured steps (a smoke run)
    python benchmarks/bench_ppo.py --preset gpt2 --device cuda   # a 124M GPT-2 (random weights), bf16

Tokens are response tokens that count (up to and including EOS). Rollout:
the local batch through the one decode loop (``guided_generate``: KV cache,
fused sampler). Training: the rollout forward (old
log-probs, values, reference log-probs) plus ``ppo_epochs`` passes of
forward + backward, so training tokens/s = tokens x epochs / that time.
The first step is a warm-up and is not reported. Prints a table last;
``--json PATH`` writes the numbers.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def build(preset: str, workdir: Path):
    from transformers import GPT2Config, GPT2LMHeadModel

    from bonesoup.train.ppo.checkpoint_training import load_policy
    from bonesoup.tasks.review import build_task_sft, make_task_tokenizer

    if preset == "tiny":
        return load_policy(build_task_sft(workdir / "sft"))
    tok = make_task_tokenizer()
    # GPT-2 small's shape (124M parameters with its 50257-token vocabulary); the tokenizer is padded
    # with placeholder tokens so every sampled id decodes.
    tok.add_tokens([f"<x{i}>" for i in range(50257 - len(tok))])
    cfg = GPT2Config(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                     pad_token_id=tok.pad_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = GPT2LMHeadModel(cfg)
    return model, tok


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", choices=["tiny", "gpt2"], default="tiny")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--steps", type=int, default=4, help="measured steps (after one warm-up step)")
    ap.add_argument("--quick", action="store_true", help="2 measured steps (overrides --steps)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--mini-batch-size", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int)
    ap.add_argument("--threads", type=int)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    if args.quick:
        args.steps = 2
    if args.threads:
        torch.set_num_threads(args.threads)

    from bonesoup.train.ppo import PPOConfig, PPOTrainer
    from bonesoup.train.rewards import CombinedReward
    from bonesoup.tasks.review import TASK_REWARDS, task_prompts

    with tempfile.TemporaryDirectory(prefix="bench-ppo-") as tmp:
        t0 = time.perf_counter()
        policy, tok = build(args.preset, Path(tmp))
        setup_s = time.perf_counter() - t0
    n_params = sum(p.numel() for p in policy.parameters())
    T = args.max_new_tokens or (20 if args.preset == "tiny" else 64)
    cfg = PPOConfig(batch_size=args.batch_size, mini_batch_size=args.mini_batch_size, max_new_tokens=T,
                    steps=args.steps + 1)
    reward = CombinedReward(list(TASK_REWARDS), [0.5, 0.5])
    trainer = PPOTrainer(cfg, policy, tok, reward, task_prompts("train"), device=args.device)
    records = [trainer.step() for _ in range(args.steps + 1)][1:]

    def mean(key):
        return sum(r[key] for r in records) / len(records)

    row = {"preset": args.preset, "params": n_params, "device": str(trainer.device),
           "bf16": trainer.autocast_dtype is not None, "batch_size": cfg.batch_size,
           "max_new_tokens": T, "response_tokens_per_step": mean("response_length") * cfg.batch_size,
           "rollout_tokens_per_s": mean("rollout_tokens_per_s"), "train_tokens_per_s": mean("train_tokens_per_s"),
           "step_s": mean("seconds"), "setup_s": setup_s, "threads": torch.get_num_threads(),
           "machine": platform.processor() or platform.machine(),
           "gpu": torch.cuda.get_device_name() if trainer.device.type == "cuda" else None}
    if trainer.device.type == "cuda":
        row["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    if args.json:
        args.json.write_text(json.dumps(row, indent=2))
    print(f"{'preset':<8}{'params':>12}{'device':>8}{'bf16':>6}{'batch':>7}{'T':>5}{'resp tok/step':>15}"
          f"{'rollout tok/s':>15}{'train tok/s':>13}{'step s':>9}")
    print(f"{row['preset']:<8}{n_params:>12,}{row['device']:>8}{str(row['bf16']):>6}{cfg.batch_size:>7}{T:>5}"
          f"{row['response_tokens_per_step']:>15.0f}{row['rollout_tokens_per_s']:>15.0f}"
          f"{row['train_tokens_per_s']:>13.0f}{row['step_s']:>9.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Worker for tests/test_ppo_ddp.py: a few PPO steps on the task, alone or as one rank under torchrun.

    python tests/ddp_ppo_worker.py --sft DIR --out DIR --grad-accum 2 --generation-batch-size 8
    python -m torch.distributed.run --nproc_per_node 2 tests/ddp_ppo_worker.py --sft DIR --out DIR --grad-accum 1

Writes OUT/rank{R}.safetensors (policy + value-head parameters after the
steps), OUT/rank{R}.json (per-step statistics, the sampled responses and, on
rank 0 of a multi-process run, the largest parameter difference between
ranks after each step).
"""

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bonesoup.train.ppo import PPOConfig, PPOTrainer  # noqa: E402
from bonesoup.train.ppo.checkpoint_training import load_policy  # noqa: E402
from bonesoup.train.rewards import CombinedReward, combination_weights  # noqa: E402
from bonesoup.tasks.review import TASK_REWARDS, task_prompts  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sft", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--generation-batch-size", type=int)
    args = ap.parse_args()
    torch.set_num_threads(1)
    policy, tok = load_policy(args.sft)
    reward = CombinedReward(list(TASK_REWARDS), combination_weights(2, backbone=0, beta=0.7))
    cfg = PPOConfig(batch_size=16, mini_batch_size=8, grad_accum_steps=args.grad_accum, ppo_epochs=2,
                    max_new_tokens=12, lr=3e-4, generation_batch_size=args.generation_batch_size, seed=5)
    tr = PPOTrainer(cfg, policy, tok, reward, task_prompts("train"), device="cpu")
    rank, world = tr.dist.rank, tr.dist.world
    records, responses, rank_diff = [], [], []
    for _ in range(args.steps):
        records.append(tr.step())
        responses.append(tr.last_rollout["response"].tolist())
        if world > 1:  # ranks in sync: every parameter identical on every rank, after every step
            import torch.distributed as dist

            flat = torch.cat([p.detach().reshape(-1) for p in tr.module.parameters()])
            parts = [torch.empty_like(flat) for _ in range(world)]
            dist.all_gather(parts, flat)
            rank_diff.append(max(float((p - flat).abs().max()) for p in parts))
    from safetensors.torch import save_file

    args.out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().clone() for k, v in tr.module.named_parameters()}
    save_file(state, str(args.out / f"rank{rank}.safetensors"))
    (args.out / f"rank{rank}.json").write_text(json.dumps(
        {"world": world, "records": records, "responses": responses, "rank_diff": rank_diff}))
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())

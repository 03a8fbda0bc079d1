"""``bonesoup train`` and ``bonesoup train-all``: PPO backbones, experts and MORLHF policies.

    bonesoup train --backbone 0 --beta 0.7 --out out/train/backbone-0      # embedded task
    bonesoup train --sft ckpt/sft --prompts prompts.txt --rewards sentiment readability --expert 1 --out DIR
    bonesoup train-all --beta 0.7 --experts --eval --out out/train-all
    python -m torch.distributed.run --nproc_per_node 2 -m bonesoup train ...   # data parallel

Without ``--sft`` the embedded task is used: its SFT model is built in code
under ``--task-dir`` (once; reused after) and its prompts and rewards
(sentiment, conciseness) are the defaults.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

__all__ = ["add_train_parsers"]

TRAIN_DIR = Path("out") / "train"


def _add_common(p: argparse.ArgumentParser) -> None:
    from bonesoup.train.ppo.trainer import PPOConfig

    d = PPOConfig()
    g = p.add_argument_group("model and data")
    g.add_argument("--sft", type=Path, help="SFT checkpoint directory (default: the embedded task's, built in code)")
    g.add_argument("--task-dir", type=Path, default=Path("out") / "task",
                   help="embedded task: where its SFT model is built and cached (default %(default)s)")
    g.add_argument("--prompts", type=Path, help="training prompts, one per line (default: the embedded task's)")
    g.add_argument("--rewards", nargs="+", default=None, metavar="NAME",
                   help="reward names, one per objective (default: the task's sentiment conciseness); "
                   "built in: sentiment, readability, conciseness, length, coverage")
    g.add_argument("--normalize", action="store_true",
                   help="z-normalise each reward with its mean and std over 256 SFT samples before combining "
                   "(default: combine the raw rewards; the built-in ones share a unit scale)")
    g.add_argument("--normalization", type=Path,
                   help="JSON {mean: [...], std: [...]}: normalise with these statistics instead")
    g.add_argument("--value-model", choices=["shared", "separate"], default="shared",
                   help="value head on the policy's trunk (shared) or on a separate copy of the SFT model")
    g.add_argument("--lora-rank", type=int, metavar="R",
                   help="train LoRA adapters of rank R (needs the optional peft package); the reference is the "
                   "base with adapters disabled; the output is a full checkpoint (adapters merged)")
    g = p.add_argument_group("PPO")
    g.add_argument("--steps", type=int, default=d.steps)
    g.add_argument("--batch-size", type=int, default=d.batch_size, help="rollouts per step, all processes")
    g.add_argument("--mini-batch-size", type=int, default=d.mini_batch_size, help="rollouts per optimiser step")
    g.add_argument("--grad-accum", type=int, default=d.grad_accum_steps, help="micro-batches per minibatch")
    g.add_argument("--epochs", type=int, default=d.ppo_epochs, help="PPO epochs per batch")
    g.add_argument("--lr", type=float, default=d.lr)
    g.add_argument("--kl-coef", type=float, default=d.kl_coef)
    g.add_argument("--kl-estimator", choices=["k1", "k3"], default=d.kl_estimator)
    g.add_argument("--adaptive-kl", action="store_true", help="steer the KL coefficient towards --target-kl")
    g.add_argument("--target-kl", type=float, default=d.target_kl)
    g.add_argument("--early-stop-kl", type=float, default=None, metavar="KL",
                   help="stop a step's PPO epochs once a minibatch's approximate KL exceeds 1.5 x KL (default off)")
    g.add_argument("--vf-coef", type=float, default=d.vf_coef)
    g.add_argument("--temperature", type=float, default=d.temperature)
    g.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens)
    g.add_argument("--missing-eos-penalty", type=float, default=None)
    g.add_argument("--whiten-rewards", action="store_true")
    g.add_argument("--seed", type=int, default=d.seed)
    g.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast (default: on for CUDA)")
    g.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=None,
                   help="(default: on for CUDA)")
    g = p.add_argument_group("run")
    g.add_argument("--device", help="cpu or cuda (default: cuda:LOCAL_RANK if available)")
    g.add_argument("--threads", type=int, help="torch CPU threads per process")
    g.add_argument("--force", action="store_true", help="replace existing output directories")
    g.add_argument("--save-every", type=int, default=0, metavar="N",
                   help="write a resumable training checkpoint every N steps beside the output (default 0: off)")
    g.add_argument("--resume", action="store_true",
                   help="continue from the newest training checkpoint of the same run (none: start afresh); "
                   "train-all skips the models already written")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")


def add_train_parsers(sub) -> None:
    """Add ``train`` and ``train-all`` to the ``bonesoup`` sub-command parser."""
    p = sub.add_parser(
        "train", help="train one policy with PPO on a reward combination (expert, backbone or preference)",
        description="PPO from an SFT checkpoint on one combination of rewards: --expert I (Rewarded Soup "
        "expert, reward r_I), --backbone J --beta B (Bone Soup backbone, reward row J of the backbone matrix) "
        "or --preference MU... (MORLHF). Writes a Hugging Face checkpoint of the policy (no value head), "
        "train_log.jsonl and train_log.png. Without --sft: the embedded task.")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--expert", type=int, metavar="I", help="train on reward I alone")
    which.add_argument("--backbone", type=int, metavar="J", help="train on row J of backbone_matrix(n, beta)")
    which.add_argument("--preference", type=float, nargs="+", metavar="MU", help="train on sum_i mu_i r_i")
    p.add_argument("--beta", type=float, help="backbone mixing strength in (0.5, 1) (with --backbone)")
    p.add_argument("--out", type=Path, help=f"output directory (default {TRAIN_DIR}/<expert-I|backbone-J|...>)")
    _add_common(p)
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser(
        "train-all", help="train the n Bone Soup backbones (and optionally the n experts) of one configuration",
        description="Train backbone-0 .. backbone-{n-1} (rows of backbone_matrix(n, beta)) and, with --experts, "
        "expert-0 .. expert-{n-1}, from one SFT model with one reward normalisation, under --out. With --eval, "
        "sample the SFT model and every trained model on held-out prompts and write eval.json.")
    p.add_argument("--beta", type=float, required=True, help="backbone mixing strength in (0.5, 1)")
    p.add_argument("--experts", action="store_true", help="also train the single-reward experts")
    p.add_argument("--eval", action="store_true", help="evaluate SFT and trained models on held-out prompts")
    p.add_argument("--eval-prompts", type=Path, help="held-out prompts, one per line (default: the task's)")
    p.add_argument("--eval-samples", type=int, default=8, help="samples per held-out prompt (default 8)")
    p.add_argument("--out", type=Path, default=Path("out") / "train-all", help="output root (default %(default)s)")
    _add_common(p)
    p.set_defaults(func=_cmd_train_all)


def _read_lines(path: Path, what: str) -> list[str]:
    lines = [line.rstrip("\n") for line in path.read_text().splitlines() if line.strip()]
    if not lines:
        raise ValueError(f"{what} file {path} holds no prompts")
    return lines


def _setup(args):
    """(sft dir, prompts, reward names, PPOConfig, normalisation) from the common arguments."""
    import torch

    from bonesoup.train.ppo.trainer import PPOConfig
    from bonesoup.train.rewards import RewardNormalization, available_rewards
    from bonesoup.tasks.review import TASK_REWARDS, build_task_sft, task_prompts

    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    rewards = list(args.rewards or TASK_REWARDS)
    for r in rewards:
        if r not in available_rewards():
            raise ValueError(f"--rewards: unknown reward {r!r}; built in: {available_rewards()}")
    if len(rewards) < 2:
        raise ValueError(f"--rewards needs at least 2 objectives, got {rewards}")
    if args.sft is None:
        sft = build_task_sft(args.task_dir / "sft", progress=not args.no_progress)
    else:
        sft = args.sft
    prompts = _read_lines(args.prompts, "--prompts") if args.prompts else task_prompts("train")
    config = PPOConfig(
        steps=args.steps, batch_size=args.batch_size, mini_batch_size=args.mini_batch_size,
        grad_accum_steps=args.grad_accum, ppo_epochs=args.epochs, lr=args.lr, kl_coef=args.kl_coef,
        kl_estimator=args.kl_estimator, adaptive_kl=args.adaptive_kl, target_kl=args.target_kl,
        vf_coef=args.vf_coef, temperature=args.temperature, max_new_tokens=args.max_new_tokens,
        missing_eos_penalty=args.missing_eos_penalty, whiten_rewards=args.whiten_rewards, seed=args.seed,
        bf16=args.bf16, gradient_checkpointing=args.gradient_checkpointing, early_stop_kl=args.early_stop_kl,
        save_every=args.save_every)
    if args.normalize and args.normalization:
        raise ValueError("--normalize and --normalization exclude each other")
    if not (args.normalize or args.normalization):
        norm = None
    elif args.normalization:
        norm = RewardNormalization.load(args.normalization)
        if len(norm.mean) != len(rewards):
            raise ValueError(f"--normalization {args.normalization} has {len(norm.mean)} entries for "
                             f"{len(rewards)} rewards")
    else:
        from bonesoup.train.ppo.checkpoint_training import measure_reward_normalization

        norm = measure_reward_normalization(sft, prompts, rewards, max_new_tokens=config.max_new_tokens,
                                            temperature=config.temperature, seed=config.seed)
    return sft, prompts, rewards, config, norm


def _cmd_train(args) -> int:
    from bonesoup.train.ppo.checkpoint_training import train_checkpoint
    from bonesoup.train.rewards import combination_weights

    sft, prompts, rewards, config, norm = _setup(args)
    n = len(rewards)
    if args.beta is not None and args.backbone is None:
        raise ValueError("--beta applies to --backbone only")
    weights = combination_weights(n, expert=args.expert, backbone=args.backbone, beta=args.beta,
                                  preference=args.preference)
    if args.expert is not None:
        name = f"expert-{args.expert}"
    elif args.backbone is not None:
        name = f"backbone-{args.backbone}"
    else:
        name = "preference-" + "-".join(f"{m:g}" for m in args.preference)
    out = args.out or TRAIN_DIR / name
    records = train_checkpoint(sft, out, rewards=rewards, weights=weights, prompts=prompts, config=config,
                               normalization=norm, separate_critic=args.value_model == "separate",
                               lora_rank=args.lora_rank, force=args.force, progress=not args.no_progress, device=args.device,
                               metadata={"combination": name, "beta": args.beta}, resume=args.resume)
    if _is_main():
        last = records[-1]
        print(json.dumps({"out": str(out), "weights": weights.tolist(), "steps": len(records),
                          "final_score": last["score"], "final_kl": last["kl"],
                          **{k: v for k, v in last.items() if k.startswith("reward/")}}, indent=2))
    return 0


def _is_main() -> bool:
    import os

    return int(os.environ.get("RANK", "0")) == 0


def _cmd_train_all(args) -> int:
    import numpy as np
    import torch

    from bonesoup.merge.coefficients import backbone_matrix
    from bonesoup.train.ppo.checkpoint_training import evaluate_checkpoint, train_checkpoint
    from bonesoup.train.rewards import CombinedReward
    from bonesoup.tasks.review import task_prompts

    sft, prompts, rewards, config, norm = _setup(args)
    n = len(rewards)
    B = backbone_matrix(n, args.beta)
    runs = [(f"backbone-{j}", B[j]) for j in range(n)]
    if args.experts:
        runs += [(f"expert-{i}", np.eye(n)[i]) for i in range(n)]
    root = args.out
    for name, _ in runs:  # refuse before hours of training, not after
        if (root / name).exists() and not args.force and not args.resume:
            raise FileExistsError(f"output directory {root / name} already exists; pass --force to replace it")
    root.mkdir(parents=True, exist_ok=True)
    if norm is not None and _is_main():
        (root / "reward_normalization.json").write_text(json.dumps(norm.to_dict(), indent=2))
    summary = {"sft": str(sft), "beta": args.beta, "rewards": rewards, "models": {}}
    for name, w in runs:
        if _is_main():
            print(f"[train-all] {name}: weights {np.round(w, 4).tolist()}", file=sys.stderr)
        if args.resume and not args.force and (root / name / "config.json").is_file():  # written before the kill
            from bonesoup.train.ppo.training_log import read_training_log

            records = read_training_log(root / name / "train_log.jsonl")
        else:
            records = train_checkpoint(sft, root / name, rewards=rewards, weights=w, prompts=prompts, config=config,
                                       normalization=norm, separate_critic=args.value_model == "separate",
                                       lora_rank=args.lora_rank, force=args.force, progress=not args.no_progress,
                                       device=args.device, metadata={"combination": name, "beta": args.beta},
                                       resume=args.resume)
        summary["models"][name] = {"weights": w.tolist(), "final_score": records[-1]["score"],
                                   "final_kl": records[-1]["kl"],
                                   "seconds": sum(r["seconds"] for r in records)}
    if args.eval and _is_main():
        eval_prompts = _read_lines(args.eval_prompts, "--eval-prompts") if args.eval_prompts else task_prompts("test")
        evals = {}
        for name, path, w in [("sft", sft, None), *[(nm, root / nm, w) for nm, w in runs]]:
            evals[name] = evaluate_checkpoint(path, eval_prompts, rewards, ref=sft if w is not None else None,
                                              samples_per_prompt=args.eval_samples,
                                              max_new_tokens=config.max_new_tokens, temperature=config.temperature,
                                              weights=w, normalization=norm)
            if w is not None:  # the SFT samples scored with this model's own combination: the gain
                sft_obj = torch.tensor(evals["sft"]["per_sample"])
                s = CombinedReward(rewards, w, normalization=norm).score(sft_obj)
                evals[name]["sft_score"] = {"mean": float(s.mean()), "std": float(s.std())}
        summary["eval"] = evals
        # How the rewards go together on SFT samples (Pearson): the conflict as the SFT model sees it.
        corr = np.corrcoef(np.asarray(evals["sft"]["per_sample"]).T)
        summary["sft_reward_correlation"] = corr.tolist()
        _print_eval(evals, rewards)
        print(f"Pearson correlation of the rewards on SFT samples: {np.round(corr, 3).tolist()}")
    if _is_main():
        tmp = root / ".train-all.json.tmp"
        tmp.write_text(json.dumps(summary, indent=2))
        tmp.replace(root / "train-all.json")
        print(f"[train-all] summary: {root / 'train-all.json'}", file=sys.stderr)
    return 0


def _print_eval(evals: dict, rewards: list[str]) -> None:
    head = f"{'model':<12}" + "".join(f"{r:>22}" for r in rewards) + f"{'own score (SFT -> model)':>34}{'KL':>16}"
    print(head)
    for name, e in evals.items():
        row = f"{name:<12}" + "".join(f"{e['rewards'][r]['mean']:>13.3f} +- {e['rewards'][r]['std']:<5.3f}"
                                      for r in rewards)
        if "score" in e:
            row += (f"{e['sft_score']['mean']:>12.3f} +- {e['sft_score']['std']:.3f} -> "
                    f"{e['score']['mean']:.3f} +- {e['score']['std']:.3f}")
        else:
            row += " " * 34
        if "kl" in e:
            row += f"{e['kl']['mean']:>9.2f} +- {e['kl']['std']:.2f}"
        print(row)

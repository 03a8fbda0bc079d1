"""PPO for causal language models: configuration, the policy-and-value module, the training loop.

One :meth:`PPOTrainer.step` is the numbered sequence of CleanRL's ``ppo.py``:

1. choose the step's prompts (the same global batch on every process);
2. roll out: sample up to T tokens per prompt with the one decode loop
   (``guided_generate``: KV cache, fused sampler, one key per rollout), pad after the first EOS;
3. score each (prompt, response) with the reward function; penalise missing EOS;
4. gather the global batch on every process (data parallel);
5. old log-probs, values and reference log-probs, in exactly the micro-batches
   of epoch 0 (so the first minibatch sees ratio 1 and approximate KL 0);
6. per-token KL penalty, score on the last real token, GAE, whitening;
7. several epochs over shuffled minibatches with gradient accumulation,
   clipped surrogate + clipped value loss, grad-norm clipping (optionally
   stopped early when the approximate KL to the rollout policy grows too large);
8. statistics and the KL-coefficient update (fixed, or adaptive: Ziegler et al.).

Data parallel: under ``torchrun`` every process samples and scores its slice
of the global batch, then all of them hold the whole (small) rollout tensors,
so whitening and minibatch choice are those of one process; each process
trains on its share of every minibatch and DDP averages the gradients. The
loss of a micro-batch is its token sum over the minibatch's global token
count times the world size, so the averaged gradient is exactly the one
process's masked mean over the minibatch.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import time
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn

from .losses import (
    AdaptiveKLController,
    FixedKLController,
    entropy_from_logits,
    gae,
    kl_penalty,
    masked_mean,
    masked_whiten,
    policy_loss,
    token_rewards,
    value_loss,
)
from bonesoup.decode.batching import derive_seed, left_pad_prompts, position_ids_from_mask

from .config import PPOConfig
from .distributed import DistInfo, init_distributed
from .policy import PolicyAndValue, disable_dropout, enable_checkpointing, is_peft_model, with_lora
from .rollout import check_special_tokens, decode_responses, generate_rollout, logprobs_from_logits, response_logits

__all__ = ["PPOConfig", "PolicyAndValue", "PPOTrainer", "disable_dropout", "with_lora", "DistInfo", "init_distributed"]


# Streams of the CPU generators, keyed (seed, step, stream, i): four keys, so never a rollout's
# Philox key derive_seed(seed, step, index), which has three.
_PROMPTS, _SHUFFLE = 1, 2


def _generator(*keys: int) -> torch.Generator:
    """A CPU generator for prompt choice and minibatch shuffles, seeded by the one scheme (derive_seed)."""
    return torch.Generator().manual_seed(derive_seed(*keys) & (2**63 - 1))


class PPOTrainer:
    """PPO on a causal LM with a reward function on (prompt, response) text.

    Parameters
    ----------
    config : PPOConfig
    policy : transformers causal LM
        Trained in place (its dropout is turned off). Usually the SFT model.
    tokenizer : transformers tokenizer
        Must have an EOS and a pad token, distinct.
    reward_fn : callable
        ``reward_fn(prompts, responses)`` -> a :class:`bonesoup.train.rewards.RewardOutput`
        (score (B,) plus per-objective rewards for the log) or B floats.
    prompts : sequence of str
        Prompts to draw from (with replacement, seeded per step).
    ref_model : causal LM, optional
        Frozen reference; default a frozen copy of ``policy`` as given (the SFT
        model), or for a LoRA policy (:func:`with_lora`) the base model with
        the adapters disabled.
    critic : causal LM, optional
        A separate trunk for the value head (default: the policy's trunk).
    objective_names : sequence of str, optional
        Names of the per-objective rewards in the log (default: ``reward_fn.names``).
    device : torch.device or str, optional
        Default: ``cuda:LOCAL_RANK`` when CUDA is available, else CPU.
    """

    def __init__(self, config: PPOConfig, policy: nn.Module, tokenizer, reward_fn: Callable, prompts: Sequence[str],
                 *, ref_model: nn.Module | None = None, critic: nn.Module | None = None,
                 objective_names: Sequence[str] | None = None, device: str | torch.device | None = None):
        if not isinstance(config, PPOConfig):
            raise TypeError(f"config must be a PPOConfig, got {type(config).__name__}")
        if isinstance(prompts, str) or not len(prompts):
            raise ValueError("prompts must be a non-empty sequence of strings")
        if not callable(reward_fn):
            raise TypeError(f"reward_fn must be callable, got {reward_fn!r}")
        self.config, self.tokenizer, self.reward_fn, self.prompts = config, tokenizer, reward_fn, list(prompts)
        self.pad_id, self.eos_id = check_special_tokens(tokenizer)
        if device is None:
            device = (torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if torch.cuda.is_available()
                      else torch.device("cpu"))
        self.device = torch.device(device)
        self.dist = init_distributed(self.device)
        config.check_world(self.dist.world)
        cuda = self.device.type == "cuda"
        self.autocast_dtype = torch.bfloat16 if (config.bf16 if config.bf16 is not None else cuda) else None
        names = objective_names if objective_names is not None else getattr(reward_fn, "names", None)
        self.objective_names = list(names) if names is not None else None

        # The reference is the policy as given (the SFT model), frozen: a copy made before anything
        # changes it or, for a peft (LoRA) policy, the same model with its adapters disabled (no copy).
        self.lora = is_peft_model(policy)
        if ref_model is not None:
            self.ref_model = ref_model
        elif self.lora:
            self.ref_model = None
        else:
            self.ref_model = copy.deepcopy(policy)
        if self.ref_model is not None:
            self.ref_model.to(self.device).eval().requires_grad_(False)
            disable_dropout(self.ref_model)
        for m in (policy, critic):
            if m is not None:
                disable_dropout(m)
                if config.gradient_checkpointing if config.gradient_checkpointing is not None else cuda:
                    enable_checkpointing(m)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            self.module = PolicyAndValue(policy, critic).to(self.device)
        self.model = self.module
        if self.dist.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            self.model = DistributedDataParallel(self.module, device_ids=[self.device.index] if cuda else None)
        self.optimizer = torch.optim.AdamW([p for p in self.module.parameters() if p.requires_grad], lr=config.lr,
                                           eps=config.adam_eps, weight_decay=0.0)
        self.kl_ctl = (AdaptiveKLController(config.kl_coef, config.target_kl, config.kl_horizon)
                       if config.adaptive_kl else FixedKLController(config.kl_coef))
        self.step_index = 0
        # Diagnostics of the last step's first micro-batch of epoch 0 (tests check ratio == 1 there).
        self.first_microbatch: dict[str, torch.Tensor] = {}
        # Rollout of the last step (global batch, CPU), for inspection and tests.
        self.last_rollout: dict[str, torch.Tensor] = {}

    @property
    def policy(self) -> nn.Module:
        return self.module.policy

    # ------------------------------------------------------------------ distributed plumbing

    def _gather_rows(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenate equally shaped per-process tensors along dim 0, in rank order."""
        if self.dist.world == 1:
            return x
        import torch.distributed as dist

        parts = [torch.empty_like(x) for _ in range(self.dist.world)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    def _all_mean(self, values: dict[str, float]) -> dict[str, float]:
        if self.dist.world == 1 or not values:
            return values
        import torch.distributed as dist

        keys = sorted(values)
        t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return {k: v / self.dist.world for k, v in zip(keys, t.tolist())}

    def _ref_logits(self, x: torch.Tensor, a: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        if self.ref_model is None:  # LoRA: the base model is the reference
            with self.module.policy.disable_adapter():
                return self.module.policy(input_ids=x, attention_mask=a, position_ids=p, use_cache=False).logits
        return self.ref_model(input_ids=x, attention_mask=a, position_ids=p, use_cache=False).logits

    def _autocast(self):
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def _minibatches(self, epoch: int) -> list[tuple[torch.Tensor, list[torch.Tensor]]]:
        """The minibatches of ``epoch``: (global rows, this process's micro-batches of them).

        Minibatch k is rows ``perm[kM:(k+1)M]`` of the global batch, whatever
        the world size; process r takes the r-th slice of it and cuts that
        into ``grad_accum_steps`` micro-batches.
        """
        c, w, r = self.config, self.dist.world, self.dist.rank
        perm = torch.randperm(c.batch_size, generator=_generator(c.seed, self.step_index, _SHUFFLE, epoch))
        share, micro = c.mini_batch_size // w, c.mini_batch_size // (w * c.grad_accum_steps)
        out = []
        for k in range(c.batch_size // c.mini_batch_size):
            rows = perm[k * c.mini_batch_size:(k + 1) * c.mini_batch_size]
            mine = rows[r * share:(r + 1) * share]
            out.append((rows, [mine[j * micro:(j + 1) * micro] for j in range(c.grad_accum_steps)]))
        return out

    # ------------------------------------------------------------------ one PPO step

    def step(self) -> dict:
        """One rollout batch and its PPO update. Returns the step's statistics (floats, identical on all ranks)."""
        c, d, dev = self.config, self.dist, self.device
        B, T, local = c.batch_size, c.max_new_tokens, c.batch_size // self.dist.world
        t0 = time.perf_counter()

        # 1. Prompts: the same global batch on every process; this process samples rows [rank*local, +local).
        pick = _generator(c.seed, self.step_index, _PROMPTS, 0)
        idx = torch.randint(len(self.prompts), (B,), generator=pick).tolist()
        batch_prompts = [self.prompts[i] for i in idx]
        width = max(len(self.tokenizer(p, add_special_tokens=False)["input_ids"]) for p in batch_prompts)
        if c.max_prompt_tokens is not None:
            width = min(width, c.max_prompt_tokens)
        rows = range(d.rank * local, (d.rank + 1) * local)
        my_prompts = [batch_prompts[i] for i in rows]
        query, query_mask = left_pad_prompts(self.tokenizer, my_prompts, max_prompt_tokens=c.max_prompt_tokens,
                                             width=width)

        # 2. Roll out through the one decode loop, in eval mode (dropout is off anyway; eval keeps the
        #    KV cache usable under gradient checkpointing). Rollout i of the global batch draws with the
        #    key derive_seed(seed, step, i): its tokens depend on nothing else (not the batch, not the rank).
        keys = torch.tensor([derive_seed(c.seed, self.step_index, i) for i in rows], dtype=torch.int64)
        policy = self.module.policy
        policy.eval()
        gb = c.generation_batch_size or local
        parts = []
        for i in range(0, local, gb):
            with self._autocast():
                parts.append(generate_rollout(policy, query[i:i + gb].to(dev), query_mask[i:i + gb].to(dev),
                                              seeds=keys[i:i + gb], max_new_tokens=T, temperature=c.temperature,
                                              eos_id=self.eos_id, pad_id=self.pad_id))
        response = torch.cat([p.response for p in parts]).cpu()
        response_mask = torch.cat([p.response_mask for p in parts]).cpu()
        has_eos = torch.cat([p.has_eos for p in parts]).cpu()
        t_rollout = time.perf_counter() - t0

        # 3. Scores on text, computed where the samples are.
        texts = decode_responses(self.tokenizer, response, response_mask, self.eos_id)
        out = self.reward_fn(my_prompts, texts)
        if hasattr(out, "score"):
            score, objectives = out.score, out.objectives
        else:
            score, objectives = torch.as_tensor(out, dtype=torch.float32), None
        score = torch.as_tensor(score, dtype=torch.float32).reshape(-1)
        if score.shape != (local,):
            raise ValueError(f"reward_fn returned {tuple(score.shape)} scores for {local} rollouts")
        if not torch.isfinite(score).all():
            raise ValueError("reward_fn returned a non-finite score")
        raw_score = score.clone()
        if c.missing_eos_penalty is not None:
            score = score - c.missing_eos_penalty * (~has_eos).float()

        # 4. The whole batch on every process (tokens and scores are small).
        query = self._gather_rows(query.to(dev)).cpu()
        query_mask = self._gather_rows(query_mask.to(dev)).cpu()
        response = self._gather_rows(response.to(dev)).cpu()
        response_mask = self._gather_rows(response_mask.to(dev)).cpu()
        has_eos = self._gather_rows(has_eos.to(dev)).cpu()
        score = self._gather_rows(score.to(dev)).cpu()
        raw_score = self._gather_rows(raw_score.to(dev)).cpu()
        if objectives is not None:
            objectives = self._gather_rows(torch.as_tensor(objectives, dtype=torch.float32).to(dev)).cpu()
        P = query.shape[1]
        ids = torch.cat([query, response], 1)
        attn = torch.cat([query_mask, response_mask], 1)
        pos = position_ids_from_mask(attn)
        mask = response_mask.float()

        # 5. Old log-probs / values / reference log-probs, in epoch 0's micro-batches: the first
        #    minibatch's forward then repeats these exact computations (ratio 1, approx KL 0).
        t1 = time.perf_counter()
        schedule = [self._minibatches(e) for e in range(c.ppo_epochs)]
        old_logp = torch.zeros(B, T)
        old_values = torch.zeros(B, T)
        ref_logp = torch.zeros(B, T)
        entropy = torch.zeros(B, T)
        mine = torch.cat([mb for _, micro in schedule[0] for mb in micro])
        self.module.train()
        with torch.no_grad():
            for _, micro in schedule[0]:
                for mb in micro:
                    x, a, p = ids[mb].to(dev), attn[mb].to(dev), pos[mb].to(dev)
                    with self._autocast():
                        logits, values = self.module(x, a, p)
                        ref_logits = self._ref_logits(x, a, p)
                    lg = response_logits(logits, P)
                    old_logp[mb] = logprobs_from_logits(lg, response[mb].to(dev), c.temperature).cpu()
                    old_values[mb] = values[:, P - 1:-1].cpu()
                    ref_logp[mb] = logprobs_from_logits(response_logits(ref_logits, P), response[mb].to(dev),
                                                        c.temperature).cpu()
                    entropy[mb] = entropy_from_logits(lg / c.temperature).cpu()
        if d.world > 1:  # every process computed its epoch-0 share; give everyone everything
            order = self._gather_rows(mine.to(dev)).cpu()
            for t in (old_logp, old_values, ref_logp, entropy):
                t[order] = self._gather_rows(t[mine].to(dev)).cpu()

        # 6. Rewards per token (KL penalty everywhere, score on the last real token), GAE, whitening.
        kl = kl_penalty(old_logp, ref_logp, c.kl_estimator) * mask
        old_values = old_values * mask
        rewards = token_rewards(score, kl, mask, self.kl_ctl.value)
        if c.whiten_rewards:
            rewards = masked_whiten(rewards, mask, shift_mean=False)
        advantages, returns = gae(rewards, old_values, mask, c.gamma, c.lam)
        raw_advantages = advantages
        if c.whiten_advantages:
            advantages = masked_whiten(advantages, mask)

        # 7. PPO epochs over minibatches, gradient accumulation, grad-norm clipping; optionally stop the
        #    epochs early once the policy has moved too far from the rollout policy (trl's early_stopping:
        #    the minibatch that crossed 1.5 x early_stop_kl is still applied, the rest of the step is not).
        stats_sum: dict[str, float] = {}
        n_micro = updates = 0
        grad_norms = []
        stopped = False
        for epoch, minibatches in enumerate(schedule):
            if stopped:
                break
            for k, (rows, micro) in enumerate(minibatches):
                # Global token count of the minibatch (all processes' shares): the masked-mean denominator.
                n_tokens = mask[rows].sum()
                kl_sum = 0.0
                self.optimizer.zero_grad(set_to_none=True)
                for j, mb in enumerate(micro):
                    last = j == len(micro) - 1
                    sync = self.model.no_sync() if (d.world > 1 and not last) else nullcontext()
                    m = mask[mb].to(dev)
                    with sync:
                        with self._autocast():
                            logits, values = self.model(ids[mb].to(dev), attn[mb].to(dev), pos[mb].to(dev))
                        new_logp = logprobs_from_logits(response_logits(logits, P), response[mb].to(dev),
                                                        c.temperature)
                        values = values[:, P - 1:-1]
                        pg, pg_info = policy_loss(new_logp, old_logp[mb].to(dev), advantages[mb].to(dev),
                                                  c.cliprange)
                        vf, vf_clipped = value_loss(values, old_values[mb].to(dev), returns[mb].to(dev),
                                                    c.cliprange_value)
                        loss = ((pg + c.vf_coef * vf) * m).sum() / n_tokens.to(dev) * d.world
                        loss.backward()
                    with torch.no_grad():
                        if epoch == 0 and k == 0 and j == 0:
                            self.first_microbatch = {"ratio": pg_info["ratio"].detach().cpu(),
                                                     "approx_kl": pg_info["approx_kl"].detach().cpu(),
                                                     "mask": m.cpu()}
                        for name, v in (("policy_loss", pg), ("value_loss", vf),
                                        ("approx_kl", pg_info["approx_kl"]), ("clipfrac", pg_info["clipped"]),
                                        ("vf_clipfrac", vf_clipped), ("ratio", pg_info["ratio"])):
                            stats_sum[name] = stats_sum.get(name, 0.0) + float(masked_mean(v, m))
                        kl_sum += float((pg_info["approx_kl"] * m).sum())
                    n_micro += 1
                grad_norms.append(float(torch.nn.utils.clip_grad_norm_(self.module.parameters(), c.max_grad_norm)))
                self.optimizer.step()
                updates += 1
                if c.early_stop_kl is not None:  # the minibatch's token mean over all processes, same on every rank
                    mb_kl = self._all_mean({"kl": kl_sum})["kl"] * d.world / float(n_tokens)
                    if mb_kl > 1.5 * c.early_stop_kl:
                        stopped = True
                        break
        t_train = time.perf_counter() - t1

        # 8. Statistics (means over the global batch) and the KL controller.
        seq_kl = kl.sum(1)
        stats = {
            "step": self.step_index,
            "score": float(raw_score.mean()),
            "score_std": float(raw_score.std()),
            "kl": float(seq_kl.mean()),
            "kl_coef": float(self.kl_ctl.value),
            "non_score_reward": float((-self.kl_ctl.value * kl).sum(1).mean()),
            "entropy": float(masked_mean(entropy, mask)),
            "response_length": float(mask.sum(1).mean()),
            "eos_fraction": float(has_eos.float().mean()),
            "returns": float(masked_mean(returns, mask)),
            "advantages_raw": float(masked_mean(raw_advantages, mask)),
            "values": float(masked_mean(old_values, mask)),
            "grad_norm": sum(grad_norms) / len(grad_norms),
            "ppo_updates": updates,
            "early_stopped": float(stopped),
        }
        stats.update(self._all_mean({k: v / n_micro for k, v in stats_sum.items()}))
        if objectives is not None:
            names = self.objective_names or [f"r{i}" for i in range(objectives.shape[1])]
            for i, name in enumerate(names):
                stats[f"reward/{name}"] = float(objectives[:, i].mean())
        tokens = float(mask.sum())
        stats["rollout_tokens_per_s"] = tokens / max(t_rollout, 1e-9)
        stats["train_tokens_per_s"] = tokens * c.ppo_epochs / max(t_train, 1e-9)
        stats["seconds"] = time.perf_counter() - t0
        self.kl_ctl.update(stats["kl"], B)
        self.last_rollout = {"query": query, "query_mask": query_mask, "response": response,
                             "response_mask": response_mask, "score": score, "old_logprobs": old_logp,
                             "ref_logprobs": ref_logp, "values": old_values, "rewards": rewards,
                             "advantages": advantages}
        self.step_index += 1
        return stats

    # ------------------------------------------------------------------ the loop and the output

    def train(self, steps: int | None = None, *, out_dir: str | os.PathLike | None = None, force: bool = False,
              progress: bool = True, metadata: dict | None = None, resume: bool = False) -> list[dict]:
        """Train until ``steps`` steps are done (default ``config.steps``); optionally write the result.

        With ``out_dir``, the main process writes, atomically (a temporary
        directory renamed into place at the end; nothing is left under the
        target's name if training fails): the policy as a Hugging Face
        checkpoint (no value-head keys), the tokenizer, ``train_log.jsonl``
        (one line of statistics per step, written as training goes),
        ``train_log.png`` and ``bonesoup-train.json`` (config, metadata, time).

        ``config.save_every = N > 0``: the main process writes a training checkpoint
        (:mod:`~bonesoup.train.ppo.training_state`) every N steps under ``config.checkpoint_dir``
        (default ``<out_dir>.checkpoints``), keeping the newest; they are removed once ``out_dir`` is
        in place. ``resume=True`` continues from the newest complete one (none: from step 0), with the
        uninterrupted run's result; one of a run with other settings (``config.run_settings()``),
        prompts, reward, trainable parameters or ``metadata`` is refused, naming the field.

        Returns the per-step statistics of every step (restored ones included).
        """
        from . import training_state as ts
        from .training_log import TrainingLog

        c = self.config
        steps = c.steps if steps is None else steps
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ValueError(f"steps must be a non-negative integer, got {steps!r}")
        ckpt_root = Path(c.checkpoint_dir) if c.checkpoint_dir is not None else (
            Path(f"{os.fspath(out_dir)}.checkpoints") if out_dir is not None else None)
        if (c.save_every or resume) and ckpt_root is None:
            raise ValueError("save_every / resume need config.checkpoint_dir or an out_dir (checkpoints go beside it)")
        description = ts.run_description(self, metadata) if ckpt_root is not None else None
        records: list[dict] = []
        write = out_dir is not None and self.dist.is_main
        from bonesoup.merge.checkpoint import atomic_output_dir

        # Refuses an existing output before any training.
        ctx = atomic_output_dir(out_dir, force=force) if write else nullcontext(None)
        t0 = time.perf_counter()
        with ctx as tmp:
            latest = ts.latest_checkpoint(ckpt_root) if resume else None
            if latest is not None:
                records = ts.restore_trainer(self, latest, description)
            log = TrainingLog(Path(tmp) / "train_log.jsonl") if write else None
            for r in records if log is not None else ():
                log.append(r)
            bar = range(self.step_index, steps)
            if progress and self.dist.is_main:
                from tqdm.auto import tqdm

                bar = tqdm(bar, desc="ppo", unit="step", dynamic_ncols=True)
            for _ in bar:
                s = self.step()
                records.append(s)
                if log is not None:
                    log.append(s)
                if c.save_every and self.step_index % c.save_every == 0 and self.step_index < steps \
                        and self.dist.is_main:
                    ts.save_trainer(self, ckpt_root, records, description)
                if hasattr(bar, "set_postfix"):
                    bar.set_postfix(score=f"{s['score']:.3f}", kl=f"{s['kl']:.2f}", ent=f"{s['entropy']:.2f}")
            if write:
                log.close()
                self.save_policy(tmp)
                log.plot(Path(tmp) / "train_log.png", self.objective_names)
                meta = {"config": asdict(c), "steps": steps, "world_size": self.dist.world,
                        "seconds": time.perf_counter() - t0, "final": records[-1] if records else None,
                        "resumed_from": str(latest) if latest is not None else None,
                        "objectives": self.objective_names, **(metadata or {})}
                (Path(tmp) / "bonesoup-train.json").write_text(json.dumps(meta, indent=2))
        if write and ckpt_root is not None:  # the output is in place: the checkpoints have served
            for p in ts.complete_checkpoints(ckpt_root):
                shutil.rmtree(p, ignore_errors=True)
            if ckpt_root.is_dir() and not any(ckpt_root.iterdir()):
                ckpt_root.rmdir()
        return records

    def save_policy(self, out_dir: str | os.PathLike) -> None:
        """``save_pretrained`` of the policy alone (no value head) plus the tokenizer, into ``out_dir``.

        A LoRA policy is saved with its adapters merged into the base weights (no copy of the model,
        the base left as it was: :func:`~bonesoup.train.ppo.policy.merged_lora_state_dict`): a full
        checkpoint with the SFT model's keys, which the merges (``merge_checkpoints``, ``LiveSoup``) combine.
        """
        if self.lora:
            from .policy import merged_lora_state_dict

            self.policy.get_base_model().save_pretrained(out_dir, state_dict=merged_lora_state_dict(self.policy))
        else:
            self.policy.save_pretrained(out_dir)
        self.tokenizer.save_pretrained(out_dir)

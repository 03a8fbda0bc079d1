"""Explicit value models for MAGE: token-level Q-functions, trained by regression, saved as HF checkpoints.

A value model for the reward combination ``r = sum_i weights[i] r_i`` is a
causal LM with the SFT model's architecture whose outputs ``[B, L, V]`` are
Q-values: the output at position t for vocabulary token v estimates
``E[r | prefix up to t, next token v]`` when the SFT policy writes the rest.

- Built from the SFT checkpoint: the same trunk, an UNTIED output head
  initialised to zero. A token never taken in the training samples keeps
  Q = 0 exactly -- no spurious preference -- and guidance
  ``z_base + w * Q`` only moves tokens the data says something about.
- Trained on Monte-Carlo targets: completions are sampled ONCE from the SFT
  policy and scored with every reward; every response position t (up to and
  including the first EOS) regresses ``Q(prefix_<t, a_t)`` onto the
  completion's combined reward (mean squared error on the taken tokens).
  The same samples serve every value model, so n value models cost one
  sampling pass.
- Saved with ``save_pretrained`` (config says ``tie_word_embeddings: false``)
  and loaded by ``AutoModelForCausalLM``; every value model of one SFT has
  the same keys and shapes, so they merge weight by weight
  (:class:`bonesoup.decode.values.ValueSoup`).
"""

from __future__ import annotations

import copy
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from bonesoup.decode.batching import model_device, position_ids_from_mask
from bonesoup.fingerprint import checkpoint_fingerprint, fingerprint

__all__ = ["ValueData", "make_value_model", "load_value_model", "sample_value_data", "value_targets",
           "value_predictions", "value_loss", "ensemble_loss", "train_value_models"]


@dataclass
class ValueData:
    """Sampled completions and their rewards.

    ids, mask : [N, P + T] int64, left-padded prompt + response (pad after the first EOS) and its mask.
    prompt_width : P.
    response : [N, T] int64 and response_mask : [N, T] int64 (1 up to and including the first EOS).
    rewards : [N, n] float64, the raw rewards per objective (names in ``names``).
    """

    ids: torch.Tensor
    mask: torch.Tensor
    prompt_width: int
    response: torch.Tensor
    response_mask: torch.Tensor
    rewards: torch.Tensor
    names: list

    def __len__(self) -> int:
        return self.ids.shape[0]

    def subset(self, idx: torch.Tensor) -> "ValueData":
        return ValueData(self.ids[idx], self.mask[idx], self.prompt_width, self.response[idx],
                         self.response_mask[idx], self.rewards[idx], self.names)


def make_value_model(sft_model):
    """A value model from an SFT causal LM (in memory): same trunk weights, untied zero output head.

    Before training its outputs are exactly 0 for every token. The SFT model is not modified.
    """
    config = copy.deepcopy(sft_model.config)
    config.tie_word_embeddings = False
    model = type(sft_model)(config)
    missing, unexpected = model.load_state_dict(sft_model.state_dict(), strict=False)
    head = model.get_output_embeddings()
    if head is None:
        raise TypeError(f"{type(sft_model).__name__} has no output embeddings to turn into a value head")
    if head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr():
        raise RuntimeError(f"{type(sft_model).__name__} ignores tie_word_embeddings=False: the value head would "
                           "share the input embeddings")
    if unexpected or [k for k in missing if not k.startswith(("lm_head", "score"))]:
        raise RuntimeError(f"value model keys differ from the SFT model's: missing {missing}, unexpected {unexpected}")
    with torch.no_grad():
        head.weight.zero_()
        if getattr(head, "bias", None) is not None:
            head.bias.zero_()
    return model.to(next(sft_model.parameters()).device).eval()


def load_value_model(path: str | os.PathLike, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
    """A saved value model (``AutoModelForCausalLM``), eval mode, fp32 by default."""
    from transformers import AutoModelForCausalLM

    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a checkpoint directory (no config.json)")
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype or torch.float32).to(device).eval()


@torch.no_grad()
def sample_value_data(sft: str | os.PathLike, prompts: Sequence[str], rewards: Sequence, *, samples: int = 2048,
                      max_new_tokens: int = 20, temperature: float = 1.0, seed: int = 0,
                      device: str | torch.device = "cpu") -> ValueData:
    """Sample ``samples`` SFT completions (prompts cycled in order, per-sample seeded) on ``device`` and score them.

    The returned tensors are on the CPU, whatever the device.

    Sampling is the one decode loop's (:func:`bonesoup.train.ppo.rollout.sample_rollouts`,
    i.e. ``guided_generate`` with key ``derive_seed(seed, i)`` for completion i).
    """
    from bonesoup.train.ppo.checkpoint_training import _reward_fns, load_policy
    from bonesoup.train.ppo.rollout import decode_responses, sample_rollouts
    from bonesoup.train.rewards import CombinedReward

    if isinstance(prompts, str) or not len(prompts):
        raise ValueError("prompts must be a non-empty sequence of strings")
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 2:
        raise ValueError(f"samples must be an integer >= 2, got {samples!r}")
    model, tok = load_policy(sft, device=device)
    fns, names = _reward_fns(rewards)
    ps = [prompts[i % len(prompts)] for i in range(samples)]
    (r,) = sample_rollouts(model, tok, ps, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed,
                           batch_size=samples)
    texts = decode_responses(tok, r.response, r.response_mask, tok.eos_token_id)
    obj = CombinedReward(fns, np.zeros(len(fns)), names=names).objectives(ps, texts)
    ids, mask, _ = r.full()
    return ValueData(ids.cpu(), mask.cpu(), r.query.shape[1], r.response.cpu(), r.response_mask.cpu(),
                     torch.as_tensor(obj, dtype=torch.float64), names)


def _weights(weights, n: int, name: str = "weights") -> torch.Tensor:
    w = torch.as_tensor(np.asarray(weights, dtype=np.float64))
    if w.shape != (n,) or not bool(torch.isfinite(w).all()):
        raise ValueError(f"{name} must hold {n} finite numbers (one per reward), got {weights!r}")
    return w


def value_targets(data: ValueData, weights) -> torch.Tensor:
    """Monte-Carlo targets [N, T] fp32: the completion's combined reward at every response position (0 on pads)."""
    w = _weights(weights, data.rewards.shape[1])
    r = (data.rewards @ w).float()
    return r[:, None] * data.response_mask.float()


def value_predictions(model, data: ValueData) -> torch.Tensor:
    """``Q(prefix_<t, a_t)`` [N, T] fp32 on the model's device for every response token a_t (autograd-enabled
    when the caller is); ``data`` may live anywhere (it is moved to the model's device)."""
    dev = model_device(model)
    ids, mask = data.ids.to(dev), data.mask.to(dev)
    q = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits
    q = q[:, data.prompt_width - 1:-1].float()
    return q.gather(-1, data.response.to(dev).unsqueeze(-1)).squeeze(-1)


def _mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.to(pred.device).float()
    return ((pred - target.to(pred.device)) ** 2 * m).sum() / m.sum().clamp(min=1)


@torch.no_grad()
def value_loss(model, data: ValueData, weights, *, batch_size: int = 512) -> float:
    """Mean squared error of ``model``'s Q on the taken tokens of ``data`` against ``sum_i weights[i] r_i``."""
    return ensemble_loss([model], [1.0], data, weights, batch_size=batch_size)


@torch.no_grad()
def ensemble_loss(models: Sequence, coeffs: Sequence[float], data: ValueData, weights, *,
                  batch_size: int = 512) -> float:
    """MSE of the output-space ensemble ``sum_k coeffs[k] * Q_k`` (compare with a weight-space merge's)."""
    if len(models) != len(coeffs) or not models:
        raise ValueError(f"models and coeffs must be non-empty and of one length, got {len(models)} and {len(coeffs)}")
    num = den = 0.0
    for s in range(0, len(data), batch_size):
        d = data.subset(torch.arange(s, min(s + batch_size, len(data))))
        pred = sum(float(c) * value_predictions(m, d) for c, m in zip(coeffs, models))
        m = d.response_mask.to(pred.device).float()
        num += float((((pred - value_targets(d, weights).to(pred.device)) ** 2) * m).sum())
        den += float(m.sum())
    return num / max(den, 1.0)


def train_value_models(sft: str | os.PathLike, out_dirs: Sequence[str | os.PathLike], *, rewards: Sequence[str],
                       weights: Sequence[Sequence[float]], prompts: Sequence[str], samples: int = 2048,
                       max_new_tokens: int = 20, temperature: float = 1.0, steps: int = 300, batch_size: int = 64,
                       lr: float = 1e-3, seed: int = 0, holdout: float = 0.1, force: bool = False,
                       progress: bool = False, device: str | torch.device = "cpu") -> list[Path]:
    """Train one explicit value model per weight vector on ONE shared set of SFT samples.

    Parameters
    ----------
    sft : SFT checkpoint directory (the policy whose continuations the values are of).
    out_dirs : one output directory per value model.
    rewards : reward names (or callables) -- the objectives.
    weights : [len(out_dirs)][len(rewards)]: value model k regresses ``sum_i weights[k][i] r_i``
        (one-hot rows: one value model per objective; backbone rows: Bone Soup's mixtures).
    prompts : training prompts (cycled to ``samples`` completions).
    samples, max_new_tokens, temperature : the SFT sampling.
    steps, batch_size, lr : AdamW regression (completions per step).
    seed : sampling, hold-out split, minibatch order and init order.
    holdout : fraction of the completions held out to report the MSE (and the
        constant-mean predictor's, to show what was learned).
    device : where the SFT samples are drawn and the value models trained (they are saved from there).
    force : rebuild even if cached. A directory whose ``bonesoup-value.json``
        holds the same fingerprint (every argument that matters, the SFT's own
        fingerprint, the torch version) is reused without sampling.

    Returns the output directories. Each holds the model, the tokenizer and
    ``bonesoup-value.json``; each is written atomically.
    """
    from transformers import AutoTokenizer

    from bonesoup.merge.checkpoint import atomic_output_dir
    from bonesoup.train.ppo.checkpoint_training import load_policy

    sft = Path(sft)
    if not (sft / "config.json").is_file():
        raise FileNotFoundError(f"sft: {sft} is not a checkpoint directory (no config.json)")
    outs = [Path(o) for o in out_dirs]
    if not outs:
        raise ValueError("out_dirs must name at least one output directory")
    weights = [list(map(float, w)) for w in weights]
    if len(weights) != len(outs):
        raise ValueError(f"weights has {len(weights)} rows but out_dirs {len(outs)} directories (one row each)")
    names = [r if isinstance(r, str) else getattr(r, "name", f"r{i}") for i, r in enumerate(rewards)]
    for k, w in enumerate(weights):
        _weights(w, len(names), f"weights[{k}]")
    if not 0.0 < holdout < 1.0:
        raise ValueError(f"holdout must lie in (0, 1), got {holdout!r}")
    for name, v in (("steps", steps), ("batch_size", batch_size), ("samples", samples)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    common = dict(sft=checkpoint_fingerprint(sft), rewards=names, prompts=fingerprint(list(prompts)),
                  samples=samples, T=max_new_tokens, temperature=temperature, steps=steps, batch_size=batch_size,
                  lr=lr, seed=seed, holdout=holdout, torch=torch.__version__,
                  # The samples' draws: models cached under an older sampler are rebuilt once.
                  sampler="guided_generate/derive_seed")
    fps = [fingerprint({**common, "weights": w}) for w in weights]

    def cached(out: Path, fp: str) -> bool:
        try:
            return json.loads((out / "bonesoup-value.json").read_text()).get("fingerprint") == fp
        except (OSError, ValueError):
            return False

    todo = [k for k in range(len(outs)) if force or not cached(outs[k], fps[k])]
    if not todo:
        return outs
    t0 = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        data = sample_value_data(sft, prompts, rewards, samples=samples, max_new_tokens=max_new_tokens,
                                 temperature=temperature, seed=seed, device=device)
        t_sample = time.perf_counter() - t0
        perm = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))
        n_hold = max(1, int(round(holdout * len(data))))
        held, train = data.subset(perm[:n_hold]), data.subset(perm[n_hold:])
        sft_model, _ = load_policy(sft, device=device)
        tok = AutoTokenizer.from_pretrained(sft)
        for k in todo:
            t1 = time.perf_counter()
            torch.manual_seed(seed * 1_000_003 + k)
            model = make_value_model(sft_model).train()
            opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20) * max(0.1, 1 - s / steps))
            gen = torch.Generator().manual_seed(seed + 17 * k)
            it = range(steps)
            if progress:
                from tqdm.auto import tqdm

                it = tqdm(it, desc=f"value model {outs[k].name}", unit="step")
            for _ in it:
                d = train.subset(torch.randint(len(train), (min(batch_size, len(train)),), generator=gen))
                loss = _mse(value_predictions(model, d), value_targets(d, weights[k]), d.response_mask)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                sched.step()
            model.eval()
            target_train = (train.rewards @ _weights(weights[k], len(names))).float()
            const = float((target_train * train.response_mask.float().sum(1)).sum() / train.response_mask.sum())
            tgt = value_targets(held, weights[k])
            baseline = float(_mse(torch.full_like(tgt, const), tgt, held.response_mask))
            meta = {"fingerprint": fps[k], "rewards": names, "weights": weights[k], "samples": len(data),
                    "heldout_samples": n_hold, "heldout_mse": value_loss(model, held, weights[k]),
                    "baseline_mse": baseline, "final_train_mse": loss.item(), "seconds": time.perf_counter() - t1,
                    "sampling_seconds": t_sample, "args": common}
            with atomic_output_dir(outs[k], force=outs[k].exists()) as tmp:
                model.save_pretrained(tmp)
                tok.save_pretrained(tmp)
                (tmp / "bonesoup-value.json").write_text(json.dumps(meta, indent=2))
    return outs

"""The arithmetic of PPO for language models, as pure functions on tensors.

Shapes: B rollouts, T response positions. ``mask`` (B, T) is 1 on response
tokens that count (up to and including the first EOS) and 0 on padding and on
everything after the first EOS. All float tensors are float32 unless said.

References: Ziegler et al. 2019 (per-token KL penalty, adaptive KL
controller), Schulman et al. 2016 (GAE), Schulman et al. 2017 (clipped
surrogate), Huang et al. 2024 "The N+ implementation details of RLHF with
PPO" (score on the last token, masked whitening, value clipping, k1/k3).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = [
    "masked_mean",
    "masked_var",
    "masked_whiten",
    "kl_penalty",
    "last_token_index",
    "token_rewards",
    "gae",
    "policy_loss",
    "value_loss",
    "entropy_from_logits",
    "AdaptiveKLController",
    "FixedKLController",
]


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    """Mean of ``x`` over the positions where ``mask`` is 1 (all of them, or along ``dim``)."""
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum()
    return (x * mask).sum(dim) / mask.sum(dim)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of ``x`` over the masked positions (Bessel-corrected by default)."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    if unbiased:
        n = mask.sum()
        if n < 2:
            raise ValueError(f"masked_var needs at least 2 unmasked values, mask has {int(n)}")
        var = var * n / (n - 1)
    return var


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """``(x - mean) / std`` with statistics over the masked positions only; masked-out positions become 0.

    ``shift_mean=False`` only rescales (used for rewards, whose sign carries meaning).
    """
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask.to(x.dtype)


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) at the sampled tokens, (B, T).

    ``k1``: ``log pi - log pi_ref`` (unbiased, can be negative per token);
    ``k3``: ``(r - 1) - log r`` with ``r = pi_ref / pi`` (unbiased, never negative).
    """
    log_ratio = logprobs - ref_logprobs
    if estimator == "k1":
        return log_ratio
    if estimator == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"kl estimator must be 'k1' or 'k3', got {estimator!r}")


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last 1 in each row of a right-aligned response mask, (B,) int64.

    A row without any response token (cannot happen: the first sampled token
    always counts) would give -1; it is refused.
    """
    length = mask.sum(1)
    if bool((length == 0).any()):
        raise ValueError("every response must hold at least one token (mask has an all-zero row)")
    return (length - 1).long()


def token_rewards(score: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """Per-token rewards, (B, T): ``-kl_coef * kl`` on every response token, plus the score on the last real token.

    The sequence-level score lands where the episode ends: the EOS token, or
    the last sampled token when there is none. Padding and post-EOS positions
    get 0.
    """
    rewards = -kl_coef * kl * mask.to(kl.dtype)
    rows = torch.arange(score.shape[0], device=score.device)
    rewards[rows, last_token_index(mask)] += score.to(rewards.dtype)
    return rewards


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over response positions.

    ``delta_t = r_t + gamma V_{t+1} - V_t`` and ``A_t = delta_t + gamma lam A_{t+1}``,
    with ``V`` and ``r`` zeroed outside ``mask`` so the episode ends at the
    last real token (``V_{end} = 0``). Returns ``(advantages, returns)``,
    both (B, T), ``returns = advantages + values`` (the value targets), 0 outside ``mask``.
    """
    m = mask.to(values.dtype)
    values, rewards = values * m, rewards * m
    T = rewards.shape[1]
    last = torch.zeros_like(rewards[:, 0])
    adv = []
    for t in reversed(range(T)):
        next_value = values[:, t + 1] if t + 1 < T else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = delta + gamma * lam * last
        adv.append(last)
    advantages = torch.stack(adv[::-1], dim=1) * m
    return advantages, (advantages + values) * m


def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, cliprange: float
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped surrogate, per token, (B, T): ``max(-A r, -A clip(r, 1 - eps, 1 + eps))``, ``r = pi / pi_old``.

    Returns the per-token loss and per-token diagnostics: ``ratio``,
    ``approx_kl`` (``0.5 (log r)^2``) and ``clipped`` (1.0 where the clip was active).
    """
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    loss_unclipped = -advantages * ratio
    loss_clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    loss = torch.maximum(loss_unclipped, loss_clipped)
    return loss, {"ratio": ratio, "approx_kl": 0.5 * log_ratio**2,
                  "clipped": (loss_clipped > loss_unclipped).to(logprobs.dtype)}


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, cliprange_value: float
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped value loss, per token, (B, T): ``0.5 max((V - R)^2, (clip(V, V_old +- eps) - R)^2)``.

    Returns the per-token loss and where the clipped branch was the larger (float 0/1).
    """
    v_clipped = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    l1, l2 = (values - returns) ** 2, (v_clipped - returns) ** 2
    return 0.5 * torch.maximum(l1, l2), (l2 > l1).to(values.dtype)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of ``softmax(logits)`` over the last dim, in nats."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


@dataclass
class FixedKLController:
    """A constant KL coefficient."""

    value: float

    def update(self, current_kl: float, n_steps: int) -> None:
        pass


@dataclass
class AdaptiveKLController:
    """Ziegler et al. (2019): steer the KL coefficient so that the measured KL tracks ``target``.

    ``e = clip(KL / target - 1, -0.2, 0.2)``; ``beta <- beta (1 + e n / horizon)``
    after a batch of ``n`` rollouts: a KL above target raises the coefficient,
    below lowers it.
    """

    value: float
    target: float
    horizon: float

    def __post_init__(self):
        if not self.target > 0:
            raise ValueError(f"target_kl must be positive, got {self.target!r}")
        if not self.horizon > 0:
            raise ValueError(f"kl_horizon must be positive, got {self.horizon!r}")

    def update(self, current_kl: float, n_steps: int) -> None:
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon

"""The trained module: policy + value head, dropout off, LoRA adapters, activation checkpointing."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

__all__ = ["PolicyAndValue", "disable_dropout", "with_lora", "is_peft_model", "enable_checkpointing",
           "merged_lora_state_dict"]


def disable_dropout(model: nn.Module) -> nn.Module:
    """Set every dropout probability in ``model`` to 0, in place (the saved config is left alone).

    PPO's ratio compares two forward passes of the same weights; dropout
    would make it differ from 1 by noise. Covers ``nn.Dropout`` modules and
    float attributes named ``*dropout*`` that attention code reads directly.
    """
    for m in model.modules():
        if isinstance(m, nn.modules.dropout._DropoutNd):
            m.p = 0.0
        for name, v in list(vars(m).items()):
            if "dropout" in name and isinstance(v, float):
                setattr(m, name, 0.0)
    return model


class PolicyAndValue(nn.Module):
    """A causal LM policy and a scalar value head.

    The value head reads the last hidden state of the policy's own trunk
    (``critic=None``, the default) or of a separate critic LM. One forward
    returns both, so the rollout's old log-probs and values come from one pass.

    Parameters
    ----------
    policy : transformers causal LM
    critic : transformers causal LM or None
        A separate trunk for the value (e.g. a copy of the SFT model).
    """

    def __init__(self, policy: nn.Module, critic: nn.Module | None = None):
        super().__init__()
        self.policy = policy
        self.critic = critic
        hidden = (critic if critic is not None else policy).config.hidden_size
        # Zero init: the first value estimates are 0, the first advantages the whitened rewards.
        self.value_head = nn.Linear(hidden, 1)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, L) int64 each -> ``(logits (B, L, V), values (B, L) fp32)``."""
        out = self.policy(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                          output_hidden_states=self.critic is None, use_cache=False)
        if self.critic is None:
            hidden = out.hidden_states[-1]
        else:
            hidden = self.critic(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                 output_hidden_states=True, use_cache=False).hidden_states[-1]
        values = self.value_head(hidden.to(self.value_head.weight.dtype)).squeeze(-1).float()
        return out.logits, values


def is_peft_model(model: nn.Module) -> bool:
    """A peft ``PeftModel`` (LoRA adapters that can be disabled); peft itself is not imported."""
    return hasattr(model, "disable_adapter") and hasattr(model, "peft_config")


def with_lora(policy: nn.Module, rank: int = 8, alpha: float | None = None, dropout: float = 0.0,
              target_modules: Sequence[str] | str | None = None) -> nn.Module:
    """Wrap a causal LM with trainable LoRA adapters (needs the optional ``peft`` package).

    Only the adapters (and the value head) are trained; :class:`PPOTrainer`
    then uses the same model with adapters disabled as the reference, so no
    second copy of the weights is held. ``target_modules`` None: peft's
    default for the architecture.
    """
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise ImportError("LoRA needs the optional 'peft' package: pip install peft") from None
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"lora rank must be a positive integer, got {rank!r}")
    cfg = LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else 2 * rank, lora_dropout=dropout,
                     target_modules=target_modules, task_type="CAUSAL_LM")
    return get_peft_model(policy, cfg)


def enable_checkpointing(model: nn.Module) -> None:
    """Activation (gradient) checkpointing, non-reentrant, under whichever name this transformers uses."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


@torch.no_grad()
def merged_lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict of a peft LoRA model with its active adapters merged, without touching or copying the model.

    Keys are the base model's own (no ``base_layer.`` / ``lora_`` keys).
    Each adapted weight is a new tensor ``W + delta`` (the same arithmetic as
    peft's ``merge``); every other entry is the model's own tensor, so the
    extra memory is the adapted weights only, not a copy of the model (which
    ``copy.deepcopy(model).merge_and_unload()`` would make), and the model
    keeps training (its base, the PPO reference, is left bit for bit as it was).
    Vanilla LoRA only (no DoRA or other variants, no LoRA bias).
    """
    from peft.tuners.lora import LoraLayer

    base = model.get_base_model()
    merged = {}
    for name, mod in base.named_modules():
        if not isinstance(mod, LoraLayer):
            continue
        w = mod.get_base_layer().weight
        out = w
        for a in mod.active_adapters:
            if a not in mod.lora_A:
                continue
            if a in getattr(mod, "lora_variant", {}) or getattr(mod, "lora_bias", {}).get(a, False):
                raise NotImplementedError(f"{name}: adapter {a!r} is not vanilla LoRA (a variant or a LoRA bias); "
                                          "merging it is not supported here")
            out = out + mod.get_delta_weight(a).to(w.dtype)
        merged[f"{name}.weight"] = out
    sd = {}
    for k, v in base.state_dict(keep_vars=False).items():
        if "lora_" in k:
            continue
        k = k.replace(".base_layer.", ".")
        sd[k] = merged.get(k, v)
    return sd

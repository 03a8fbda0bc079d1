"""A tiny Qwen2 made in code (no download), its LoRA adapter backbones and full backbones: the vLLM models.

Qwen2 because vLLM fuses its q/k/v and gate/up layers (trained adapters, and
checkpoints, hold the unfused ones) and its q/k/v carry biases; head size 32,
the smallest vLLM's CPU attention backend takes; 4 query and 2 KV heads at
hidden 128, so tensor-parallel 2 splits both.

- :func:`make_tiny_qwen2_adapters`: the SFT model and LoRA backbones on it
  (``--engine vllm``'s embedded default);
- :func:`materialise_backbones`: those adapters as full checkpoints;
- :func:`make_tiny_qwen2`: the SFT model and full backbones perturbed in every
  weight (optionally tied embeddings, bf16), for the vLLM tests and benchmarks.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import torch

__all__ = ["make_tiny_qwen2", "make_tiny_qwen2_adapters", "materialise_backbones"]

#: The modules the tiny adapters adapt (every linear layer of a Qwen2 block).
_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _tiny_qwen2(tok, *, seed: int, hidden: int, layers: int, intermediate: int, tied: bool = False,
                dtype: torch.dtype = torch.float32):
    """A float32 Qwen2ForCausalLM sized to ``tok``, initialised from ``seed`` (the global RNG untouched)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=len(tok), hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=hidden // 32,
                         num_key_value_heads=max(1, hidden // 64), max_position_embeddings=1024,
                         tie_word_embeddings=tied, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id, torch_dtype=str(dtype).removeprefix("torch."))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return Qwen2ForCausalLM(config).eval()


def make_tiny_qwen2(root, n: int = 2, *, tied: bool = False, seed: int = 0, hidden: int = 128, layers: int = 2,
                    intermediate: int = 256, delta: float = 0.02,
                    dtype: torch.dtype = torch.float32) -> tuple[Path, list[Path]]:
    """Save ``root/sft`` and ``n`` full backbones ``root/backbone-{j}`` (SFT + ``delta`` * N(0, 1) on every weight).

    ``tied`` ties ``lm_head`` to ``embed_tokens`` (one tensor, perturbed once);
    ``dtype`` is the saved dtype (and the config's). The deltas are seeded by
    ``(seed, j)`` as :func:`~bonesoup.tasks.tiny_models.make_tiny_backbones`'
    are. Returns ``(sft_dir, [backbone dirs])``; each holds config, tokenizer
    and model.safetensors.
    """
    from bonesoup.tasks.tiny_models import make_tiny_tokenizer, save_perturbed_backbones

    tok = make_tiny_tokenizer()
    model = _tiny_qwen2(tok, seed=seed, hidden=hidden, layers=layers, intermediate=intermediate, tied=tied,
                        dtype=dtype)
    return save_perturbed_backbones(model, tok, Path(root), n, seed=seed, delta=delta, dtype=dtype)


def make_tiny_qwen2_adapters(root, n: int = 2, *, rank: int = 4, seed: int = 0, scale: float = 1.0,
                             hidden: int = 128, layers: int = 2, intermediate: int = 256) -> tuple[Path, list[Path]]:
    """A tiny Qwen2 SFT model and ``n`` LoRA adapter backbones on it, made in code (no download).

    Saves ``root/sft`` (config, tokenizer, model.safetensors; float32) and
    ``root/adapter-{j}`` (peft format: rank ``rank`` on every linear layer of
    every block, ``lora_alpha = 2 * rank``, A and B seeded by ``(seed, j)``;
    ``scale`` multiplies B, so the deltas are large enough that preferences
    change greedy text). The adapters target the unfused layers, as trained
    adapters do. Reuses an existing ``root``.
    """
    from bonesoup.merge.lora import LoraAdapter, LoraModule, is_adapter_dir
    from bonesoup.tasks.tiny_models import make_tiny_tokenizer

    root = Path(root)
    sft, dirs = root / "sft", [root / f"adapter-{j}" for j in range(n)]
    if (sft / "config.json").is_file() and all(is_adapter_dir(d) for d in dirs):
        return sft, dirs
    tok = make_tiny_tokenizer()
    model = _tiny_qwen2(tok, seed=seed, hidden=hidden, layers=layers, intermediate=intermediate)
    if not (sft / "config.json").is_file():
        model.save_pretrained(sft)
        tok.save_pretrained(sft)
    shapes = {name: (mod.in_features, mod.out_features) for name, mod in model.named_modules()
              if name.rsplit(".", 1)[-1] in _TARGETS}
    for j, d in enumerate(dirs):
        if is_adapter_dir(d):
            continue
        gen = torch.Generator().manual_seed(seed * 1_000_003 + j + 1)
        modules = {}
        for name, (fan_in, fan_out) in sorted(shapes.items()):
            A = torch.randn(rank, fan_in, generator=gen) / math.sqrt(fan_in)
            B = torch.randn(fan_out, rank, generator=gen) * (scale / math.sqrt(rank))
            modules[name] = LoraModule(A, B, 2.0)
        cfg = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(sft.resolve()),
               "r": rank, "lora_alpha": 2 * rank, "target_modules": list(_TARGETS), "lora_dropout": 0.0,
               "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
               "inference_mode": True}
        LoraAdapter(cfg, modules).save(d)
    return sft, dirs


def materialise_backbones(sft, adapter_dirs: Sequence, root) -> list[Path]:
    """Each LoRA backbone as a full checkpoint, ``W + D_j`` (float64 sum, float32 weights, with the tokenizer).

    For the full-weight path on the same models (tests, benchmarks): returns ``root/backbone-{j}``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bonesoup.merge.lora import load_adapter

    out = []
    for j, d in enumerate(adapter_dirs):
        path = Path(root) / f"backbone-{j}"
        if not (path / "config.json").is_file():
            model = AutoModelForCausalLM.from_pretrained(sft, dtype=torch.float32).eval()
            state = model.state_dict()
            with torch.no_grad():
                for name, delta in load_adapter(d).weight_deltas(torch.float64).items():
                    state[name].copy_((state[name].to(torch.float64) + delta).to(torch.float32))
            model.save_pretrained(path)
            AutoTokenizer.from_pretrained(sft).save_pretrained(path)
        out.append(path)
    return out

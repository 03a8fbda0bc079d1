"""``bonesoup serve --engine vllm``: the same API (app.py, protocol.py) on vLLM's AsyncLLM.

Two modes, picked by the backbones:

- adapter backbones (peft LoRA directories): every request's preference is its
  own mixture adapter (:mod:`bonesoup.vllm.adapters`), all in one continuous
  batch; no re-merge, no pause. ``POST /v1/preference`` only sets the default
  preference (of requests that give none) and makes its adapter ready.
  ``weights_version`` is the id of the mixture adapter a request used (the
  same id, the same weights).
- full-weight backbones: ``bonesoup.vllm.AsyncSoup`` re-merges in place. Like
  the hf engine, requests are served in rounds grouped by target (the current
  weights' group first): a group whose target differs pauses (in-flight
  requests finish), re-merges, resumes. A request for the live target starts
  at once unless requests for another target are waiting (so those are not
  starved). ``weights_version`` counts re-merges (0: the SFT model).

The engine runs an asyncio loop of its own on a thread (vLLM's ``AsyncLLM``
lives there); ``submit`` hands it a job from any thread and returns a
``concurrent.futures.Future``, the interface the app expects of the hf
``Engine``. Tokenization, the OpenAI fields, limits and errors are the app's
and the protocol's; text is decoded from the token ids by the same tokenizer
call as the hf engine, stop strings cut the same way (vLLM also stops there).

Sampling: greedy requests are exact (vLLM's argmax on the merged model);
sampled rows use vLLM's sampler with the row's Philox key as vLLM's per-request
``seed`` (reproducible, but not the hf engine's draws).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import math
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Sequence

import torch

from bonesoup.merge.live import RemergeInfo
from bonesoup.serve.engine import CURRENT, Engine
from bonesoup.serve.metrics import Metrics
from bonesoup.serve.protocol import DEFAULT_MAX_QUEUE, RequestError

__all__ = ["VLLMSoup", "VLLMEngine", "build_vllm_app", "make_tiny_qwen2_adapters", "VLLM_DEMO_DIR"]

log = logging.getLogger(__name__)

VLLM_DEMO_DIR = Path("out") / "serve-vllm-demo"

#: The modules the tiny adapters adapt (every linear layer of a Qwen2 block).
_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def make_tiny_qwen2_adapters(root, n: int = 2, *, rank: int = 4, seed: int = 0, scale: float = 1.0,
                             hidden: int = 128, layers: int = 2, intermediate: int = 256) -> tuple[Path, list[Path]]:
    """A tiny Qwen2 SFT model and ``n`` LoRA adapter backbones on it, made in code (no download).

    Saves ``root/sft`` (config, tokenizer, model.safetensors; float32) and
    ``root/adapter-{j}`` (peft format: rank ``rank`` on every linear layer of
    every block, ``lora_alpha = 2 * rank``, A and B seeded by ``(seed, j)``;
    ``scale`` multiplies B, so the deltas are large enough that preferences
    change greedy text). Qwen2 because vLLM fuses its q/k/v and gate/up layers
    (the adapters target the unfused ones, as trained adapters do); head size
    32, the CPU attention backend's smallest. Reuses an existing ``root``.
    """
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from bonesoup.merge.lora import LoraAdapter, LoraModule, is_adapter_dir
    from bonesoup.tasks.tiny_models import make_tiny_tokenizer

    root = Path(root)
    sft, dirs = root / "sft", [root / f"adapter-{j}" for j in range(n)]
    if (sft / "config.json").is_file() and all(is_adapter_dir(d) for d in dirs):
        return sft, dirs
    tok = make_tiny_tokenizer()
    config = Qwen2Config(vocab_size=len(tok), hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=hidden // 32,
                         num_key_value_heads=max(1, hidden // 64), max_position_embeddings=1024,
                         tie_word_embeddings=False, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config).eval()
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

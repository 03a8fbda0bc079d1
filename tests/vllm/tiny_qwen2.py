"""A tiny Qwen2ForCausalLM made in code (SFT + perturbed backbones), for the vLLM tests and benchmark.

Qwen2 because vLLM fuses its q/k/v and gate/up projections and its q/k/v
carry biases: the arena must hold vLLM's layout, not the checkpoint's. Head
size 32 (the smallest the CPU attention backend takes); 4 query and 2 KV
heads, so tensor-parallel 2 splits both.
"""

from __future__ import annotations

from pathlib import Path

import torch

from bonesoup.tasks.tiny_models import make_tiny_tokenizer


def make_tiny_qwen2(root, n: int = 2, *, tied: bool = False, seed: int = 0, hidden: int = 128,
                    layers: int = 2, intermediate: int = 256, delta: float = 0.02,
                    dtype: torch.dtype = torch.float32) -> tuple[Path, list[Path]]:
    """Save ``root/sft`` and ``root/backbone-{j}`` (SFT + ``delta`` * N(0, 1) on every weight, seeded by j).

    Returns ``(sft_dir, [backbone dirs])``; each holds config, tokenizer and model.safetensors.
    """
    from transformers import Qwen2Config, Qwen2ForCausalLM

    root = Path(root)
    tok = make_tiny_tokenizer()
    config = Qwen2Config(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=hidden // 32, num_key_value_heads=max(1, hidden // 64), max_position_embeddings=1024,
        tie_word_embeddings=tied, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, torch_dtype=str(dtype).removeprefix("torch."))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config).eval()
    sft_state = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def save(path: Path) -> Path:
        model.to(dtype).save_pretrained(path)
        model.to(torch.float32)
        tok.save_pretrained(path)
        return path

    sft = save(root / "sft")
    dirs = []
    for j in range(n):
        model.load_state_dict(sft_state)
        gen = torch.Generator().manual_seed(seed * 1_000_003 + j + 1)
        with torch.no_grad():
            for p in model.parameters():  # a tied head is one parameter: perturbed once
                p.add_(torch.randn(p.shape, generator=gen), alpha=delta)
        dirs.append(save(root / f"backbone-{j}"))
    return sft, dirs

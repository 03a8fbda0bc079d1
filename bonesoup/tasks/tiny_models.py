"""Tiny models built in code, no download: for tests, the demo and benchmarks.

- :func:`make_tiny_tokenizer`: a byte-level BPE tokenizer trained in
  milliseconds on the sentences below, wrapped as
  ``transformers.PreTrainedTokenizerFast`` (``<|endoftext|>`` is bos/eos,
  ``<|pad|>`` pads, on the left as decoder-only generation wants).
- :func:`tiny_gpt2_config`: a 2-layer, 64-wide GPT-2 sized to that tokenizer.
- :func:`make_tiny_backbones`: an SFT checkpoint and n backbones (SFT plus
  small seeded random deltas), saved with ``save_pretrained`` like any HF
  checkpoint, optionally sharded.
- :func:`random_gpt2_adapters`: n seeded random LoRA backbones of a GPT-2
  model, in memory (``LoraAdapter``; ``.save(dir)`` writes peft's format).

GPT-2 ties ``lm_head.weight`` to ``transformer.wte.weight``; transformers 5
saves only ``transformer.wte.weight`` and re-ties on load, so the files hold
no ``lm_head`` key. Merging the files is still exact: the tied head is the
merged embedding.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

__all__ = ["TINY_CORPUS", "make_tiny_tokenizer", "tiny_gpt2_config", "make_tiny_backbones", "save_perturbed_backbones",
           "random_gpt2_adapters"]

#: Training text for the tiny tokenizer (also handy as prompts).
TINY_CORPUS = (
    "The assistant answers the question politely and briefly.",
    "A helpful answer explains each step in plain words.",
    "A harmless answer refuses to give dangerous instructions.",
    "The user asks how to bake bread at home.",
    "Mix flour, water, salt and yeast, then let the dough rest.",
    "The user asks for a short poem about the sea.",
    "Waves roll in, grey and slow, and the gulls cry over the harbour.",
    "Summarise the article in two sentences.",
    "The report says the river rose after three days of rain.",
    "Thank you for the clear explanation!",
    "I am not sure; could you give an example?",
    "Numbers like 1, 2, 3, 42 and 2024 appear in text too.",
    "Preferences change: sometimes we want humour, sometimes we want facts.",
    "Bone soup merges backbone models with preference weights.",
)

_EOS = "<|endoftext|>"
_PAD = "<|pad|>"


def make_tiny_tokenizer(vocab_size: int = 384, corpus=TINY_CORPUS):
    """A deterministic byte-level BPE tokenizer trained on ``corpus`` (default :data:`TINY_CORPUS`).

    Byte-level, so any text encodes (no unknown token). ``vocab_size`` counts
    the 256 byte symbols, the merges and the two special tokens.

    Returns
    -------
    transformers.PreTrainedTokenizerFast
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[_EOS, _PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=_EOS, eos_token=_EOS, pad_token=_PAD, padding_side="left"
    )


def tiny_gpt2_config(tokenizer, *, n_embd: int = 64, n_layer: int = 2, n_head: int = 4, n_positions: int = 128):
    """``GPT2Config`` for a tiny model over ``tokenizer``'s vocabulary (special ids wired in)."""
    from transformers import GPT2Config

    return GPT2Config(
        vocab_size=len(tokenizer), n_embd=n_embd, n_layer=n_layer, n_head=n_head, n_positions=n_positions,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def make_tiny_backbones(
    root: str | os.PathLike,
    n: int,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    shard_size: int | str | None = None,
    n_embd: int = 64,
    n_layer: int = 2,
    n_head: int = 4,
    delta: float = 0.02,
) -> tuple[Path, list[Path]]:
    """Save a tiny SFT GPT-2 and ``n`` perturbed backbones under ``root``.

    Backbone j is SFT + ``delta`` * N(0, 1) noise on every parameter, seeded
    by ``(seed, j)``, so the backbones differ in every weight (a merge test
    that mixed up coefficients or keys would notice). The global torch RNG is
    left untouched.

    Parameters
    ----------
    root : path
        Created if needed; gets ``sft/`` and ``backbone-0/`` ... ``backbone-{n-1}/``.
    n : int
        Number of backbones.
    seed : int
        Seeds the SFT initialisation and the deltas.
    dtype : torch.dtype
        Saved parameter dtype (deltas are added in float32 first).
    shard_size : int or str, optional
        ``max_shard_size`` for ``save_pretrained`` (e.g. ``"100KB"``); small
        values produce ``model-XXXXX-of-YYYYY.safetensors`` plus
        ``model.safetensors.index.json``. None writes one ``model.safetensors``.
    n_embd, n_layer, n_head : int
        Model size (n_embd divisible by n_head).
    delta : float
        Standard deviation of the backbone perturbation.

    Returns
    -------
    (Path, list of Path)
        The SFT directory and the backbone directories. Each holds
        config.json, generation_config.json, tokenizer files and weights.
    """
    from transformers import GPT2LMHeadModel

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    tokenizer = make_tiny_tokenizer()
    config = tiny_gpt2_config(tokenizer, n_embd=n_embd, n_layer=n_layer, n_head=n_head)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(config).eval()
    save_kwargs = {} if shard_size is None else {"max_shard_size": shard_size}
    return save_perturbed_backbones(model, tokenizer, root, n, seed=seed, delta=delta, dtype=dtype, **save_kwargs)


def save_perturbed_backbones(model, tokenizer, root: Path, n: int, *, seed: int, delta: float,
                             dtype: torch.dtype = torch.float32, **save_kwargs) -> tuple[Path, list[Path]]:
    """Save float32 ``model`` as ``root/sft`` and ``n`` backbones ``root/backbone-{j}`` (SFT + ``delta`` * N(0, 1)).

    The deltas are seeded by ``(seed, j)`` and added in float32; every
    checkpoint is saved in ``dtype`` with ``tokenizer``. Tied parameters are
    one parameter, perturbed once. ``model`` ends as the last backbone.
    """
    def save(path: Path) -> Path:
        model.to(dtype).save_pretrained(path, **save_kwargs)
        model.to(torch.float32)
        tokenizer.save_pretrained(path)
        return path

    sft_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    sft_path = save(root / "sft")
    paths = []
    for j in range(n):
        model.load_state_dict(sft_state)
        gen = torch.Generator().manual_seed(seed * 1_000_003 + j + 1)
        with torch.no_grad():
            for param in model.parameters():  # the tied lm_head/wte is one parameter: perturbed once
                param.add_(torch.randn(param.shape, generator=gen), alpha=delta)
        paths.append(save(root / f"backbone-{j}"))
    return sft_path, paths


def random_gpt2_adapters(model, n: int, rank: int, *, seed: int = 0, delta: float = 0.3, base: str | None = None,
                         target_modules=("c_attn", "c_proj", "c_fc")) -> list:
    """``n`` seeded random LoRA adapters of rank ``rank`` on a GPT-2 ``model``'s Conv1D layers.

    Every layer whose name ends in one of ``target_modules`` gets ``A`` [r, in]
    and ``B`` [out, r] (float32) with ``lora_alpha = 2 r`` (scaling 2), drawn so
    that the delta ``s B A`` has entries of standard deviation ``delta``. The
    global torch RNG is left untouched.

    Returns
    -------
    list of :class:`bonesoup.merge.lora.LoraAdapter`
        In memory (``path`` None); ``base`` is recorded as ``base_model_name_or_path``.
    """
    from bonesoup.merge.lora import LoraAdapter, LoraModule

    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be an integer >= 1, got {rank!r}")
    shapes = {name: tuple(m.weight.shape) for name, m in model.named_modules()  # Conv1D weight: [in, out]
              if type(m).__name__ == "Conv1D" and name.rsplit(".", 1)[-1] in target_modules}
    if not shapes:
        raise ValueError(f"the model has no Conv1D layers named {list(target_modules)} (not a GPT-2?)")
    lora_alpha = 2 * rank
    scaling = lora_alpha / rank
    adapters = []
    for j in range(n):
        gen = torch.Generator().manual_seed(seed * 1_000_003 + j + 1)
        modules = {}
        for name, (d_in, d_out) in sorted(shapes.items()):
            A = torch.randn(rank, d_in, generator=gen)
            B = torch.randn(d_out, rank, generator=gen) * (delta / (rank ** 0.5 * scaling))
            modules[name] = LoraModule(A, B, scaling)
        config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base, "r": rank,
                  "lora_alpha": lora_alpha, "target_modules": list(target_modules), "fan_in_fan_out": True,
                  "lora_dropout": 0.0, "bias": "none", "use_rslora": False, "use_dora": False,
                  "inference_mode": True}
        adapters.append(LoraAdapter(config, modules))
    return adapters

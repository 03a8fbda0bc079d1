"""What the embedded tasks share: review-style prompts, adjective-list endings and a tiny SFT made from a corpus.

Every embedded task is a corpus of short sentences ``"<opener> <subject>
was <ending>"`` generated in code, a byte-level BPE tokenizer trained on it
and a tiny GPT-2 fine-tuned on it for some seconds (:func:`build_corpus_sft`).
The prompts are the openers with a subject (:func:`review_prompts`); the
tasks differ in their endings and their rewards.
"""

from __future__ import annotations

import json
import os
import random
import time
from pathlib import Path
from typing import Sequence

import torch

from bonesoup.fingerprint import fingerprint

__all__ = ["SUBJECTS", "OPENERS", "adjective_list", "review_prompts", "build_corpus_sft"]

SUBJECTS = (
    "movie", "film", "book", "hotel", "room", "food", "meal", "coffee", "service", "staff", "concert", "show",
    "trip", "park", "game", "class", "teacher", "phone", "car", "city", "beach", "museum", "song", "team",
    "weather", "party", "holiday", "restaurant",
)
OPENERS = (
    "The {s} was", "I thought the {s} was", "Honestly, the {s} was", "Our {s} was", "This {s} is", "My {s} was",
)


def adjective_list(rng: random.Random, words: Sequence[str], k: int) -> str:
    """``"a."``, ``"a and b."``, ``"a, b and c."``, ... with ``k`` distinct words of ``words``, in the order drawn."""
    w = rng.sample(list(words), k)
    return (w[0] if k == 1 else ", ".join(w[:-1]) + " and " + w[-1]) + "."


def review_prompts(split: str = "train") -> list[str]:
    """Opener + subject prompts: ``"train"`` (126), ``"test"`` (42, held out) or ``"all"`` (168).

    The held-out quarter is fixed: every fourth (opener, subject) pair in a
    deterministic shuffle. Prompts end without a trailing space; responses
    start with one.
    """
    if split not in ("train", "test", "all"):
        raise ValueError(f"split must be 'train', 'test' or 'all', got {split!r}")
    prompts = [o.format(s=s) for o in OPENERS for s in SUBJECTS]
    random.Random(1234).shuffle(prompts)
    if split == "all":
        return prompts
    test = prompts[::4]
    return test if split == "test" else [p for i, p in enumerate(prompts) if i % 4]


def build_corpus_sft(out_dir: str | os.PathLike, corpus: Sequence[str], tokenizer_corpus: Sequence[str], *,
                     steps: int = 400, batch_size: int = 32, lr: float = 3e-3, n_embd: int = 64, n_layer: int = 2,
                     n_head: int = 4, seed: int = 0, vocab_size: int = 512, force: bool = False,
                     progress: bool = False) -> Path:
    """Fine-tune a tiny GPT-2 on ``corpus`` and save it as a Hugging Face checkpoint in ``out_dir``.

    The tokenizer is a byte-level BPE trained on ``tokenizer_corpus``. Reused
    when ``out_dir`` already holds a model built from the same corpus and
    arguments (a fingerprint in ``bonesoup-sft.json``); ``force`` rebuilds.
    Written atomically. Deterministic for a given seed, torch version and
    thread count (the global RNG is left as is).

    Returns the checkpoint directory (config, ``model.safetensors``, tokenizer).
    """
    from transformers import GPT2LMHeadModel

    from bonesoup.merge.checkpoint import atomic_output_dir
    from bonesoup.tasks.tiny_models import make_tiny_tokenizer, tiny_gpt2_config

    out_dir = Path(out_dir)
    corpus = list(corpus)
    args = dict(steps=steps, batch_size=batch_size, lr=lr, n_embd=n_embd, n_layer=n_layer, n_head=n_head, seed=seed)
    if vocab_size != 512:  # the default stays out of the fingerprint: the review task's cached SFTs stay valid
        args["vocab_size"] = vocab_size
    fp = fingerprint({**args, "corpus": corpus, "torch": torch.__version__})
    marker = out_dir / "bonesoup-sft.json"
    if not force and marker.is_file():
        try:
            if json.loads(marker.read_text()).get("fingerprint") == fp:
                return out_dir
        except (OSError, ValueError):
            pass
    tokenizer = make_tiny_tokenizer(vocab_size, corpus=list(tokenizer_corpus))
    config = tiny_gpt2_config(tokenizer, n_embd=n_embd, n_layer=n_layer, n_head=n_head, n_positions=64)
    ids = [tokenizer(s)["input_ids"] + [tokenizer.eos_token_id] for s in corpus]
    width = max(map(len, ids))
    x = torch.full((len(ids), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(x)
    for i, row in enumerate(ids):  # right padding for teacher forcing; the loss skips pads
        x[i, :len(row)] = torch.tensor(row)
        mask[i, :len(row)] = 1
    labels = x.masked_fill(mask == 0, -100)
    t0 = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(config)
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 50) * max(0.05, 1 - s / steps))
        gen = torch.Generator().manual_seed(seed)
        it = range(steps)
        if progress:
            from tqdm.auto import tqdm

            it = tqdm(it, desc="sft", unit="step")
        for _ in it:
            idx = torch.randint(len(ids), (batch_size,), generator=gen)
            loss = model(input_ids=x[idx], attention_mask=mask[idx], labels=labels[idx]).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
    model.eval()
    with atomic_output_dir(out_dir, force=out_dir.exists()) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "bonesoup-sft.json").write_text(json.dumps(
            {"fingerprint": fp, "args": args, "final_loss": loss.item(), "seconds": time.perf_counter() - t0,
             "corpus_sentences": len(corpus)}, indent=2))
    return out_dir

"""The embedded task: short reviews, two rewards that pull apart, no download.

A corpus of short review sentences is generated in code: an opener with a
subject ("The hotel was", "Honestly, the concert was", ...) and an ending
that lists one to four positive, negative or neutral adjectives ("great.",
"dirty, rude and noisy.") or is a longer phrase. A byte-level BPE tokenizer
is trained on it in code and a tiny GPT-2 (2 layers, 64 wide) is fine-tuned
on it for some seconds: the SFT model writes both happy and unhappy endings,
short and long.

The two built-in rewards are VADER ``sentiment`` of the response and
``conciseness`` (``1 - words / 12``). They conflict: VADER's compound score
grows with the number of positive words (``"good."`` 0.44, ``"good, fun and
lovely."`` 0.88), so the most positive responses are long, while every word
costs conciseness. A policy trained on sentiment alone writes longer
responses than the SFT model, and one trained on a mixture settles at a list
length that depends on the weights (README: measured).

Prompts are opener + subject; a fixed quarter of them is held out for
evaluation (``task_prompts("test")``).
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

__all__ = [
    "TASK_REWARDS",
    "TASK_MAX_NEW_TOKENS",
    "DEFAULT_TASK_DIR",
    "task_corpus",
    "task_prompts",
    "make_task_tokenizer",
    "build_task_sft",
    "task_reward_fns",
]

#: The two built-in rewards of the task, in objective order.
TASK_REWARDS = ("sentiment", "conciseness")
#: Response length used for training and evaluation on the task.
TASK_MAX_NEW_TOKENS = 20
#: Where the embedded SFT model goes by default (under the working directory, never the home).
DEFAULT_TASK_DIR = Path("out") / "task"

_SUBJECTS = (
    "movie", "film", "book", "hotel", "room", "food", "meal", "coffee", "service", "staff", "concert", "show",
    "trip", "park", "game", "class", "teacher", "phone", "car", "city", "beach", "museum", "song", "team",
    "weather", "party", "holiday", "restaurant",
)
_OPENERS = (
    "The {s} was", "I thought the {s} was", "Honestly, the {s} was", "Our {s} was", "This {s} is", "My {s} was",
)
_POSITIVE_WORDS = (
    "good", "great", "nice", "lovely", "fun", "happy", "bright", "friendly", "perfect", "wonderful", "amazing",
    "excellent", "beautiful", "calm", "clean", "cheerful", "pleasant", "relaxing", "charming", "delightful",
)
_NEGATIVE_WORDS = (
    "bad", "awful", "boring", "sad", "terrible", "dull", "dirty", "noisy", "rude", "ugly", "horrible", "miserable",
    "broken", "lazy", "gloomy", "disappointing", "stressful", "annoying", "painful",
)
_NEUTRAL_WORDS = ("long", "small", "old", "new", "quiet", "busy", "short", "big", "late", "early")
_PHRASES = (
    "really good and I enjoyed it.", "great, and the people were friendly.", "wonderful and we loved every minute.",
    "bad and I hated it.", "awful, and the people were rude.", "terrible and we regretted every minute.",
    "about what we expected.", "in the centre of town, near the station.", "the same as last year, more or less.",
    "good but noisy.", "noisy but good.", "small, but it had everything we needed.",
)


def _adjective_list(rng: random.Random, words: Sequence[str], k: int) -> str:
    """``"a."``, ``"a and b."``, ``"a, b and c."``, ... with k distinct words."""
    w = rng.sample(words, k)
    return (w[0] if k == 1 else ", ".join(w[:-1]) + " and " + w[-1]) + "."


def task_corpus(seed: int = 0) -> list[str]:
    """The SFT corpus: five sentences per prompt, shuffled deterministically (840 in all).

    For each of the 168 prompts (opener + subject): two positive and two
    negative endings that list 1 to 4 adjectives (``"good."``, ``"good, fun
    and lovely."``), and one neutral list or a longer phrase. VADER's
    compound score grows with the number of adjectives of one polarity
    (0.44, 0.74, 0.88, 0.92 for 1 to 4 positive ones), while every word costs
    conciseness: the two task rewards trade off along the list length.
    """
    rng = random.Random(seed)
    out = []
    for opener in _OPENERS:
        for s in _SUBJECTS:
            prompt = opener.format(s=s)
            endings = [_adjective_list(rng, words, rng.randint(1, 4))
                       for words in (_POSITIVE_WORDS, _POSITIVE_WORDS, _NEGATIVE_WORDS, _NEGATIVE_WORDS)]
            endings.append(_adjective_list(rng, _NEUTRAL_WORDS, rng.randint(1, 2)) if rng.random() < 0.5
                           else rng.choice(_PHRASES))
            out.extend(f"{prompt} {e}" for e in endings)
    rng.shuffle(out)
    return out


def task_prompts(split: str = "train") -> list[str]:
    """Prompts of the task: ``"train"`` (126), ``"test"`` (42, held out) or ``"all"`` (168).

    The held-out quarter is fixed: every fourth (opener, subject) pair in a
    deterministic shuffle. Prompts end without a trailing space; responses
    start with one.
    """
    if split not in ("train", "test", "all"):
        raise ValueError(f"split must be 'train', 'test' or 'all', got {split!r}")
    prompts = [o.format(s=s) for o in _OPENERS for s in _SUBJECTS]
    random.Random(1234).shuffle(prompts)
    if split == "all":
        return prompts
    test = prompts[::4]
    return test if split == "test" else [p for i, p in enumerate(prompts) if i % 4]


def make_task_tokenizer(vocab_size: int = 512):
    """Byte-level BPE trained on :func:`task_corpus` (``<|endoftext|>`` = EOS, ``<|pad|>`` = pad, left padding)."""
    from bonesoup.tasks.tiny_models import make_tiny_tokenizer

    return make_tiny_tokenizer(vocab_size, corpus=task_corpus())


def task_reward_fns() -> list:
    """The task's reward functions, in :data:`TASK_REWARDS` order."""
    from bonesoup.train.rewards import get_reward

    return [get_reward(name) for name in TASK_REWARDS]


def build_task_sft(out_dir: str | os.PathLike = DEFAULT_TASK_DIR / "sft", *, steps: int = 400, batch_size: int = 32,
                   lr: float = 3e-3, n_embd: int = 64, n_layer: int = 2, n_head: int = 4, seed: int = 0,
                   force: bool = False, progress: bool = False) -> Path:
    """Fine-tune a tiny GPT-2 on :func:`task_corpus` and save it as a Hugging Face checkpoint.

    Reused when ``out_dir`` already holds a model built with the same
    arguments (a fingerprint in ``bonesoup-sft.json``), so tests and the CLI
    pay for it once; ``force`` rebuilds. Written atomically. Deterministic for
    a given seed, torch version and thread count (the global RNG is left as is).

    Returns the checkpoint directory (config, ``model.safetensors``, tokenizer).
    """
    from transformers import GPT2LMHeadModel

    from bonesoup.merge.checkpoint import atomic_output_dir
    from bonesoup.tasks.tiny_models import tiny_gpt2_config

    out_dir = Path(out_dir)
    args = dict(steps=steps, batch_size=batch_size, lr=lr, n_embd=n_embd, n_layer=n_layer, n_head=n_head, seed=seed)
    fp = fingerprint({**args, "corpus": task_corpus(seed), "torch": torch.__version__})
    marker = out_dir / "bonesoup-sft.json"
    if not force and marker.is_file():
        try:
            if json.loads(marker.read_text()).get("fingerprint") == fp:
                return out_dir
        except (OSError, ValueError):
            pass
    tokenizer = make_task_tokenizer()
    config = tiny_gpt2_config(tokenizer, n_embd=n_embd, n_layer=n_layer, n_head=n_head, n_positions=64)
    corpus = task_corpus(seed)
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


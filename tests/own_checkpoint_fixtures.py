"""Tiny Hugging Face checkpoints as a user would have them: random-weight Llama / Qwen2 policies, reward models.

Each is built in code (a tokenizer from ``make_tiny_tokenizer``, a config,
random weights) and saved with ``save_pretrained``: the tests then name only
directories and files, never code.
"""

import functools
from pathlib import Path

import torch

#: A plain chat template (the tiny tokenizer ships none): one "role: content" line per message.
CHAT_TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"


@functools.lru_cache(maxsize=1)
def tokenizer():
    """The tiny byte-level BPE tokenizer with :data:`CHAT_TEMPLATE` (built once; treat as read-only)."""
    from bonesoup.tasks.tiny_models import make_tiny_tokenizer

    tok = make_tiny_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    return tok


def _ids(tok) -> dict:
    return dict(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id)


def save_policy(path: Path, arch: str, seed: int = 0) -> Path:
    """A random-weight causal LM (``"llama"`` or ``"qwen2"``, 1 layer, 32 wide) and its tokenizer under ``path``."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    tok = tokenizer()
    shape = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                 num_key_value_heads=1, max_position_embeddings=128, tie_word_embeddings=False, **_ids(tok))
    cls, cfg = {"llama": (LlamaForCausalLM, LlamaConfig), "qwen2": (Qwen2ForCausalLM, Qwen2Config)}[arch]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls(cfg(**shape))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def save_reward_model(path: Path, arch: str = "qwen2", *, labels: tuple = ("score",), seed: int = 1) -> Path:
    """A random-weight sequence classifier with ``labels`` (``id2label``), pad token set, and its tokenizer."""
    from transformers import (GPT2Config, GPT2ForSequenceClassification, Qwen2Config,
                              Qwen2ForSequenceClassification)

    tok = tokenizer()
    id2label = dict(enumerate(labels))
    common = dict(num_labels=len(labels), id2label=id2label, label2id={v: k for k, v in id2label.items()},
                  **_ids(tok))
    if arch == "qwen2":
        model_cls, config = Qwen2ForSequenceClassification, Qwen2Config(
            hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
            max_position_embeddings=256, **common)
    else:
        model_cls, config = GPT2ForSequenceClassification, GPT2Config(n_embd=32, n_layer=1, n_head=2,
                                                                      n_positions=256, **common)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls(config)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def write_prompts(root: Path) -> dict:
    """train.jsonl, validation.txt (plain text) and test.jsonl under ``root``; returns their paths."""
    import json

    train = ["Tell me about the sea.", "How do I bake bread?", "Write a short poem.", "Summarise the report.",
             "Give me an example.", "Explain each step.", "What is bone soup?", "Say thank you."]
    root.mkdir(parents=True, exist_ok=True)
    (root / "train.jsonl").write_text("".join(json.dumps({"prompt": p, "id": i}) + "\n" for i, p in enumerate(train)))
    (root / "validation.txt").write_text("Answer briefly.\n\nBe polite.\nName three numbers.\n")
    (root / "test.jsonl").write_text(json.dumps({"prompt": "The user asks for help."}) + "\n\n"
                                     + json.dumps({"prompt": "Describe the harbour."}) + "\n")
    return {"train_prompts": str(root / "train.jsonl"), "validation_prompts": str(root / "validation.txt"),
            "test_prompts": str(root / "test.jsonl")}

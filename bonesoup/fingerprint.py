"""Fingerprints of cached models: one hash of a JSON-able description, one directory-name rule.

Everything this project trains and caches (the task's SFT model, the
experiment's PPO policies, the explicit value models) is reused when a
directory holds a model whose *description* -- every argument it depends on,
the fingerprints of its inputs, the torch version -- hashes to the same
value. The description is hashed as canonical JSON (sorted keys), so the key
order of a dict never changes a fingerprint and anything that is not plain
JSON (a tensor, a path, an object with a lossy ``str``) is refused instead of
being hashed by its repr.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

__all__ = ["FINGERPRINT_CHARS", "fingerprint", "cached_model_dir", "checkpoint_fingerprint", "file_fingerprint",
           "directory_fingerprint"]

#: Hex characters kept of the sha256 (64 bits: collisions are not a concern for a cache).
FINGERPRINT_CHARS = 16


def fingerprint(description) -> str:
    """The fingerprint of a JSON-able ``description``: sha256 of its canonical JSON, first 16 hex characters.

    Parameters
    ----------
    description : dict, list, str, int, float, bool or None (nested)
        Everything the cached object depends on. Tuples hash as lists.

    Raises
    ------
    TypeError
        ``description`` holds something that is not plain JSON (it names the type).
    """
    try:
        text = json.dumps(description, sort_keys=True)  # inf / NaN (e.g. max_grad_norm=inf) hash as Infinity / NaN
    except TypeError as e:
        raise TypeError(f"a fingerprint's description must be plain JSON (dicts, lists, str, numbers): {e}") from None
    return hashlib.sha256(text.encode()).hexdigest()[:FINGERPRINT_CHARS]


def cached_model_dir(root: str | os.PathLike, name: str, description) -> Path:
    """``root / f"{name}-{fingerprint(description)}"``: where the model ``description`` is cached."""
    return Path(root) / f"{name}-{fingerprint(description)}"


def checkpoint_fingerprint(path: str | os.PathLike, marker: str = "bonesoup-sft.json") -> str:
    """A checkpoint directory's fingerprint: the one it was built with, else a hash of its weights.

    A directory we built records its fingerprint in ``marker`` (the task SFT's
    ``bonesoup-sft.json``); any other checkpoint is fingerprinted by the bytes
    of its ``*.safetensors`` files (else its ``*.bin`` files), in name order.
    """
    path = Path(path)
    try:
        return json.loads((path / marker).read_text())["fingerprint"]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    h = hashlib.sha256()
    files = sorted(path.glob("*.safetensors")) or sorted(path.glob("*.bin"))
    if not files:
        raise FileNotFoundError(f"{path}: no {marker} and no *.safetensors or *.bin weights to fingerprint")
    for f in files:
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 24), b""):
                h.update(block)
    return h.hexdigest()[:FINGERPRINT_CHARS]


def file_fingerprint(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes, first 16 hex characters (its content, never its name)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()[:FINGERPRINT_CHARS]


#: Top-level files of a checkpoint that change what it computes besides its weights (config, tokenizer,
#: chat template, generation defaults); our own records (``bonesoup-*.json``, training logs) are left out.
_SIDE_SUFFIXES = (".json", ".txt", ".model", ".jinja", ".tiktoken")


def directory_fingerprint(path: str | os.PathLike) -> str:
    """A checkpoint directory's content: :func:`checkpoint_fingerprint` plus its config and tokenizer files.

    A user's checkpoint whose tokenizer or chat template changed is a new
    input even with the same weights; the files are hashed by content, so a
    copy or a move of the directory keeps its fingerprint.
    """
    path = Path(path)
    side = {f.name: file_fingerprint(f) for f in sorted(path.iterdir())
            if f.is_file() and f.suffix in _SIDE_SUFFIXES and not f.name.startswith("bonesoup-")}
    return fingerprint({"weights": checkpoint_fingerprint(path), "files": side})

"""One fingerprint helper for every cached model: canonical JSON, one directory rule, checkpoint fingerprints."""

import hashlib
import json

import pytest
import torch
from safetensors.torch import save_file

from bonesoup.fingerprint import FINGERPRINT_CHARS, cached_model_dir, checkpoint_fingerprint, fingerprint


def test_fingerprint_is_the_sha256_of_canonical_json():
    d = {"b": [1, 2.5, None], "a": {"y": "x", "x": True}}
    want = hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:FINGERPRINT_CHARS]
    assert fingerprint(d) == want and len(want) == 16
    assert fingerprint({"a": {"x": True, "y": "x"}, "b": [1, 2.5, None]}) == want  # key order never matters
    assert fingerprint({"b": (1, 2.5, None), "a": {"y": "x", "x": True}}) == want  # tuples hash as lists
    assert fingerprint({**d, "b": [1, 2.5000001, None]}) != want


def test_non_json_is_refused_not_hashed_by_repr():
    with pytest.raises(TypeError, match="plain JSON.*Tensor"):
        fingerprint({"w": torch.zeros(3)})


def test_one_directory_rule(tmp_path):
    assert cached_model_dir(tmp_path, "expert0-seed1", {"k": 1}) == tmp_path / f"expert0-seed1-{fingerprint({'k': 1})}"


def test_checkpoint_fingerprint_uses_the_recorded_one_else_the_weights(tmp_path):
    save_file({"w": torch.arange(4.0)}, tmp_path / "model.safetensors")
    by_bytes = checkpoint_fingerprint(tmp_path)
    assert by_bytes == hashlib.sha256((tmp_path / "model.safetensors").read_bytes()).hexdigest()[:16]
    save_file({"w": torch.arange(4.0) + 1}, tmp_path / "model.safetensors")
    assert checkpoint_fingerprint(tmp_path) != by_bytes
    (tmp_path / "bonesoup-sft.json").write_text(json.dumps({"fingerprint": "abc123"}))
    assert checkpoint_fingerprint(tmp_path) == "abc123"
    with pytest.raises(FileNotFoundError, match="no bonesoup-sft.json and no"):
        checkpoint_fingerprint(tmp_path / "missing")
    (tmp_path / "bin").mkdir()
    torch.save({"w": torch.ones(2)}, tmp_path / "bin" / "pytorch_model.bin")
    assert checkpoint_fingerprint(tmp_path / "bin") == hashlib.sha256(
        (tmp_path / "bin" / "pytorch_model.bin").read_bytes()).hexdigest()[:16]

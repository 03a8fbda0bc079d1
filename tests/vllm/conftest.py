"""Set-up for the vLLM tests (run in the vLLM environment: scripts/test.sh does it).

vLLM reads its environment at import, so it is set here first: 1 GiB of KV
cache, no OpenMP thread pinning on a shared machine, engine and worker in the
test process (start-up in seconds; the AsyncLLM and tensor-parallel engines
still use processes), caches inside the work tree, no hub access.

Engines are module-scoped fixtures (one start-up per file); the tiny models and
the transformers references are made once per session.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

_ROOT = Path(__file__).resolve().parents[2]
_CACHE = _ROOT / ".vllm-cache"
for key, value in {
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "VLLM_CPU_OMP_THREADS_BIND": "nobind",
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "HF_HUB_OFFLINE": "1",
    "VLLM_CACHE_ROOT": str(_CACHE / "vllm"),
    "TORCHINDUCTOR_CACHE_DIR": str(_CACHE / "inductor"),
    "VLLM_LOGGING_LEVEL": "WARNING",
    "TOKENIZERS_PARALLELISM": "false",
}.items():
    os.environ.setdefault(key, value)
sys.path.insert(0, str(Path(__file__).parent))  # vllm_helpers

from bonesoup.tasks.tiny_qwen2 import make_tiny_qwen2  # noqa: E402
from vllm_helpers import MAX_TOKENS, References  # noqa: E402


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """(sft_dir, [backbone dirs]): an untied tiny Qwen2 and 2 backbones."""
    return make_tiny_qwen2(tmp_path_factory.mktemp("qwen2"), 2)


@pytest.fixture(scope="session")
def tiny_tied(tmp_path_factory):
    """(sft_dir, [backbone dirs]): the same with tied embeddings (one lm_head / embed_tokens tensor)."""
    return make_tiny_qwen2(tmp_path_factory.mktemp("qwen2-tied"), 2, tied=True, seed=1)


@pytest.fixture(scope="session")
def prompts(tiny):
    """Token-id prompts (the same ids go to vLLM and to transformers), the last longer than one KV block."""
    from transformers import AutoTokenizer

    from bonesoup.tasks.tiny_models import TINY_CORPUS

    tok = AutoTokenizer.from_pretrained(tiny[0])
    short = [tok(t).input_ids for t in ("The user asks", "Bone soup merges", "Waves roll in, grey")]
    long = tok(" ".join(TINY_CORPUS * 2)).input_ids[:200]
    assert len(long) > 128, "the long prompt must span more than one KV block (128 tokens on CPU)"
    return short + [long]


@pytest.fixture(scope="session")
def reference(tmp_path_factory):
    """``reference(models, preference, alpha, prompts=..., max_tokens=...)``: transformers' greedy tokens."""
    return References(tmp_path_factory.mktemp("merged"))


@pytest.fixture(scope="session")
def greedy():
    from vllm import SamplingParams

    return SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)

"""Shared by the vLLM adapter tests: the vLLM environment, the tiny adapter backbones, exact references.

References are transformers + the one decode loop on the SFT model with the
backbones' LoRA deltas merged in exactly (``W + sum_j c_j D_j``, float64 sum,
float32 weights) at the served preference: never through vLLM or a mixture
adapter.
"""

from __future__ import annotations

import os
from pathlib import Path

_CACHE = Path(__file__).resolve().parents[2] / "out" / "vllm-cache"
for _key, _value in {  # before vLLM is imported (tests/vllm/conftest.py may have set them already)
    "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind", "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "HF_HUB_OFFLINE": "1", "VLLM_CACHE_ROOT": str(_CACHE / "vllm"), "TORCHINDUCTOR_CACHE_DIR": str(_CACHE / "inductor"),
    "VLLM_LOGGING_LEVEL": "WARNING", "TOKENIZERS_PARALLELISM": "false",
}.items():
    os.environ.setdefault(_key, _value)

import torch  # noqa: E402

BETA = 0.7
PROMPTS = ("The user asks", "Bone soup merges", "Waves roll in, grey", "Numbers like 1, 2")


class MixtureReference:
    """Greedy tokens / text of transformers on the SFT model + the exact adapter merge at a target (cached)."""

    def __init__(self, sft, adapter_dirs, *, beta: float = BETA, method: str = "bone"):
        from transformers import AutoTokenizer

        from bonesoup.merge.lora import load_adapters

        self.sft, self.beta, self.method = sft, beta, method
        self.adapters = load_adapters(adapter_dirs)
        self.deltas = [a.weight_deltas(torch.float64) for a in self.adapters]
        self.tok = AutoTokenizer.from_pretrained(sft)
        self._models: dict = {}
        self._tokens: dict = {}

    def model(self, preference, alpha: float = 0.0):
        from transformers import AutoModelForCausalLM

        from bonesoup.merge.coefficients import merge_coefficients

        key = (tuple(preference), float(alpha))
        if key not in self._models:
            c, _ = merge_coefficients(list(preference), method=self.method, beta=self.beta, alpha=alpha,
                                      n=len(self.adapters))
            model = AutoModelForCausalLM.from_pretrained(self.sft, dtype=torch.float32).eval()
            state = model.state_dict()
            with torch.no_grad():
                for name in self.deltas[0]:
                    merged = state[name].to(torch.float64) + sum(cj * d[name] for cj, d in zip(c, self.deltas))
                    state[name].copy_(merged.to(torch.float32))
            self._models[key] = model
        return self._models[key]

    def tokens(self, preference, alpha, ids, max_tokens: int, *, stop_at_eos: bool = False) -> list[int]:
        """Greedy new tokens (ignoring EOS unless ``stop_at_eos``; then the EOS is dropped)."""
        from bonesoup import guided_generate

        key = (tuple(preference), float(alpha), tuple(ids), max_tokens, stop_at_eos)
        if key not in self._tokens:
            kw = {} if stop_at_eos else {"stop_token_ids": []}
            with torch.no_grad():
                out = guided_generate(self.model(preference, alpha), [], [1.0], torch.tensor([list(ids)]),
                                      max_new_tokens=max_tokens, temperature=0.0, **kw)
            toks = out.new_tokens[0, : int(out.lengths[0])].tolist()
            if stop_at_eos and toks and toks[-1] == self.tok.eos_token_id:
                toks = toks[:-1]
            self._tokens[key] = toks
        return self._tokens[key]

    def text(self, preference, alpha, prompt: str, max_tokens: int) -> str:
        """What the server must answer: greedy, stopping at EOS, decoded without special tokens."""
        ids = self.tok(prompt)["input_ids"] or [self.tok.bos_token_id]
        toks = self.tokens(preference, alpha, ids, max_tokens, stop_at_eos=True)
        return self.tok.decode(toks, skip_special_tokens=True)


def shutdown_engine(llm) -> None:
    """Free an in-process engine so the next module can start its own."""
    import gc

    from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

    del llm
    gc.collect()
    cleanup_dist_env_and_memory()


class Client:
    """A keep-alive HTTP/1.1 connection to a test server (one per thread)."""

    def __init__(self, srv, key=None, timeout=120.0):
        import http.client

        self.conn = http.client.HTTPConnection(srv.host, srv.port, timeout=timeout)
        self.key = key

    def request(self, method, path, body=None, key=None, raw=None):
        import json

        headers = {"Content-Type": "application/json"}
        key = self.key if key is None else key
        if key:
            headers["Authorization"] = f"Bearer {key}"
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        self.conn.request(method, path, body=data, headers=headers)
        resp = self.conn.getresponse()
        text = resp.read().decode()
        ctype = resp.getheader("content-type", "")
        return resp.status, (json.loads(text) if ctype.startswith("application/json") else text)

    def post(self, path, body=None, **kw):
        return self.request("POST", path, body, **kw)

    def get(self, path, **kw):
        return self.request("GET", path, **kw)

    def close(self):
        self.conn.close()


class MergeReference(MixtureReference):
    """The same references on full checkpoints: the model ``bonesoup.merge_checkpoints`` writes at a target."""

    def __init__(self, sft, backbones, root, *, beta: float = BETA, method: str = "bone"):
        from transformers import AutoTokenizer

        self.sft, self.backbones, self.root, self.beta, self.method = sft, list(backbones), Path(root), beta, method
        self.tok = AutoTokenizer.from_pretrained(sft)
        self._models, self._tokens = {}, {}

    def model(self, preference, alpha: float = 0.0):
        from transformers import AutoModelForCausalLM

        from bonesoup import merge_checkpoints

        key = (tuple(preference), float(alpha))
        if key not in self._models:
            out = merge_checkpoints(self.backbones, self.root / f"merged-{len(self._models)}", preference=list(preference),
                                    beta=self.beta, alpha=alpha, sft=self.sft, method=self.method, progress=False)
            self._models[key] = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        return self._models[key]

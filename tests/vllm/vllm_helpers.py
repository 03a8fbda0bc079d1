"""Helpers shared by the vLLM tests (a module of its own: test files import it by name, not conftest).

References are transformers + the one decode loop, greedy, float32, on a model
merged outside vLLM at the target: ``bonesoup.merge_checkpoints`` for full
backbones (:class:`MergeReference`), the SFT model plus the exact adapter merge
``W + sum_j c_j D_j`` (float64 sum) for LoRA backbones (:class:`MixtureReference`);
never through vLLM or a mixture adapter.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import gc
from pathlib import Path

import torch

BETA = 0.7
MAX_TOKENS = 16
PROMPTS = ("The user asks", "Bone soup merges", "Waves roll in, grey", "Numbers like 1, 2")


def shutdown_engine(llm) -> None:
    """Free an in-process engine so the next module can start its own."""
    from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

    del llm
    gc.collect()
    cleanup_dist_env_and_memory()


def token_prompts(prompts):
    """vLLM prompts from token ids (the ids transformers gets: no second tokenisation)."""
    return [{"prompt_token_ids": list(p)} for p in prompts]


@contextlib.contextmanager
def serving(argv):
    """``bonesoup serve --engine vllm *argv`` built and started: yields ``(ServerThread, app, soup)``."""
    from bonesoup.serve.cli import ServerThread, add_serve_parser, build_from_args

    parser = argparse.ArgumentParser()
    add_serve_parser(parser.add_subparsers(dest="command"))
    app, soup, _ = build_from_args(parser.parse_args(["serve", "--engine", "vllm", *map(str, argv)]))
    srv = ServerThread(app).start()
    try:
        yield srv, app, soup
    finally:
        srv.stop(120)


def concurrently(srv, jobs, threads: int, max_tokens: int) -> list[tuple]:
    """``(target, prompt, status, body)`` of greedy completions of ``jobs`` [(target, prompt)], ``threads`` clients."""
    from serve_fixtures import Client, complete

    def run(chunk):
        c = Client(srv)
        try:
            return [(t, p, *complete(c, p, t, max_tokens=max_tokens)[:2]) for t, p in chunk]
        finally:
            c.close()

    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        return [r for rs in pool.map(run, [jobs[i::threads] for i in range(threads)]) for r in rs]


class _Greedy:
    """Greedy tokens / text of transformers on :meth:`model` at a target (both cached)."""

    def __init__(self, sft, *, beta: float | None = BETA, method: str = "bone"):
        from transformers import AutoTokenizer

        self.sft, self.beta, self.method = sft, beta, method
        self.tok = AutoTokenizer.from_pretrained(sft)
        self._models: dict = {}
        self._tokens: dict = {}

    def model(self, preference, alpha: float = 0.0):  # pragma: no cover - each subclass has its own
        raise NotImplementedError

    def _cached_model(self, preference, alpha, make):
        key = (preference and tuple(preference), float(alpha))
        if key not in self._models:
            self._models[key] = make().eval()
        return self._models[key]

    def tokens(self, preference, alpha, ids, max_tokens: int, *, stop_at_eos: bool = False) -> list[int]:
        """Greedy new tokens (ignoring EOS unless ``stop_at_eos``; then the EOS is dropped)."""
        from bonesoup import guided_generate

        key = (preference and tuple(preference), float(alpha), tuple(ids), max_tokens, stop_at_eos)
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


class MergeReference(_Greedy):
    """Full backbones: the model ``bonesoup.merge_checkpoints`` writes at a target (preference None: the SFT model)."""

    def __init__(self, sft, backbones, root, *, beta: float | None = BETA, method: str = "bone"):
        super().__init__(sft, beta=beta, method=method)
        self.backbones, self.root = list(backbones), Path(root)

    def model(self, preference, alpha: float = 0.0):
        from transformers import AutoModelForCausalLM

        from bonesoup import merge_checkpoints

        def make():
            out = self.sft if preference is None else merge_checkpoints(
                self.backbones, self.root / f"merged-{len(self._models)}", preference=list(preference),
                beta=self.beta, alpha=alpha, sft=self.sft, method=self.method, progress=False)
            return AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)

        return self._cached_model(preference, alpha, make)


class MixtureReference(_Greedy):
    """LoRA backbones: the SFT model with the deltas merged in exactly (float64 sum, float32 weights)."""

    def __init__(self, sft, adapter_dirs, *, beta: float | None = BETA, method: str = "bone"):
        from bonesoup.merge.lora import load_adapters

        super().__init__(sft, beta=beta, method=method)
        self.adapters = load_adapters(adapter_dirs)
        self.deltas = [a.weight_deltas(torch.float64) for a in self.adapters]

    def model(self, preference, alpha: float = 0.0):
        from transformers import AutoModelForCausalLM

        from bonesoup.merge.coefficients import merge_coefficients

        def make():
            c, _ = merge_coefficients(list(preference), method=self.method, beta=self.beta, alpha=alpha,
                                      n=len(self.adapters))
            model = AutoModelForCausalLM.from_pretrained(self.sft, dtype=torch.float32)
            state = model.state_dict()
            with torch.no_grad():
                for name in self.deltas[0]:
                    merged = state[name].to(torch.float64) + sum(cj * d[name] for cj, d in zip(c, self.deltas))
                    state[name].copy_(merged.to(torch.float32))
            return model

        return self._cached_model(preference, alpha, make)


class References:
    """``reference(models, preference, alpha, prompts=, max_tokens=, method=)``: a MergeReference per models."""

    def __init__(self, root: Path):
        self.root, self._refs = Path(root), {}

    def __call__(self, models, preference, alpha=0.0, prompts=(), max_tokens=MAX_TOKENS, method="bone"):
        sft, backbones = models
        key = (str(sft), method)
        if key not in self._refs:
            self._refs[key] = MergeReference(sft, backbones, self.root / f"ref-{len(self._refs)}",
                                             beta=BETA if method == "bone" else None, method=method)
        return [self._refs[key].tokens(preference, alpha, ids, max_tokens) for ids in prompts]

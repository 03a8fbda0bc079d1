"""The worker extension: code that runs where the weights live, called by name over ``collective_rpc``.

vLLM imports this class in every worker and adds it to the worker's bases
(``worker_extension_cls="bonesoup.vllm.worker.SoupWorkerExtension"``).
Importing this module also registers the ``bonesoup`` model loader, so a
worker process that never imported bonesoup before finds the loader.

The worker runs RPCs between model steps, one at a time, so no step reads a
half-merged weight and tensor-parallel ranks switch at the same step.
"""

from __future__ import annotations

from . import loader as _loader  # noqa: F401  (registers load_format="bonesoup" in this process)
from .loader import find_arena

__all__ = ["SoupWorkerExtension", "WORKER_EXTENSION"]

#: The qualified name vLLM's ``worker_extension_cls`` takes.
WORKER_EXTENSION = "bonesoup.vllm.worker.SoupWorkerExtension"


class SoupWorkerExtension:
    """RPC methods (all prefixed ``bonesoup_`` so they cannot clash with the worker's own)."""

    def _bonesoup_arena(self):
        return find_arena(self.model_runner.model)

    def bonesoup_set_coefficients(self, coefficients: list[float], version: int) -> dict:
        """Merge the stored rows with ``coefficients`` (backbones, then SFT) in place and republish.

        Returns this rank's ``merge_s``, ``publish_s``, ``launches``, ``bytes_moved``,
        ``version`` and ``rank``; or, if anything failed, ``{"error", "error_type",
        "rank"}`` with the old weights still live. It never raises: with tensor
        parallelism, vLLM 0.32's multiprocess executor returns the first rank's
        exception and leaves the other ranks' replies queued, where the next RPC
        reads them. Bad coefficients fail before anything is written.
        """
        try:
            out = self._bonesoup_arena().merge(coefficients, version)
        except Exception as e:  # reported to the client, which raises it
            return {"error": str(e), "error_type": type(e).__name__, "rank": self.rank}
        out["rank"] = self.rank
        return out

    def bonesoup_info(self) -> dict:
        """This rank's arena: k, sources, bytes, dtypes, version and coefficients."""
        out = self._bonesoup_arena().info()
        out["rank"] = self.rank
        return out

    def bonesoup_live_state(self) -> dict:
        """The rank's live weights by vLLM parameter name (CPU clones; for tests and debugging)."""
        return {k: v.cpu() for k, v in self._bonesoup_arena().live_state().items()}

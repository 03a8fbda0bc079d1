"""Flat per-rank arenas inside a vLLM model: capture at load time, merge in place, republish.

What lives on one tensor-parallel rank, per parameter dtype:

- ``inputs [k, P]``: the k = n + 1 stored models (backbones, then the SFT
  model), each row filled by vLLM's own ``model.load_weights`` (so qkv /
  gate_up fusing, the rank's shard and the dtype are vLLM's);
- ``live [P]``: the parameters the model reads, every one a view into it.
  Tied parameters are one ``nn.Parameter`` in vLLM too, so they get one slot
  and are merged once.

A re-merge is one ``sk.merge`` per dtype over those rows (one launch per dtype
per rank). On the CPU backend the linear layers do not read their weight: at
load time vLLM packs a oneDNN (or sgl) copy and drops the weight
(``dispatch_cpu_unquantized_gemm``), so after a merge the arena is
*republished*: each layer's parameters are pointed back at their views and its
own ``quant_method.process_weights_after_loading`` runs again, building fresh
packed copies from the merged weights. On CUDA that step packs nothing and only
re-points parameters (views set up before graph capture stay valid), so the
merge is the whole cost there.

This module knows torch and the vLLM layer protocol (``quant_method``), not the
engine; :mod:`bonesoup.vllm.loader` builds an arena and the worker extension
drives it.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import torch

import soupkernels as sk
from soupkernels._dtypes import SUPPORTED_DTYPES

__all__ = ["SoupArena", "free_bytes"]


@dataclass
class _DtypeArena:
    dtype: torch.dtype
    params: list[tuple[str, torch.nn.Parameter]] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)
    numel: int = 0
    live: torch.Tensor | None = None  # [P]
    inputs: torch.Tensor | None = None  # [k, P]

    def view(self, i: int) -> torch.Tensor:
        _, p = self.params[i]
        off = self.offsets[i]
        return self.live[off : off + p.numel()].view(p.shape)


def free_bytes(device: torch.device) -> int | None:
    """Memory free for new allocations on ``device`` (None where unknown)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type == "cpu":
        import psutil

        return psutil.virtual_memory().available
    return None


class SoupArena:
    """The stored models and live weights of one rank's vLLM model, as flat buffers.

    Build it in a model loader, after ``create_model`` and before
    ``process_weights_after_loading``: :meth:`__init__` plans the slots and
    checks memory (nothing allocated yet), :meth:`capture` fills the rows.

    Parameters
    ----------
    model : torch.nn.Module
        The freshly created vLLM model (parameters allocated, not yet loaded).
    sources : sequence of str
        What each stored row holds, for messages (backbone directories, then the SFT directory).
    host_ranks : int
        Ranks that fill their arenas from the same host memory at the same time
        (vLLM's tensor-parallel ranks on the CPU backend): the free memory must hold all of them.
    """

    def __init__(self, model: torch.nn.Module, sources: Sequence[str], *, host_ranks: int = 1):
        self.model = model
        self.sources = [str(s) for s in sources]
        self.k = len(self.sources)
        arenas: dict[torch.dtype, _DtypeArena] = {}
        for name, p in model.named_parameters():  # tied parameters: listed once
            if p.dtype not in SUPPORTED_DTYPES or p.numel() == 0:
                continue
            a = arenas.setdefault(p.dtype, _DtypeArena(p.dtype))
            a.params.append((name, p))
            a.offsets.append(a.numel)
            a.numel += p.numel()
        if not arenas:
            raise ValueError("the vLLM model has no float32/bfloat16/float16 parameters to merge")
        self._arenas = list(arenas.values())
        self.param_bytes = sum(a.numel * a.dtype.itemsize for a in self._arenas)
        self.device = self._arenas[0].params[0][1].device
        # k stored rows + the live arena (the model's own storage is released once
        # its parameters are views; it is counted as free only after that).
        self.bytes_needed = (self.k + 1) * self.param_bytes
        ranks = host_ranks if self.device.type == "cpu" else 1  # a GPU rank allocates on its own device
        free = free_bytes(self.device)
        if free is not None and ranks * self.bytes_needed > free:
            raise MemoryError(
                f"bonesoup.vllm needs {ranks * self.bytes_needed / 2**30:.2f} GiB on {self.device} for "
                f"{'this rank' if ranks == 1 else f'{ranks} ranks'} ({self.k} stored models + the live weights, "
                f"{self.param_bytes / 2**30:.3f} GiB each per rank) but only {free / 2**30:.2f} GiB is free")
        self.version = 0
        self.coefficients: list[float] = [0.0] * (self.k - 1) + [1.0]  # as loaded: the last row (SFT)
        self._modules: list[tuple[torch.nn.Module, list[tuple[str, torch.nn.Parameter]]]] = []
        self.publish = "repack"  # or "views" (compute_on_views)

    # ------------------------------------------------------------------ load time

    def capture(self, load_row: Callable[[int], Iterable[str] | None]) -> None:
        """Fill every row: ``load_row(i)`` loads source i into the model's parameters.

        ``load_row`` is expected to call vLLM's ``model.load_weights``; it runs with
        the parameters already views of the live arena, so after it returns the
        live arena holds source i in vLLM's layout and is copied into row i. The
        live weights end as the last source (the SFT model).
        """
        for a in self._arenas:
            a.live = torch.empty(a.numel, dtype=a.dtype, device=self.device)
            a.inputs = torch.empty((self.k, a.numel), dtype=a.dtype, device=self.device)
            with torch.no_grad():
                for i, (_, p) in enumerate(a.params):
                    p.data = a.view(i)  # same Parameter object: tied modules and weight_loader attributes follow
        for row in range(self.k):
            for a in self._arenas:
                a.live.fill_(float("nan"))  # a parameter the source did not write is caught below
            load_row(row)
            for a in self._arenas:
                if not torch.isfinite(a.live).all():
                    bad = [name for i, (name, _) in enumerate(a.params) if not torch.isfinite(a.view(i)).all()]
                    raise ValueError(f"{self.sources[row]}: parameters {bad[:5]}{' ...' if len(bad) > 5 else ''} "
                                     "were not loaded (or hold NaN/inf); every stored model must have every weight")
                a.inputs[row].copy_(a.live)
        # The modules whose weights vLLM post-processes (packs on CPU): their
        # parameter objects are kept so a republish can point them back at the views.
        ours = {id(p) for a in self._arenas for _, p in a.params}
        for _, module in self.model.named_modules():
            if getattr(module, "quant_method", None) is None:
                continue
            entries = [(attr, p) for attr, p in module.named_parameters(recurse=False) if id(p) in ours]
            if entries:
                self._modules.append((module, entries))

    # ------------------------------------------------------------------ re-merge

    def check_coefficients(self, coefficients: Sequence[float]) -> list[float]:
        """``coefficients`` as k floats (backbones, then SFT), or ValueError naming the problem."""
        try:
            c = [float(x) for x in coefficients]
        except (TypeError, ValueError):
            raise TypeError(f"coefficients must be a sequence of {self.k} numbers, got {coefficients!r}") from None
        if len(c) != self.k or not all(math.isfinite(x) for x in c):
            raise ValueError(f"coefficients must hold {self.k} finite numbers (the {self.k - 1} backbones, then the "
                             f"SFT model), got {list(coefficients)!r}")
        return c

    def merge(self, coefficients: Sequence[float], version: int) -> dict:
        """Merge the stored rows into the live weights and republish them; returns timings.

        Validates everything before writing. If republishing fails, the previous
        coefficients are merged and republished again before the error is raised,
        so the rank keeps serving its old weights.
        """
        c = self.check_coefficients(coefficients)
        if isinstance(version, bool) or not isinstance(version, int):
            raise TypeError(f"version must be an int, got {version!r}")
        t0 = time.perf_counter()
        self._merge(c)
        t1 = time.perf_counter()
        try:
            self.republish()
        except BaseException:
            self._merge(self.coefficients)
            self.republish()
            raise
        t2 = time.perf_counter()
        self.coefficients, self.version = c, version
        return {"merge_s": t1 - t0, "publish_s": t2 - t1, "launches": len(self._arenas),
                "bytes_moved": (self.k + 1) * self.param_bytes, "version": version}

    def _merge(self, c: list[float]) -> None:
        sync = self.device.type == "cuda"
        if sync:
            torch.cuda.synchronize(self.device)  # the last forward's kernels read the old weights
        for a in self._arenas:
            sk.merge(list(a.inputs.unbind(0)), c, out=a.live)
        if sync:
            torch.cuda.synchronize(self.device)

    def republish(self) -> None:
        """Make the live arena what vLLM's kernels read.

        ``publish="repack"``: re-point parameters at their views and re-run each
        layer's post-load processing (fresh packed copies). ``publish="views"``:
        nothing to do, the layers already compute on the views.
        """
        if self.publish == "views":
            return
        with torch.no_grad():
            self._point_at_views()
            for module, _ in self._modules:
                module.quant_method.process_weights_after_loading(module)

    def _point_at_views(self) -> None:
        for a in self._arenas:
            for i, (_, p) in enumerate(a.params):
                p.data = a.view(i)  # processing may have swapped .data (e.g. a bias cast to fp32)
        for module, entries in self._modules:
            for attr, p in entries:
                if module._parameters.get(attr) is not p:  # replaced by an empty one after packing
                    module._parameters[attr] = p

    def compute_on_views(self) -> None:
        """``publish="views"``, once, after vLLM's post-load processing and before any forward (or compile).

        Every processed layer gets its parameters back as arena views and, on the
        CPU backend, ``torch.nn.functional.linear`` as its GEMM (in place of the
        packed copy), so a merge is the only write a preference change needs. On
        CUDA nothing was packed: the views are what the kernels read already.
        """
        self.publish = "views"
        with torch.no_grad():
            self._point_at_views()
            for module, _ in self._modules:
                if hasattr(module, "cpu_linear"):
                    module.cpu_linear = torch.nn.functional.linear

    def info(self) -> dict:
        """What this rank holds (for checks and messages)."""
        return {"k": self.k, "sources": self.sources, "param_bytes": self.param_bytes,
                "dtypes": [str(a.dtype) for a in self._arenas], "numel": [a.numel for a in self._arenas],
                "version": self.version, "coefficients": list(self.coefficients), "device": str(self.device),
                "publish": self.publish, "processed_modules": len(self._modules)}

    def live_state(self) -> dict[str, torch.Tensor]:
        """Clones of the live weights by vLLM parameter name (tests compare them with a reference merge)."""
        return {name: a.view(i).detach().clone() for a in self._arenas for i, (name, _) in enumerate(a.params)}

"""Live re-merge inside a running process: ``LiveSoup``.

The backbones (and the SFT model) are held resident in flat per-dtype arenas
laid out like the live model's parameters, and the live model's parameters
become views into a flat arena of their own. A preference change is then ONE
fused ``sk.merge`` per dtype over those arenas (bytes moved: (inputs + 1) x
model bytes), with no per-tensor Python loop, no state-dict copies and no
``load_state_dict``.

Atomicity: a reader that wraps its forward passes in ``with soup.reading():``
sees either the old or the new weights, never a mix. ``set_preference`` takes
the write side of a readers-writer lock (writers are preferred, so a stream of
readers cannot starve a re-merge), so no reader is inside its block while the
arena is rewritten. On CUDA, GPU work is asynchronous: a reader's kernels may
still be queued after its block exits, possibly on another stream, so the
writer synchronises the device before the merge (no queued forward reads a
half-written weight) and after it (the next reader's kernels see the new
weights whatever stream they use). Two syncs per re-merge cost microseconds
next to the merge and keep the guarantee obvious.
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import torch

import soupkernels as sk

from .checkpoint import MERGEABLE_DTYPES, CheckpointDir
from .coefficients import merge_coefficients, validate_beta
from .methods import get_merge_method

__all__ = ["LiveSoup", "RemergeInfo"]


@dataclass(frozen=True)
class RemergeInfo:
    """What one ``set_preference`` did."""

    version: int  #: weights version after the re-merge
    preference: list[float]  #: mu
    alpha: float  #: extrapolation strength
    coefficients: list[float]  #: one per stored input: backbones, then the SFT model (if any)
    seconds: float  #: wall time of the re-merge (device synchronised)
    bytes_moved: int  #: (inputs + 1) x bytes of the merged parameters
    launches: int  #: fused kernel calls (one per parameter dtype)


class _ReadWriteLock:
    """Many readers or one writer, fair both ways.

    A waiting writer blocks new readers (re-merges are not starved by a
    steady stream of requests), and when a writer finishes, the readers that
    waited through it go before the next writer (requests are not starved by
    back-to-back re-merges).
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0  # inside
        self._readers_waiting = 0
        self._passes = 0  # readers let in ahead of waiting writers after a write
        self._writer = False
        self._writers_waiting = 0

    @contextlib.contextmanager
    def read(self) -> Iterator[None]:
        with self._cond:
            self._readers_waiting += 1
            while self._writer or (self._writers_waiting and not self._passes):
                self._cond.wait()
            self._readers_waiting -= 1
            self._passes = max(0, self._passes - 1)
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if self._readers == 0:
                    self._cond.notify_all()

    @contextlib.contextmanager
    def write(self) -> Iterator[None]:
        with self._cond:
            self._writers_waiting += 1
            while self._writer or self._readers or self._passes:
                self._cond.wait()
            self._writers_waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._passes = self._readers_waiting
                self._cond.notify_all()


@dataclass
class _Arena:
    """Parameters of one dtype: their slots in the flat buffers."""

    dtype: torch.dtype
    names: list[str] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)
    numel: int = 0
    live: torch.Tensor | None = None  # [P] the model's parameters, as views
    inputs: torch.Tensor | None = None  # [k, P] backbones (+ SFT), one row each


class _Source:
    """A backbone or SFT model given as a checkpoint directory or a state dict."""

    def __init__(self, src, what: str):
        self.what = what
        if isinstance(src, (str, Path)):
            self.ckpt: CheckpointDir | None = CheckpointDir(src)
            self.state: Mapping[str, torch.Tensor] | None = None
            self.keys = set(self.ckpt.tensors)
        elif isinstance(src, Mapping):
            self.ckpt, self.state = None, src
            self.keys = set(src)
        else:
            raise TypeError(f"{what} must be a checkpoint directory or a state dict, got {type(src).__name__}")

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.ckpt.tensors[key].shape) if self.ckpt else tuple(self.state[key].shape)

    def copy_into(self, dst: torch.Tensor, key: str, handles: dict) -> None:
        if self.state is not None:
            dst.copy_(self.state[key].reshape(dst.shape))
            return
        file = self.ckpt.tensors[key].file
        if file not in handles:
            handles[file] = self.ckpt.open_file(file).__enter__()
        dst.copy_(handles[file].get_tensor(key).reshape(dst.shape))


class LiveSoup:
    """Bone Soup (or Rewarded Soup) weights, re-merged in place inside a live model.

    Parameters
    ----------
    model : torch.nn.Module
        The live model (e.g. a transformers causal LM). Its float32 /
        bfloat16 / float16 parameters are merged; after construction they are
        views into one flat arena per dtype (do not ``.to()`` the model
        afterwards). Tied parameters are one parameter and are merged once.
        Buffers are not merged.
    backbones : sequence of (checkpoint directory or state dict), length n
        The n backbones, in the order of the preference.
    beta : float
        Backbone mixing strength in (0.5, 1); required for ``method="bone"``.
    sft : checkpoint directory or state dict, optional
        The SFT model, needed for extrapolation (``alpha != 0``) and for
        ``store="delta"``.
    device : torch.device or str, optional
        Where the arenas live; default the model's parameters' device.
    method : str, default "bone"
        A name registered in :mod:`bonesoup.merge.methods` (``"bone"``, ``"rewarded"``, ...).
    store : {"full", "delta"}
        ``"delta"`` keeps backbones as ``theta_j - theta_sft`` (same bytes;
        the path to compressed deltas); the merge folds the SFT coefficient
        accordingly.

    Raises
    ------
    ValueError
        A parameter missing from a backbone (names the key and the source),
        shapes that disagree, bad method/beta/store.
    MemoryError
        The arenas would not fit in the device's free memory (checked before
        anything is allocated).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        backbones: Sequence,
        *,
        beta: float | None = None,
        sft=None,
        device: torch.device | str | None = None,
        method: str = "bone",
        store: str = "full",
    ):
        spec = get_merge_method(method)  # the registry: a new method is accepted here by name
        if store not in ("full", "delta"):
            raise ValueError(f"store must be 'full' or 'delta', got {store!r}")
        if isinstance(backbones, (str, Path, Mapping)) or len(backbones) < 1:
            raise TypeError("backbones must be a non-empty sequence of checkpoint directories or state dicts")
        if spec.needs_beta:
            if beta is None:
                raise ValueError(f"beta is required for method={method!r}")
            self.beta = validate_beta(beta)
        else:
            self.beta = None
        if len(backbones) < 2:
            raise ValueError(f"method={method!r} needs n >= 2 backbones, got {len(backbones)}")
        if store == "delta" and sft is None:
            raise ValueError("store='delta' keeps backbones as differences from the SFT model, so sft is required")
        self.model, self.method, self.store, self.n = model, method, store, len(backbones)
        sources = [_Source(b, f"backbones[{j}]") for j, b in enumerate(backbones)]
        if sft is not None:
            sources.append(_Source(sft, "sft"))
        self._has_sft = sft is not None

        # 1. Which parameters, which source key for each (a tied parameter may
        #    be stored under any of its names), and their arena slots.
        params = [(name, p) for name, p in model.named_parameters() if p.dtype in MERGEABLE_DTYPES]
        if not params:
            raise ValueError("the model has no float32/bfloat16/float16 parameters to merge")
        aliases: dict[int, list[str]] = {}
        for name, p in model.named_parameters(remove_duplicate=False):
            aliases.setdefault(id(p), []).append(name)
        devices = {p.device for _, p in params}
        self.device = torch.device(device) if device is not None else next(iter(devices))
        self._keys: dict[str, list[str]] = {}  # param name -> key in each source
        arenas: dict[torch.dtype, _Arena] = {}
        for name, p in params:
            keys = []
            for src in sources:
                key = next((a for a in aliases[id(p)] if a in src.keys), None)
                if key is None:
                    where = f" ({src.ckpt.path})" if src.ckpt else ""
                    raise ValueError(f"parameter {name!r} (aliases {aliases[id(p)]}) is missing from "
                                     f"{src.what}{where}")
                if src.shape(key) != tuple(p.shape):
                    raise ValueError(f"parameter {name!r} has shape {tuple(p.shape)} in the model but "
                                     f"{src.shape(key)} in {src.what}")
                keys.append(key)
            self._keys[name] = keys
            arena = arenas.setdefault(p.dtype, _Arena(p.dtype))
            arena.names.append(name)
            arena.offsets.append(arena.numel)
            arena.numel += p.numel()
        self._arenas = list(arenas.values())
        self._params = dict(params)

        # 2. Memory, before anything is allocated: k input rows + the live arena.
        k = len(sources)
        self.param_bytes = sum(a.numel * a.dtype.itemsize for a in self._arenas)
        need = (k + 1) * self.param_bytes
        free = _free_bytes(self.device)
        if free is not None and need > free:
            raise MemoryError(
                f"LiveSoup needs {need / 2**30:.2f} GiB on {self.device} ({k} stored models + the live arena, "
                f"{self.param_bytes / 2**30:.2f} GiB each) but only {free / 2**30:.2f} GiB is free")

        # 3. Fill the input rows, then move the live parameters into their arena.
        handles: list[dict] = [dict() for _ in sources]
        try:
            for arena in self._arenas:
                arena.inputs = torch.empty((k, arena.numel), dtype=arena.dtype, device=self.device)
                for name, off in zip(arena.names, arena.offsets):
                    p = self._params[name]
                    for row, (src, key) in enumerate(zip(sources, self._keys[name])):
                        src.copy_into(arena.inputs[row, off : off + p.numel()].view(p.shape), key, handles[row])
                if store == "delta":  # rows j < n become theta_j - theta_sft, computed in fp32
                    sft_row = arena.inputs[k - 1]
                    for j in range(self.n):
                        sk.merge([arena.inputs[j], sft_row], [1.0, -1.0], out=arena.inputs[j])
                arena.live = torch.empty(arena.numel, dtype=arena.dtype, device=self.device)
                with torch.no_grad():
                    for name, off in zip(arena.names, arena.offsets):
                        p = self._params[name]
                        view = arena.live[off : off + p.numel()].view(p.shape)
                        view.copy_(p.data)
                        p.data = view  # same Parameter object: tied modules follow
        finally:
            for hs in handles:
                for h in hs.values():
                    h.__exit__(None, None, None)

        self._lock = _ReadWriteLock()
        self.version = 0
        self.preference: list[float] | None = None
        self.alpha = 0.0

    # ------------------------------------------------------------------ reading

    @contextlib.contextmanager
    def reading(self) -> Iterator[int]:
        """Hold the weights steady: no re-merge runs inside the block. Yields the version."""
        with self._lock.read():
            yield self.version

    # ------------------------------------------------------------------ writing

    def coefficients(self, preference: Sequence[float], alpha: float = 0.0) -> list[float]:
        """Coefficients of the stored rows (backbones, then SFT) for ``preference`` and ``alpha``."""
        c, c_sft = merge_coefficients(preference, method=self.method, beta=self.beta, alpha=alpha, n=self.n)
        coeffs = [float(x) for x in c]
        if self._has_sft:
            # delta rows: sum_j c_j (d_j + s) + c_sft s = sum_j c_j d_j + (sum_j c_j + c_sft) s
            coeffs.append(float(c_sft + (sum(coeffs) if self.store == "delta" else 0.0)))
        elif c_sft != 0.0:
            raise ValueError(f"alpha={alpha!r} extrapolates away from the SFT model, which this LiveSoup "
                             "was built without (pass sft=...)")
        return coeffs

    def set_preference(self, preference: Sequence[float], alpha: float = 0.0) -> RemergeInfo:
        """Re-merge the live weights for ``preference`` (and ``alpha``), in place and atomically.

        One fused kernel call per parameter dtype. Readers inside
        ``reading()`` finish first; readers that start later see the new
        weights. Returns a :class:`RemergeInfo`.
        """
        coeffs = self.coefficients(preference, alpha)  # validates before taking the lock
        return self._remerge(coeffs, [float(x) for x in preference], float(alpha))

    def set_coefficients(self, coefficients: Sequence[float]) -> RemergeInfo:
        """Re-merge with raw coefficients over the stored rows (backbones, then the SFT model if stored).

        For merges that a preference and one ``alpha`` do not describe:
        per-objective extrapolation (:func:`~bonesoup.per_objective_extrapolation`;
        with ``store="delta"`` pass the coefficients of the full models, they
        are folded here), value models merged with their own weights, or a
        one-hot row to serve one stored model as is (bit for bit: ``1 * x +
        0 * y`` in fp32). Same atomicity as :meth:`set_preference`; the
        returned info's ``preference`` is empty and ``alpha`` NaN.
        """
        k = self.n + (1 if self._has_sft else 0)
        try:
            c = [float(x) for x in coefficients]
        except (TypeError, ValueError):
            raise TypeError(f"coefficients must be a sequence of {k} numbers, got {coefficients!r}") from None
        if len(c) != k or not all(math.isfinite(x) for x in c):
            raise ValueError(f"coefficients must hold {k} finite numbers (backbones"
                             f"{', then the SFT model' if self._has_sft else ''}), got {coefficients!r}")
        if self.store == "delta":
            c[-1] += sum(c[:-1])
        return self._remerge(c, [], float("nan"))

    def _remerge(self, coeffs: list[float], preference: list[float], alpha: float) -> RemergeInfo:
        cuda = self.device.type == "cuda"
        with self._lock.write():
            if cuda:
                torch.cuda.synchronize(self.device)  # queued forwards of earlier readers
            t0 = time.perf_counter()
            for arena in self._arenas:
                sk.merge(list(arena.inputs.unbind(0)), coeffs, out=arena.live)
            if cuda:
                torch.cuda.synchronize(self.device)
            seconds = time.perf_counter() - t0
            self.version += 1
            self.preference = preference or None
            self.alpha = alpha
            version = self.version
        k = len(coeffs)
        return RemergeInfo(version, list(preference), alpha, coeffs, seconds,
                           (k + 1) * self.param_bytes, len(self._arenas))

    def __repr__(self) -> str:
        return (f"LiveSoup(n={self.n}, method={self.method!r}, store={self.store!r}, device={self.device}, "
                f"{self.param_bytes / 2**20:.1f} MiB of parameters in {len(self._arenas)} arena(s), "
                f"version={self.version}, preference={self.preference})")


def _free_bytes(device: torch.device) -> int | None:
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return free
    if device.type == "cpu":
        import psutil

        return psutil.virtual_memory().available
    return None

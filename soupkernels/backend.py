"""Which implementation runs an op: Triton (CUDA), C++ (CPU) or plain torch.

``SOUPKERNELS_BACKEND=auto|triton|cpp|torch`` (read at each call) overrides the
automatic choice. ``triton`` on CPU tensors needs ``TRITON_INTERPRET=1`` set
before soupkernels is imported: that runs the Triton kernels in Triton's
interpreter, which is how they are tested without a GPU.
"""

from __future__ import annotations

import importlib.util
import os
import warnings

import torch

BACKENDS = ("auto", "triton", "cpp", "torch")

try:  # the C++ extension is optional: without it the torch path still works
    from soupkernels import _C  # type: ignore[attr-defined]

    CPP_ERROR: str | None = None
except ImportError as exc:  # pragma: no cover - exercised only on broken builds
    _C = None
    CPP_ERROR = f"soupkernels._C could not be imported ({exc}); rebuild with `pip install -e .`"

TRITON_AVAILABLE = importlib.util.find_spec("triton") is not None
_warned: set[str] = set()


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def requested_backend() -> str:
    """The value of ``SOUPKERNELS_BACKEND`` (default ``auto``), validated."""
    name = os.environ.get("SOUPKERNELS_BACKEND", "auto").strip().lower() or "auto"
    if name not in BACKENDS:
        raise ValueError(f"SOUPKERNELS_BACKEND must be one of {', '.join(BACKENDS)}, got {name!r}")
    return name


def _warn_once(msg: str) -> None:
    if msg not in _warned:
        _warned.add(msg)
        warnings.warn(msg, RuntimeWarning, stacklevel=3)


def backend_for(tensor: torch.Tensor) -> str:
    """Name of the backend that runs ops on ``tensor``: 'triton', 'cpp' or 'torch'.

    Auto: CUDA tensors use Triton, CPU tensors the C++ extension; either falls
    back to 'torch' (with a one-time RuntimeWarning that says why) when its
    backend is missing. A backend forced through ``SOUPKERNELS_BACKEND`` that
    cannot run on the tensor's device raises RuntimeError instead.
    """
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"backend_for expects a torch.Tensor, got {type(tensor).__name__}")
    want = requested_backend()
    dev = tensor.device.type
    if want == "torch":
        return "torch"
    if want == "cpp":
        if dev != "cpu":
            raise RuntimeError(f"SOUPKERNELS_BACKEND=cpp runs on CPU tensors only, got a {dev} tensor")
        if _C is None:
            raise RuntimeError(f"SOUPKERNELS_BACKEND=cpp but {CPP_ERROR}")
        return "cpp"
    if want == "triton":
        if not TRITON_AVAILABLE:
            raise RuntimeError("SOUPKERNELS_BACKEND=triton but triton is not installed (pip install triton)")
        if dev == "cpu" and not _interpret():
            raise RuntimeError("SOUPKERNELS_BACKEND=triton on CPU tensors needs TRITON_INTERPRET=1")
        if dev not in ("cpu", "cuda"):
            raise RuntimeError(f"SOUPKERNELS_BACKEND=triton runs on CUDA (or interpreted CPU) tensors, got {dev}")
        return "triton"
    # auto
    if dev == "cuda":
        if TRITON_AVAILABLE:
            return "triton"
        _warn_once("triton is not installed: soupkernels runs CUDA tensors on the slower torch path")
        return "torch"
    if dev == "cpu":
        if _C is not None:
            return "cpp"
        _warn_once(f"{CPP_ERROR}: soupkernels runs CPU tensors on the slower torch path")
        return "torch"
    return "torch"


def cpu_info() -> dict:
    """What the C++ backend will use here: SIMD path and OpenMP threads."""
    if _C is None:
        return {"cpp": False, "error": CPP_ERROR}
    return {"cpp": True, "simd": _C.simd(), "best_simd": _C.best_simd(), "threads": _C.max_threads()}


def _apply_simd_env() -> None:
    # SOUPKERNELS_SIMD=scalar|avx2|avx512 pins the CPU path (tests cover each
    # path the CPU has; a request above what it has fails loudly).
    level = os.environ.get("SOUPKERNELS_SIMD", "").strip().lower()
    if level and _C is not None:
        _C.set_simd(level)


_apply_simd_env()

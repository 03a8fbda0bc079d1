"""Which kernel paths the tests run here: every SIMD level this CPU has, and a backend switch."""

from __future__ import annotations

import contextlib

import pytest

from soupkernels import backend as sk_backend


def simd_levels() -> list[str]:
    """The C++ SIMD paths this CPU supports, narrowest first (none without the extension)."""
    if sk_backend._C is None:
        return []
    order = ["scalar", "avx2", "avx512"]
    return order[: order.index(sk_backend._C.best_simd()) + 1]


@contextlib.contextmanager
def use_backend(monkeypatch, name: str, simd: str | None):
    """Route soupkernels ops to backend ``name`` (and the C++ kernels to ``simd``) inside the block."""
    if name == "triton":
        pytest.importorskip("triton")
    monkeypatch.setenv("SOUPKERNELS_BACKEND", name)
    if simd is None:
        yield name
        return
    prev = sk_backend._C.simd()
    sk_backend._C.set_simd(simd)
    try:
        yield name
    finally:
        sk_backend._C.set_simd(prev)

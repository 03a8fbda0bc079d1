"""Philox4x32-10, the counter-based generator behind Triton's ``tl.rand``.

Every sampling backend draws a row's uniform from this exact function of
(seed, offset), so the C++ kernel, the Triton kernel and the torch reference
pick the same token for the same seed, and a row's draw never depends on
which other rows share the batch. Written with Python integers: one call per
row, and obviously right next to ``triton/language/random.py`` and
``csrc/philox.h``, which compute the same bits.
"""

from __future__ import annotations

import numpy as np

_M32 = 0xFFFFFFFF
_KEY_A, _KEY_B = 0x9E3779B9, 0xBB67AE85
_ROUND_A, _ROUND_B = 0xD2511F53, 0xCD9E8D57
#: Triton's scale: the largest float with (2**31 - 1) * scale < 1 in fp32.
UNIFORM_SCALE = np.float32(4.6566127342e-10)


def philox4x32(c0: int, c1: int, c2: int, c3: int, k0: int, k1: int, rounds: int = 10) -> tuple[int, int, int, int]:
    """Philox4x32 with ``rounds`` rounds on counter (c0..c3) and key (k0, k1), all uint32."""
    for _ in range(rounds):
        p0 = _ROUND_A * c0
        p2 = _ROUND_B * c2
        c0, c1, c2, c3 = (p2 >> 32) ^ c1 ^ k0, p2 & _M32, (p0 >> 32) ^ c3 ^ k1, p0 & _M32
        k0 = (k0 + _KEY_A) & _M32
        k1 = (k1 + _KEY_B) & _M32
    return c0, c1, c2, c3


def philox_uint32(seed: int, offset: int) -> int:
    """``tl.randint(seed, offset)`` for a 64-bit seed and a 64-bit offset."""
    seed &= (1 << 64) - 1
    offset &= (1 << 64) - 1
    return philox4x32(offset & _M32, offset >> 32, 0, 0, seed & _M32, seed >> 32)[0]


def philox_uniform(seed: int, offset: int) -> np.float32:
    """``tl.rand(seed, offset)``: a float32 in [0, 1) from ``philox_uint32``.

    The uint32 is read as int32; negative values map to ``~x``; then
    ``float32(x) * UNIFORM_SCALE`` in float32, exactly as Triton does it.
    """
    x = philox_uint32(seed, offset)
    if x >= 1 << 31:
        x = ~(x - (1 << 32))
    return np.float32(x) * UNIFORM_SCALE

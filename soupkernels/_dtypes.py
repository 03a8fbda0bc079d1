"""The one dtype table: codes shared with the kernels (csrc/dtype.h mirrors them) and dtype names.

bonesoup takes its mergeable dtypes and ``--dtype`` parsing from here, so a
dtype the kernels gain or lose changes in one place.
"""

from __future__ import annotations

import torch

#: torch dtype -> code passed to soupkernels._C and used in Triton kernels.
DTYPE_CODE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
#: The dtypes the kernels read and write (they accumulate in float32).
SUPPORTED_DTYPES = tuple(DTYPE_CODE)

#: Names accepted by :func:`parse_dtype` (lower case, optional "torch." prefix).
DTYPE_NAMES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}


def dtype_code(dtype: torch.dtype, what: str) -> int:
    """Code of a supported floating dtype, or TypeError naming ``what``."""
    try:
        return DTYPE_CODE[dtype]
    except KeyError:
        names = ", ".join(str(d).replace("torch.", "") for d in SUPPORTED_DTYPES)
        raise TypeError(f"{what} has dtype {dtype}; supported dtypes are {names}") from None


def parse_dtype(dtype: str | torch.dtype | None, name: str = "dtype") -> torch.dtype | None:
    """``None``, a supported torch dtype or its name (``"bfloat16"``, ``"bf16"``, ...) -> torch dtype or None.

    Raises ValueError naming ``name`` for anything else (float64, int8, "fp8", ...).
    """
    if dtype is None:
        return None
    if isinstance(dtype, str):
        key = dtype.strip().lower().removeprefix("torch.")
        if key in DTYPE_NAMES:
            return DTYPE_NAMES[key]
    elif isinstance(dtype, torch.dtype) and dtype in DTYPE_CODE:
        return dtype
    raise ValueError(f"{name} must be one of float32, bfloat16, float16 (or None), got {dtype!r}")

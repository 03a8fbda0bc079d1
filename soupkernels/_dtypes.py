"""dtype codes shared with the kernels (csrc/dtype.h mirrors them)."""

import torch

#: torch dtype -> code passed to soupkernels._C and used in Triton kernels.
DTYPE_CODE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
SUPPORTED_DTYPES = tuple(DTYPE_CODE)


def dtype_code(dtype: torch.dtype, what: str) -> int:
    """Code of a supported floating dtype, or TypeError naming ``what``."""
    try:
        return DTYPE_CODE[dtype]
    except KeyError:
        names = ", ".join(str(d).replace("torch.", "") for d in SUPPORTED_DTYPES)
        raise TypeError(f"{what} has dtype {dtype}; supported dtypes are {names}") from None

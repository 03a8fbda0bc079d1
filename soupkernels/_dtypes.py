"""The one dtype table: codes shared with the kernels (csrc/dtype.h mirrors them) and dtype names.

bonesoup takes its mergeable dtypes and ``--dtype`` parsing from here, so a
dtype the kernels gain or lose changes in one place. The table is keyed by
dtype *name* so that the torch-free CPU merge (raw buffers into
``soupkernels._C``) can use it without importing torch; the torch-keyed
views (``DTYPE_CODE``, ``SUPPORTED_DTYPES``, ``DTYPE_NAMES``) are built on
first access (PEP 562).
"""

from __future__ import annotations

#: dtype name -> code passed to soupkernels._C and used in Triton kernels.
NAME_CODE = {"float32": 0, "bfloat16": 1, "float16": 2}
#: Bytes per element of each kernel dtype.
NAME_ITEMSIZE = {"float32": 4, "bfloat16": 2, "float16": 2}
#: The safetensors spelling of each kernel dtype.
NAME_TO_SAFETENSORS = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}

#: Spellings accepted by :func:`parse_dtype_name` / :func:`parse_dtype` -> canonical name.
NAME_ALIASES = {
    "float32": "float32", "fp32": "float32", "float": "float32",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
    "float16": "float16", "fp16": "float16", "half": "float16",
}

_TORCH_VIEWS = ("DTYPE_CODE", "SUPPORTED_DTYPES", "DTYPE_NAMES")


def __getattr__(name):
    if name in _TORCH_VIEWS:
        import torch

        views = {
            # torch dtype -> kernel code; the dtypes the kernels read and write (fp32 accumulation).
            "DTYPE_CODE": {getattr(torch, n): c for n, c in NAME_CODE.items()},
            "SUPPORTED_DTYPES": tuple(getattr(torch, n) for n in NAME_CODE),
            "DTYPE_NAMES": {alias: getattr(torch, n) for alias, n in NAME_ALIASES.items()},
        }
        globals().update(views)
        return views[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def dtype_code(dtype, what: str) -> int:
    """Code of a supported floating torch dtype, or TypeError naming ``what``."""
    try:
        return __getattr__("DTYPE_CODE")[dtype]
    except KeyError:
        names = ", ".join(NAME_CODE)
        raise TypeError(f"{what} has dtype {dtype}; supported dtypes are {names}") from None


def parse_dtype_name(dtype, name: str = "dtype") -> str | None:
    """``None`` or a dtype spelling (``"bfloat16"``, ``"bf16"``, ``"torch.float16"``, a torch dtype) -> canonical name.

    Imports no torch for strings. Raises ValueError naming ``name`` for anything else (float64, int8, "fp8", ...).
    """
    if dtype is None:
        return None
    key = dtype if isinstance(dtype, str) else str(dtype) if type(dtype).__name__ == "dtype" else None
    if key is not None:
        key = key.strip().lower().removeprefix("torch.")
        if key in NAME_ALIASES:
            return NAME_ALIASES[key]
    raise ValueError(f"{name} must be one of float32, bfloat16, float16 (or None), got {dtype!r}")


def parse_dtype(dtype, name: str = "dtype"):
    """``None``, a supported torch dtype or its name (``"bfloat16"``, ``"bf16"``, ...) -> torch dtype or None.

    Raises ValueError naming ``name`` for anything else (float64, int8, "fp8", ...).
    """
    canonical = parse_dtype_name(dtype, name)
    if canonical is None:
        return None
    import torch

    return getattr(torch, canonical)

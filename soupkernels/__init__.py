"""soupkernels: fused kernels for merging models and guided decoding.

Knows tensors, not models. Public ops dispatch to Triton (CUDA tensors), the
C++ extension ``soupkernels._C`` (CPU tensors) or plain torch; see
``backend_for`` and the ``SOUPKERNELS_BACKEND`` environment variable.

The public names are loaded on first use (PEP 562), so that ``import
soupkernels._C`` (the torch-free CPU merge feeds it raw buffers) does not
import torch.
"""

import sys as _sys
import types as _types

__version__ = "0.1.0"

_LAZY = {
    "merge": "merge",
    "merge_many": "merge",
    "merge_reference": "reference",
    "guided_sample": "sampling",
    "guided_logits": "sampling",
    "backend_for": "backend",
    "cpu_info": "backend",
    "BACKENDS": "backend",
    "SUPPORTED_DTYPES": "_dtypes",
    "parse_dtype": "_dtypes",
}

__all__ = [*_LAZY, "__version__"]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(f"soupkernels.{_LAZY[name]}"), name)
        globals()[name] = value
        return value
    import importlib.util

    if not name.startswith("_") and importlib.util.find_spec(f"soupkernels.{name}") is not None:
        # a submodule (``soupkernels.<name>``), reachable as an attribute as when everything was imported eagerly
        return importlib.import_module(f"soupkernels.{name}")
    raise AttributeError(f"module 'soupkernels' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))


class _Package(_types.ModuleType):
    """``soupkernels.merge`` is both a submodule and the public function it defines.

    Loading the submodule makes the import system bind it on the package; the
    public name must stay the function (as the eager ``from soupkernels.merge
    import merge`` used to leave it).
    """

    def __setattr__(self, name, value):
        if name == "merge" and isinstance(value, _types.ModuleType):
            value = value.merge
        super().__setattr__(name, value)


_sys.modules[__name__].__class__ = _Package

"""soupkernels: fused kernels for merging models and guided decoding.

Knows tensors, not models. Public ops dispatch to Triton (CUDA tensors), the
C++ extension ``soupkernels._C`` (CPU tensors) or plain torch; see
``backend_for`` and the ``SOUPKERNELS_BACKEND`` environment variable.
"""

from soupkernels._dtypes import SUPPORTED_DTYPES, parse_dtype
from soupkernels.backend import BACKENDS, backend_for, cpu_info
from soupkernels.merge import merge, merge_many
from soupkernels.reference import merge_reference
from soupkernels.sampling import guided_logits, guided_sample

__version__ = "0.1.0"

__all__ = [
    "merge",
    "merge_many",
    "merge_reference",
    "guided_sample",
    "guided_logits",
    "backend_for",
    "cpu_info",
    "BACKENDS",
    "SUPPORTED_DTYPES",
    "parse_dtype",
    "__version__",
]

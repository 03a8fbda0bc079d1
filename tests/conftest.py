"""Test set-up: Triton kernels run in Triton's interpreter on CPU tensors.

TRITON_INTERPRET must be set before triton decorates the kernels, so it is set
here, at import, and only where there is no GPU (on a GPU machine the Triton
tests compile and run for real).
"""

import os

import pytest

try:
    import torch

    _HAS_CUDA = torch.cuda.is_available()
except ImportError:  # pragma: no cover
    _HAS_CUDA = False

if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

# tests/vllm/ runs in the vLLM environment (scripts/test.sh does it after the main
# suite): vLLM's pins conflict with ours, so the main environment has no vllm.
import importlib.util  # noqa: E402

_vllm = importlib.util.find_spec("vllm")  # tests/vllm itself is a namespace package named vllm (origin None)
collect_ignore = [] if _vllm is not None and _vllm.origin is not None else ["vllm"]


def pytest_collection_modifyitems(config, items):
    if _HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def load_benchmark():
    """Import a script from benchmarks/ by name (they are scripts, not a package)."""
    import importlib.util
    from pathlib import Path

    def load(name: str):
        path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
        spec = importlib.util.spec_from_file_location(name, path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod

    return load


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of tiny-model tests (``pytestmark = pytest.mark.usefixtures("one_thread")``).

    With two OpenMP threads on a busy 2-core machine a tiny model's forward
    takes ~100x longer (spinning threads); one thread keeps such files at
    seconds. The previous count is restored after the module.
    """
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

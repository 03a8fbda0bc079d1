"""The Triton merge kernel compiled ahead of time for an H100 (sm_90), no GPU needed.

Checks the generated PTX, which is what decides bandwidth on the device: with
16-byte-aligned addresses the whole-block path must use 128-bit vector loads
and stores (a kernel that loads element by element moves the same bytes in
8x as many transactions and does not reach the copy bandwidth). Compiled in a
subprocess because this test session runs Triton in interpreter mode.
"""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

_SCRIPT = r"""
import json, re, sys
from collections import Counter
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from soupkernels import triton_merge as tm

single, aligned = sys.argv[1] == "1", sys.argv[2] == "1"
sig = {"out_addrs": "*i64", "in_addrs": "*i64", "sizes": "*i64", "tile_off": "*i64", "coeffs": "*fp32"}
consts = {"N_F32": 1, "N_BF16": 3, "N_F16": 0, "OUT_CODE": 1, "SEARCH_STEPS": 0 if single else 9,
          "ALIGNED": aligned, "TILE": tm.TILE, "BLOCK": tm.BLOCK}
sig.update({k: "constexpr" for k in consts})
src = ASTSource(fn=tm._merge_tiles_kernel, signature=sig, constexprs=consts,
                attrs={(i,): [["tt.divisibility", 16]] for i in range(5)})
try:
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": tm.NUM_WARPS})
except Exception as exc:
    print(json.dumps({"skip": str(exc)[:300]}))
    sys.exit(0)
print(json.dumps(Counter(re.findall(r"(?:ld|st)\.global[.\w]*", kernel.asm["ptx"]))))
"""


def _ptx_ops(single: bool, aligned: bool) -> dict:
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_DEFAULT_FP_FUSION="1")
    proc = subprocess.run([sys.executable, "-c", _SCRIPT, str(int(single)), str(int(aligned))],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    ops = json.loads(proc.stdout.strip().splitlines()[-1])
    if "skip" in ops:  # a triton build without the NVIDIA backend or ptxas
        pytest.skip(f"cannot compile for sm_90 here: {ops['skip']}")
    return ops


@pytest.mark.parametrize("single", [True, False], ids=["merge", "merge_many"])
def test_aligned_kernel_uses_vector_memory_ops(single):
    ops = _ptx_ops(single, aligned=True)
    # per thread and block: 8 fp32 (2 x v4) + 3 x 8 bf16 (3 x v4) loads, one v4 bf16 store
    assert ops.get("ld.global.v4.b32", 0) >= 5, ops
    assert ops.get("st.global.v4.b32", 0) >= 1, ops


def test_unaligned_kernel_compiles_with_element_loads():
    ops = _ptx_ops(True, aligned=False)
    assert ops.get("ld.global.v4.b32", 0) == 0 and ops.get("ld.global.b16", 0) > 0, ops

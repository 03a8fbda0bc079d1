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


_SAMPLING_SCRIPT = r"""
import json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from soupkernels import triton_sampling as ts

out = {}
combine_sig = {"in_addrs": "*i64", "strides": "*i64", "coeffs": "*fp32", "temperature": "*fp32",
               "top_k": "*i64", "top_p": "*fp32", "s_out": "*fp32", "part_max": "*fp32", "part_arg": "*i64",
               "part_bad": "*i32", "hist": "*i32", "part_z": "*fp32", "cand_count": "*i32", "near": "*fp32",
               "near_idx": "*i32", "near_count": "*i32", "V": "i64", "NCH": "i64"}
consts = {"N_F32": 0, "N_BF16": 3, "N_F16": 1, "SCALE": True, "HIST": True, "CHUNK": ts.CHUNK, "BLOCK": ts.BLOCK,
          "NB": ts.NB, "BIN_W": ts.BIN_W, "NEAR_D": ts.NEAR_D, "LCAP": ts.LCAP}
collect_sig = {"in_addrs": "*i64", "strides": "*i64", "coeffs": "*fp32", "s_out": "*fp32", "part_max": "*fp32",
               "part_bad": "*i32", "hist": "*i32", "temperature": "*fp32", "top_k": "*i64", "top_p": "*fp32",
               "cand": "*fp32", "cand_idx": "*i32", "cand_count": "*i32", "part_z": "*fp32", "near": "*fp32",
               "near_idx": "*i32", "near_count": "*i32", "V": "i64", "NCH": "i64"}
cconsts = {"N_F32": 0, "N_BF16": 3, "N_F16": 1, "NCH_P2": 16, "CHUNK": ts.CHUNK, "BLOCK": ts.BLOCK, "NB": ts.NB,
           "BIN_W": ts.BIN_W, "CAP": ts.CAP, "NEAR_D": ts.NEAR_D, "LCAP": ts.LCAP}
sample_sig = {"in_addrs": "*i64", "strides": "*i64", "coeffs": "*fp32", "s_ptr": "*fp32", "part_max": "*fp32",
              "part_arg": "*i64", "part_bad": "*i32", "hist": "*i32", "cand": "*fp32", "cand_idx": "*i32",
              "cand_count": "*i32", "part_z": "*fp32", "temperature": "*fp32", "top_k": "*i64", "top_p": "*fp32",
              "min_p": "*fp32", "seed": "*i64", "offset": "*i64", "tokens": "*i64", "logprobs": "*fp32",
              "V": "i64", "NCH": "i64"}
sconsts = {"N_F32": 0, "N_BF16": 3, "N_F16": 1, "NCH_P2": 16, "BLOCK": ts.BLOCK, "NPIV": ts.NPIV,
           "SEARCH_BLOCK": ts.SEARCH_BLOCK, "CAND_BLOCK": ts.CAND_BLOCK, "NB": ts.NB, "BIN_W": ts.BIN_W,
           "CAP": ts.CAP}
for name, fn, sig, c, warps in (("combine", ts._combine_kernel, combine_sig, consts, ts.COMBINE_WARPS),
                                ("collect", ts._collect_kernel, collect_sig, cconsts, 4),
                                ("sample", ts._sample_kernel, sample_sig, sconsts, 4)):
    sig = dict(sig, **{k: "constexpr" for k in c})
    try:
        k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=c),
                           target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
    except Exception as exc:
        if "ptxas" in str(exc) or "backend" in str(exc).lower():
            print(json.dumps({"skip": str(exc)[:300]}))
            sys.exit(0)
        raise
    # Registers and spills as ptxas reports them for the PTX Triton produced.
    import os, re, subprocess, tempfile
    from triton.backends.nvidia.compiler import get_ptxas
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, name + ".ptx")
        open(path, "w").write(k.asm["ptx"])
        rep = subprocess.run([get_ptxas(90).path, "-v", "--gpu-name=sm_90a", path, "-o", path + ".o"],
                             capture_output=True, text=True).stderr
    regs = int(re.search(r"Used (\d+) registers", rep).group(1))
    spills = sum(int(x) for x in re.findall(r"(\d+) bytes spill (?:stores|loads)", rep))
    out[name] = {"regs": regs, "spills": spills}
print(json.dumps(out))
"""


def test_sampling_kernels_compile_for_sm90_without_spills(capsys):
    env = dict(os.environ, TRITON_INTERPRET="0")
    proc = subprocess.run([sys.executable, "-c", _SAMPLING_SCRIPT], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    if "skip" in info:
        pytest.skip(f"cannot compile for sm_90 here: {info['skip']}")
    with capsys.disabled():
        print(f"\nsm_90 registers / spill bytes: {info}")
    assert set(info) == {"combine", "collect", "sample"}
    for name, k in info.items():
        # A spilling kernel would not reach the bandwidth floor; the register
        # budget keeps several warps per SM resident (255 is the hard limit).
        assert k["spills"] == 0 and k["regs"] <= 128, (name, k)

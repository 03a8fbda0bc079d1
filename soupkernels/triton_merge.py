"""Triton kernel for the n-way merge, and its launcher.

One kernel serves ``sk.merge`` (one tensor) and ``sk.merge_many`` (a whole
parameter list): the launcher passes a table of tensor addresses and the
prefix sums of each tensor's tile count (a program finds its tensor by binary
search), so a model of any number of tensors is merged in ONE launch per
dtype signature, and the table is O(tensors) bytes. Each program merges one tile of
``TILE`` elements: it reads each input once, accumulates in fp32 registers and
stores the output once - the bytes moved are the floor, (n + 1) x P x size.

Inputs are grouped by dtype (all fp32 inputs, then bf16, then fp16) so the
element type of every address is known at compile time; the launcher reorders
the coefficients to match. Tested on the CPU under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import triton
import triton.language as tl

from soupkernels._dtypes import DTYPE_CODE
from soupkernels._triton_common import as_ptr, device_ctx, group_by_dtype

BLOCK = 1024  # elements per vector step: 4 warps x 32 lanes x 8 elements
TILE = 8 * BLOCK  # elements per program
NUM_WARPS = 4


@triton.jit
def _load(addr, CODE: tl.constexpr, ALIGNED: tl.constexpr, idx, mask, MASKED: tl.constexpr):
    p = as_ptr(addr, CODE, ALIGNED) + idx
    if MASKED:
        x = tl.load(p, mask=mask, other=0.0)
    else:
        x = tl.load(p)
    return x.to(tl.float32)


@triton.jit
def _merge_block(out, row, coeffs, idx, mask, N_F32: tl.constexpr, N_BF16: tl.constexpr, N_F16: tl.constexpr,
                 ALIGNED: tl.constexpr, MASKED: tl.constexpr, BLOCK: tl.constexpr):
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for j in tl.static_range(N_F32):
        acc += tl.load(coeffs + j) * _load(tl.load(row + j), 0, ALIGNED, idx, mask, MASKED)
    for j in tl.static_range(N_BF16):
        k = N_F32 + j
        acc += tl.load(coeffs + k) * _load(tl.load(row + k), 1, ALIGNED, idx, mask, MASKED)
    for j in tl.static_range(N_F16):
        k = N_F32 + N_BF16 + j
        acc += tl.load(coeffs + k) * _load(tl.load(row + k), 2, ALIGNED, idx, mask, MASKED)
    if MASKED:
        tl.store(out + idx, acc.to(out.dtype.element_ty), mask=mask)
    else:
        tl.store(out + idx, acc.to(out.dtype.element_ty))


@triton.jit
def _merge_tiles_kernel(
    out_addrs,  # int64 [T]       address of each output
    in_addrs,  # int64 [T, N]     addresses of the inputs, grouped f32|bf16|f16
    sizes,  # int64 [T]           elements per tensor
    tile_off,  # int64 [T + 1]    first tile of each tensor (exclusive prefix sum)
    coeffs,  # fp32 [N]           coefficients in the same grouped order
    N_F32: tl.constexpr,
    N_BF16: tl.constexpr,
    N_F16: tl.constexpr,
    OUT_CODE: tl.constexpr,
    SEARCH_STEPS: tl.constexpr,  # ceil(log2(T)); 0 for a single tensor
    ALIGNED: tl.constexpr,
    TILE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    N: tl.constexpr = N_F32 + N_BF16 + N_F16
    # Which tensor owns this tile: binary search over T + 1 prefix sums, so the
    # table is O(tensors), not O(tiles) (a 7B model has ~800k tiles).
    lo = pid * 0
    hi = lo + (1 << SEARCH_STEPS)
    for _ in tl.static_range(SEARCH_STEPS):
        mid = (lo + hi) // 2
        go_right = tl.load(tile_off + mid) <= pid
        lo = tl.where(go_right, mid, lo)
        hi = tl.where(go_right, hi, mid)
    t = lo
    start = tl.multiple_of((pid - tl.load(tile_off + t)) * TILE, TILE)
    end = tl.minimum(start + TILE, tl.load(sizes + t))
    out = as_ptr(tl.load(out_addrs + t), OUT_CODE, ALIGNED)
    row = in_addrs + t * N
    # Whole blocks without masks (vectorisable), then at most one masked block.
    n_full = (end - start) // BLOCK
    for b in range(0, n_full):
        idx = start + b * BLOCK + tl.arange(0, BLOCK)
        _merge_block(out, row, coeffs, idx, idx < end, N_F32, N_BF16, N_F16, ALIGNED, False, BLOCK)
    tail = start + n_full * BLOCK
    if tail < end:
        idx = tail + tl.arange(0, BLOCK)
        _merge_block(out, row, coeffs, idx, idx < end, N_F32, N_BF16, N_F16, ALIGNED, True, BLOCK)


def merge_group_triton(
    outs: Sequence[torch.Tensor],
    groups: Sequence[Sequence[torch.Tensor]],
    coeffs: Sequence[float],
) -> None:
    """One launch for many tensors sharing one dtype signature and device.

    ``outs[t] = sum_k coeffs[k] * groups[t][k]``; contiguous tensors on one
    CUDA device (or the CPU under ``TRITON_INTERPRET=1``), ``groups[t][k].dtype``
    the same for every t. Validation is the caller's job (soupkernels.merge).
    """
    device = outs[0].device
    dtypes = [t.dtype for t in groups[0]]
    order, counts = group_by_dtype(dtypes)
    T = len(outs)
    sizes = np.fromiter((o.numel() for o in outs), dtype=np.int64, count=T)
    addrs = np.empty((T, 1 + len(order)), dtype=np.int64)
    for t, (o, g) in enumerate(zip(outs, groups)):
        addrs[t, 0] = o.data_ptr()
        addrs[t, 1:] = [g[k].data_ptr() for k in order]
    aligned = bool((addrs % 16 == 0).all())
    tiles = (sizes + TILE - 1) // TILE
    grid = int(tiles.sum())
    if grid == 0:
        return
    steps = max(0, (T - 1).bit_length())  # 2**steps >= T
    # Pad the prefix sums to 2**steps + 1 entries so the search never reads past them.
    tile_off = np.full((1 << steps) + 1, grid, dtype=np.int64)
    tile_off[0] = 0
    tile_off[1 : T + 1] = np.cumsum(tiles)
    # One host->device copy for all int64 tables.
    table = torch.from_numpy(np.concatenate([addrs[:, 0], addrs[:, 1:].reshape(-1), sizes, tile_off]))
    table = table.to(device, non_blocking=True)
    o_addr, i_addr = table[:T], table[T : T + T * len(order)]
    t_sizes, t_off = table[T + T * len(order) : 2 * T + T * len(order)], table[2 * T + T * len(order) :]
    c = torch.tensor([float(coeffs[k]) for k in order], dtype=torch.float32).to(device, non_blocking=True)
    with device_ctx(device):
        _launch(o_addr, i_addr, t_sizes, t_off, c, counts, outs[0].dtype, steps, aligned, grid)


def _launch(o_addr, i_addr, t_sizes, t_off, c, counts, out_dtype, steps, aligned, grid) -> None:
    _merge_tiles_kernel[(grid,)](
        o_addr,
        i_addr,
        t_sizes,
        t_off,
        c,
        N_F32=counts[0],
        N_BF16=counts[1],
        N_F16=counts[2],
        OUT_CODE=DTYPE_CODE[out_dtype],
        SEARCH_STEPS=steps,
        ALIGNED=aligned,
        TILE=TILE,
        BLOCK=BLOCK,
        num_warps=NUM_WARPS,
    )

"""Triton kernel for the n-way merge, and its launcher.

One kernel serves ``sk.merge`` (one tensor) and ``sk.merge_many`` (a whole
parameter list): the launcher passes a table of tensor addresses and a table
of tiles (tensor index, start element), so a model of any number of tensors
is merged in ONE launch per dtype signature. Each program merges one tile of
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

BLOCK = 1024  # elements per vector step: 4 warps x 32 lanes x 8 elements
TILE = 8 * BLOCK  # elements per program
NUM_WARPS = 4
_ORDER = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def _as_ptr(addr, CODE: tl.constexpr, ALIGNED: tl.constexpr):
    # Addresses come from a table, so Triton cannot see their alignment. The
    # launcher checked 16-byte alignment; the hint on the pointer (a hint on
    # the integer is lost, checked in the PTX) lets the compiler emit 128-bit
    # loads and stores instead of one per element.
    if CODE == 0:
        p = addr.to(tl.pointer_type(tl.float32))
    elif CODE == 1:
        p = addr.to(tl.pointer_type(tl.bfloat16))
    else:
        p = addr.to(tl.pointer_type(tl.float16))
    if ALIGNED:
        p = tl.multiple_of(p, 16)
    return p


@triton.jit
def _load(addr, CODE: tl.constexpr, ALIGNED: tl.constexpr, idx, mask, MASKED: tl.constexpr):
    p = _as_ptr(addr, CODE, ALIGNED) + idx
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
    tile_tensor,  # int64 [G]     tensor index of each tile (unused if SINGLE)
    tile_start,  # int64 [G]      first element of each tile (unused if SINGLE)
    coeffs,  # fp32 [N]           coefficients in the same grouped order
    N_F32: tl.constexpr,
    N_BF16: tl.constexpr,
    N_F16: tl.constexpr,
    OUT_CODE: tl.constexpr,
    SINGLE: tl.constexpr,
    ALIGNED: tl.constexpr,
    TILE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    N: tl.constexpr = N_F32 + N_BF16 + N_F16
    if SINGLE:
        t = 0
        start = pid.to(tl.int64) * TILE
    else:
        t = tl.load(tile_tensor + pid)
        start = tl.multiple_of(tl.load(tile_start + pid), TILE)
    end = tl.minimum(start + TILE, tl.load(sizes + t))
    out = _as_ptr(tl.load(out_addrs + t), OUT_CODE, ALIGNED)
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
    order = sorted(range(len(dtypes)), key=lambda k: _ORDER.index(dtypes[k]))
    counts = [sum(1 for d in dtypes if d == o) for o in _ORDER]
    T = len(outs)
    sizes = np.fromiter((o.numel() for o in outs), dtype=np.int64, count=T)
    addrs = np.empty((T, 1 + len(order)), dtype=np.int64)
    for t, (o, g) in enumerate(zip(outs, groups)):
        addrs[t, 0] = o.data_ptr()
        addrs[t, 1:] = [g[k].data_ptr() for k in order]
    single = T == 1
    aligned = bool((addrs % 16 == 0).all())
    if single:
        grid = triton.cdiv(int(sizes[0]), TILE)
        tile_tensor = np.zeros(1, dtype=np.int64)
        tile_start = np.zeros(1, dtype=np.int64)
    else:
        tiles = (sizes + TILE - 1) // TILE
        grid = int(tiles.sum())
        tile_tensor = np.repeat(np.arange(T, dtype=np.int64), tiles)
        first = np.repeat(np.cumsum(tiles) - tiles, tiles)
        tile_start = (np.arange(grid, dtype=np.int64) - first) * TILE
    if grid == 0:
        return
    # One host->device copy for all int64 tables.
    table = torch.from_numpy(np.concatenate([addrs[:, 0], addrs[:, 1:].reshape(-1), sizes, tile_tensor, tile_start]))
    table = table.to(device, non_blocking=True)
    o_addr, rest = table[:T], table[T:]
    i_addr, rest = rest[: T * len(order)], rest[T * len(order) :]
    t_sizes, rest = rest[:T], rest[T:]
    t_tensor, t_start = rest[: len(tile_tensor)], rest[len(tile_tensor) :]
    c = torch.tensor([float(coeffs[k]) for k in order], dtype=torch.float32).to(device, non_blocking=True)
    _merge_tiles_kernel[(grid,)](
        o_addr,
        i_addr,
        t_sizes,
        t_tensor,
        t_start,
        c,
        N_F32=counts[0],
        N_BF16=counts[1],
        N_F16=counts[2],
        OUT_CODE=DTYPE_CODE[outs[0].dtype],
        SINGLE=single,
        ALIGNED=aligned,
        TILE=TILE,
        BLOCK=BLOCK,
        num_warps=NUM_WARPS,
    )

"""Triton kernels for guided sampling, and their launchers.

Two launches per call:

1. ``_combine_kernel``, grid (B, chunks): reads the M inputs once, writes the
   scaled combined logits s = (sum_m c[b, m] x_m[b]) / T to an fp32 scratch
   [B, V], and per chunk the max, the first index of the max and a NaN/+inf
   count. ``guided_logits`` is this kernel alone (T = 1, scratch = output).
2. ``_sample_kernel``, grid (B,): per row, reduces the chunk partials (greedy
   rows end here), then works on the scratch row only (it stays in L2):
   top-k and top-p thresholds by a multi-pivot search over the order-
   preserving integer keys of s (NPIV pivots per pass, so ~8 passes pin a
   32-bit key exactly), the kept mass, and the inverse-CDF walk with the
   Philox uniform of (seed, offset), block by block with ``tl.cumsum``, which
   stops at the block holding the token.

The kept set and the draw follow soupkernels/sampling_reference.py exactly,
so the same seed gives the same token as the C++ kernel (up to float
summation order at the boundaries). Tested on the CPU under
``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from soupkernels._triton_common import as_ptr, device_ctx, group_by_dtype

BLOCK = 1024  # elements per step of the combine and walk loops
CHUNK = 8 * BLOCK  # elements per combine program
SEARCH_BLOCK = 256  # elements per step of a pivot pass ([SEARCH_BLOCK, NPIV] compares)
NPIV = 16  # pivots per pass: each pass shrinks the key range 17x
# Under TRITON_INTERPRET=1 each tensor op costs a numpy call, so the same
# kernels run with larger blocks there (same code, other constexpr sizes; the
# GPU sizes are compiled for sm_90 in tests/test_triton_codegen.py).
_INTERPRETED = dict(BLOCK=4096, CHUNK=4 * 4096, SEARCH_BLOCK=4096)
_COMPILED = dict(BLOCK=BLOCK, CHUNK=CHUNK, SEARCH_BLOCK=SEARCH_BLOCK)


def _sizes(dev: torch.device) -> dict:
    return _COMPILED if dev.type == "cuda" else _INTERPRETED


@triton.jit
def _load_input(addrs, strides, j, b, idx, mask, CODE: tl.constexpr):
    p = as_ptr(tl.load(addrs + j), CODE, False)  # rows may be strided: no alignment hint
    return tl.load(p + b * tl.load(strides + j) + idx, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _combine_kernel(
    in_addrs,  # int64 [M]   input addresses, grouped f32 | bf16 | f16
    strides,  # int64 [M]    row stride of each input, elements
    coeffs,  # fp32 [B, M]   per-row coefficients in the grouped order
    temperature,  # fp32 [B] (used when SCALE)
    s_out,  # fp32 [B, V]    scaled combined logits
    part_max,  # fp32 [B, NCH]
    part_arg,  # int64 [B, NCH]  first index of the chunk max
    part_bad,  # int32 [B, NCH]  NaN / +inf count
    V,
    NCH,
    N_F32: tl.constexpr,
    N_BF16: tl.constexpr,
    N_F16: tl.constexpr,
    SCALE: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    ch = tl.program_id(1).to(tl.int64)
    M: tl.constexpr = N_F32 + N_BF16 + N_F16
    t = 1.0
    if SCALE:
        t = tl.load(temperature + b)
        t = tl.where(t == 0.0, 1.0, t)  # greedy rows: argmax of the unscaled logits
    mx = -float("inf")
    arg = V.to(tl.int64) * 0 + V
    bad = 0
    for blk in range(0, CHUNK, BLOCK):
        idx = ch * CHUNK + blk + tl.arange(0, BLOCK)
        mask = idx < V
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for j in tl.static_range(N_F32):
            acc += tl.load(coeffs + b * M + j) * _load_input(in_addrs, strides, j, b, idx, mask, 0)
        for j in tl.static_range(N_BF16):
            k = N_F32 + j
            acc += tl.load(coeffs + b * M + k) * _load_input(in_addrs, strides, k, b, idx, mask, 1)
        for j in tl.static_range(N_F16):
            k = N_F32 + N_BF16 + j
            acc += tl.load(coeffs + b * M + k) * _load_input(in_addrs, strides, k, b, idx, mask, 2)
        acc = acc / t + 0.0  # + 0.0 turns -0.0 into +0.0: the integer keys then order like floats
        tl.store(s_out + b * V + idx, acc, mask=mask)
        am = tl.where(mask, acc, -float("inf"))
        bm = tl.max(am, 0)
        barg = tl.min(tl.where(am == bm, idx, V), 0)
        bad += tl.sum((((acc != acc) | (acc == float("inf"))) & mask).to(tl.int32), 0)
        arg = tl.where(bm > mx, barg, arg)
        mx = tl.maximum(mx, bm)
    tl.store(part_max + b * NCH + ch, mx)
    tl.store(part_arg + b * NCH + ch, arg)
    tl.store(part_bad + b * NCH + ch, bad)


@triton.jit
def _keys(s):
    # Order-preserving int32 image of a float (-0.0 was canonicalised to +0.0).
    bits = s.to(tl.int32, bitcast=True)
    return tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(tl.int64)


@triton.jit
def _search(row, V, m, lo, hi, floor_key, target, BY_MASS: tl.constexpr, NPIV: tl.constexpr,
            SEARCH_BLOCK: tl.constexpr):
    # Largest key t in [lo, hi] with f(t) >= target, where f(t) counts (or, BY_MASS,
    # sums exp(s - m) over) the tokens with key >= t among those with key >= floor_key.
    # Needs f(lo) >= target; f is non-increasing, so each pass keeps the bracket.
    j = tl.arange(0, NPIV).to(tl.int64)
    while lo < hi:
        piv = lo + ((j + 1) * (hi - lo) + NPIV) // (NPIV + 1)  # in (lo, hi]
        f = tl.zeros([NPIV], dtype=tl.float32)
        for start in range(0, V, SEARCH_BLOCK):
            idx = start + tl.arange(0, SEARCH_BLOCK)
            mask = idx < V
            s = tl.load(row + idx, mask=mask, other=-float("inf"))
            key = _keys(s)
            live = mask & (key >= floor_key)
            if BY_MASS:
                w = tl.where(live, tl.exp(s - m), 0.0)
            else:
                w = live.to(tl.float32)
            hit = key[:, None] >= piv[None, :]
            f += tl.sum(tl.where(hit, w[:, None], 0.0), 0)
        ok = f >= target
        lo = tl.maximum(lo, tl.max(tl.where(ok, piv, lo), 0))
        hi = tl.minimum(hi, tl.min(tl.where(ok, hi, piv - 1), 0))
    return lo


@triton.jit
def _sample_kernel(
    s_ptr,  # fp32 [B, V] from _combine_kernel
    part_max,
    part_arg,
    part_bad,
    temperature,  # fp32 [B]
    top_k,  # int64 [B]
    top_p,  # fp32 [B]
    min_p,  # fp32 [B]
    seed,  # int64 [B]
    offset,  # int64 [B]
    tokens,  # int64 [B] out
    logprobs,  # fp32 [B] out
    V,
    NCH,
    NCH_P2: tl.constexpr,
    BLOCK: tl.constexpr,
    NPIV: tl.constexpr,
    SEARCH_BLOCK: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    c = tl.arange(0, NCH_P2)
    cm = c < NCH
    pm = tl.load(part_max + b * NCH + c, mask=cm, other=-float("inf"))
    m = tl.max(pm, 0)
    argmax = tl.min(tl.where(cm & (pm == m), tl.load(part_arg + b * NCH + c, mask=cm, other=0), V), 0)
    nbad = tl.sum(tl.load(part_bad + b * NCH + c, mask=cm, other=0), 0)
    t = tl.load(temperature + b)
    row = s_ptr + b * V
    if (nbad > 0) | (m == -float("inf")):
        tl.store(tokens + b, -1)
        tl.store(logprobs + b, float("nan"))
    elif t == 0.0:
        tl.store(tokens + b, argmax)
        tl.store(logprobs + b, 0.0)
    else:
        k = tl.load(top_k + b)
        p = tl.load(top_p + b)
        minp = tl.load(min_p + b)
        log_minp = tl.where(minp > 0.0, tl.log(tl.maximum(minp, 1e-38)), -float("inf"))
        key_min = (-2147483648 + b * 0).to(tl.int64)
        key_max = _keys(m)
        tau = key_min
        if (k > 0) & (k < V):
            tau = _search(row, V, m, key_min, key_max, key_min, k.to(tl.float32), False, NPIV, SEARCH_BLOCK)
        if p < 1.0:
            z1 = tl.zeros([SEARCH_BLOCK], dtype=tl.float32)
            for start in range(0, V, SEARCH_BLOCK):
                idx = start + tl.arange(0, SEARCH_BLOCK)
                s = tl.load(row + idx, mask=idx < V, other=-float("inf"))
                z1 += tl.where(_keys(s) >= tau, tl.exp(s - m), 0.0)
            target = p * tl.sum(z1, 0)
            tau = _search(row, V, m, tau, key_max, tau, target, True, NPIV, SEARCH_BLOCK)
        # Kept mass, then the walk: first token whose running kept mass exceeds u * Z.
        zacc = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, V, BLOCK):
            idx = start + tl.arange(0, BLOCK)
            s = tl.load(row + idx, mask=idx < V, other=-float("inf"))
            keep = (_keys(s) >= tau) & (s - m >= log_minp)
            zacc += tl.where(keep, tl.exp(s - m), 0.0)
        z = tl.sum(zacc, 0)
        u = tl.rand(tl.load(seed + b), tl.load(offset + b))
        target = u * z
        run = 0.0
        tok = (b * 0 - 1).to(tl.int64)
        last = tok
        start = b * 0
        while (start < V) & (tok < 0):
            idx = start + tl.arange(0, BLOCK)
            s = tl.load(row + idx, mask=idx < V, other=-float("inf"))
            keep = (_keys(s) >= tau) & (s - m >= log_minp)
            e = tl.where(keep, tl.exp(s - m), 0.0)
            hit = (run + tl.cumsum(e, 0) > target) & (idx < V)
            first = tl.min(tl.where(hit, idx, V), 0)
            tok = tl.where(first < V, first, tok)
            last = tl.maximum(last, tl.max(tl.where(e > 0.0, idx, -1), 0))
            run += tl.sum(e, 0)
            start += BLOCK
        tok = tl.where(tok < 0, last, tok)  # rounding: u * z beyond the walked sum
        tl.store(tokens + b, tok)
        tl.store(logprobs + b, (tl.load(row + tok) - m) - tl.log(z))


def _table(xs, coeffs):
    """Inputs grouped f32 | bf16 | f16: address and stride tables, counts, reordered coefficients."""
    order, counts = group_by_dtype([x.dtype for x in xs])
    dev = xs[0].device
    table = torch.tensor([[xs[k].data_ptr() for k in order], [xs[k].stride(0) for k in order]], dtype=torch.int64)
    table = table.to(dev, non_blocking=True)
    return table[0], table[1], counts, coeffs[:, order].contiguous()


def _combine(xs, coeffs, temperature, s_out, scale: bool):
    B, V = xs[0].shape
    dev = xs[0].device
    sz = _sizes(dev)
    addrs, strides, counts, c = _table(xs, coeffs)
    nch = triton.cdiv(V, sz["CHUNK"])
    part_max = torch.empty((B, nch), dtype=torch.float32, device=dev)
    part_arg = torch.empty((B, nch), dtype=torch.int64, device=dev)
    part_bad = torch.empty((B, nch), dtype=torch.int32, device=dev)
    _combine_kernel[(B, nch)](
        addrs, strides, c, temperature if scale else c, s_out, part_max, part_arg, part_bad, V, nch,
        N_F32=counts[0], N_BF16=counts[1], N_F16=counts[2], SCALE=scale, CHUNK=sz["CHUNK"], BLOCK=sz["BLOCK"],
        num_warps=4,
    )
    return part_max, part_arg, part_bad, nch


def guided_logits_triton(xs, coeffs, out) -> None:
    """out [B, V] fp32 = sum_m coeffs[:, m] * xs[m] (validated by soupkernels.sampling)."""
    with device_ctx(xs[0].device):
        _combine(xs, coeffs, None, out, scale=False)


def guided_sample_triton(xs, coeffs, temperature, top_k, top_p, min_p, seed, offset, tokens, logprobs) -> None:
    """Fills tokens [B] int64 and logprobs [B] fp32 (validated by soupkernels.sampling)."""
    B, V = xs[0].shape
    dev = xs[0].device
    with device_ctx(dev):
        s = torch.empty((B, V), dtype=torch.float32, device=dev)
        part_max, part_arg, part_bad, nch = _combine(xs, coeffs, temperature, s, scale=True)
        _sample_kernel[(B,)](
            s, part_max, part_arg, part_bad, temperature, top_k, top_p, min_p, seed, offset, tokens, logprobs,
            V, nch, NCH_P2=triton.next_power_of_2(nch), BLOCK=_sizes(dev)["BLOCK"], NPIV=NPIV,
            SEARCH_BLOCK=_sizes(dev)["SEARCH_BLOCK"],
            num_warps=4,
        )

"""Triton kernels for guided sampling, and their launchers.

Three launches per call (the C++ kernel's algorithm, csrc/sample_body.inc,
spread over the GPU):

1. ``_combine_kernel``, grid (B, chunks): reads the M inputs once and holds
   its chunk of the scaled combined logits s = (sum_m c[b, m] x_m[b]) / T in
   registers: per chunk the max, the first index of the max, a NaN/+inf
   count, a histogram of d = chunk max - s (NB bins of BIN_W nats; the last
   bin holds everything further down), the chunk's mass and the list of its
   tokens within NEAR_D of its max (s and index). Only rows without top-k /
   top-p write s to the fp32 scratch [B, V]. ``guided_logits`` is this
   kernel alone (T = 1, scratch = output, no histogram).
2. ``_collect_kernel``, grid (B, chunks): rows with top-k or top-p read their
   chunk histograms and plan a cut-off s >= m - T that provably holds the
   final kept set (bin edges bound each token's s; bin counts bound the mass)
   and at most CAP tokens; every program then appends its chunk's tokens
   above the cut-off, with their indices, to the row's candidate list, from
   its near-top list or, if the cut lies below it, from the inputs. A row
   whose plan fails (a very flat row) gets its scratch row here.
3. ``_sample_kernel``, grid (B,): reduces the chunk partials (greedy and
   invalid rows end here); a collected row finds its top-k and top-p
   thresholds by a multi-pivot search over the order-preserving integer keys
   of its candidates only, with fixed-point masses (exact sums, so the
   list's arbitrary order changes nothing), its kept mass, and draws by an
   index search over the same list: no row data. The other rows (failed
   plans, temperature / min-p only) run the same searches and a walk over
   their scratch row.

The kept set and the draw follow soupkernels/sampling_reference.py exactly
(the Philox uniform of (seed, offset), the first token in vocabulary order
whose running kept mass exceeds u * Z), so the same seed gives the same token
as the C++ kernel (up to float summation order at the boundaries). Tested on
the CPU under ``TRITON_INTERPRET=1``; costs in benchmarks/GPU_MODEL.md.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from soupkernels._triton_common import as_ptr, device_ctx, group_by_dtype
from soupkernels._triton_thresholds import plan_cutoff, sample_by_passes, sample_from_candidates

BLOCK = 1024  # elements per step of the combine, collect and walk loops
CHUNK = 8 * BLOCK  # elements per combine / collect program
SEARCH_BLOCK = 256  # elements per step of a pivot pass ([SEARCH_BLOCK, NPIV] compares)
NPIV = 16  # pivots per pass: each pass shrinks the key range 17x
# Histogram bins per chunk: tl.histogram costs ~NB / 32 popcounts per element
# on the GPU, so the bins are few and fine where the cut-offs fall (16 nats
# below the chunk max at 0.25 nat, which bounds a token's mass within 1.28x).
NB = 64
BIN_W = 0.25
CAP = 2048  # candidates per row (a row with more near its cut takes the row passes)
# The combine pass also lists each chunk's tokens within NEAR_D nats of the
# chunk max (up to LCAP of them, in vocabulary order): the collect pass reads
# those lists instead of re-reading the inputs whenever the cut-off lies inside them.
NEAR_D = 4.0
LCAP = 256
# The sampling combine holds its whole chunk in registers: 16 warps keep that
# at 16 floats a thread (8 warps: 198 registers, one CTA per SM either way).
COMBINE_WARPS = 16
CAND_BLOCK = 128  # elements per step of a pivot pass over the candidates (256 spills on sm_90)
# Under TRITON_INTERPRET=1 each tensor op costs a numpy call, so the same
# kernels run with larger blocks there (same code, other constexpr sizes; the
# GPU sizes are compiled for sm_90 in tests/test_triton_codegen.py).
_INTERPRETED = dict(BLOCK=4096, CHUNK=4 * 4096, SEARCH_BLOCK=4096, CAP=CAP, CAND_BLOCK=CAND_BLOCK)
_COMPILED = dict(BLOCK=BLOCK, CHUNK=CHUNK, SEARCH_BLOCK=SEARCH_BLOCK, CAP=CAP, CAND_BLOCK=CAND_BLOCK)


def _sizes(dev: torch.device) -> dict:
    return _COMPILED if dev.type == "cuda" else _INTERPRETED


@triton.jit
def _load_input(addrs, strides, j, b, idx, mask, CODE: tl.constexpr):
    p = as_ptr(tl.load(addrs + j), CODE, False)  # rows may be strided: no alignment hint
    # Inputs are read once per pass: let them leave L2 first, so what the
    # later kernels re-read (histograms, lists, fallback scratch rows) stays.
    return tl.load(p + b * tl.load(strides + j) + idx, mask=mask, other=0.0,
                   eviction_policy="evict_first").to(tl.float32)


@triton.jit
def _scaled(in_addrs, strides, coeffs, b, idx, mask, t, N_F32: tl.constexpr, N_BF16: tl.constexpr,
            N_F16: tl.constexpr):
    # s = (sum_m c[b, m] x_m[b, idx]) / t, the one formula every kernel that
    # needs s computes it with (the same fp32 operations in the same order, so
    # a recomputed s is bit-identical to the combine pass's).
    M: tl.constexpr = N_F32 + N_BF16 + N_F16
    acc = tl.zeros(idx.shape, dtype=tl.float32)
    for j in tl.static_range(N_F32):
        acc += tl.load(coeffs + b * M + j) * _load_input(in_addrs, strides, j, b, idx, mask, 0)
    for j in tl.static_range(N_BF16):
        k = N_F32 + j
        acc += tl.load(coeffs + b * M + k) * _load_input(in_addrs, strides, k, b, idx, mask, 1)
    for j in tl.static_range(N_F16):
        k = N_F32 + N_BF16 + j
        acc += tl.load(coeffs + b * M + k) * _load_input(in_addrs, strides, k, b, idx, mask, 2)
    return acc / t + 0.0  # + 0.0 turns -0.0 into +0.0: the integer keys then order like floats


@triton.jit
def _write_scaled(in_addrs, strides, coeffs, temperature, s_out, b, lo, hi, V, N_F32: tl.constexpr,
                  N_BF16: tl.constexpr, N_F16: tl.constexpr, BLOCK: tl.constexpr):
    # The scratch row s[b, lo:hi] from the inputs, for the rows that take the row passes.
    t = tl.load(temperature + b)
    for start in range(lo, hi, BLOCK):
        idx = start + tl.arange(0, BLOCK)
        mask = (idx < hi) & (idx < V)
        tl.store(s_out + b * V + idx, _scaled(in_addrs, strides, coeffs, b, idx, mask, t, N_F32, N_BF16, N_F16),
                 mask=mask)


@triton.jit
def _combine_kernel(
    in_addrs,  # int64 [M]   input addresses, grouped f32 | bf16 | f16
    strides,  # int64 [M]    row stride of each input, elements
    coeffs,  # fp32 [B, M]   per-row coefficients in the grouped order
    temperature,  # fp32 [B] (used when SCALE)
    top_k,  # int64 [B], fp32 [B] (used when HIST: which rows need their scratch row)
    top_p,
    s_out,  # fp32 [B, V]    scaled combined logits (when HIST: only the rows without top-k / top-p)
    part_max,  # fp32 [B, NCH]
    part_arg,  # int64 [B, NCH]  first index of the chunk max
    part_bad,  # int32 [B, NCH]  NaN / +inf count
    hist,  # int32 [B, NCH, NB]      bins of d = chunk max - s (used when HIST)
    part_z,  # fp32 [B, NCH]         sum of exp(s - chunk max) (used when HIST)
    cand_count,  # int32 [B]         zeroed here for _collect_kernel (when HIST)
    near,  # fp32 [B, NCH, LCAP]     s of the chunk's tokens with d <= NEAR_D (when HIST)
    near_idx,  # int32 [B, NCH, LCAP]  their vocabulary indices
    near_count,  # int32 [B, NCH]    how many there are (may exceed LCAP: then the list is unusable)
    V,
    NCH,
    N_F32: tl.constexpr,
    N_BF16: tl.constexpr,
    N_F16: tl.constexpr,
    SCALE: tl.constexpr,
    HIST: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK: tl.constexpr,
    NB: tl.constexpr,
    BIN_W: tl.constexpr,
    NEAR_D: tl.constexpr,
    LCAP: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    ch = tl.program_id(1).to(tl.int64)
    t = 1.0
    if SCALE:
        t0 = tl.load(temperature + b)
        t = tl.where(t0 == 0.0, 1.0, t0)  # greedy rows: argmax of the unscaled logits
    if HIST:
        # Sampling: the whole chunk at once, in registers (16 floats a thread
        # at 16 warps), so the histogram relative to the chunk max needs no
        # second read. Only rows without top-k / top-p (temperature / min-p:
        # the row passes) get their scratch row here; rows whose plan fails
        # get it from _collect_kernel, the common case none.
        k = tl.load(top_k + b)
        filtered = ((k > 0) & (k < V)) | (tl.load(top_p + b) < 1.0)
        rows_pass = (t0 != 0.0) & (filtered == 0)
        # int32 indices (V < 2^31): int64 ones would take another 32 registers a thread.
        idx = (ch * CHUNK).to(tl.int32) + tl.arange(0, CHUNK)
        v32 = V.to(tl.int32)
        mask = idx < v32
        sv = _scaled(in_addrs, strides, coeffs, b, idx, mask, t, N_F32, N_BF16, N_F16)
        if rows_pass:
            tl.store(s_out + b * V + idx, sv, mask=mask)
        am = tl.where(mask, sv, -float("inf"))
        mx = tl.max(am, 0)
        arg = tl.where(mx > -float("inf"), tl.min(tl.where(am == mx, idx, v32), 0), v32).to(tl.int64)
        bad = tl.sum((((sv != sv) | (sv == float("inf"))) & mask).to(tl.int32), 0)
        d = mx - sv
        d = tl.where(d == d, d, float("inf"))  # -inf chunks and NaN rows: the last bin
        h = tl.histogram(tl.minimum(d * (1.0 / BIN_W), NB - 1.0).to(tl.int32), NB, mask=mask)
        zc = tl.sum(tl.where(mask & (d < float("inf")), tl.exp(-d), 0.0), 0)
        near_sel = mask & (d <= NEAR_D)
        pos = tl.cumsum(near_sel.to(tl.int32), 0) - 1
        keep = near_sel & (pos < LCAP)
        tl.store(near + (b * NCH + ch) * LCAP + pos, sv, mask=keep)
        tl.store(near_idx + (b * NCH + ch) * LCAP + pos, idx, mask=keep)
        tl.store(near_count + b * NCH + ch, tl.sum(near_sel.to(tl.int32), 0))
        tl.store(hist + (b * NCH + ch) * NB + tl.arange(0, NB), h)
        tl.store(part_z + b * NCH + ch, zc)
        if ch == 0:
            tl.store(cand_count + b, 0)
    else:
        mx = -float("inf")
        arg = V.to(tl.int64) * 0 + V
        bad = 0
        for blk in range(0, CHUNK, BLOCK):
            idx = ch * CHUNK + blk + tl.arange(0, BLOCK)
            mask = idx < V
            acc = _scaled(in_addrs, strides, coeffs, b, idx, mask, t, N_F32, N_BF16, N_F16)
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
def _row_state(part_max, part_bad, b, NCH, NCH_P2: tl.constexpr):
    c = tl.arange(0, NCH_P2)
    cm = c < NCH
    pm = tl.load(part_max + b * NCH + c, mask=cm, other=-float("inf"))
    nbad = tl.sum(tl.load(part_bad + b * NCH + c, mask=cm, other=0), 0)
    return tl.max(pm, 0), nbad, pm, cm, c


@triton.jit
def _append(cand_row, cidx_row, count_ptr, sv, ix, sel, CAP: tl.constexpr):
    # Appends (sv, ix)[sel] to the row's list: one atomic per block for the slots.
    n = tl.sum(sel.to(tl.int32), 0)
    if n > 0:
        base = tl.atomic_add(count_ptr, n)
        pos = base + tl.cumsum(sel.to(tl.int32), 0) - 1
        tl.store(cand_row + pos, sv, mask=sel & (pos < CAP))
        tl.store(cidx_row + pos, ix, mask=sel & (pos < CAP))


@triton.jit
def _collect_kernel(
    in_addrs,  # int64 [M], int64 [M], fp32 [B, M]: the inputs, as for _combine_kernel
    strides,
    coeffs,
    s_out,  # fp32 [B, V] out: the scratch rows of the rows whose plan fails (only those)
    part_max,
    part_bad,
    hist,  # int32 [B, NCH, NB]
    temperature,
    top_k,
    top_p,
    cand,  # fp32 [B, CAP] out: s of the tokens above the cut, in no particular order
    cand_idx,  # int32 [B, CAP] out: their vocabulary indices
    cand_count,  # int32 [B] out (zeroed by _combine_kernel)
    part_z,  # fp32 [B, NCH]
    near,  # fp32 [B, NCH, LCAP], int32 [B, NCH, LCAP] and int32 [B, NCH], from _combine_kernel
    near_idx,
    near_count,
    V,
    NCH,
    N_F32: tl.constexpr,
    N_BF16: tl.constexpr,
    N_F16: tl.constexpr,
    NCH_P2: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK: tl.constexpr,
    NB: tl.constexpr,
    BIN_W: tl.constexpr,
    CAP: tl.constexpr,
    NEAR_D: tl.constexpr,
    LCAP: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    ch = tl.program_id(1).to(tl.int64)
    m, nbad, _pm, _cm, _c = _row_state(part_max, part_bad, b, NCH, NCH_P2)
    k = tl.load(top_k + b)
    p = tl.load(top_p + b)
    k_on = (k > 0) & (k < V)
    p_on = p < 1.0
    t = tl.load(temperature + b)
    sampled = (nbad == 0) & (m > -float("inf")) & (t != 0.0)  # neither invalid nor greedy
    collect = m != m  # False, as a tensor for the ifs below
    thr = m * 0.0
    if sampled & (k_on | p_on):
        collect, thr, _z = plan_cutoff(hist + b * NCH * NB, part_max + b * NCH, part_z + b * NCH, m, NCH, k_on, k, p_on,
                                 p, NB, BIN_W, CAP)
    if collect:
        cut = m - thr
        nn = tl.load(near_count + b * NCH + ch)
        # A token above the cut has d = chunk max - s <= thr - (m - chunk max);
        # within NEAR_D (less a bin for rounding) it is in the chunk's list.
        if (thr - (m - tl.load(part_max + b * NCH + ch)) <= NEAR_D - BIN_W) & (nn <= LCAP):
            slot = tl.arange(0, LCAP)
            sv = tl.load(near + (b * NCH + ch) * LCAP + slot, mask=slot < nn, other=-float("inf"))
            ix = tl.load(near_idx + (b * NCH + ch) * LCAP + slot, mask=slot < nn, other=0)
            _append(cand + b * CAP, cand_idx + b * CAP, cand_count + b, sv, ix, (slot < nn) & (sv >= cut), CAP)
        else:
            # The cut lies below the list: s again from the inputs (no scratch was written).
            for blk in range(0, CHUNK, BLOCK):
                idx = ch * CHUNK + blk + tl.arange(0, BLOCK)
                mask = idx < V
                sv = _scaled(in_addrs, strides, coeffs, b, idx, mask, t, N_F32, N_BF16, N_F16)
                _append(cand + b * CAP, cand_idx + b * CAP, cand_count + b, sv, idx.to(tl.int32),
                        mask & (sv >= cut), CAP)
    elif sampled & (k_on | p_on):
        # A plan that does not fit: the row passes will read this row, so its
        # scratch is written here, chunk-parallel, from the inputs.
        _write_scaled(in_addrs, strides, coeffs, temperature, s_out, b, ch * CHUNK, ch * CHUNK + CHUNK, V, N_F32,
                      N_BF16, N_F16, BLOCK)


@triton.jit
def _sample_kernel(
    in_addrs,  # int64 [M], int64 [M], fp32 [B, M]: the inputs, as for _combine_kernel
    strides,
    coeffs,
    s_ptr,  # fp32 [B, V]: scratch rows of the row-pass rows (written by the combine, the collect or here)
    part_max,
    part_arg,
    part_bad,
    hist,  # int32 [B, NCH, NB]
    cand,  # fp32 [B, CAP], int32 [B, CAP] and int32 [B], from _collect_kernel
    cand_idx,
    cand_count,
    part_z,  # fp32 [B, NCH]
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
    N_F32: tl.constexpr,
    N_BF16: tl.constexpr,
    N_F16: tl.constexpr,
    NCH_P2: tl.constexpr,
    BLOCK: tl.constexpr,
    NPIV: tl.constexpr,
    SEARCH_BLOCK: tl.constexpr,
    CAND_BLOCK: tl.constexpr,
    NB: tl.constexpr,
    BIN_W: tl.constexpr,
    CAP: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    m, nbad, pm, cm, c = _row_state(part_max, part_bad, b, NCH, NCH_P2)
    argmax = tl.min(tl.where(cm & (pm == m), tl.load(part_arg + b * NCH + c, mask=cm, other=0), V), 0)
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
        k_on = (k > 0) & (k < V)
        p_on = p < 1.0
        log_minp = tl.where(minp > 0.0, tl.log(tl.maximum(minp, 1e-38)), -float("inf"))
        u = tl.rand(tl.load(seed + b), tl.load(offset + b))
        collect = m != m  # False (m is a number on this branch), as a tensor for the if below
        z = m * 0.0
        if k_on | p_on:
            collect, _thr, z = plan_cutoff(hist + b * NCH * NB, part_max + b * NCH, part_z + b * NCH, m, NCH, k_on, k,
                                     p_on, p, NB, BIN_W, CAP)
        count = tl.load(cand_count + b)
        if collect & (count <= CAP):
            tok, lp = sample_from_candidates(cand + b * CAP, cand_idx + b * CAP, count, V, m, k_on, k, p_on, p,
                                              log_minp, z, u, NPIV, CAND_BLOCK)
        else:
            if collect:
                # The plan held but the list overflowed (float rounding at a bin
                # edge; not seen in the tests): _collect_kernel wrote no
                # scratch for this row, so this program writes it.
                _write_scaled(in_addrs, strides, coeffs, temperature, s_ptr, b, 0, V, V, N_F32, N_BF16, N_F16,
                              BLOCK)
                tl.debug_barrier()  # the whole block's stores, visible to the passes
            tok, lp = sample_by_passes(row, V, m, k_on, k, p_on, p, log_minp, u, BLOCK, NPIV, SEARCH_BLOCK)
        tl.store(tokens + b, tok)
        tl.store(logprobs + b, lp)


def _table(xs, coeffs):
    """Inputs grouped f32 | bf16 | f16: address and stride tables, counts, reordered coefficients."""
    order, counts = group_by_dtype([x.dtype for x in xs])
    dev = xs[0].device
    table = torch.tensor([[xs[k].data_ptr() for k in order], [xs[k].stride(0) for k in order]], dtype=torch.int64)
    table = table.to(dev, non_blocking=True)
    return table[0], table[1], counts, coeffs[:, order].contiguous()


def _combine(xs, coeffs, temperature, s_out, scale: bool, top_k=None, top_p=None) -> dict:
    """Launches _combine_kernel; with ``scale`` (sampling) the histograms and near-top lists instead of
    ``s_out``. Returns the input table and the partials."""
    B, V = xs[0].shape
    dev = xs[0].device
    sz = _sizes(dev)
    addrs, strides, counts, c = _table(xs, coeffs)
    nch = triton.cdiv(V, sz["CHUNK"])
    per_chunk = lambda *shape, dtype: torch.empty(shape if scale else (1,), dtype=dtype, device=dev)  # noqa: E731
    st = dict(addrs=addrs, strides=strides, counts=counts, coeffs=c, nch=nch,
              part_max=torch.empty((B, nch), dtype=torch.float32, device=dev),
              part_arg=torch.empty((B, nch), dtype=torch.int64, device=dev),
              part_bad=torch.empty((B, nch), dtype=torch.int32, device=dev),
              hist=per_chunk(B, nch, NB, dtype=torch.int32), part_z=per_chunk(B, nch, dtype=torch.float32),
              cand_count=per_chunk(B, dtype=torch.int32), near=per_chunk(B, nch, LCAP, dtype=torch.float32),
              near_idx=per_chunk(B, nch, LCAP, dtype=torch.int32), near_count=per_chunk(B, nch, dtype=torch.int32))
    _combine_kernel[(B, nch)](
        addrs, strides, c, *((temperature, top_k, top_p) if scale else (c, c, c)), s_out, st["part_max"],
        st["part_arg"], st["part_bad"], st["hist"], st["part_z"], st["cand_count"], st["near"], st["near_idx"],
        st["near_count"], V, nch,
        N_F32=counts[0], N_BF16=counts[1], N_F16=counts[2], SCALE=scale, HIST=scale, CHUNK=sz["CHUNK"],
        BLOCK=sz["BLOCK"], NB=NB, BIN_W=BIN_W, NEAR_D=NEAR_D, LCAP=LCAP, num_warps=COMBINE_WARPS if scale else 4,
    )
    return st


def guided_logits_triton(xs, coeffs, out) -> None:
    """out [B, V] fp32 = sum_m coeffs[:, m] * xs[m] (validated by soupkernels.sampling)."""
    with device_ctx(xs[0].device):
        _combine(xs, coeffs, None, out, scale=False)


def _scratch_rows(B: int, V: int, dev: torch.device) -> torch.Tensor:
    """fp32 [B, V], uninitialised: the kernels write only the rows the row passes read (tests poison it)."""
    return torch.empty((B, V), dtype=torch.float32, device=dev)


def _combine_and_collect(xs, coeffs, temperature, top_k, top_p) -> dict:
    """The first two launches: partials, histograms, candidate lists, and the scratch rows of the rows
    that take the row passes (tests read them too)."""
    B, V = xs[0].shape
    dev = xs[0].device
    sz = _sizes(dev)
    s = _scratch_rows(B, V, dev)
    st = _combine(xs, coeffs, temperature, s, scale=True, top_k=top_k, top_p=top_p)
    st.update(s=s, cand=torch.empty((B, sz["CAP"]), dtype=torch.float32, device=dev),
              cand_idx=torch.empty((B, sz["CAP"]), dtype=torch.int32, device=dev))
    n = st["counts"]
    _collect_kernel[(B, st["nch"])](
        st["addrs"], st["strides"], st["coeffs"], s, st["part_max"], st["part_bad"], st["hist"], temperature, top_k,
        top_p, st["cand"], st["cand_idx"], st["cand_count"], st["part_z"], st["near"], st["near_idx"],
        st["near_count"], V, st["nch"], N_F32=n[0], N_BF16=n[1], N_F16=n[2],
        NCH_P2=triton.next_power_of_2(st["nch"]), CHUNK=sz["CHUNK"], BLOCK=sz["BLOCK"], NB=NB, BIN_W=BIN_W,
        CAP=sz["CAP"], NEAR_D=NEAR_D, LCAP=LCAP, num_warps=4,
    )
    return st


def _sample(st, temperature, top_k, top_p, min_p, seed, offset, tokens, logprobs) -> None:
    """The third launch, on _combine_and_collect's state."""
    B, V = st["s"].shape
    sz = _sizes(st["s"].device)
    n = st["counts"]
    _sample_kernel[(B,)](
        st["addrs"], st["strides"], st["coeffs"], st["s"], st["part_max"], st["part_arg"], st["part_bad"],
        st["hist"], st["cand"], st["cand_idx"], st["cand_count"], st["part_z"], temperature, top_k, top_p, min_p,
        seed, offset, tokens, logprobs, V, st["nch"], N_F32=n[0], N_BF16=n[1], N_F16=n[2],
        NCH_P2=triton.next_power_of_2(st["nch"]), BLOCK=sz["BLOCK"], NPIV=NPIV, SEARCH_BLOCK=sz["SEARCH_BLOCK"],
        CAND_BLOCK=sz["CAND_BLOCK"], NB=NB, BIN_W=BIN_W, CAP=sz["CAP"], num_warps=4,
    )


def guided_sample_triton(xs, coeffs, temperature, top_k, top_p, min_p, seed, offset, tokens, logprobs) -> None:
    """Fills tokens [B] int64 and logprobs [B] fp32 (validated by soupkernels.sampling)."""
    with device_ctx(xs[0].device):
        st = _combine_and_collect(xs, coeffs, temperature, top_k, top_p)
        _sample(st, temperature, top_k, top_p, min_p, seed, offset, tokens, logprobs)

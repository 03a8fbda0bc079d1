"""Cut-offs, thresholds and the draw of the Triton sampler (private).

Used by soupkernels/triton_sampling.py: ``plan_cutoff``, a cut-off from the
per-chunk histograms that provably holds a row's kept set; the top-k and
top-p thresholds by a multi-pivot search over the order-preserving integer
keys of s (NPIV pivots per pass, so ~8 passes pin a 32-bit key exactly); the
kept mass; and the draw, either over a row's candidate list (an index search,
fixed-point masses, no row data) or over its whole scratch row (the
inverse-CDF walk with ``tl.cumsum``).
"""

from __future__ import annotations

import triton
import triton.language as tl

KEY_MIN = tl.constexpr(-2147483648)  # the smallest order-preserving key


@triton.jit
def _keys(s):
    # Order-preserving int32 image of a float (-0.0 was canonicalised to +0.0).
    bits = s.to(tl.int32, bitcast=True)
    return tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(tl.int64)


@triton.jit
def _search(row, V, m, lo, hi, floor_key, target, BY_MASS: tl.constexpr, NPIV: tl.constexpr,
            SEARCH_BLOCK: tl.constexpr, FIXED: tl.constexpr = False):
    # Largest key t in [lo, hi] with f(t) >= target, where f(t) counts (or, BY_MASS,
    # sums exp(s - m) over) the tokens with key >= t among those with key >= floor_key.
    # Needs f(lo) >= target; f is non-increasing, so each pass keeps the bracket.
    # FIXED: masses in fixed point (_fixed), summed exactly whatever the order
    # of the tokens in `row` (the candidate lists are filled in any order).
    j = tl.arange(0, NPIV).to(tl.int64)
    while lo < hi:
        piv = lo + ((j + 1) * (hi - lo) + NPIV) // (NPIV + 1)  # in (lo, hi]
        if FIXED:
            f = tl.zeros([NPIV], dtype=tl.int64)
        else:
            f = tl.zeros([NPIV], dtype=tl.float32)
        for start in range(0, V, SEARCH_BLOCK):
            idx = start + tl.arange(0, SEARCH_BLOCK)
            mask = idx < V
            s = tl.load(row + idx, mask=mask, other=-float("inf"))
            key = _keys(s)
            live = mask & (key >= floor_key)
            if FIXED:
                w = tl.where(live, _fixed(tl.exp(s - m)), 0) if BY_MASS else live.to(tl.int64)
            elif BY_MASS:
                w = tl.where(live, tl.exp(s - m), 0.0)
            else:
                w = live.to(tl.float32)
            hit = key[:, None] >= piv[None, :]
            f += tl.sum(tl.where(hit, w[:, None], 0), 0)
        ok = f.to(tl.float32) >= target
        lo = tl.maximum(lo, tl.max(tl.where(ok, piv, lo), 0))
        hi = tl.minimum(hi, tl.min(tl.where(ok, hi, piv - 1), 0))
    return lo


@triton.jit
def _fixed(e):
    # e in [0, 1] as an integer multiple of 2^-36 (csrc/sample_body.inc's fixed
    # point): sums of these are exact, so they do not depend on the order.
    return (e * 68719476736.0 + 0.5).to(tl.int64)


@triton.jit
def _walk(row, V, m, tau, log_minp, target, BLOCK: tl.constexpr):
    # The first kept token, in vocabulary order, whose running kept mass
    # exceeds target; block by block, stopping at the block that holds it.
    run = 0.0
    tok = (tau * 0 - 1).to(tl.int64)
    last = tok
    start = tau * 0
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
    return tl.where(tok < 0, last, tok)  # rounding: target beyond the walked sum


@triton.jit
def _draw_index(cand_row, cidx_row, count, V, m, tau, log_minp, target, NPIV: tl.constexpr,
                CAND_BLOCK: tl.constexpr):
    # The inverse CDF over the kept candidates in vocabulary order, without
    # ordering them: the smallest index i whose kept mass over {index <= i}
    # (fixed point, so exact in any order) exceeds target, by a multi-pivot
    # search over the index range (NPIV pivots per pass: 5 passes for 128k).
    # Invariant: G(hi) > target (G(V - 1) is the kept mass, above u * Z).
    j = tl.arange(0, NPIV).to(tl.int64)
    lo = (m * 0).to(tl.int64)
    hi = lo + V - 1
    while lo < hi:
        piv = lo + ((j + 1) * (hi - lo)) // (NPIV + 1)  # in [lo, hi)
        g = tl.zeros([NPIV], dtype=tl.int64)
        for start in range(0, count, CAND_BLOCK):
            slot = start + tl.arange(0, CAND_BLOCK)
            s = tl.load(cand_row + slot, mask=slot < count, other=-float("inf"))
            ix = tl.load(cidx_row + slot, mask=slot < count, other=0).to(tl.int64)
            w = tl.where((_keys(s) >= tau) & (s - m >= log_minp), _fixed(tl.exp(s - m)), 0)
            g += tl.sum(tl.where(ix[:, None] <= piv[None, :], w[:, None], 0), 0)
        above = g > target
        hi = tl.minimum(hi, tl.min(tl.where(above, piv, hi), 0))
        lo = tl.maximum(lo, tl.max(tl.where(above, lo, piv + 1), 0))
    return lo


@triton.jit
def plan_cutoff(hist_row, pmax_row, pz_row, m, NCH, k_on, k, p_on, p, NB: tl.constexpr, BIN_W: tl.constexpr,
                CAP: tl.constexpr):
    # A cut-off s >= m - thr that holds the row's kept set, from the chunk
    # histograms alone. A token of chunk c in bin j has d = m - s in
    # [lo_j, hi_j) = (m - max_c) + [j, j + 1) * BIN_W, so on the grid
    # T_i = (i + 1) * BIN_W, L[i] (tokens whose whole bin is within T_i) is a
    # lower bound of the count of {d <= T_i}, U[i] an upper bound of the count
    # of {d <= T_i + BIN_W}, and TAIL[i] an upper bound of the mass of
    # {d > T_i}. Top-k keeps a subset of {d <= T_i} once L[i] >= k; top-p
    # (alone) once the mass of {d <= T_i}, at least Z - TAIL[i], reaches
    # p * Z (Z: the row's mass, exact from the chunk sums). The cut sits one
    # bin further down (float rounding of d) and is taken only if U says the
    # candidates fit. Returns (collect, thr, Z).
    # Counted per grid cell, then prefix-summed: a bin of chunk c is inside
    # T_i for i >= j + ceil((m - max_c) / BIN_W), so each chunk adds its bins
    # shifted by that offset (a shifted load, no [NB, NB] tile in registers).
    j = tl.arange(0, NB)
    Lc = tl.zeros([NB], dtype=tl.float32)
    Uc = tl.zeros([NB], dtype=tl.float32)
    Mc = tl.zeros([NB], dtype=tl.float32)  # upper mass of the bins inside, per cell
    zup = 0.0
    z = 0.0
    for c in range(0, NCH):
        base = hist_row + c * NB
        dc = m - tl.load(pmax_row + c)  # +inf for an all -inf chunk: it adds nothing below
        z += tl.where(dc < float("inf"), tl.exp(-dc) * tl.load(pz_row + c), 0.0)
        off = tl.ceil(tl.minimum(dc * (1.0 / BIN_W), 4.0 * NB)).to(tl.int32)
        jin = j - off  # the bin that enters at cell j; the last bin (unbounded below) never does
        cin = tl.load(base + jin, mask=(jin >= 0) & (jin < NB - 1), other=0).to(tl.float32)
        Lc += cin
        Mc += cin * tl.exp(-(dc + jin.to(tl.float32) * BIN_W))
        jup = j - off + 2  # lo_j <= T_i + BIN_W: two cells earlier; bins before cell 0 fold into it
        Uc += tl.load(base + jup, mask=(jup >= 0) & (jup < NB), other=0).to(tl.float32)
        full = tl.load(base + j).to(tl.float32)
        Uc += tl.where(j == 0, tl.sum(tl.where(j < 2 - off, full, 0.0), 0), 0.0)
        zup += tl.sum(full * tl.exp(-(dc + j.to(tl.float32) * BIN_W)), 0)
    L = tl.cumsum(Lc, 0)
    U = tl.cumsum(Uc, 0)
    TAIL = zup - tl.cumsum(Mc, 0)
    ik = tl.min(tl.where(L >= k.to(tl.float32), j, NB), 0)
    ip = tl.min(tl.where(TAIL <= z * (1.0 - p * 1.0001), j, NB), 0)  # 1e-4: fp32 rounding of the bounds
    isel = tl.where(k_on, ik, ip)
    fits = tl.sum(tl.where(j == isel, U, 0.0), 0) <= CAP
    collect = (k_on | p_on) & (isel < NB) & fits
    return collect, (isel + 2).to(tl.float32) * BIN_W, z


@triton.jit
def sample_from_candidates(cand_row, cidx_row, count, V, m, k_on, k, p_on, p, log_minp, z_row, u,
                           NPIV: tl.constexpr, CAND_BLOCK: tl.constexpr):
    # The row's kept set lies inside its candidates (plan_cutoff):
    # the thresholds by the pivot search over the candidates only (count <= CAP,
    # not V), masses in fixed point (the list's order is arbitrary), then the
    # draw by index over the same list: no row data is read.
    key_min = (m * 0).to(tl.int64) + KEY_MIN
    key_max = _keys(m)
    tau = key_min
    if k_on:
        tau = _search(cand_row, count, m, key_min, key_max, key_min, k.to(tl.float32), False, NPIV, CAND_BLOCK,
                      True)
    if p_on:
        z1 = z_row * 68719476736.0  # the whole row's mass (top-k off), in fixed-point units
        if k_on:
            acc = tl.zeros([CAND_BLOCK], dtype=tl.int64)
            for start in range(0, count, CAND_BLOCK):
                idx = start + tl.arange(0, CAND_BLOCK)
                s = tl.load(cand_row + idx, mask=idx < count, other=-float("inf"))
                acc += tl.where(_keys(s) >= tau, _fixed(tl.exp(s - m)), 0)
            z1 = tl.sum(acc, 0).to(tl.float32)
        tau = _search(cand_row, count, m, tau, key_max, tau, p * z1, True, NPIV, CAND_BLOCK, True)
    acc = tl.zeros([CAND_BLOCK], dtype=tl.int64)
    for start in range(0, count, CAND_BLOCK):
        idx = start + tl.arange(0, CAND_BLOCK)
        s = tl.load(cand_row + idx, mask=idx < count, other=-float("inf"))
        acc += tl.where((_keys(s) >= tau) & (s - m >= log_minp), _fixed(tl.exp(s - m)), 0)
    zfix = tl.sum(acc, 0)
    # u * Z in fp64 (Z < 2^48): floor(u * Z) < Z, so a kept token is always drawn.
    target = (u.to(tl.float64) * zfix.to(tl.float64)).to(tl.int64)
    tok = _draw_index(cand_row, cidx_row, count, V, m, tau, log_minp, target, NPIV, CAND_BLOCK)
    # The token's s from the list (each index appears once), for its log-prob.
    st = tl.full([CAND_BLOCK], -float("inf"), dtype=tl.float32)
    for start in range(0, count, CAND_BLOCK):
        idx = start + tl.arange(0, CAND_BLOCK)
        s = tl.load(cand_row + idx, mask=idx < count, other=-float("inf"))
        ix = tl.load(cidx_row + idx, mask=idx < count, other=-1)
        st = tl.maximum(st, tl.where(ix == tok, s, -float("inf")))
    z = zfix.to(tl.float32) * (1.0 / 68719476736.0)
    return tok, (tl.max(st, 0) - m) - tl.log(z)


@triton.jit
def sample_by_passes(row, V, m, k_on, k, p_on, p, log_minp, u, BLOCK: tl.constexpr, NPIV: tl.constexpr,
                      SEARCH_BLOCK: tl.constexpr):
    # Any row, by passes over its scratch row: thresholds by the pivot search,
    # the kept mass, then the walk.
    key_min = (m * 0).to(tl.int64) + KEY_MIN
    key_max = _keys(m)
    tau = key_min
    if k_on:
        tau = _search(row, V, m, key_min, key_max, key_min, k.to(tl.float32), False, NPIV, SEARCH_BLOCK)
    if p_on:
        z1 = tl.zeros([SEARCH_BLOCK], dtype=tl.float32)
        for start in range(0, V, SEARCH_BLOCK):
            idx = start + tl.arange(0, SEARCH_BLOCK)
            s = tl.load(row + idx, mask=idx < V, other=-float("inf"))
            z1 += tl.where(_keys(s) >= tau, tl.exp(s - m), 0.0)
        target = p * tl.sum(z1, 0)
        tau = _search(row, V, m, tau, key_max, tau, target, True, NPIV, SEARCH_BLOCK)
    zacc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, V, BLOCK):
        idx = start + tl.arange(0, BLOCK)
        s = tl.load(row + idx, mask=idx < V, other=-float("inf"))
        keep = (_keys(s) >= tau) & (s - m >= log_minp)
        zacc += tl.where(keep, tl.exp(s - m), 0.0)
    z = tl.sum(zacc, 0)
    tok = _walk(row, V, m, tau, log_minp, u * z, BLOCK)
    return tok, (tl.load(row + tok) - m) - tl.log(z)

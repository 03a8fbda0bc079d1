"""sk.guided_sample / sk.guided_logits: distribution, determinism, agreement, errors.

- The empirical distribution over many seeds equals transformers' own
  warpers (Temperature, TopK, TopP, MinP, in that order) applied to the
  combined logits: a chi-square test with fixed seeds (deterministic, so it
  cannot flake), and a negative control showing the same test rejects a
  wrong distribution.
- The C++ kernel (every SIMD path of this CPU), the Triton kernel (under
  TRITON_INTERPRET=1) and the torch reference pick the same token for the
  same seed; the kept set equals the warpers' non -inf set exactly.
- Batch invariance, per-row parameters, greedy ties, dtypes, strided rows,
  invalid rows, and bad arguments.
"""

from __future__ import annotations


import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import soupkernels as sk
from sampling_checks import chi_square_pvalue, warped_probs
from kernel_paths import simd_levels, use_backend
from soupkernels import backend as sk_backend
from soupkernels.philox import philox_uniform
from soupkernels.sampling_reference import guided_logits_reference, guided_sample_reference, kept_mask_reference
from soupkernels.torch_sampling import guided_sample_torch, kept_mask_torch


KERNELS = [pytest.param(("cpp", s), id=f"cpp-{s}") for s in simd_levels()] + [
    pytest.param(("triton", None), id="triton-interp"),
    pytest.param(("torch", None), id="torch"),  # the batched fallback (CUDA without Triton)
]


@pytest.fixture(autouse=True)
def _poisoned_triton_scratch(monkeypatch):
    """The Triton sampler writes its fp32 scratch only for the rows that take the row passes: NaN-filled
    here, a row that read an unwritten scratch row would give token -1 or a wrong token."""
    try:
        from soupkernels import triton_sampling as ts
    except ImportError:
        return
    monkeypatch.setattr(ts, "_scratch_rows",
                        lambda B, V, dev: torch.full((B, V), float("nan"), dtype=torch.float32, device=dev))


@pytest.fixture(params=KERNELS)
def kernel(request, monkeypatch):
    with use_backend(monkeypatch, *request.param) as name:
        yield name


def _per_row(B, **kw):
    """Per-row parameter tensors as guided_sample_reference takes them."""
    f = lambda v, dt: torch.as_tensor(v, dtype=dt).expand(B).contiguous()  # noqa: E731
    return (f(kw.get("temperature", 1.0), torch.float32), f(kw.get("top_k", 0), torch.int64),
            f(kw.get("top_p", 1.0), torch.float32), f(kw.get("min_p", 0.0), torch.float32),
            f(kw.get("seed", 0), torch.int64), f(kw.get("offset", 0), torch.int64))


def _reference(xs, coeffs, acc_dtype=torch.float64, **kw):
    B, M = xs[0].shape[0], len(xs)
    c = torch.as_tensor(coeffs, dtype=torch.float32)
    c = c.expand(B, M) if c.dim() == 1 else c
    return guided_sample_reference(xs, c, *_per_row(B, **kw), acc_dtype=acc_dtype)


FILTERS = [
    dict(temperature=1.0),
    dict(temperature=0.7, top_k=10),
    dict(temperature=1.3, top_p=0.8),
    dict(temperature=1.0, min_p=0.05),
    dict(temperature=0.9, top_k=20, top_p=0.9, min_p=0.02),
]


# ----------------------------------------------------------------- the rule


def test_philox_matches_triton_tl_rand_and_cpp():
    pytest.importorskip("triton")
    import triton
    import triton.language as tl

    @triton.jit
    def rand_kernel(seed_ptr, off_ptr, out_ptr, N: tl.constexpr):
        i = tl.arange(0, N)
        tl.store(out_ptr + i, tl.rand(tl.load(seed_ptr), tl.load(off_ptr + i)))

    offs = torch.tensor([0, 1, 2, 77, 2**33 + 5, 2**40, 123456789, 2**62], dtype=torch.int64)
    for seed in (0, 1, 12345, -7, 2**62 + 3):
        out = torch.empty(8)
        rand_kernel[(1,)](torch.tensor([seed]), offs, out, N=8)
        ours = [float(philox_uniform(seed, int(o))) for o in offs]
        assert out.tolist() == ours
        if sk_backend._C is not None:
            assert [sk_backend._C.philox_uniform(seed, int(o)) for o in offs] == ours
        assert all(0.0 <= u < 1.0 for u in ours)


@pytest.mark.parametrize("kw", FILTERS + [dict(temperature=1.0, top_k=1), dict(temperature=2.0, top_p=0.05)])
def test_kept_set_equals_transformers_warpers(kw):
    gen = torch.Generator().manual_seed(0)
    for trial in range(20):
        V = [5, 37, 300, 1001][trial % 4]
        z = torch.randn(V, generator=gen, dtype=torch.float64) * 3
        if trial % 3 == 0:  # ties, including at the top-k boundary
            z = torch.round(z)
        if trial % 5 == 0:  # masked tokens
            z[::7] = -float("inf")
        mask = kept_mask_reference(z / kw["temperature"], kw.get("top_k", 0), kw.get("top_p", 1.0),
                                   kw.get("min_p", 0.0))
        probs = warped_probs(z[None], kw["temperature"], kw.get("top_k", 0), kw.get("top_p", 1.0),
                             kw.get("min_p", 0.0))[0]
        theirs = probs > 0
        if trial % 3:  # distinct values: the same set exactly
            assert torch.equal(mask & torch.isfinite(z), theirs), (trial, kw)
        else:  # ties: transformers cuts a tied run wherever its sort put it; we keep the whole run
            assert torch.equal(mask & theirs, theirs), (trial, kw)
            extra = mask & ~theirs & torch.isfinite(z)
            assert (z[extra] == z[theirs].min()).all(), (trial, kw)


# ---------------------------------------------------------- distribution


def _draws(kw, n, kernel_name):
    gen = torch.Generator().manual_seed(1234)
    V = 40
    x0 = torch.randn(1, V, generator=gen) * 1.5
    x1 = torch.randn(1, V, generator=gen) * 1.5
    coeffs = [1.0, -0.6]
    z = guided_logits_reference([x0, x1], torch.tensor([coeffs]), acc_dtype=torch.float64)
    # One logits row shared by n rows (row stride 0), one seed per row.
    xs = [x0.expand(n, V), x1.expand(n, V)]
    seeds = torch.arange(n, dtype=torch.int64) * 7919 + 11
    tokens = sk.guided_sample(xs, coeffs, seed=seeds, **kw)
    counts = torch.bincount(tokens, minlength=V)
    return counts, z


@pytest.mark.parametrize("kw", FILTERS, ids=lambda kw: "-".join(f"{k}{v}" for k, v in kw.items()))
def test_chi_square_against_transformers_warpers(kw, monkeypatch):
    monkeypatch.setenv("SOUPKERNELS_BACKEND", "cpp" if sk_backend._C is not None else "torch")
    n = 40_000 if sk_backend._C is not None else 2_000
    counts, z = _draws(kw, n, "cpp")
    args = (kw["temperature"], kw.get("top_k", 0), kw.get("top_p", 1.0), kw.get("min_p", 0.0))
    probs = warped_probs(z, *args)[0]
    p, df = chi_square_pvalue(counts, probs)
    assert df >= 3
    assert p > 1e-4, f"chi-square p = {p:.3g} with {df} dof: the draws do not follow the warped distribution"
    # Negative control: the same counts against a distribution that differs
    # slightly (temperature off by 10%) must be rejected, or the test is blind.
    wrong = warped_probs(z, args[0] * 1.1, *args[1:])[0]
    p_wrong, _ = chi_square_pvalue(counts, wrong)
    assert p_wrong < 1e-6, f"chi-square cannot tell T from 1.1 T (p = {p_wrong:.3g}): too few draws"


# ------------------------------------------------------------ agreement


@pytest.mark.parametrize("kw", FILTERS + [dict(temperature=0.0)],
                         ids=lambda kw: "-".join(f"{k}{v}" for k, v in kw.items()))
def test_kernels_match_reference_token_for_token(kernel, kw):
    gen = torch.Generator().manual_seed(7)
    B, V = (48, 257) if kernel == "triton" else (2000, 1000)  # the interpreter is slow
    xs = [torch.randn(B, V, generator=gen) * 2, (torch.randn(B, V, generator=gen) * 2).bfloat16()]
    coeffs = torch.randn(B, 2, generator=gen)
    seeds = torch.randint(-(2**62), 2**62, (B,), generator=gen)
    offsets = torch.randint(0, 2**40, (B,), generator=gen)
    tok, lp = sk.guided_sample(xs, coeffs, seed=seeds, offset=offsets, return_logprobs=True, **kw)
    ref_tok, ref_lp = _reference(xs, coeffs, seed=seeds, offset=offsets, acc_dtype=torch.float32, **kw)
    mismatches = int((tok != ref_tok).sum())
    assert mismatches <= max(1, B // 1000), f"{kernel}: {mismatches} of {B} draws differ from the reference"
    same = tok == ref_tok
    torch.testing.assert_close(lp[same], ref_lp[same], rtol=1e-4, atol=2e-5)


def test_cpp_and_triton_agree_at_llama3_vocab(monkeypatch):
    pytest.importorskip("triton")
    if sk_backend._C is None:
        pytest.skip("needs the C++ extension")
    gen = torch.Generator().manual_seed(3)
    B, V = 2, 128_256
    xs = [(torch.randn(B, V, generator=gen) * 3).bfloat16() for _ in range(3)]
    coeffs = [1.0, 0.5, -0.5]
    for kw in (dict(temperature=0.8), dict(temperature=0.8, top_k=50, top_p=0.9), dict(temperature=1.0, top_p=0.5)):
        got = {}
        for name in ("cpp", "triton"):
            monkeypatch.setenv("SOUPKERNELS_BACKEND", name)
            got[name] = sk.guided_sample(xs, coeffs, seed=[11, 12], offset=5, **kw)
        ref, _ = _reference(xs, coeffs, seed=torch.tensor([11, 12]), offset=5, **kw)
        assert torch.equal(got["cpp"], got["triton"]), kw
        assert torch.equal(got["cpp"], ref), kw


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("kw", FILTERS + [dict(temperature=0.0)],
                         ids=lambda kw: "-".join(f"{k}{v}" for k, v in kw.items()))
def test_cuda_backends_match_reference(backend, kw, monkeypatch):
    """On a GPU: the compiled Triton kernel and the batched torch path at a Llama-3 vocabulary."""
    if backend == "triton":
        pytest.importorskip("triton")
    monkeypatch.setenv("SOUPKERNELS_BACKEND", backend)
    gen = torch.Generator().manual_seed(17)
    B, V, M = 64, 128_256, 4
    xs = [(torch.randn(B, V, generator=gen) * 3).bfloat16() for _ in range(M)]
    coeffs = torch.randn(B, M, generator=gen)
    seeds = torch.randint(-(2**62), 2**62, (B,), generator=gen)
    offsets = torch.randint(0, 2**40, (B,), generator=gen)
    tok, lp = sk.guided_sample([x.cuda() for x in xs], coeffs.cuda(), seed=seeds, offset=offsets,
                               return_logprobs=True, **kw)
    assert tok.is_cuda
    ref_tok, ref_lp = _reference(xs, coeffs, seed=seeds, offset=offsets, acc_dtype=torch.float32, **kw)
    same = tok.cpu() == ref_tok
    assert int((~same).sum()) <= 1, f"{backend}: {int((~same).sum())} of {B} draws differ from the reference"
    torch.testing.assert_close(lp.cpu()[same], ref_lp[same], rtol=1e-4, atol=2e-5)


def test_triton_candidate_lists_and_row_passes_give_the_reference_tokens(monkeypatch):
    """Rows with top-k / top-p are resolved on candidate lists; rows whose cut-off holds more than CAP
    tokens (forced here with a tiny CAP, and a flat row) take the row passes. Both: the reference's tokens."""
    pytest.importorskip("triton")
    from soupkernels import triton_sampling as ts

    monkeypatch.setenv("SOUPKERNELS_BACKEND", "triton")
    gen = torch.Generator().manual_seed(31)
    B, V = 12, 3001
    x = torch.randn(B, V, generator=gen) * torch.linspace(0.3, 5.0, B)[:, None]  # flat to peaked rows
    x[0] = 1.0  # every token ties at the max
    x[1] = torch.round(x[1] * 2)  # runs of ties at the cut-offs
    kw = dict(temperature=torch.linspace(0.5, 1.5, B), top_k=[0, 5, 50, 0, 1, 200, 0, 30, 0, 3000, 7, 0],
              top_p=[0.9, 1.0, 0.9, 0.5, 1.0, 0.95, 0.99, 0.7, 0.3, 1.0, 0.8, 0.9],
              min_p=[0.0] * 6 + [0.05] + [0.0] * 5, seed=torch.arange(B) * 17 + 1, offset=3)
    ref, ref_lp = _reference([x], [1.0], acc_dtype=torch.float32, **kw)
    per_row = _per_row(B, **{k: v for k, v in kw.items() if k in ("seed", "offset")})
    temp, top_k, top_p = (torch.as_tensor(kw[k], dtype=d) for k, d in
                          (("temperature", torch.float32), ("top_k", torch.int64), ("top_p", torch.float32)))
    assert per_row[4].shape == (B,)
    for cap in (ts.CAP, 8):
        monkeypatch.setitem(ts._INTERPRETED, "CAP", cap)
        state = ts._combine_and_collect([x], torch.ones(B, 1), temp, top_k, top_p)
        counts = state["cand_count"]
        assert (state["near_count"][3:] <= ts.LCAP).all()  # the more peaked rows' lists are usable
        listed = (counts > 0) & (counts <= cap)
        if cap == ts.CAP:  # every row fits in a list but the flat one and top_k = 3000 of 3001
            assert listed.tolist() == [False] + [True] * 8 + [False] + [True] * 2, counts
            # The collect pass reads the combine pass's near-top lists where the cut-off lies inside
            # them, the inputs again otherwise: lists of one entry (unusable) give the same candidates.
            monkeypatch.setattr(ts, "LCAP", 1)
            assert torch.equal(ts._combine_and_collect([x], torch.ones(B, 1), temp, top_k, top_p)["cand_count"],
                               counts)
            monkeypatch.undo()
            monkeypatch.setenv("SOUPKERNELS_BACKEND", "triton")
        else:  # the larger lists no longer fit
            assert not listed[[0, 2, 3, 5, 6, 9, 11]].any(), counts
        tok, lp = sk.guided_sample([x], [1.0], return_logprobs=True, **kw)
        assert torch.equal(tok, ref), (cap, tok, ref)
        torch.testing.assert_close(lp, ref_lp, rtol=1e-4, atol=2e-5)


def test_triton_candidate_draw_at_its_edges(monkeypatch):
    """The draw over the candidate list (an index search, no row walk): ties at the top-k threshold, the
    drawn token being the last kept candidate (index V - 1, or mid-row), and a list filled exactly to CAP
    (one slot less: the row passes). Every case: the reference's and the C++ kernel's tokens."""
    pytest.importorskip("triton")
    from soupkernels import triton_sampling as ts

    monkeypatch.setenv("SOUPKERNELS_BACKEND", "triton")
    gen = torch.Generator().manual_seed(5)
    R, V = 6, 3001  # seeds per pattern
    tied = torch.round(torch.randn(V, generator=gen) * 12) / 4  # on the 0.25 grid: runs of ties everywhere
    mid = torch.randn(V, generator=gen) * 0.5
    mid[2990], mid[2991:] = 12.0, -5.0  # the last kept token (in vocabulary order) holds ~all the mass
    end = torch.randn(V, generator=gen) * 0.5
    end[-1] = 12.0
    x = torch.stack([tied] * R + [mid] * R + [end] * R)
    B = x.shape[0]
    kth = torch.sort(tied, descending=True).values[39]
    assert (tied == kth).sum() > 1 and (tied > kth).sum() < 40  # the 40th value is tied
    kw = dict(temperature=1.0, top_k=[40] * R + [8] * R + [0] * R, top_p=[1.0] * R + [0.9] * R + [0.5] * R,
              seed=torch.arange(B) * 7919 + 3, offset=11)
    ref, ref_lp = _reference([x], [1.0], acc_dtype=torch.float32, **kw)
    assert (ref[R:2 * R] == 2990).all() and (ref[2 * R:] == V - 1).all()
    if sk_backend._C is not None:
        monkeypatch.setenv("SOUPKERNELS_BACKEND", "cpp")
        assert torch.equal(sk.guided_sample([x], [1.0], **kw), ref)
        monkeypatch.setenv("SOUPKERNELS_BACKEND", "triton")
    temp, top_k, top_p = (torch.as_tensor(kw[k], dtype=d).expand(B).contiguous() for k, d in
                          (("temperature", torch.float32), ("top_k", torch.int64), ("top_p", torch.float32)))
    counts = ts._combine_and_collect([x], torch.ones(B, 1), temp, top_k, top_p)["cand_count"]
    assert ((counts > 0) & (counts <= ts.CAP)).all(), counts  # every row on its candidate list
    tok, lp = sk.guided_sample([x], [1.0], return_logprobs=True, **kw)
    assert torch.equal(tok, ref), (tok, ref)
    torch.testing.assert_close(lp, ref_lp, rtol=1e-4, atol=2e-5)
    # On the 0.25 grid the plan's bound is tight: the tied rows fill a list of exactly n slots.
    n = int(counts[0])
    assert n > 40 and (counts[:R] == n).all()
    for cap, listed in ((n, True), (n - 1, False)):
        monkeypatch.setitem(ts._INTERPRETED, "CAP", cap)
        got = ts._combine_and_collect([x], torch.ones(B, 1), temp, top_k, top_p)["cand_count"][:R]
        assert bool((got == n).all()) == listed, (cap, got)
        assert torch.equal(sk.guided_sample([x], [1.0], **kw), ref), cap
    # A list that overflows although its plan held (the launcher's guard; rounding at a bin edge):
    # no kernel wrote the scratch for those rows before, so the sample kernel writes it itself.
    monkeypatch.setitem(ts._INTERPRETED, "CAP", ts.CAP)
    st = ts._combine_and_collect([x], torch.ones(B, 1), temp, top_k, top_p)
    st["cand_count"] += ts.CAP
    tok = torch.empty(B, dtype=torch.int64)
    lp = torch.empty(B, dtype=torch.float32)
    seed, offset = _per_row(B, seed=kw["seed"], offset=kw["offset"])[4:]
    ts._sample(st, temp, top_k, top_p, torch.zeros(B), seed, offset, tok, lp)
    assert torch.equal(tok, ref), (tok, ref)
    torch.testing.assert_close(lp, ref_lp, rtol=1e-4, atol=2e-5)


@pytest.mark.parametrize("kw", [dict(top_k=5000, top_p=0.9), dict(top_k=4096, top_p=0.5), dict(top_k=4097, top_p=0.5),
                                dict(top_k=6000), dict(top_k=100, top_p=0.99)], ids=str)
def test_cpp_large_and_small_top_k_paths_match_reference(kw, monkeypatch):
    """top-k up to 4096 is resolved by sorting the set whole; larger k goes through the mass histogram."""
    if sk_backend._C is None:
        pytest.skip("needs the C++ extension")
    monkeypatch.setenv("SOUPKERNELS_BACKEND", "cpp")
    gen = torch.Generator().manual_seed(13)
    B, V = 24, 20_000
    x = torch.randn(B, V, generator=gen) * torch.linspace(0.3, 4.0, B)[:, None]  # flat to peaked rows
    tok = sk.guided_sample([x], [1.0], seed=torch.arange(B), temperature=0.9, **kw)
    ref, _ = _reference([x], [1.0], seed=torch.arange(B), temperature=0.9, acc_dtype=torch.float32, **kw)
    assert torch.equal(tok, ref)


@settings(max_examples=40, deadline=None, derandomize=True)
@given(
    B=st.integers(1, 5),
    V=st.sampled_from([1, 2, 7, 64, 65, 1023]),
    M=st.integers(1, 4),
    temperature=st.sampled_from([0.0, 0.3, 1.0, 2.5]),
    top_k=st.sampled_from([0, 1, 3, 50, 5000]),
    top_p=st.sampled_from([1.0, 0.95, 0.5, 0.01]),
    min_p=st.sampled_from([0.0, 0.1, 1.0]),
    seed=st.integers(-(2**63), 2**63 - 1),
)
def test_cpp_matches_reference_property(B, V, M, temperature, top_k, top_p, min_p, seed):
    if sk_backend._C is None:
        pytest.skip("needs the C++ extension")
    gen = torch.Generator().manual_seed(abs(seed) % 2**31)
    xs = [torch.randn(B, V, generator=gen) * 2 for _ in range(M)]
    coeffs = torch.randn(M, generator=gen)
    kw = dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    tok = sk.guided_sample(xs, coeffs, seed=seed, **kw)
    ref, _ = _reference(xs, coeffs, seed=seed, acc_dtype=torch.float32, **kw)
    assert torch.equal(tok, ref)


def test_torch_fallback_keeps_the_reference_sets_and_draws_its_tokens():
    """The batched torch path: per row the reference's kept set, and its token for the same uniform."""
    gen = torch.Generator().manual_seed(21)
    B, V = 48, 301
    z = torch.randn(B, V, generator=gen) * 3
    z[::3] = torch.round(z[::3])  # ties, at the top-k and top-p boundaries too
    z[1::4, ::5] = -float("inf")
    temperature = torch.rand(B, generator=gen) * 2 + 0.1
    top_k = torch.randint(0, 60, (B,), generator=gen) * (torch.rand(B, generator=gen) < 0.7)
    top_k[:3] = torch.tensor([1, V, 10 * V])
    top_p = torch.where(torch.rand(B, generator=gen) < 0.7, torch.rand(B, generator=gen), torch.ones(B))
    top_p = top_p.clamp_min(1e-3)
    min_p = torch.where(torch.rand(B, generator=gen) < 0.4, torch.rand(B, generator=gen) * 0.3, torch.zeros(B))
    s = z / temperature[:, None]
    keep = kept_mask_torch(s, top_k, top_p, min_p)
    for b in range(B):
        ref = kept_mask_reference(s[b], int(top_k[b]), float(top_p[b]), float(min_p[b]))
        assert torch.equal(keep[b], ref), b
    # The same uniform gives the same token (and log-prob) as the per-row specification.
    seeds = torch.randint(-(2**62), 2**62, (B,), generator=gen)
    offsets = torch.randint(0, 2**40, (B,), generator=gen)
    temperature[5] = 0.0  # a greedy row
    z[7, 3] = float("nan")  # an invalid row
    args = ([z, z * 0.5], torch.tensor([[0.6, 0.8]]).expand(B, 2).contiguous(), temperature, top_k, top_p, min_p,
            seeds, offsets)
    tok, lp = guided_sample_torch(*args)
    ref_tok, ref_lp = guided_sample_reference(*args)
    assert torch.equal(tok, ref_tok)
    assert tok[7] == -1 and torch.isnan(lp[7])
    same = tok >= 0
    torch.testing.assert_close(lp[same], ref_lp[same], rtol=1e-5, atol=1e-6)
    # An explicit uniform of 0 takes the first kept token of each row.
    got, _ = guided_sample_torch(*args, uniforms=torch.zeros(B))
    kept = kept_mask_torch(z / torch.where(temperature == 0, 1.0, temperature)[:, None], top_k, top_p, min_p)
    for b in set(range(B)) - {5, 7}:
        assert got[b] == torch.nonzero(kept[b])[0, 0], b


# ------------------------------------------------------------- semantics


def test_batch_invariance(kernel):
    gen = torch.Generator().manual_seed(5)
    V = 300
    row = [torch.randn(1, V, generator=gen) for _ in range(2)]
    kw = dict(temperature=0.9, top_k=40, top_p=0.9, seed=99, offset=3)
    alone = sk.guided_sample(row, [1.0, 0.7], **kw)
    for B, pos in ((5, 0), (9, 4), (3, 2)):
        xs = [torch.randn(B, V, generator=gen) * 4 for _ in range(2)]
        for m in range(2):
            xs[m][pos] = row[m][0]
        seeds = torch.randint(0, 1000, (B,), generator=gen)
        seeds[pos] = 99
        tok = sk.guided_sample(xs, [1.0, 0.7], temperature=0.9, top_k=40, top_p=0.9, seed=seeds, offset=3)
        assert tok[pos] == alone[0], (B, pos)


@pytest.mark.parametrize("kw", FILTERS + [dict(temperature=0.0)],
                         ids=lambda kw: "-".join(f"{k}{v}" for k, v in kw.items()))
def test_cpp_vocabulary_split_across_threads_changes_nothing(kw):
    """Batch 1 splits a row's vocabulary over the threads; the token and log-prob must not change."""
    if sk_backend._C is None:
        pytest.skip("needs the C++ extension")
    import numpy as np

    from soupkernels.cpp_sampling import guided_sample_cpp_packed

    gen = torch.Generator().manual_seed(12)
    V = 3 * 8192 + 77  # several of the kernel's fixed chunks, and a ragged end
    xs = [torch.randn(1, V, generator=gen) * 3, (torch.randn(1, V, generator=gen) * 3).bfloat16()]
    c = torch.tensor([[1.0, -0.5]])
    fp = np.array([[kw["temperature"]], [kw.get("top_p", 1.0)], [kw.get("min_p", 0.0)]], dtype=np.float32)
    results = set()
    for seed in range(20):
        ip = np.array([[kw.get("top_k", 0)], [seed], [0]], dtype=np.int64)
        for threads in (1, 2, 3):
            tok, lp = torch.empty(1, dtype=torch.int64), torch.empty(1)
            guided_sample_cpp_packed(xs, c, fp, ip, tok, lp, num_threads=threads)
            results.add((seed, tok.item(), lp.item()))
    assert len(results) == 20  # one (token, log-prob) per seed, whatever the thread count


def test_per_row_parameters_equal_rows_alone(kernel):
    gen = torch.Generator().manual_seed(6)
    B, V = 6, 200
    xs = [torch.randn(B, V, generator=gen) * 2 for _ in range(3)]
    coeffs = torch.randn(B, 3, generator=gen)
    params = dict(
        temperature=[0.0, 0.5, 1.0, 1.5, 0.8, 1.0],
        top_k=[0, 5, 0, 20, 1, 0],
        top_p=[1.0, 1.0, 0.7, 0.9, 1.0, 0.3],
        min_p=[0.0, 0.0, 0.1, 0.0, 0.0, 0.05],
        seed=[1, 2, 3, 4, 5, 6],
        offset=[0, 10, 20, 30, 40, 50],
    )
    tok, lp = sk.guided_sample(xs, coeffs, return_logprobs=True, **params)
    for b in range(B):
        one = {k: v[b] for k, v in params.items()}
        t1, l1 = sk.guided_sample([x[b : b + 1] for x in xs], coeffs[b], return_logprobs=True, **one)
        assert tok[b] == t1[0] and lp[b] == l1[0], b


def test_greedy_takes_the_lowest_index_of_ties(kernel):
    V = 50
    z = torch.zeros(3, V)
    z[0, [7, 3, 30]] = 5.0
    z[1, [49, 48]] = 1.0
    z[2] = -1.0
    z[2, 0] = float("-inf")
    tok, lp = sk.guided_sample([z, z], [0.5, 0.5], temperature=0.0, return_logprobs=True)
    assert tok.tolist() == [3, 48, 1]
    assert lp.tolist() == [0.0, 0.0, 0.0]


def test_filters_at_their_limits(kernel):
    gen = torch.Generator().manual_seed(8)
    B, V = (16 if kernel == "triton" else 64), 100
    x = torch.randn(B, V, generator=gen) * 2
    argmax = x.argmax(-1)
    seeds = torch.arange(B)
    # top_k = 1, a tiny top_p and min_p = 1 all leave only the argmax.
    for kw in (dict(top_k=1), dict(top_p=1e-6), dict(min_p=1.0)):
        assert torch.equal(sk.guided_sample([x], [1.0], seed=seeds, **kw), argmax), kw
    # top_k >= V is off; masked tokens are never drawn.
    x[:, ::3] = -float("inf")
    for kw in (dict(top_k=V), dict(top_k=10 * V), dict(top_p=0.999)):
        tok = sk.guided_sample([x], [1.0], seed=seeds, temperature=3.0, **kw)
        assert (tok % 3 != 0).all(), kw


def test_logprobs_are_those_of_the_filtered_distribution(kernel):
    gen = torch.Generator().manual_seed(9)
    B, V = 32, 64
    xs = [torch.randn(B, V, generator=gen) for _ in range(2)]
    kw = dict(temperature=0.7, top_k=15, top_p=0.85)
    tok, lp = sk.guided_sample(xs, [1.0, 0.3], seed=torch.arange(B), return_logprobs=True, **kw)
    z = guided_logits_reference(xs, torch.tensor([[1.0, 0.3]]).expand(B, 2), acc_dtype=torch.float64)
    probs = warped_probs(z, 0.7, 15, 0.85, 0.0)
    expect = probs.gather(1, tok[:, None]).squeeze(1).log()
    torch.testing.assert_close(lp.double(), expect, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtypes", [(torch.float32,), (torch.bfloat16,), (torch.float16,),
                                    (torch.bfloat16, torch.float32, torch.float16), (torch.float64,)])
def test_dtypes_and_layouts(kernel, dtypes):
    gen = torch.Generator().manual_seed(10)
    B, V = 8, 129
    stacked = torch.randn(len(dtypes), B, 2 * V, generator=gen)
    # Rows with a stride of 2V (a slice of wider logits), in each dtype.
    xs = [stacked[m, :, :V].to(dt) if dt != torch.float32 else stacked[m, :, :V] for m, dt in enumerate(dtypes)]
    coeffs = torch.linspace(1.0, -0.5, len(dtypes))
    kw = dict(temperature=0.8, top_p=0.9, seed=torch.arange(B) + 100)
    tok = sk.guided_sample(xs, coeffs, **kw)
    ref, _ = _reference(xs, coeffs, acc_dtype=torch.float32, **kw)
    assert torch.equal(tok, ref)
    # A [M, B, V] tensor works the same as the list.
    if len(set(dtypes)) == 1:
        assert torch.equal(sk.guided_sample(torch.stack(xs), coeffs, **kw), tok)


@pytest.mark.parametrize("V", [1, 7, 1023, 20_001])
def test_guided_logits_matches_float64(kernel, V):
    gen = torch.Generator().manual_seed(V)
    B = 3
    xs = [torch.randn(B, V, generator=gen), torch.randn(B, V, generator=gen).bfloat16(),
          torch.randn(B, V, generator=gen).half()]
    coeffs = torch.randn(B, 3, generator=gen)
    z = sk.guided_logits(xs, coeffs)
    assert z.dtype == torch.float32 and z.shape == (B, V)
    ref = guided_logits_reference(xs, coeffs, acc_dtype=torch.float64)
    bound = 1e-6 * guided_logits_reference([x.abs() for x in xs], coeffs.abs(), acc_dtype=torch.float64)
    assert ((z.double() - ref).abs() <= bound + 1e-30).all()


# --------------------------------------------------------- invalid rows


@pytest.mark.filterwarnings("ignore:invalid value encountered")  # numpy, in the interpreter: inf - inf
def test_invalid_rows_get_minus_one_or_a_clear_error(kernel):
    V = 20
    x = torch.randn(5, V)
    x[1, 3] = float("nan")
    x[2] = -float("inf")
    x[3, 0] = float("inf")
    for temperature in (0.0, 1.0):
        tok, lp = sk.guided_sample([x], [1.0], temperature=temperature, seed=0, return_logprobs=True, check=False)
        assert tok[[1, 2, 3]].tolist() == [-1, -1, -1]
        assert torch.isnan(lp[[1, 2, 3]]).all()
        assert (tok[[0, 4]] >= 0).all() and (tok[[0, 4]] < V).all()
        with pytest.raises(ValueError, match=r"rows 1, 2, 3 .*NaN or \+inf or are all -inf"):
            sk.guided_sample([x], [1.0], temperature=temperature, seed=0)
    # A NaN produced by the combination itself (inf - inf) is caught too.
    y = torch.zeros(1, V)
    y[0, 4] = float("inf")
    assert sk.guided_sample([y, y], [1.0, -1.0], seed=0, check=False).item() == -1


def test_bad_arguments_are_refused_clearly():
    x = torch.randn(2, 10)
    cases = [
        (dict(top_p=0.0), ValueError, r"top_p\[0\] = 0.0 is out of range \(in \(0, 1\]"),
        (dict(top_p=1.5), ValueError, "top_p"),
        (dict(top_k=-1), ValueError, r"top_k\[0\] = -1 is out of range"),
        (dict(top_k=2.5), TypeError, "top_k must be an integer"),
        (dict(temperature=-0.1), ValueError, "temperature"),
        (dict(temperature=float("nan")), ValueError, "temperature"),
        (dict(min_p=1.1), ValueError, "min_p"),
        (dict(offset=-1), ValueError, "offset"),
        (dict(seed=[1, 2, 3]), ValueError, r"seed has 3 entries; expected a scalar or one per row \(B = 2\)"),
        (dict(temperature=torch.ones(3)), ValueError, r"temperature has 3 entries; expected a scalar or one per row"),
        (dict(top_p=torch.ones(2, 1)), ValueError, r"top_p has shape \(2, 1\)"),
        (dict(seed=2**64), ValueError, r"seed\[0\] = 18446744073709551616 is out of range"),
        (dict(top_k=torch.tensor([1.0, 2.0])), TypeError, "top_k must hold integers"),
    ]
    for kw, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            sk.guided_sample([x, x], [1.0, 1.0], **kw)
    with pytest.raises(ValueError, match=r"coeffs has 3 entries but logits holds M = 2"):
        sk.guided_sample([x, x], [1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match=r"coeffs has shape \(3, 2\)"):
        sk.guided_sample([x, x], torch.ones(3, 2))
    with pytest.raises(ValueError, match="coeffs must be finite"):
        sk.guided_sample([x, x], [1.0, float("nan")])
    with pytest.raises(ValueError, match=r"logits\[1\] has shape \(2, 11\) but logits\[0\] has \(2, 10\)"):
        sk.guided_sample([x, torch.randn(2, 11)], [1.0, 1.0])
    with pytest.raises(ValueError, match=r"a \[M, B, V\] tensor or a list"):
        sk.guided_sample(x, [1.0])
    with pytest.raises(TypeError, match=r"logits\[0\] has dtype torch.int64"):
        sk.guided_sample([torch.ones(2, 10, dtype=torch.int64)], [1.0])
    with pytest.raises(ValueError, match="at most 16"):
        sk.guided_sample([x] * 17, [1.0] * 17)
    with pytest.raises(ValueError, match="logits is empty"):
        sk.guided_sample([], [])


def test_seed_none_draws_from_torchs_generator():
    x = torch.zeros(4, 1000)
    torch.manual_seed(0)
    a = sk.guided_sample([x], [1.0])
    torch.manual_seed(0)
    b = sk.guided_sample([x], [1.0])
    assert torch.equal(a, b)
    assert len(set(a.tolist())) > 1  # rows get independent seeds

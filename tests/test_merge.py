"""sk.merge / sk.merge_many against the float64 reference, on every backend.

The C++ kernel runs on every SIMD path this CPU has (scalar, avx2, avx512);
the Triton kernel runs under TRITON_INTERPRET=1 on CPU tensors (its fp32 ->
bf16 conversion truncates there, hence 1 ulp, as DESIGN.md allows).
"""

import itertools

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

import soupkernels as sk
from merge_checks import assert_merged
from kernel_paths import simd_levels, use_backend
from soupkernels import backend as sk_backend

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SIZES = [1, 7, 1023, 1_000_003]


BACKENDS = [pytest.param(("cpp", s), id=f"cpp-{s}") for s in simd_levels()] + [
    pytest.param(("triton", None), id="triton-interp"),
    pytest.param(("torch", None), id="torch"),
]


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    with use_backend(monkeypatch, *request.param) as name:
        yield name


def _inputs(gen, size, dtypes):
    return [torch.randn(size, generator=gen).to(d) for d in dtypes]


def _coeffs(gen, n):
    # include negatives and values > 1 (Bone Soup + extrapolation)
    return (torch.rand(n, generator=gen, dtype=torch.float64) * 4 - 2).tolist()


def _poisoned(size, dtype):
    return torch.full((size,), float("nan"), dtype=dtype)


@pytest.mark.parametrize("size", SIZES)
def test_sizes_and_dtypes(backend, size):
    gen = torch.Generator().manual_seed(size)
    combos = [(d, d) for d in DTYPES] if size > 10_000 else list(itertools.product(DTYPES, DTYPES))
    for in_dt, out_dt in combos:
        xs = _inputs(gen, size, [in_dt] * 3)
        cs = _coeffs(gen, 3)
        out = sk.merge(xs, cs, out=_poisoned(size, out_dt))
        assert out.dtype == out_dt
        assert_merged(out, xs, cs)


@pytest.mark.parametrize("n", range(1, 9))
def test_n_inputs_mixed_dtypes(backend, n):
    gen = torch.Generator().manual_seed(100 + n)
    in_dts = [DTYPES[(k + n) % 3] for k in range(n)]
    for out_dt in DTYPES:
        xs = _inputs(gen, 4099, in_dts)
        cs = _coeffs(gen, n)
        assert_merged(sk.merge(xs, cs, out=_poisoned(4099, out_dt)), xs, cs)


def test_default_out_dtype_and_shape(backend):
    gen = torch.Generator().manual_seed(1)
    xs = [torch.randn(3, 5, 7, generator=gen).bfloat16(), torch.randn(3, 5, 7, generator=gen)]
    out = sk.merge(xs, [0.3, 0.7])
    assert out.shape == (3, 5, 7) and out.dtype == torch.bfloat16
    assert_merged(out, xs, [0.3, 0.7])


@pytest.mark.parametrize("alias", [0, 2])
def test_out_aliases_an_input(backend, alias):
    gen = torch.Generator().manual_seed(7 + alias)
    for dt in DTYPES:
        xs = _inputs(gen, 70_001, [dt] * 3)
        originals = [x.clone() for x in xs]
        storage = xs[alias].data_ptr()
        cs = [1.75, -0.75, 0.5]
        out = sk.merge(xs, cs, out=xs[alias])
        # The result is written in place: the returned tensor is the aliased
        # input itself, on its own storage, and holds the merge of the inputs
        # as they were before the call; the other inputs are untouched.
        assert out is xs[alias] and out.data_ptr() == storage
        assert_merged(out, originals, cs)
        for k in range(3):
            if k != alias:
                assert torch.equal(xs[k], originals[k]), k


def test_empty_tensors(backend):
    out = sk.merge([torch.empty(0), torch.empty(0)], [1.0, 2.0])
    assert out.numel() == 0


@pytest.mark.parametrize("n_tensors", [1, 5, 300])
def test_merge_many(backend, n_tensors):
    gen = torch.Generator().manual_seed(n_tensors)
    # sizes cross thread boundaries and include 1-element tensors
    sizes = [int(s) for s in torch.randint(1, 3000, (n_tensors,), generator=gen)]
    if n_tensors > 1:
        sizes[1] = 150_001
    cs = _coeffs(gen, 3)
    groups, outs = [], []
    for p, s in enumerate(sizes):
        dt = DTYPES[p % 3]
        groups.append(_inputs(gen, s, [dt, dt, torch.float32]))
        outs.append(_poisoned(s, DTYPES[(p + 1) % 3]))
    got = sk.merge_many(groups, cs, outs=outs)
    assert len(got) == n_tensors
    for o, g in zip(got, groups):
        assert_merged(o, g, cs)


def test_merge_many_default_outs_and_aliasing(backend):
    gen = torch.Generator().manual_seed(3)
    groups = [_inputs(gen, s, [torch.bfloat16] * 2) for s in (5, 1031, 20_000)]
    originals = [[t.clone() for t in g] for g in groups]
    outs = sk.merge_many(groups, [2.0, -1.0])
    for o, g in zip(outs, originals):
        assert o.dtype == torch.bfloat16
        assert_merged(o, g, [2.0, -1.0])
    sk.merge_many(groups, [2.0, -1.0], outs=[g[1] for g in groups])
    for g, orig in zip(groups, originals):
        assert_merged(g[1], orig, [2.0, -1.0])


def test_cpp_streaming_stores_misaligned():
    """Non-temporal stores on and off, with outputs not aligned to a vector."""
    if sk_backend._C is None:
        pytest.skip("C++ extension not built")
    from soupkernels.cpp_merge import merge_group_cpp

    gen = torch.Generator().manual_seed(11)
    for dt in DTYPES:
        for shift in (0, 1, 3):
            n = 300_007
            xs = _inputs(gen, n, [dt, torch.float32])
            buf = torch.full((n + shift,), float("nan"), dtype=dt)
            out = buf[shift:]
            for nt in (False, True):
                out.fill_(float("nan"))
                merge_group_cpp([out], [xs], [0.25, -3.0], nontemporal=nt)
                assert_merged(out, xs, [0.25, -3.0])
            assert buf[:shift].isnan().all(), "wrote before the output"


def test_cpp_matches_rounding_of_torch_casts():
    """Bit-exact RNE: merging one input with coefficient 1 is a plain cast."""
    if sk_backend._C is None:
        pytest.skip("C++ extension not built")
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(200_003, generator=gen, dtype=torch.float64).float() * 3
    # specials: halfway cases, subnormals, overflow, inf, nan, signed zero
    specials = torch.tensor(
        [0.0, -0.0, 1e-40, -1e-40, 6e-8, 3e-8, 65504.0, 65520.0, 70000.0, 1e39, float("inf"),
         -float("inf"), 1.00390625, 1.01171875, -2.00390625, 3.4e38],
        dtype=torch.float32,
    )
    x = torch.cat([x, specials])
    for level in simd_levels():
        prev = sk_backend._C.simd()
        sk_backend._C.set_simd(level)
        try:
            for dt in (torch.bfloat16, torch.float16):
                out = torch.empty(x.shape, dtype=dt)
                from soupkernels.cpp_merge import merge_group_cpp

                merge_group_cpp([out], [[x]], [1.0])
                want = x.to(dt)
                same = (out.view(torch.int16) == want.view(torch.int16)) | (out.isnan() & want.isnan())
                assert same.all(), f"{level} {dt}: {(~same).sum()} casts differ, e.g. {x[~same][:4]}"
            nan_out = torch.empty(1, dtype=torch.bfloat16)
            merge_group_cpp([nan_out], [[torch.tensor([float("nan")])]], [1.0])
            assert nan_out.isnan().all()
        finally:
            sk_backend._C.set_simd(prev)


@settings(max_examples=40, deadline=None)
@example(shape=[], coeffs=[1.0127464261368318e-40], dts=[torch.float32] * 7, seed=0)  # a subnormal result
@given(
    shape=st.lists(st.integers(0, 40), min_size=0, max_size=3),
    coeffs=st.lists(st.floats(-8, 8, allow_nan=False, width=32), min_size=1, max_size=6),
    dts=st.lists(st.sampled_from(DTYPES), min_size=7, max_size=7),
    seed=st.integers(0, 2**31 - 1),
)
def test_property_shapes_and_coeffs(shape, coeffs, dts, seed):
    gen = torch.Generator().manual_seed(seed)
    xs = [torch.randn(shape, generator=gen).to(dts[k]) for k in range(len(coeffs))]
    out = torch.full(shape, float("nan"), dtype=dts[-1])
    sk.merge(xs, coeffs, out=out)
    assert_merged(out, xs, coeffs)


# ---- validation: bad input is refused with a message that names it ----------


def test_refuses_bad_input():
    a, b = torch.randn(10), torch.randn(10)
    with pytest.raises(ValueError, match=r"coeffs has 3 entries but there are 2"):
        sk.merge([a, b], [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match=r"coeffs must be finite; entries \[1\]"):
        sk.merge([a, b], [1.0, float("nan")])
    with pytest.raises(ValueError, match=r"tensors\[1\] has shape \(11,\)"):
        sk.merge([a, torch.randn(11)], [1.0, 1.0])
    with pytest.raises(TypeError, match=r"tensors\[1\] has dtype torch.float64"):
        sk.merge([a, b.double()], [1.0, 1.0])
    with pytest.raises(TypeError, match=r"out for tensors has dtype torch.int32"):
        sk.merge([a, b], [1.0, 1.0], out=torch.empty(10, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"tensors\[0\] is not contiguous"):
        sk.merge([torch.randn(4, 6).t(), torch.randn(6, 4)], [1.0, 1.0])
    with pytest.raises(ValueError, match=r"out for tensors has shape"):
        sk.merge([a, b], [1.0, 1.0], out=torch.empty(9))
    with pytest.raises(TypeError, match="non-empty sequence"):
        sk.merge([], [])
    with pytest.raises(TypeError, match="non-empty sequence"):
        sk.merge(a, [1.0])
    buf = torch.randn(20)
    with pytest.raises(ValueError, match=r"partially overlaps tensors\[0\]"):
        sk.merge([buf[0:10], b], [1.0, 1.0], out=buf[5:15])
    with pytest.raises(ValueError, match=r"groups\[1\] has 1 tensors but groups\[0\] has 2"):
        sk.merge_many([[a, b], [a]], [1.0, 1.0])
    with pytest.raises(ValueError, match=r"outs has 1 tensors but groups has 2"):
        sk.merge_many([[a, b], [a, b]], [1.0, 1.0], outs=[torch.empty(10)])
    with pytest.raises(ValueError, match=r"groups\[1\]\[1\] has shape"):
        sk.merge_many([[a, b], [a, torch.randn(3)]], [1.0, 1.0])


def test_backend_selection(monkeypatch):
    x = torch.randn(3)
    monkeypatch.setenv("SOUPKERNELS_BACKEND", "auto")
    assert sk.backend_for(x) == ("cpp" if sk_backend._C is not None else "torch")
    monkeypatch.setenv("SOUPKERNELS_BACKEND", "torch")
    assert sk.backend_for(x) == "torch"
    monkeypatch.setenv("SOUPKERNELS_BACKEND", "bogus")
    with pytest.raises(ValueError, match="SOUPKERNELS_BACKEND must be one of"):
        sk.backend_for(x)
    monkeypatch.setenv("SOUPKERNELS_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="needs TRITON_INTERPRET=1"):
        sk.backend_for(x)


def test_fallback_without_extension(monkeypatch):
    """With the extension missing, auto falls back to torch and says why."""
    monkeypatch.setenv("SOUPKERNELS_BACKEND", "auto")
    monkeypatch.setattr(sk_backend, "_C", None)
    monkeypatch.setattr(sk_backend, "CPP_ERROR", "soupkernels._C could not be imported (test)")
    monkeypatch.setattr(sk_backend, "_warned", set())
    x = torch.randn(5)
    with pytest.warns(RuntimeWarning, match="could not be imported"):
        assert sk.backend_for(x) == "torch"
    assert_merged(sk.merge([x, x], [1.0, 2.0], out=torch.full((5,), float("nan"))), [x, x], [1.0, 2.0])


def test_triton_merge_many_one_launch_per_dtype(monkeypatch):
    """A 7B-shaped parameter list (291 tensors, scaled down) in two dtypes."""
    pytest.importorskip("triton")
    monkeypatch.setenv("SOUPKERNELS_BACKEND", "triton")
    from soupkernels import triton_merge

    launches = []
    kernel = triton_merge._merge_tiles_kernel

    class Counting:
        def __getitem__(self, grid):
            launches.append(grid)
            return kernel[grid]

    monkeypatch.setattr(triton_merge, "_merge_tiles_kernel", Counting())
    gen = torch.Generator().manual_seed(0)
    # Llama-2-7B: embed, 32 x (q, k, v, o, gate, up, down, 2 norms), norm, head.
    shapes = [(64, 16)]
    for _ in range(32):
        shapes += [(16, 16)] * 4 + [(43, 16)] * 3 + [(16,), (16,)]
    shapes += [(16,), (64, 16)]
    assert len(shapes) == 291
    groups = []
    for s in shapes:
        dt = torch.float32 if len(s) == 1 else torch.bfloat16  # norms kept in fp32
        groups.append([torch.randn(s, generator=gen).to(dt) for _ in range(4)])
    cs = [1.2, -0.4, 0.5, -0.3]
    outs = sk.merge_many(groups, cs)
    assert len(launches) == 2, f"{len(launches)} launches for 2 dtypes"
    for o, g in zip(outs, groups):
        assert_merged(o, g, cs)


@pytest.mark.gpu
def test_gpu_merge_matches_reference():
    gen = torch.Generator(device="cuda").manual_seed(0)
    for dt in DTYPES:
        for size in SIZES + [64 * 1024 * 1024 + 5]:
            xs = [torch.randn(size, generator=gen, device="cuda").to(dt) for _ in range(4)]
            cs = [1.3, -0.2, 0.4, -0.5]
            out = torch.full((size,), float("nan"), device="cuda", dtype=dt)
            sk.merge(xs, cs, out=out)
            assert_merged(out.cpu(), [x.cpu() for x in xs], cs)


def test_misaligned_views(backend):
    """Views that start mid-vector (no 16-byte alignment) take the safe path."""
    gen = torch.Generator().manual_seed(21)
    for dt in DTYPES:
        n = 20_011
        bufs = [torch.randn(n + 3, generator=gen).to(dt) for _ in range(3)]
        xs = [bufs[0][1:n + 1], bufs[1][3:], bufs[2][2:n + 2]]
        out_buf = torch.full((n + 1,), float("nan"), dtype=dt)
        out = sk.merge(xs, [0.5, -1.5, 2.0], out=out_buf[1:])
        assert_merged(out, xs, [0.5, -1.5, 2.0])
        assert out_buf[0].isnan(), "wrote before the output view"


def test_merge_many_refuses_overlap_across_groups(backend):
    """Tied weights listed twice, or outputs that feed another group, would read half-merged values."""
    w, o = torch.ones(4096), torch.full((4096,), 3.0)
    with pytest.raises(ValueError, match=r"outs\[0\] and outs\[1\] overlap"):
        sk.merge_many([[w, o], [w, o]], [0.5, 0.5], outs=[w, w])
    a, b = torch.ones(100), torch.full((100,), 10.0)
    with pytest.raises(ValueError, match=r"overlaps groups\[\d\]\[0\], an input of another parameter"):
        sk.merge_many([[a], [b]], [2.0], outs=[b, a])
    buf = torch.zeros(2000)
    with pytest.raises(ValueError, match="overlap"):
        sk.merge_many([[torch.ones(1500)], [torch.ones(1500)]], [1.0], outs=[buf[:1500], buf[500:]])
    # in-place per group (each out is its own group's input) stays allowed
    x, y, u, v = (torch.full((64,), float(i)) for i in (1, 2, 3, 4))
    sk.merge_many([[x, y], [u, v]], [1.0, 1.0], outs=[x, u])
    assert (x == 3).all() and (u == 7).all()
    # ...and reading one input in two groups is fine too
    outs = sk.merge_many([[y, v], [y, v]], [1.0, 1.0])
    assert all((o == 6).all() for o in outs)


def test_refuses_element_misaligned_and_negated_views():
    raw = bytearray(4 * 1000 + 2)
    odd = torch.frombuffer(raw, dtype=torch.float32, offset=2, count=1000)
    with pytest.raises(ValueError, match="not a multiple of its element size"):
        sk.merge([torch.ones(1000), torch.ones(1000)], [1.0, 2.0], out=odd)
    neg = torch.tensor([1.0 + 2.0j]).conj().imag  # contiguous, lazy negation bit set
    assert neg.is_neg()
    with pytest.raises(ValueError, match="resolve_neg"):
        sk.merge([neg], [1.0])
    assert sk.merge([neg.resolve_neg()], [1.0]).item() == -2.0


def test_in_place_merge_bumps_the_autograd_version(backend):
    """A graph that saved the overwritten tensor must fail on backward, as with torch's own in-place ops."""
    w = torch.randn(16, requires_grad=True)
    y = w * 1.0
    z = (y * y).sum()  # saves y
    sk.merge([y.detach()], [3.0], out=y.detach())
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        z.backward()


def test_scalar_path_tails_round_like_the_body():
    """An element's value must not depend on whether it falls in a vector block or the tail."""
    if sk_backend._C is None:
        pytest.skip("C++ extension not built")
    for level in simd_levels():
        prev = sk_backend._C.simd()
        sk_backend._C.set_simd(level)
        try:
            n = 1000  # blocks of 64 (128 for AVX-512) plus a tail
            x0, x1 = torch.ones(n), torch.full((n,), 1 + 2**-12)
            out = sk.merge([x0, x1], [-1.0, 1 + 2**-12])
            assert torch.unique(out).numel() == 1, f"{level}: {torch.unique(out)}"
        finally:
            sk_backend._C.set_simd(prev)

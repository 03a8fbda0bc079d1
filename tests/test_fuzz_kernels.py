"""Hostile arguments at the kernel boundary: a clear error or a correct result, never a crash.

Tensors without a plain strided buffer (sparse, nested, meta, storage-less
efficient zero tensors) used to reach the C++ kernels as NULL pointers; the
calls that crashed run here in a subprocess, so a regression fails the test
instead of killing pytest. The property tests (hypothesis, derandomized)
draw sizes, dtypes and coefficients over a range that includes values
finite in float64 but not in float32, and check every accepted call against
the float64 reference.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import soupkernels as sk
from merge_checks import assert_merged

FAST = settings(derandomize=True, max_examples=60, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

# --------------------------------------------------------------------------- storage-less tensors (subprocess)

# Each case: (name, expression). The expression runs in a fresh interpreter;
# it must raise ValueError whose message names the argument.
_BAD_TENSORS = {
    "zero": "torch._efficientzerotensor({shape})",
    "meta": "torch.empty({shape}, device='meta')",
    "sparse": "torch.ones({shape}).to_sparse()",
    "nested": "torch.nested.nested_tensor([torch.ones({shape}[-1]), torch.ones({shape}[-1] + 1)])",
    "fake": ("__import__('torch._subclasses.fake_tensor')._subclasses.fake_tensor"
             ".FakeTensorMode().from_tensor(torch.ones({shape}))"),
}
_CASES = []
for kind, make in _BAD_TENSORS.items():
    v = make.format(shape="(4,)")
    m = make.format(shape="(2, 5)")
    _CASES += [
        (f"merge tensors[1] {kind}", f"sk.merge([torch.ones(4), {v}], [0.5, 0.5])", "tensors[1]"),
        (f"merge tensors[0] {kind}, no out", f"sk.merge([{v}], [1.0])", "tensors[0]"),
        (f"merge out {kind}", f"sk.merge([torch.ones(4)], [1.0], out={v})", "out"),
        (f"merge coeffs {kind}", f"sk.merge([torch.ones(4)] * 4, {v})", "coeffs"),
        (f"merge_many groups[1][0] {kind}",
         f"sk.merge_many([[torch.ones(4)], [{v}]], [1.0])", "groups[1][0]"),
        (f"merge_many outs[0] {kind}",
         f"sk.merge_many([[torch.ones(4)]], [1.0], outs=[{v}])", "out for groups[0]"),
        (f"guided_sample logits[0] {kind}", f"sk.guided_sample([{m}], [1.0])", "logits"),
        (f"guided_logits logits[1] {kind}", f"sk.guided_logits([torch.ones(2, 5), {m}], [1.0, 1.0])", "logits"),
        (f"guided_sample coeffs {kind}", f"sk.guided_sample([torch.ones(2, 5)] * 4, {v})", "coeffs"),
        (f"guided_sample temperature {kind}",
         f"sk.guided_sample([torch.ones(4, 5)], [1.0], temperature={v})", "temperature"),
    ]
_CASES.append(("merge inside vmap", "torch.vmap(lambda x: sk.merge([x], [1.0]))(torch.ones(2, 3))", "tensors[0]"))
_CASES.append(("guided_sample inside vmap",
               "torch.vmap(lambda x: sk.guided_sample([x[None]], [1.0]))(torch.ones(2, 3))", "logits[0]"))
_CASES.append(("guided_sample [M, B, V] meta", "sk.guided_sample(torch.empty(1, 2, 5, device='meta'), [1.0])",
               "logits"))

_SCRIPT = textwrap.dedent("""
    import json, sys, warnings
    import torch, soupkernels as sk
    warnings.simplefilter("ignore")
    for name, expr, _ in json.loads(sys.argv[1]):
        print("START", name, flush=True)
        try:
            eval(expr)
            print("RESULT", json.dumps([name, "no error", ""]), flush=True)
        except Exception as exc:
            print("RESULT", json.dumps([name, type(exc).__name__, str(exc)]), flush=True)
""")


@pytest.mark.parametrize("backend", ["cpp", "torch"])
def test_storage_less_tensors_are_refused_by_name_without_crashing(backend):
    env = {**os.environ, "SOUPKERNELS_BACKEND": backend}
    proc = subprocess.run([sys.executable, "-c", _SCRIPT, json.dumps(_CASES)], capture_output=True, text=True,
                          timeout=300, env=env, cwd=str(Path(__file__).resolve().parents[1]))
    started = [line[6:] for line in proc.stdout.splitlines() if line.startswith("START ")]
    assert proc.returncode == 0, (f"the interpreter died (rc {proc.returncode}) during case "
                                  f"{started[-1] if started else None!r}: {proc.stderr[-2000:]}")
    results = {r[0]: r[1:] for r in (json.loads(line[7:]) for line in proc.stdout.splitlines()
                                     if line.startswith("RESULT "))}
    assert len(results) == len(_CASES)
    for name, _expr, arg in _CASES:
        kind, msg = results[name]
        assert kind == "ValueError" and arg in msg, f"{name}: got {kind}: {msg}"


# --------------------------------------------------------------------------- merge: coefficients in float32

_DTYPES = st.sampled_from([torch.float32, torch.bfloat16, torch.float16])
_COEFF = st.one_of(
    st.floats(-4.0, 4.0), st.floats(-1e-30, 1e-30),
    st.sampled_from([1e39, -1e39, 3.5e38, 3.4e38, 1e300, float("inf"), float("nan"), 0.0, -0.0]),
)


@pytest.mark.parametrize("backend", ["cpp", "torch"])
@FAST
@given(n=st.integers(1, 4), size=st.integers(0, 67), dtypes=st.lists(_DTYPES, min_size=5, max_size=5),
       coeffs=st.lists(_COEFF, min_size=4, max_size=4), seed=st.integers(0, 2**16), alias=st.booleans())
def test_merge_is_refused_or_matches_float64(monkeypatch, backend, n, size, dtypes, coeffs, seed, alias):
    monkeypatch.setenv("SOUPKERNELS_BACKEND", backend)
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(size, generator=g).to(dtypes[k]) for k in range(n)]
    cs = coeffs[:n]
    out = xs[0] if alias else torch.full((size,), float("nan"), dtype=dtypes[4])
    inputs = [x.clone() for x in xs]
    f32 = [torch.tensor(c, dtype=torch.float64).float().item() for c in cs]
    if not all(math.isfinite(c) for c in f32):
        with pytest.raises(ValueError, match=r"coeffs"):
            sk.merge(xs, cs, out=out)
        return
    got = sk.merge(xs, cs, out=out)
    # The documented precision: coefficients rounded to float32 (3e-227 is 0 there), fp32 accumulation.
    ref = sum(c * x.double() for c, x in zip(f32, inputs))
    if ref.numel() and (not bool(torch.isfinite(ref).all()) or ref.abs().max() > torch.finfo(out.dtype).max / 2):
        return  # the true result overflows the output dtype: inf there is the reference's rounding
    assert_merged(got, inputs, f32)


def test_huge_coefficient_message_names_float32():
    with pytest.raises(ValueError, match=r"coeffs\[1\] = 1e\+39 is not finite in float32"):
        sk.merge([torch.ones(3), torch.ones(3)], [0.5, 1e39])
    with pytest.raises(ValueError, match=r"coeffs\[0\] = 1e\+39 is not finite in float32"):
        sk.guided_sample([torch.ones(2, 3)], [1e39])


# --------------------------------------------------------------------------- guided_sample: scalars in float32

_TEMP = st.one_of(st.floats(0.05, 5.0), st.sampled_from([0.0, 1e39, 1e-40, 1e-50, -1.0, float("nan"),
                                                         float("inf"), 1e-38, 3e38]))
_TOP_P = st.one_of(st.floats(0.05, 1.0), st.sampled_from([1e-50, 0.0, 1.5, float("nan")]))
_MIN_P = st.one_of(st.floats(0.0, 0.5), st.sampled_from([-1e-50, 1.0000001, float("nan")]))


def _accepted(t, top_p, min_p) -> bool:
    """The documented ranges, met both by the value given and by its float32 rounding."""
    def ok(t, p, m):
        return (t == 0 or (t >= torch.finfo(torch.float32).tiny and math.isfinite(t))) and 0 < p <= 1 and 0 <= m <= 1

    return ok(t, top_p, min_p) and ok(*(torch.tensor(v, dtype=torch.float64).float().item() for v in (t, top_p, min_p)))


@pytest.mark.parametrize("backend", ["cpp", "torch"])
@FAST
@given(t=_TEMP, top_p=_TOP_P, min_p=_MIN_P, per_row=st.booleans(), seed=st.integers(0, 2**16),
       c=_COEFF, M=st.integers(1, 3))
def test_guided_sample_is_refused_or_valid(monkeypatch, backend, t, top_p, min_p, per_row, seed, c, M):
    monkeypatch.setenv("SOUPKERNELS_BACKEND", backend)
    B, V = 3, 11
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(B, V, generator=g) for _ in range(M)]
    coeffs = [c] + [1.0] * (M - 1)
    kw = dict(temperature=[t] * B if per_row else t, top_p=top_p, min_p=min_p, seed=seed)
    c32 = torch.tensor(c, dtype=torch.float64).float().item()
    if not (math.isfinite(c32) and _accepted(t, top_p, min_p)):
        with pytest.raises(ValueError, match=r"coeffs|temperature|top_p|min_p"):
            sk.guided_sample(xs, coeffs, **kw)
        return
    z = sum(float(k) * x.double() for k, x in zip(coeffs, xs))
    if not bool(torch.isfinite(z.float()).all()):
        return  # overflowing combination: the row check's business (tested in test_sampling.py)
    tokens = sk.guided_sample(xs, coeffs, **kw)
    assert tokens.dtype == torch.int64 and tokens.shape == (B,)
    assert bool(((tokens >= 0) & (tokens < V)).all()), tokens
    if torch.tensor(t).float().item() == 0:  # greedy: the float64 argmax (random logits: no ties)
        assert tokens.tolist() == z.argmax(dim=1).tolist()

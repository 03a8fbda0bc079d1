"""benchmarks/bench_mixture_overhead.py --quick: every form timed, FLOPs counted from the shapes, exact mixtures."""

import json

import pytest

pytest.importorskip("transformers")


def test_bench_mixture_overhead_quick(tmp_path, capsys, load_benchmark):
    mod = load_benchmark("bench_mixture_overhead")
    out = tmp_path / "r.json"
    assert mod.main(["--quick", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    shape, layers = mod.SHAPES["tiny"], r["adapted_layers"]
    assert layers == 4 * shape["n_layer"]  # c_attn, attn.c_proj, c_fc, mlp.c_proj per block
    rows = r["rows"]
    assert {(x["shape"], x["mode"], x["rank"]) for x in rows} == {
        (s, m, k) for s in ("prefill", "decode") for m, k in [("merged", None)] + [
            (m, k) for m in ("shared", "per-row") for k in (2, 4)]}
    d = shape["n_embd"]
    per_token = sum(2 * (i + o) for i, o in [(d, 3 * d), (d, d), (d, 4 * d), (4 * d, d)]) * shape["n_layer"]
    for x in rows:
        assert x["median_ms"] > 0 and x["time_over_merged"] > 0
        if x["mode"] == "merged":
            assert x["flops_over_merged"] == 1.0 and x["max_rel_logit_diff"] is None
            continue
        rows_, tokens = (r["prefill"][0], r["prefill"][1]) if x["shape"] == "prefill" else (r["decode"][0], 1)
        merged = next(y for y in rows if y["shape"] == x["shape"] and y["mode"] == "merged")["flops"]
        R = x["rank_total"]
        assert R == 2 * x["rank"]
        # The mixture's extra FLOPs: 2 R (in + out) per adapted layer per token (+ R for the scaling).
        assert x["flops"] - merged == pytest.approx((per_token * R + layers * R) * rows_ * tokens)
        assert x["max_rel_logit_diff"] < 1e-5  # the mixture rows are the merged models (fp32 rounding)
    assert "time/merged" in capsys.readouterr().out

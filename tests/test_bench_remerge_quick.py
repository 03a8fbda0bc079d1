"""benchmarks/bench_remerge.py --quick: the bytes it claims to move, the kernel calls, and a correct merge."""

import json
import math

import pytest


def test_bench_remerge_quick(tmp_path, capsys, load_benchmark):
    from bonesoup import bone_coefficients, fold_extrapolation

    mod = load_benchmark("bench_remerge")
    out = tmp_path / "r.json"
    assert mod.main(["--quick", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    shapes = mod.SHAPES["tiny"]()
    params = sum(math.prod(s) for s in shapes)
    assert r["n"] == 2 and r["parameters"] == params
    assert r["param_bytes"] == 4 * params  # fp32
    assert r["launches"] == 1  # one dtype: one fused merge per re-merge
    # n backbones + SFT read, the live arena written: (n + 2) x the model's bytes
    assert r["bytes_moved"] == (r["n"] + 2) * r["param_bytes"]
    c, c_sft = fold_extrapolation(bone_coefficients(r["preference"], 0.7), r["alpha"])
    assert r["coefficients"] == pytest.approx([*c, c_sft], abs=1e-12)
    # The timed path computes the merge: within fp32 rounding of the float64 sum, and equal to the loop's.
    chk = r["check"]
    assert chk["max_abs_err_vs_fp64"] <= 4e-7 * chk["max_abs_ref"]
    assert chk["max_abs_diff_loop_vs_ours"] <= 4e-7 * chk["max_abs_ref"]
    assert r["samples"] == {k: 3 for k in ("set_preference", "bare_kernel", "copy", "state_dict_loop")}
    assert all(0 < r["best_s"][k] <= r["median_s"][k] for k in r["best_s"])
    assert r["set_preference_over_bare"] == r["best_s"]["set_preference"] / r["best_s"]["bare_kernel"]
    assert "set_preference" in capsys.readouterr().out

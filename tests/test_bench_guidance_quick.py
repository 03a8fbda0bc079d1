"""benchmarks/bench_guidance.py --quick: structure, forward counts and weight bytes per method."""

import json
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import bench_guidance  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread


def test_quick_run(tmp_path, capsys):
    out = tmp_path / "g.json"
    assert bench_guidance.main(["--quick", "--n", "2", "4", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "mage_explicit" in printed and "re-merge inputs" in printed
    res = json.loads(out.read_text())
    rows = {(r["method"], r["n"]): r for r in res["rows"]}
    assert len(rows) == 8
    preset = bench_guidance.PRESETS["tiny"]
    one = bench_guidance.param_bytes(bench_guidance.make_model(preset, 0)) / 2**20
    untied = bench_guidance.param_bytes(bench_guidance.make_model(preset, 0, tied=False)) / 2**20
    assert untied > one  # the value model's head is its own tensor
    for n in (2, 4):
        want = {"mod": n, "guidance_ensemble": n + 2, "mage_implicit": 3, "mage_explicit": 2}
        for m, f in want.items():
            r = rows[(m, n)]
            assert r["forwards_per_step"] == f
            assert r["tokens_per_s"] > 0 and len(r["seconds"]) == 1
        assert rows[("mod", n)]["read_mib_per_step"] == pytest.approx(n * one)
        assert rows[("guidance_ensemble", n)]["read_mib_per_step"] == pytest.approx((n + 2) * one)
        assert rows[("mage_implicit", n)]["read_mib_per_step"] == pytest.approx(3 * one)
        assert rows[("mage_explicit", n)]["read_mib_per_step"] == pytest.approx(one + untied)
        # MAGE keeps the n models its guide is re-merged from; MOD keeps nothing extra.
        assert rows[("mage_implicit", n)]["resident_with_inputs_mib"] == pytest.approx((3 + n) * one)
        assert rows[("mod", n)]["resident_with_inputs_mib"] == pytest.approx(n * one)
        assert rows[("mod", n)]["speed_vs_mod"] == 1.0


def test_merged_guide_is_the_weighted_sum():
    preset = bench_guidance.PRESETS["tiny"]
    experts = [bench_guidance.make_model(preset, 10 + i) for i in range(3)]
    out = bench_guidance.make_model(preset, 99)
    bench_guidance.merge_models(experts, [0.2, 0.3, 0.5], out)
    for name, p in out.named_parameters():
        want = sum(c * dict(e.named_parameters())[name] for c, e in zip([0.2, 0.3, 0.5], experts))
        torch.testing.assert_close(p, want, rtol=1e-6, atol=1e-6)

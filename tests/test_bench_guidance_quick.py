"""benchmarks/bench_guidance.py --quick: structure, forward counts, weight bytes, the merged guides, the RSS meter."""

import json
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import bench_guidance  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread

TINY = bench_guidance.PRESETS["tiny"]


def test_quick_run(tmp_path, capsys):
    out = tmp_path / "g.json"
    assert bench_guidance.main(["--quick", "--n", "2", "4", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    lines = printed.strip().splitlines()
    assert lines[0].startswith("# ") and "B=2" in lines[0]  # the machine line first, the table last
    assert lines[1].split()[:4] == ["method", "n", "fwd/step", "ops/step"]
    assert "re-merge inputs" in lines[1] and lines[-1].startswith("sk.merge_many")
    assert sum(line.startswith(("mod ", "guidance_ensemble ", "mage_")) for line in lines) == 8

    res = json.loads(out.read_text())
    assert {"info", "preset", "batch", "tokens", "merge_seconds", "rows"} <= set(res)
    assert res["info"]["torch"] == torch.__version__
    rows = {(r["method"], r["n"]): r for r in res["rows"]}
    assert set(rows) == {(m, n) for m in bench_guidance.METHODS for n in (2, 4)}
    one = bench_guidance.param_bytes(bench_guidance.make_model(TINY, 0)) / 2**20
    value = bench_guidance.param_bytes(bench_guidance.make_model(TINY, 0, tied=False)) / 2**20
    assert value > one  # the value model's head is its own tensor
    for n in (2, 4):
        want = {"mod": n, "guidance_ensemble": n + 2, "mage_implicit": 3, "mage_explicit": 2}
        for m, f in want.items():
            r = rows[(m, n)]
            assert r["forwards_per_step"] == f, (m, n)
            assert r["tokens_per_s"] > 0 and len(r["seconds"]) == 1
            assert r["resident_decode_mib"] == r["read_mib_per_step"]
        # Weights read per step: one model's bytes per forward (the explicit guide is an untied value model).
        assert rows[("mod", n)]["read_mib_per_step"] == pytest.approx(n * one)
        assert rows[("guidance_ensemble", n)]["read_mib_per_step"] == pytest.approx((n + 2) * one)
        assert rows[("mage_implicit", n)]["read_mib_per_step"] == pytest.approx(3 * one)
        assert rows[("mage_explicit", n)]["read_mib_per_step"] == pytest.approx(one + value)
        # + re-merge inputs: MAGE keeps the n models its guide is re-merged from; MOD and the ensemble none.
        assert rows[("mod", n)]["resident_with_inputs_mib"] == pytest.approx(n * one)
        assert rows[("guidance_ensemble", n)]["resident_with_inputs_mib"] == pytest.approx((n + 2) * one)
        assert rows[("mage_implicit", n)]["resident_with_inputs_mib"] == pytest.approx((3 + n) * one)
        assert rows[("mage_explicit", n)]["resident_with_inputs_mib"] == pytest.approx(one + (1 + n) * value)
        assert rows[("mage_implicit", n)]["remerge_inputs"] == [f"expert_{i + 1}" for i in range(n)]
        assert rows[("mod", n)]["speed_vs_mod"] == 1.0
        for m in bench_guidance.METHODS:
            rss = rows[(m, n)]["rss_growth_mib"]
            if rss is not None:  # tiny models: allocator granularity, so only "the right size"
                assert 0.5 * rows[(m, n)]["resident_with_inputs_mib"] - 0.5 < rss < 2 * rows[(m, n)][
                    "resident_with_inputs_mib"] + 0.5, (m, n, rss)
        # Every forward adds the same ops to a step (n + 2 forwards vs n: two forwards' worth).
        ops = {m: rows[(m, n)]["ops_per_step"] for m in bench_guidance.METHODS}
        two = ops["guidance_ensemble"] - ops["mod"]
        assert two > 0 and two % 2 == 0
        assert ops["mage_implicit"] - ops["mage_explicit"] == two // 2
    # MAGE's ops per step do not depend on n; MOD's grow by one forward's worth per expert.
    assert rows[("mage_explicit", 2)]["ops_per_step"] == rows[("mage_explicit", 4)]["ops_per_step"]
    assert rows[("mod", 4)]["ops_per_step"] - rows[("mod", 2)]["ops_per_step"] == two
    for n in (2, 4):
        assert set(res["merge_seconds"][str(n)]) == {"mage_implicit", "mage_explicit"}


@pytest.mark.parametrize("tied", [True, False])
def test_merged_guide_is_the_weighted_sum(tied):
    mu = [0.2, 0.3, 0.5]
    inputs = [bench_guidance.make_model(TINY, 10 + i, tied=tied) for i in range(3)]
    out = bench_guidance.make_model(TINY, 99, tied=tied)
    before = {k: v.clone() for k, v in out.state_dict().items()}
    bench_guidance.merge_models(inputs, mu, out)
    named = [dict(m.named_parameters()) for m in inputs]
    for name, p in out.named_parameters():
        want = sum(c * d[name].double() for c, d in zip(mu, named))
        torch.testing.assert_close(p.double(), want, rtol=1e-6, atol=1e-7)  # fp32 rounding of an fp32-accumulated sum
        assert not torch.equal(p, before[name]) or torch.equal(want.float(), before[name])
    shared = out.lm_head.weight.data_ptr() == out.transformer.wte.weight.data_ptr()
    assert shared == tied  # the merge kept the tie (or its absence)


def test_check_merged_catches_a_wrong_guide():
    models = bench_guidance.Models(2, TINY, "cpu", torch.float32, lambda: None)
    bench_guidance.check_merged(models, torch.float32)  # as built: merged by sk.merge_many
    with torch.no_grad():
        models.models["merged_value"].lm_head.weight[0, 0] += 1e-3
    with pytest.raises(AssertionError, match="merged_value.lm_head.weight"):
        bench_guidance.check_merged(models, torch.float32)


def test_rss_meter_measures_a_model_build():
    meter = bench_guidance.resident_meter("cpu")
    if meter() is None:
        pytest.skip("no glibc malloc_trim: the benchmark leaves the RSS column empty")
    bench_guidance.make_model(TINY, 0)
    before = meter()
    model = bench_guidance.make_model(dict(TINY, n_embd=256, vocab_size=8192), 1)  # ~12 MiB
    grown = meter() - before
    assert grown == pytest.approx(bench_guidance.param_bytes(model), rel=0.05)

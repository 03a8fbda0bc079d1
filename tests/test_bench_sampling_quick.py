"""benchmarks/bench_sampling.py runs and reports sane figures (small shapes)."""

import json


def test_bench_sampling_quick(tmp_path, capsys, load_benchmark):
    mod = load_benchmark("bench_sampling")
    out = tmp_path / "s.json"
    assert mod.main(["--quick", "--repeats", "2", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    rows = {(row["B"], row["filters"]): row for row in r["rows"]}
    assert set(rows) == {(b, f) for b in (1, 8) for f in mod.FILTERS}  # B in {1, 8} x two filter settings
    for (b, filt), row in rows.items():
        assert (row["V"], row["M"], row["dtype"]) == (4096, 2, "bfloat16")
        assert row["input_bytes"] == b * 4096 * 2 * 2  # M bf16 [B, V] inputs, read once
        assert row["samples"] == {"ours": 2, "torch": 2, "floor": 2}  # --repeats, alternated
        assert 0 < row["ours_s"] <= row["ours_median_s"] and 0 < row["torch_s"] <= row["torch_median_s"]
        assert row["speedup_vs_torch"] == row["torch_s"] / row["ours_s"]
        assert row["ours_over_floor"] == row["ours_s"] / row["floor_s"]
        # The timed kernel is the right one: its combination is the fp32 sum, its tokens are in the support.
        assert row["combine_rel_err"] < 1e-6
        assert row["ours_outside_support"] == 0
        if filt == "temp":
            assert row["support_tokens"] == b * 4096  # temperature alone filters nothing
        else:
            assert b <= row["support_tokens"] <= 50 * b  # top-k 50, then top-p
    assert "vs torch" in capsys.readouterr().out


def test_torch_path_samples_from_the_warped_distribution(load_benchmark):
    import torch

    mod = load_benchmark("bench_sampling")
    x = torch.full((4000, 10), -30.0)
    x[:, 3] = 0.0  # top_k=1 leaves one token whatever the seed
    x[:, 5] = -0.1
    tok = mod.torch_path([x], [1.0], 1.0, top_k=1)
    assert (tok == 3).all()

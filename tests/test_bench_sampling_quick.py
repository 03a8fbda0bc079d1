"""benchmarks/bench_sampling.py runs and reports sane figures (small shapes)."""

import json


def test_bench_sampling_quick(tmp_path, capsys, load_benchmark):
    mod = load_benchmark("bench_sampling")
    out = tmp_path / "s.json"
    assert mod.main(["--quick", "--repeats", "2", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert len(r["rows"]) == 2 * 2  # B in {1, 8} x two filter settings
    for row in r["rows"]:
        assert row["ours_s"] > 0 and row["torch_s"] > 0 and row["floor_s"] > 0
        assert row["input_bytes"] == row["B"] * row["V"] * row["M"] * 2
    assert "vs torch" in capsys.readouterr().out


def test_torch_path_samples_from_the_warped_distribution(load_benchmark):
    import torch

    mod = load_benchmark("bench_sampling")
    x = torch.full((4000, 10), -30.0)
    x[:, 3] = 0.0  # top_k=1 leaves one token whatever the seed
    x[:, 5] = -0.1
    tok = mod.torch_path([x], [1.0], 1.0, top_k=1)
    assert (tok == 3).all()

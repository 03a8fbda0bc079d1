"""benchmarks/bench_remerge.py runs and reports sane figures (tiny shape)."""

import json


def test_bench_remerge_quick(tmp_path, capsys, load_benchmark):
    mod = load_benchmark("bench_remerge")
    out = tmp_path / "r.json"
    assert mod.main(["--quick", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["launches"] == 1 and r["n"] == 2
    assert r["bytes_moved"] == 4 * r["param_bytes"]
    assert all(v > 0 for v in r["best_s"].values())
    assert "set_preference" in capsys.readouterr().out

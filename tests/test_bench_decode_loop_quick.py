"""benchmarks/bench_decode_loop.py: greedy decoding through the one loop equals transformers' generate."""

import json


def test_bench_decode_loop_quick(load_benchmark, tmp_path, one_thread):
    bench = load_benchmark("bench_decode_loop")
    out = tmp_path / "r.json"
    assert bench.main(["--quick", "--batch", "1", "3", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["B"], r["mode"]) for r in rows] == [(1, "greedy"), (1, "sampled"), (3, "greedy"), (3, "sampled")]
    for r in rows:
        assert r["tokens"] == r["B"] * 8
        # Greedy: the same tokens as generate, token for token; sampled: different generators.
        assert r["greedy_equal"] is (True if r["mode"] == "greedy" else None)

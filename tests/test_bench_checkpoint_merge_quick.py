"""Smoke test of benchmarks/bench_checkpoint_merge.py on the tiniest model.

Runs the benchmark's main() in-process (it starts `bonesoup merge` and the
naive loop as subprocesses) and checks its JSON: both outputs agree within
bf16 rounding, the merged checkpoint loads with transformers, and the crash
check (SIGKILL mid-write, then a clean re-run) passed.
"""

import json

import pytest


@pytest.mark.slow
def test_bench_checkpoint_merge_tiny(tmp_path, capsys, load_benchmark):
    bench = load_benchmark("bench_checkpoint_merge")
    out_json = tmp_path / "result.json"
    rc = bench.main(["--preset", "tiny", "--workdir", str(tmp_path / "work"), "--repeats", "1",
                     "--no-import-floor", "--json", str(out_json)])
    printed = capsys.readouterr().out
    res = json.loads(out_json.read_text())
    assert rc == 0, printed[-3000:]
    assert res["ok"] is True

    v = res["verify"]
    assert v["same_keys"] and v["same_weight_map"] and v["dtype_mismatches"] == 0
    assert v["elements"] > 0 and v["worst_pair_in_tolerances"] <= 1.0 and v["worst_vs_fp64_in_tolerances"] <= 1.0
    assert v["loads_with_transformers"] is True

    c = res["crash_check"]
    assert c["passed"] is True and c["killed_returncode"] == -9
    assert c["target_absent_after_kill"] and c["stale_temp_dir_left"] and c["stale_temp_dir_removed"]
    assert c["no_temp_dirs_left"] and c["output_identical_to_timed_runs"]

    for case in ("ours", "naive"):
        r = res["cases"][case]
        assert len(r["runs"]) == 1 and 0 < r["min_s"] <= r["median_s"]
        # a real process, not the benchmark's own RSS: the loop imports torch (tens of MiB at least);
        # `bonesoup merge` on the CPU imports no torch (issue 17), python + numpy are over 10 MiB
        floor = 10 * 2**20 if case == "ours" else 50 * 2**20
        assert floor < r["max_rss_bytes"] < 4 * 2**30
    # What the run knows exactly: every input read once, the output written once (the ideal), and the
    # coefficients the merge used are the ones the benchmark gave the loop.
    model_bytes, n = res["model"]["weight_bytes_per_checkpoint"], res["model"]["n_backbones"]
    assert res["ideal_bytes"] == (n + 2) * model_bytes  # n backbones + SFT read, one checkpoint written
    report = res["cases"]["ours"]["runs"][0]["report"]  # bonesoup merge's own bonesoup-merge.json
    assert report["bytes_read"] == (n + 1) * model_bytes and report["bytes_written"] == model_bytes
    assert report["bytes_read"] + report["bytes_written"] == res["ideal_bytes"]
    assert [i["coefficient"] for i in report["inputs"]] == pytest.approx(res["coefficients"], abs=1e-12)
    assert abs(sum(res["coefficients"]) - 1.0) < 1e-9  # (1 + alpha) * 1 - alpha
    assert res["speedup_median"] == pytest.approx(res["cases"]["naive"]["median_s"] / res["cases"]["ours"]["median_s"])
    # the last thing printed is the table; outputs were cleaned up, the cached inputs kept
    tail = printed.rstrip().splitlines()[-12:]
    assert any(line.startswith("bonesoup merge (ours)") for line in tail)
    assert any(line.startswith("naive per-tensor loop") for line in tail)
    assert not (tmp_path / "work" / "out" / "ours").exists()
    assert any((tmp_path / "work" / "models").iterdir())

"""benchmarks/bench_serve_preferences.py --quick: the three ways of serving 16 preferences, counted and compared."""

import json

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")


def test_bench_serve_preferences_quick(tmp_path, capsys, load_benchmark):
    mod = load_benchmark("bench_serve_preferences")
    out = tmp_path / "r.json"
    assert mod.main(["--quick", "--rank", "2", "--workdir", str(tmp_path / "w"), "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    table = {x["mode"]: x for x in r["table"]}
    assert set(table) == {"mixture", "group+remerge", "one-at-a-time", "mixture, no wait"}
    assert all(x["requests_per_s"] > 0 and x["tokens_per_s"] > 0 for x in table.values())
    (mix,), (remerge,), (seq,), (now,) = (r["samples"][m] for m in ("mixture", "group+remerge", "one-at-a-time",
                                                                    "mixture, no wait"))
    # Mixture: nothing re-merged, 16 rows in at most a few calls; group + re-merge: one call and (up to the
    # current one) one re-merge per distinct preference; one at a time: one call per request.
    assert mix["remerges"] == 0 and mix["rows"] == 16 and mix["generate_calls"] <= 4
    assert remerge["generate_calls"] == 16 and remerge["remerges"] >= 15
    assert seq["generate_calls"] == 16 and seq["remerges"] == 0
    assert now["remerges"] == 0 and now["rows"] == 16
    assert r["texts_compared"] == 16 and r["text_mismatches"] <= 1  # the same merges (a near-tie at most)
    assert "mixture / group+remerge" in capsys.readouterr().out

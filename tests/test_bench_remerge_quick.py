"""benchmarks/bench_remerge.py runs and reports sane figures (tiny shape)."""

import importlib.util
import json
from pathlib import Path


def test_bench_remerge_quick(tmp_path, capsys):
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_remerge.py"
    spec = importlib.util.spec_from_file_location("bench_remerge", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "r.json"
    assert mod.main(["--quick", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["launches"] == 1 and r["n"] == 2
    assert r["bytes_moved"] == 4 * r["param_bytes"]
    assert all(v > 0 for v in r["best_s"].values())
    assert "set_preference" in capsys.readouterr().out

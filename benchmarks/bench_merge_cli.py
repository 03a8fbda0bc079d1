"""Whole-process `bonesoup merge` on the CPU: the torch-free path vs the torch path vs mergekit-yaml.

The same linear merge (a mergekit YAML config, ``merge_method: linear``)
of n + 1 bf16 checkpoints (n backbones + the SFT model, ~1.1 GB each by
default), run as separate processes, alternated, page cache warm (one
untimed run of each first). Each process's wall time and peak RSS come from
``os.wait4``. Outputs are compared with the float64 reference (and with
each other) in bf16 ulps.

    python benchmarks/bench_merge_cli.py                       # ~1.1 GB x 4 inputs under bench-out/cli
    python benchmarks/bench_merge_cli.py --size-mb 64 --repeats 2
    python benchmarks/bench_merge_cli.py --mergekit /tmp/mk/bin/mergekit-yaml --torch-tree /work/main

Commands timed:

- ``bonesoup --config``: this tree's ``python -m bonesoup merge --config merge.yaml`` (no torch);
- ``bonesoup --no-fsync``: the same with ``--no-fsync`` (no flush to disk before the rename, like mergekit);
- ``bonesoup (torch)``: the same merge with ``--device cpu`` through
  ``bonesoup.merge.offline.merge_checkpoints`` (imports torch), i.e. the path
  ``bonesoup merge`` took before; with ``--torch-tree DIR`` it is that tree's
  ``bonesoup merge`` with flags instead;
- ``mergekit-yaml merge.yaml OUT`` when ``--mergekit`` names the executable
  (install it in a separate venv: its pins may conflict with ours).

The kernel's floor is printed beside them: (inputs + 1) x bytes over the
copy bandwidth measured here, in this process.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent


def build(root: Path, n_inputs: int, size_mb: int, seed: int = 0) -> list[Path]:
    """n_inputs checkpoints of ~size_mb MB: bf16 GPT-2-shaped tensors written with numpy, 2 shards each."""
    sys.path.insert(0, str(REPO))
    from bonesoup.merge.safetensors_file import ShardLayout, ShardWriter

    d = 1024
    per_layer = 12 * d * d  # c_attn (3d^2) + c_proj (d^2) + mlp (8 d^2)
    n_layer = max(2, round(size_mb * 2**20 / 2 / per_layer))
    # every tensor of transformers' GPT2LMHeadModel (tied lm_head omitted, as it saves them)
    shapes = {"transformer.wte.weight": (8192, d), "transformer.wpe.weight": (1024, d)}
    for i in range(n_layer):
        p = f"transformer.h.{i}."
        shapes.update({p + "ln_1.weight": (d,), p + "ln_1.bias": (d,), p + "attn.c_attn.weight": (d, 3 * d),
                       p + "attn.c_attn.bias": (3 * d,), p + "attn.c_proj.weight": (d, d), p + "attn.c_proj.bias": (d,),
                       p + "ln_2.weight": (d,), p + "ln_2.bias": (d,), p + "mlp.c_fc.weight": (d, 4 * d),
                       p + "mlp.c_fc.bias": (4 * d,), p + "mlp.c_proj.weight": (4 * d, d), p + "mlp.c_proj.bias": (d,)})
    shapes.update({"transformer.ln_f.weight": (d,), "transformer.ln_f.bias": (d,)})
    keys = list(shapes)
    halves = [keys[: len(keys) // 2], keys[len(keys) // 2:]]
    config = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "n_embd": d, "n_layer": n_layer,
              "n_head": 16, "vocab_size": 8192, "n_positions": 1024, "torch_dtype": "bfloat16"}
    dirs = []
    for m in range(n_inputs):
        out = root / f"model-{m}"
        dirs.append(out)
        if (out / "model.safetensors.index.json").is_file():
            continue
        out.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(seed + m)
        weight_map = {}
        for s, part in enumerate(halves):
            name = f"model-{s + 1:05d}-of-00002.safetensors"
            layout = ShardLayout(name, [(k, "BF16", shapes[k]) for k in part])
            with ShardWriter(out / name, layout) as w:
                for k in layout.keys:
                    x = rng.standard_normal(int(np.prod(shapes[k])), dtype=np.float32) * 0.02
                    w.write_bytes(k, (x.view(np.uint32) >> 16).astype(np.uint16))  # truncation: any bf16 will do
                    weight_map[k] = name
        total = sum(int(np.prod(v)) * 2 for v in shapes.values())
        (out / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}))
        (out / "config.json").write_text(json.dumps(config))
    return dirs


def timed(cmd: list[str], cwd: Path, env: dict) -> tuple[float, float]:
    """(seconds, peak RSS MiB) of one process."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t0
    err = proc.stderr.read().decode()
    proc.stderr.close()
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{cmd[:4]} failed: {err[-2000:]}")
    return seconds, usage.ru_maxrss / 1024


def bf16_to_f64(u16: np.ndarray) -> np.ndarray:
    return (u16.astype(np.uint32) << 16).view(np.float32).astype(np.float64)


def load_bf16(d: Path) -> dict[str, np.ndarray]:
    """All tensors of a bf16 checkpoint as uint16 arrays (numpy has no bfloat16)."""
    import struct

    out = {}
    for f in sorted(d.glob("*.safetensors")):
        raw = np.memmap(f, dtype=np.uint8, mode="r")
        (n,) = struct.unpack("<Q", raw[:8].tobytes())
        header = json.loads(raw[8:8 + n].tobytes())
        header.pop("__metadata__", None)
        for k, v in header.items():
            if v["dtype"] != "BF16":
                raise ValueError(f"{f}: {k} is {v['dtype']}, expected BF16")
            b, e = v["data_offsets"]
            out[k] = raw[8 + n + b: 8 + n + e].view(np.uint16)
    return out


def ulp_errors(out: Path, ref_terms: list[tuple[float, dict]], other: Path | None) -> tuple[float, float]:
    """Max error of ``out`` vs the float64 reference, and vs ``other`` (or nan), in bf16 ulps.

    The ulp is the bf16 ulp at the reference plus the fp32 accumulation error
    where terms cancel (2^-23 sum_k |c_k x_k|), the bound the tests use: any
    fp32-accumulating merge, mergekit's included, is allowed that much.
    """
    got = load_bf16(out)
    oth = load_bf16(other) if other is not None else None
    worst_ref = worst_other = 0.0
    for k, g in got.items():
        xs = [(c, bf16_to_f64(w[k])) for c, w in ref_terms]
        ref = sum(c * x for c, x in xs)
        mag = sum(abs(c) * np.abs(x) for c, x in xs)
        ulp = np.maximum(np.ldexp(2.0**-8, np.frexp(ref)[1]), 2.0**-133) + 2.0**-23 * mag  # bf16: 8 significant bits
        worst_ref = max(worst_ref, float((np.abs(bf16_to_f64(g) - ref) / ulp).max()))
        if oth is not None:
            worst_other = max(worst_other, float((np.abs(bf16_to_f64(g) - bf16_to_f64(oth[k])) / ulp).max()))
    return worst_ref, worst_other if oth is not None else float("nan")


def copy_bandwidth(nbytes: int = 512 * 2**20) -> float:
    a = np.ones(nbytes // 8)
    b = np.empty_like(a)
    np.copyto(b, a)
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        np.copyto(b, a)
        best = min(best, time.perf_counter() - t0)
    return 2 * nbytes / best  # read + write


def breakdown(cfg: Path, out: Path, repeats: int) -> dict:
    """Where the torch-free run's time goes: interpreter start, imports, the merge with and without the writes."""
    py, env = sys.executable, {**os.environ, "PYTHONPATH": str(REPO)}
    start = min(timed([py, "-c", "pass"], REPO, env)[0] for _ in range(repeats))
    imports = min(timed([py, "-c", "import bonesoup.cli, bonesoup.merge.cpu_merge, bonesoup.merge.mergekit_config, "
                         "soupkernels._C, yaml"], REPO, env)[0] for _ in range(repeats))
    code = """
import sys, time
from bonesoup.merge import cpu_merge
from bonesoup.merge.checkpoint import ShardWriter
from bonesoup.merge.mergekit_config import load_mergekit_config, plan_from_config
plan = plan_from_config(load_mergekit_config(sys.argv[1]))
inputs = [cpu_merge.MergeInput(p, c, r) for p, c, r in plan.inputs]
if sys.argv[3] == "nowrite":
    ShardWriter.write_bytes = lambda self, key, data: setattr(self, "_next", self._next + 1)
    ShardWriter.close = ShardWriter.abort
best = 1e9
for _ in range(int(sys.argv[4])):
    t0 = time.perf_counter()
    cpu_merge.merge_weighted_cpu(inputs, sys.argv[2], dtype=plan.out_dtype, force=True, progress=False)
    best = min(best, time.perf_counter() - t0)
print(best)
"""
    res = {}
    for mode in ("write", "nowrite"):
        run = subprocess.run([py, "-c", code, str(cfg), str(out), mode, str(repeats)], capture_output=True, text=True,
                             cwd=REPO, env=env, check=True)
        res[mode] = float(run.stdout.split()[-1])
    return {"python_start_s": start, "imports_s": imports - start, "merge_s": res["write"],
            "merge_without_writes_s": res["nowrite"], "writes_s": res["write"] - res["nowrite"]}


def compare_configs(workdir: Path, dirs: list[Path], mergekit: str) -> list[dict]:
    """The same YAML files through bonesoup and mergekit-yaml: max difference in bf16 ulps per config."""
    import yaml

    base, models = dirs[-1], dirs[:-1]
    ws = [0.6, -0.2, 0.9][: len(models)]
    rows = []
    for method in ("linear", "task_arithmetic"):
        for normalize in (True, False):
            for dtype in ("float32", None):
                config = {"merge_method": method, "parameters": {"normalize": normalize},
                          "models": [{"model": str(d), "parameters": {"weight": w}} for d, w in zip(models, ws)]}
                if method == "task_arithmetic":
                    config["base_model"] = str(base)
                    config["parameters"]["lambda"] = 0.8
                if dtype:
                    config.update(dtype=dtype, out_dtype="bfloat16")
                name = f"{method}-n{int(normalize)}-{dtype or 'native'}"
                cfg = workdir / f"{name}.yaml"
                cfg.write_text(yaml.safe_dump(config, sort_keys=False))
                ours, theirs = workdir / f"{name}-bonesoup", workdir / f"{name}-mergekit"
                env = {**os.environ, "PYTHONPATH": str(REPO)}
                timed([sys.executable, "-m", "bonesoup", "merge", "--config", str(cfg), "--out", str(ours), "--force",
                       "--no-progress"], REPO, env)
                timed([mergekit, str(cfg), str(theirs)], REPO, os.environ.copy())
                report = json.loads((ours / "bonesoup-merge.json").read_text())
                terms = [(i["coefficient"], load_bf16(Path(i["path"]))) for i in report["inputs"]]
                err_ref, err_mk = ulp_errors(ours, terms, theirs)
                mk_ref, _ = ulp_errors(theirs, terms, None)
                rows.append({"config": name, "ulp_bonesoup_vs_f64": round(err_ref, 3),
                             "ulp_mergekit_vs_f64": round(mk_ref, 3), "ulp_bonesoup_vs_mergekit": round(err_mk, 3)})
                print(rows[-1], flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", type=Path, default=REPO / "bench-out" / "cli")
    p.add_argument("--size-mb", type=int, default=1100, help="per checkpoint")
    p.add_argument("--n", type=int, default=3, help="backbones (plus one SFT model)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--mergekit", help="mergekit-yaml executable (a separate venv)")
    p.add_argument("--torch-tree", type=Path, help="a source tree whose `bonesoup merge` is the torch baseline")
    p.add_argument("--json", type=Path)
    p.add_argument("--compare-configs", action="store_true", help="only: linear / task_arithmetic, with and "
                   "without normalize and dtype, through both tools (needs --mergekit)")
    p.add_argument("--breakdown", action="store_true", help="only the torch-free run's time split (start, imports, "
                   "merge, writes), in-process")
    args = p.parse_args()

    dirs = build(args.workdir / f"inputs-{args.size_mb}mb", args.n + 1, args.size_mb)
    weights = [round(float(w), 6) for w in np.linspace(1.0, 2.0, len(dirs))]
    config = {"merge_method": "linear", "dtype": "float32", "out_dtype": "bfloat16",
              "parameters": {"normalize": True},
              "models": [{"model": str(d), "parameters": {"weight": w}} for d, w in zip(dirs, weights)]}
    import yaml

    cfg = args.workdir / "merge.yaml"
    cfg.write_text(yaml.safe_dump(config, sort_keys=False))
    if args.compare_configs:
        rows = compare_configs(args.workdir, dirs, args.mergekit)
        if args.json:
            args.json.write_text(json.dumps(rows, indent=2))
        return
    if args.breakdown:
        parts = breakdown(cfg, args.workdir / "out-breakdown", args.repeats)
        print("\n".join(f"{k:<24} {v:8.3f}" for k, v in parts.items()))
        return
    coeffs = [w / sum(weights) for w in weights]
    outs = {name: args.workdir / f"out-{i}" for i, name in enumerate(["bonesoup --config", "bonesoup --no-fsync",
                                                                        "bonesoup (torch)", "mergekit-yaml"])}
    py = sys.executable
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    pref = " ".join(str(c) for c in coeffs)
    cmds = {"bonesoup --config": ([py, "-m", "bonesoup", "merge", "--config", str(cfg), "--out",
                                   str(outs["bonesoup --config"]), "--force", "--no-progress"], REPO, env),
            # The same without fsync: what mergekit (and save_pretrained) do; still renamed into place when complete.
            "bonesoup --no-fsync": ([py, "-m", "bonesoup", "merge", "--config", str(cfg), "--out",
                                     str(outs["bonesoup --no-fsync"]), "--force", "--no-progress", "--no-fsync"],
                                    REPO, env)}
    if args.torch_tree:
        tree_env = {**os.environ, "PYTHONPATH": str(args.torch_tree)}
        cmds["bonesoup (torch)"] = ([py, "-m", "bonesoup", "merge", *map(str, dirs), "--method", "rewarded",
                                     "--preference", *pref.split(), "--dtype", "bfloat16", "--out",
                                     str(outs["bonesoup (torch)"]), "--force", "--no-progress"], args.torch_tree,
                                    tree_env)
    else:
        code = ("import sys; from bonesoup.merge.offline import merge_checkpoints; "
                "merge_checkpoints(sys.argv[3:], sys.argv[1], preference=[float(x) for x in sys.argv[2].split()], "
                "method='rewarded', dtype='bfloat16', force=True, progress=False)")
        cmds["bonesoup (torch)"] = ([py, "-c", code, str(outs["bonesoup (torch)"]), pref, *map(str, dirs)], REPO, env)
    if args.mergekit:
        cmds["mergekit-yaml"] = ([args.mergekit, str(cfg), str(outs["mergekit-yaml"])], REPO, os.environ.copy())
    times: dict[str, list[tuple[float, float]]] = {k: [] for k in cmds}
    for name, (cmd, cwd, e) in cmds.items():  # warm the page cache and check each command once
        timed(cmd, cwd, e)
    for _ in range(args.repeats):
        for name, (cmd, cwd, e) in cmds.items():
            times[name].append(timed(cmd, cwd, e))
    ins = [load_bf16(d) for d in dirs]
    terms = list(zip(coeffs, ins))
    nbytes = sum(v.nbytes for v in ins[0].values())
    floor = (len(dirs) + 1) * nbytes / copy_bandwidth()
    base = min(t for t, _ in times["bonesoup --config"])
    rows = []
    for name, ts in times.items():
        err_ref, err_mk = ulp_errors(outs[name], terms, outs["mergekit-yaml"] if "mergekit-yaml" in cmds and
                                     name != "mergekit-yaml" else None)
        best = min(t for t, _ in ts)
        median = sorted(t for t, _ in ts)[len(ts) // 2]
        rows.append({"command": name, "best_s": round(best, 3), "median_s": round(median, 3),
                     "peak_rss_mib": round(max(r for _, r in ts)), "vs_torch_free": round(best / base, 2),
                     "max_ulp_vs_f64": round(err_ref, 3), "max_ulp_vs_mergekit": round(err_mk, 3)})
    print(f"\nlinear merge of {len(dirs)} bf16 checkpoints x {nbytes / 2**20:.0f} MiB (whole processes, warm cache, "
          f"{args.repeats} alternated runs; kernel floor {(floor):.2f} s at the copy bandwidth measured here)")
    print(f"{'command':<20} {'best s':>8} {'median s':>9} {'peak RSS MiB':>13} {'x torch-free':>13} "
          f"{'ulp vs f64':>11} {'ulp vs mk':>10}")
    for r in rows:
        print(f"{r['command']:<20} {r['best_s']:>8.3f} {r['median_s']:>9.3f} {r['peak_rss_mib']:>13} "
              f"{r['vs_torch_free']:>13.2f} {r['max_ulp_vs_f64']:>11.3f} {r['max_ulp_vs_mergekit']:>10.3f}")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "floor_s": floor, "bytes_per_input": nbytes}, indent=2))


if __name__ == "__main__":
    main()

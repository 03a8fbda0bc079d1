"""Offline checkpoint merge: numerics against a float64 reference, layout, atomicity, refusals.

Tiny GPT-2 checkpoints are built in code (bonesoup.tasks.tiny_models); the
reference merge is computed here from the input files with plain torch in
float64, independent of the code under test.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import weakref
from collections import namedtuple
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import soupkernels
from bonesoup.merge import checkpoint as ckpt_mod
from bonesoup.merge import offline as offline_merge
from bonesoup.merge.checkpoint import CheckpointDir, ShardLayout, ShardWriter, clean_stale_temp_dirs
from bonesoup.merge.coefficients import bone_coefficients, fold_extrapolation, rewarded_soup_coefficients
from bonesoup.merge.offline import merge_checkpoints
from bonesoup.tasks.tiny_models import make_tiny_backbones

# --------------------------------------------------------------------------- fixtures and helpers


@pytest.fixture(scope="session")
def single32(tmp_path_factory):
    """SFT + 3 float32 backbones, one model.safetensors each."""
    return make_tiny_backbones(tmp_path_factory.mktemp("single32"), 3, seed=11)


@pytest.fixture(scope="session")
def sharded32(tmp_path_factory):
    """SFT + 2 float32 backbones sharded into several files with an index."""
    sft, bbs = make_tiny_backbones(tmp_path_factory.mktemp("sharded32"), 2, seed=12, shard_size="100KB")
    assert (bbs[0] / "model.safetensors.index.json").is_file()
    assert len(list(bbs[0].glob("model-*-of-*.safetensors"))) > 2
    return sft, bbs


@pytest.fixture(scope="session")
def single_bf16(tmp_path_factory):
    return make_tiny_backbones(tmp_path_factory.mktemp("single_bf16"), 2, seed=13, dtype=torch.bfloat16)


def load_weights(d: Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint directory, read straight from its safetensors files."""
    out = {}
    for f in sorted(Path(d).glob("*.safetensors")):
        out.update(load_file(f))
    return out


def reference_merge(dirs, coeffs) -> tuple[dict, dict]:
    """float64 sum_k c_k x_k and sum_k |c_k x_k| per key."""
    weights = [load_weights(d) for d in dirs]
    ref, mag = {}, {}
    for key in weights[0]:
        xs = [w[key].double() for w in weights]
        ref[key] = sum(c * x for c, x in zip(coeffs, xs))
        mag[key] = sum(abs(c) * x.abs() for c, x in zip(coeffs, xs))
    return ref, mag


def assert_close_to_reference(out_dir, ref, mag, dtype):
    got = load_weights(out_dir)
    assert set(got) == set(ref)
    for key, r in ref.items():
        g = got[key]
        assert g.dtype == dtype, key
        err = (g.double() - r).abs()
        if dtype == torch.float32:
            bound = 1e-6 * mag[key]
        else:
            # one ulp of the output dtype at the reference value (fp32 accumulation, one rounding;
            # subnormals have the fixed ulp smallest_normal * eps), plus the fp32 accumulation
            # error where terms cancel
            fi = torch.finfo(dtype)
            _, e = torch.frexp(r)  # |r| = m 2^e, m in [0.5, 1): ulp = 2^(e - 1) * eps
            ulp = torch.ldexp(torch.full_like(r, fi.eps), e - 1).clamp(min=fi.smallest_normal * fi.eps)
            bound = ulp + 1e-6 * mag[key]
        assert bool((err <= bound).all()), f"{key}: max error {err.max().item():.3g} over the bound"


def dir_entries(parent: Path) -> set[str]:
    return set(os.listdir(parent))


def temp_dirs(parent: Path) -> list[str]:
    return [n for n in os.listdir(parent) if ".bonesoup-" in n]


def rewrite_single(src: Path, dst: Path, edit) -> Path:
    """Copy a single-file checkpoint and rewrite its weights with ``edit(dict) -> dict``."""
    shutil.copytree(src, dst)
    weights = load_file(dst / "model.safetensors")
    save_file(edit(dict(weights)), dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# --------------------------------------------------------------------------- numerics


@pytest.mark.parametrize(
    "method,alpha",
    [("bone", 0.0), ("bone", 0.5), ("rewarded", 0.0), ("rewarded", 0.25)],
)
@pytest.mark.parametrize("layout", ["single32", "sharded32"])
def test_merge_matches_float64_reference(request, tmp_path, layout, method, alpha):
    sft, bbs = request.getfixturevalue(layout)
    n = len(bbs)
    pref = [0.2, 0.3, 0.5][:n] if n == 3 else [0.9, 0.1]
    lam = bone_coefficients(pref, 0.7) if method == "bone" else rewarded_soup_coefficients(pref)
    coeffs, c_sft = fold_extrapolation(lam, alpha)
    out = merge_checkpoints(bbs, tmp_path / "out", preference=pref, beta=0.7 if method == "bone" else None,
                            alpha=alpha, sft=sft if alpha else None, method=method, progress=False)
    assert out == tmp_path / "out"
    dirs, cs = list(bbs), list(coeffs)
    if alpha:
        dirs.append(sft)
        cs.append(c_sft)
    ref, mag = reference_merge(dirs, cs)
    assert_close_to_reference(out, ref, mag, torch.float32)
    report = json.loads((out / "bonesoup-merge.json").read_text())
    assert [i["coefficient"] for i in report["inputs"]] == pytest.approx(cs)
    assert report["method"] == method and report["alpha"] == alpha


def test_negative_coefficients_known_values(tmp_path, single32):
    # beta = 0.7, mu = (1, 0): lambda = (1.75, -0.75) -- negative and never clipped.
    sft, bbs = single32
    out = merge_checkpoints(bbs[:2], tmp_path / "out", preference=[1.0, 0.0], beta=0.7, progress=False)
    ref, mag = reference_merge(bbs[:2], [1.75, -0.75])
    assert_close_to_reference(out, ref, mag, torch.float32)


@pytest.mark.parametrize("alpha", [0.0, 0.3])
def test_bf16_within_one_ulp(tmp_path, single_bf16, alpha):
    sft, bbs = single_bf16
    out = merge_checkpoints(bbs, tmp_path / "out", preference=[0.35, 0.65], beta=0.8, alpha=alpha,
                            sft=sft, progress=False)
    coeffs, c_sft = fold_extrapolation(bone_coefficients([0.35, 0.65], 0.8), alpha)
    dirs, cs = (bbs + [sft], list(coeffs) + [c_sft]) if alpha else (bbs, list(coeffs))
    ref, mag = reference_merge(dirs, cs)
    assert_close_to_reference(out, ref, mag, torch.bfloat16)


@pytest.mark.parametrize("dtype,expect", [("bfloat16", torch.bfloat16), (torch.float16, torch.float16)])
def test_output_dtype_conversion(tmp_path, single32, dtype, expect):
    sft, bbs = single32
    out = merge_checkpoints(bbs[:2], tmp_path / "out", preference=[0.5, 0.5], beta=0.75, dtype=dtype,
                            progress=False)
    ref, mag = reference_merge(bbs[:2], bone_coefficients([0.5, 0.5], 0.75))
    assert_close_to_reference(out, ref, mag, expect)
    assert json.loads((out / "config.json").read_text())["dtype"] == str(expect).removeprefix("torch.")


def test_non_float_tensors_copied_from_first_backbone(tmp_path, single32):
    sft, bbs = single32
    a = rewrite_single(bbs[0], tmp_path / "a", lambda w: {**w, "buf.ids": torch.arange(10, dtype=torch.int64)})
    b = rewrite_single(bbs[1], tmp_path / "b", lambda w: {**w, "buf.ids": torch.arange(10, 20, dtype=torch.int64)})
    out = merge_checkpoints([a, b], tmp_path / "out", preference=[0.4, 0.6], beta=0.7, progress=False)
    got = load_weights(out)
    assert torch.equal(got["buf.ids"], torch.arange(10, dtype=torch.int64))
    report = json.loads((out / "bonesoup-merge.json").read_text())
    assert report["copied_tensors"] == 1 and report["merged_tensors"] == len(got) - 1


# --------------------------------------------------------------------------- layout and loading


def test_output_mirrors_first_backbone_layout(tmp_path, sharded32):
    sft, bbs = sharded32
    out = merge_checkpoints(bbs, tmp_path / "out", preference=[0.5, 0.5], beta=0.7, alpha=0.1, sft=sft,
                            progress=False)
    src_names = sorted(p.name for p in bbs[0].glob("*.safetensors"))
    assert sorted(p.name for p in out.glob("*.safetensors")) == src_names
    src_index = json.loads((bbs[0] / "model.safetensors.index.json").read_text())
    out_index = json.loads((out / "model.safetensors.index.json").read_text())
    assert out_index["weight_map"] == src_index["weight_map"]
    assert out_index["metadata"]["total_size"] == sum(t.nbytes for t in load_weights(out).values())
    for name in src_names:  # same keys per shard, and the metadata transformers insists on
        with safe_open(str(out / name), "pt") as f, safe_open(str(bbs[0] / name), "pt") as g:
            assert set(f.keys()) == set(g.keys())
            assert f.metadata() == {"format": "pt"}
    for side in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (out / side).read_bytes() == (bbs[0] / side).read_bytes(), side
    assert temp_dirs(tmp_path) == []


def test_single_file_stays_single_file(tmp_path, single32):
    sft, bbs = single32
    out = merge_checkpoints(bbs, tmp_path / "out", preference=[0.2, 0.3, 0.5], beta=0.6, progress=False)
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["model.safetensors"]
    assert not (out / "model.safetensors.index.json").exists()


@pytest.mark.parametrize("layout", ["single32", "sharded32"])
def test_merged_checkpoint_loads_and_generates(request, tmp_path, layout):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    sft, bbs = request.getfixturevalue(layout)
    pref = [1 / len(bbs)] * len(bbs)
    pref[-1] = 1 - sum(pref[:-1])
    out = merge_checkpoints(bbs, tmp_path / "out", preference=pref, beta=0.7, alpha=0.2, sft=sft,
                            progress=False)
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    # the tied head is the merged embedding, and the merged weights are what got loaded
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    merged = load_weights(out)
    assert torch.equal(model.transformer.h[0].mlp.c_fc.weight, merged["transformer.h.0.mlp.c_fc.weight"])
    ids = tok(["The user asks"], return_tensors="pt")
    gen = model.generate(**ids, max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)
    assert gen.shape == (1, ids["input_ids"].shape[1] + 5)


# --------------------------------------------------------------------------- refusals before writing


def _assert_nothing_written(parent: Path, before: set[str]):
    assert dir_entries(parent) == before
    assert temp_dirs(parent) == []


def test_missing_key_refused(tmp_path, single32):
    sft, bbs = single32
    key = "transformer.ln_f.bias"
    bad = rewrite_single(bbs[1], tmp_path / "bad", lambda w: {k: v for k, v in w.items() if k != key})
    before = dir_entries(tmp_path)
    with pytest.raises(ValueError, match=rf"'{key}' is in .*backbone-0.model\.safetensors but missing from .*bad"):
        merge_checkpoints([bbs[0], bad], tmp_path / "out", preference=[0.5, 0.5], beta=0.7, progress=False)
    _assert_nothing_written(tmp_path, before)


def test_extra_key_refused(tmp_path, single32):
    sft, bbs = single32
    bad = rewrite_single(bbs[1], tmp_path / "bad", lambda w: {**w, "extra.weight": torch.zeros(3)})
    before = dir_entries(tmp_path)
    with pytest.raises(ValueError, match=r"'extra\.weight'.*bad.*model\.safetensors.*missing from.*backbone-0"):
        merge_checkpoints([bbs[0], bad], tmp_path / "out", preference=[0.5, 0.5], beta=0.7, progress=False)
    _assert_nothing_written(tmp_path, before)


def test_shape_mismatch_refused(tmp_path, single32):
    sft, bbs = single32
    key = "transformer.h.1.ln_2.weight"
    bad = rewrite_single(bbs[1], tmp_path / "bad", lambda w: {**w, key: torch.ones(65)})
    before = dir_entries(tmp_path)
    with pytest.raises(ValueError, match=rf"shape mismatch for key '{key}': \[64\] in .*backbone-0.* \[65\] in .*bad"):
        merge_checkpoints([bbs[0], bad], tmp_path / "out", preference=[0.5, 0.5], beta=0.7, progress=False)
    _assert_nothing_written(tmp_path, before)


def test_dtype_mismatch_refused(tmp_path, single32):
    sft, bbs = single32
    key = "transformer.wpe.weight"
    bad = rewrite_single(bbs[1], tmp_path / "bad", lambda w: {**w, key: w[key].half()})
    before = dir_entries(tmp_path)
    with pytest.raises(ValueError,
                       match=rf"dtype mismatch for key '{key}': torch.float32 in .*backbone-0.*float16 in .*bad"):
        merge_checkpoints([bbs[0], bad], tmp_path / "out", preference=[0.5, 0.5], beta=0.7, progress=False)
    _assert_nothing_written(tmp_path, before)


def test_sft_mismatch_refused(tmp_path, single32):
    sft, bbs = single32
    key = "transformer.h.0.attn.c_proj.bias"
    bad_sft = rewrite_single(sft, tmp_path / "bad_sft", lambda w: {**w, key: torch.zeros(2, 32)})
    before = dir_entries(tmp_path)
    with pytest.raises(ValueError, match=rf"shape mismatch for key '{key}'.*bad_sft"):
        merge_checkpoints(bbs[:2], tmp_path / "out", preference=[0.5, 0.5], beta=0.7, alpha=0.2, sft=bad_sft,
                          progress=False)
    _assert_nothing_written(tmp_path, before)


def test_architecture_mismatch_refused(tmp_path, single32):
    sft, bbs = single32
    bad = tmp_path / "bad"
    shutil.copytree(bbs[1], bad)
    config = json.loads((bad / "config.json").read_text())
    config["architectures"] = ["LlamaForCausalLM"]
    (bad / "config.json").write_text(json.dumps(config))
    before = dir_entries(tmp_path)
    pattern = r"architectures.*GPT2LMHeadModel.*backbone-0.config\.json.*LlamaForCausalLM.*bad.config\.json"
    with pytest.raises(ValueError, match=pattern):
        merge_checkpoints([bbs[0], bad], tmp_path / "out", preference=[0.5, 0.5], beta=0.7, progress=False)
    _assert_nothing_written(tmp_path, before)


def test_float64_tensor_refused(tmp_path, single32):
    sft, bbs = single32
    key = "transformer.ln_f.weight"
    dirs = [rewrite_single(b, tmp_path / f"d{i}", lambda w: {**w, key: w[key].double()}) for i, b in enumerate(bbs[:2])]
    with pytest.raises(ValueError, match=rf"'{key}'.*float64"):
        merge_checkpoints(dirs, tmp_path / "out", preference=[0.5, 0.5], beta=0.7, progress=False)
    assert not (tmp_path / "out").exists()


def test_argument_errors(tmp_path, single32):
    sft, bbs = single32
    out = tmp_path / "out"
    kw = dict(progress=False)
    with pytest.raises(ValueError, match="preference has 2 entries but 3 backbones"):
        merge_checkpoints(bbs, out, preference=[0.5, 0.5], beta=0.7, **kw)
    with pytest.raises(ValueError, match="sft .* is required"):
        merge_checkpoints(bbs[:2], out, preference=[0.5, 0.5], beta=0.7, alpha=0.1, **kw)
    with pytest.raises(ValueError, match="beta is required"):
        merge_checkpoints(bbs[:2], out, preference=[0.5, 0.5], **kw)
    with pytest.raises(ValueError, match="method must be one of"):
        merge_checkpoints(bbs[:2], out, preference=[0.5, 0.5], beta=0.7, method="ties", **kw)
    with pytest.raises(ValueError, match="dtype must be one of"):
        merge_checkpoints(bbs[:2], out, preference=[0.5, 0.5], beta=0.7, dtype="int8", **kw)
    with pytest.raises(ValueError, match="sum to 1"):
        merge_checkpoints(bbs[:2], out, preference=[0.5, 0.6], beta=0.7, **kw)
    with pytest.raises(TypeError, match="sequence of checkpoint directories"):
        merge_checkpoints(str(bbs[0]), out, preference=[0.5, 0.5], beta=0.7, **kw)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            merge_checkpoints(bbs[:2], out, preference=[0.5, 0.5], beta=0.7, device="cuda", **kw)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        merge_checkpoints([bbs[0], tmp_path / "nope"], out, preference=[0.5, 0.5], beta=0.7, **kw)
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text("{}")
    (no_weights / "pytorch_model.bin").write_bytes(b"\x80")
    with pytest.raises(FileNotFoundError, match="pytorch_model.bin.*never loaded"):
        merge_checkpoints([bbs[0], no_weights], out, preference=[0.5, 0.5], beta=0.7, **kw)
    with pytest.raises(ValueError, match="is or contains the input"):
        merge_checkpoints(bbs[:2], bbs[1], preference=[0.5, 0.5], beta=0.7, force=True, **kw)
    # --force into the directory that holds the inputs would delete them
    with pytest.raises(ValueError, match="is or contains the input"):
        merge_checkpoints(bbs[:2], bbs[0].parent, preference=[0.5, 0.5], beta=0.7, force=True, **kw)
    assert all(b.is_dir() for b in bbs[:2])
    assert not out.exists()


# --------------------------------------------------------------------------- atomic output


def test_existing_output_refused_then_replaced_with_force(tmp_path, single32):
    sft, bbs = single32
    out = merge_checkpoints(bbs[:2], tmp_path / "out", preference=[0.5, 0.5], beta=0.7, progress=False)
    first = load_weights(out)
    with pytest.raises(FileExistsError, match="already exists.*force"):
        merge_checkpoints(bbs[:2], out, preference=[0.1, 0.9], beta=0.7, progress=False)
    assert all(torch.equal(first[k], v) for k, v in load_weights(out).items())
    merge_checkpoints(bbs[:2], out, preference=[0.1, 0.9], beta=0.7, force=True, progress=False)
    ref, mag = reference_merge(bbs[:2], bone_coefficients([0.1, 0.9], 0.7))
    assert_close_to_reference(out, ref, mag, torch.float32)
    assert sorted(os.listdir(tmp_path)) == ["out"]  # old copy deleted, no temp dirs


def _fail_on_second_close(monkeypatch):
    real_close = ShardWriter.close
    calls = []

    def close(self):
        calls.append(self.path.name)
        if len(calls) == 2:
            raise OSError(28, "No space left on device (simulated)")
        real_close(self)

    monkeypatch.setattr(ShardWriter, "close", close)
    return calls


def test_failure_mid_write_leaves_nothing(tmp_path, monkeypatch, sharded32):
    sft, bbs = sharded32
    calls = _fail_on_second_close(monkeypatch)
    with pytest.raises(OSError, match="simulated"):
        merge_checkpoints(bbs, tmp_path / "out", preference=[0.5, 0.5], beta=0.7, progress=False)
    assert len(calls) == 2  # one shard had been completed inside the temp dir
    assert os.listdir(tmp_path) == []


def test_failure_mid_write_keeps_existing_output(tmp_path, monkeypatch, sharded32):
    sft, bbs = sharded32
    out = merge_checkpoints(bbs, tmp_path / "out", preference=[0.5, 0.5], beta=0.7, progress=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    _fail_on_second_close(monkeypatch)
    with pytest.raises(OSError, match="simulated"):
        merge_checkpoints(bbs, out, preference=[0.2, 0.8], beta=0.7, force=True, progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert os.listdir(tmp_path) == ["out"]


def test_stale_temp_dir_of_dead_run_is_cleaned(tmp_path, single32):
    sft, bbs = single32
    stale = tmp_path / f".out.bonesoup-tmp-{dead_pid()}-0badc0de"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half written")
    live = tmp_path / f".out.bonesoup-tmp-{os.getpid()}-00c0ffee"  # a run still in progress
    live.mkdir()
    other = tmp_path / f".other.bonesoup-tmp-{dead_pid()}-12345678"  # another target's
    other.mkdir()
    merge_checkpoints(bbs[:2], tmp_path / "out", preference=[0.5, 0.5], beta=0.7, progress=False)
    assert not stale.exists()
    assert live.exists() and other.exists()
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_stale_old_dir_restored_when_target_missing(tmp_path):
    # A run killed between "move old output aside" and "move new one in" left only the old copy.
    old = tmp_path / f".out.bonesoup-old-{dead_pid()}-abcdef01"
    old.mkdir()
    (old / "config.json").write_text("{}")
    clean_stale_temp_dirs(tmp_path / "out")
    assert (tmp_path / "out" / "config.json").read_text() == "{}"
    assert not old.exists()


def test_free_space_checked_before_writing(tmp_path, monkeypatch, single32):
    sft, bbs = single32
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**6, 10**6 - 1000, 1000))
    with pytest.raises(OSError, match="not enough free disk space.*needs.*MiB.*only 1000 B is free"):
        merge_checkpoints(bbs[:2], tmp_path / "out", preference=[0.5, 0.5], beta=0.7, progress=False)
    assert os.listdir(tmp_path) == []


# --------------------------------------------------------------------------- streaming and memory


@pytest.mark.parametrize("layout", ["single32", "sharded32"])
def test_peak_output_memory_is_bounded_by_the_writers_two_batches(request, tmp_path, monkeypatch, layout):
    """Output memory alive at once stays within the writer's overlap: the batch being written plus the one
    being merged (cpu_merge, where merge_checkpoints(device="cpu") runs), each at most one batch (the
    largest tensor if it is bigger).

    Every output array is tracked by a weak reference from the moment the merge makes it, and the writer
    is slowed down so the merge runs as far ahead as the design lets it. An implementation that collected
    a shard (or the model) before writing, or let batches queue up behind a slow disk, fails here.
    """
    import threading
    import time

    import numpy as np

    from bonesoup.merge import cpu_merge

    sft, bbs = request.getfixturevalue(layout)
    limit = 40_000
    monkeypatch.setattr(cpu_merge, "MERGE_BATCH_BYTES", limit)
    tensors = CheckpointDir(bbs[0]).tensors
    largest = max(t.nbytes for t in tensors.values())
    batch_bound = max(limit, largest)
    assert 2 * batch_bound < CheckpointDir(bbs[0]).total_bytes / 2  # the bound is well below "one model"

    live: list[tuple[weakref.ref, int]] = []
    peak = [0]
    lock = threading.Lock()

    def live_bytes() -> int:
        return sum(n for r, n in live if r() is not None)

    real_merge_batch, real_write = cpu_merge._merge_batch, ShardWriter.write_bytes

    def merge_batch(*args, **kwargs):
        with lock:
            before = live_bytes()  # older batches can only die while this one is merged: an upper bound
        outs = real_merge_batch(*args, **kwargs)
        owned = [o for o in outs if isinstance(o, np.ndarray) and o.base is None]  # not views of the inputs
        with lock:
            live.extend((weakref.ref(o), o.nbytes) for o in owned)
            peak[0] = max(peak[0], before + sum(o.nbytes for o in owned))
        return outs

    def slow_write(self, key, data):
        time.sleep(0.003)  # a slow disk: the merge gets ahead of the writer
        real_write(self, key, data)

    monkeypatch.setattr(cpu_merge, "_merge_batch", merge_batch)
    monkeypatch.setattr(ShardWriter, "write_bytes", slow_write)
    out = merge_checkpoints(bbs, tmp_path / "out", preference=[1 / 2, 1 / 2][: len(bbs)] if len(bbs) == 2
                            else [0.2, 0.3, 0.5], beta=0.7, progress=False)
    merged = [k for k, t in tensors.items() if t.dtype.is_floating_point]
    assert len(live) == len(merged) == len(load_weights(out))  # every merged output was tracked
    assert batch_bound < peak[0] <= 2 * batch_bound, f"{peak[0]} output bytes alive at once"


def test_shard_writer_round_trip_mixed_dtypes(tmp_path):
    tensors = {
        "a.bool": torch.tensor([True, False, True]),
        "b.f16": torch.randn(3, 5, generator=torch.Generator().manual_seed(0)).half(),
        "c.i64": torch.arange(7),
        "d.bf16": torch.randn(9, generator=torch.Generator().manual_seed(1)).bfloat16(),
        "e.f32": torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(2)),
        "f.empty": torch.empty(0, 4),
        "g.scalar": torch.tensor(3.5),
        "h.u8": torch.arange(5, dtype=torch.uint8),
    }
    layout = ShardLayout("x.safetensors", [(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()])
    assert [tensors[k].dtype.itemsize for k in layout.keys] == sorted(
        (v.dtype.itemsize for v in tensors.values()), reverse=True)
    with ShardWriter(tmp_path / "x.safetensors", layout) as w:
        for k in layout.keys:
            w.write(k, tensors[k])
    assert (tmp_path / "x.safetensors").stat().st_size == layout.file_size
    back = load_file(tmp_path / "x.safetensors")
    assert set(back) == set(tensors)
    for k, v in tensors.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v), k
    with safe_open(str(tmp_path / "x.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}


def test_shard_writer_refuses_out_of_plan(tmp_path):
    layout = ShardLayout("x.safetensors", [("a", torch.float32, (2,)), ("b", torch.float32, (3,))])
    w = ShardWriter(tmp_path / "x.safetensors", layout)
    with pytest.raises(ValueError, match="expected key 'a' next, got 'b'"):
        w.write("b", torch.zeros(3))
    with pytest.raises(ValueError, match="planned as torch.float32 \\[2\\]"):
        w.write("a", torch.zeros(2, dtype=torch.float16))
    w.write("a", torch.zeros(2))
    with pytest.raises(ValueError, match="closed before key 'b'"):
        w.close()


def test_checkpoint_dir_reads_headers(single32, sharded32):
    for d in (single32[1][0], sharded32[1][0]):
        ck = CheckpointDir(d)
        weights = load_weights(d)
        assert set(ck.keys) == set(weights)
        for k, t in ck.tensors.items():
            assert t.shape == tuple(weights[k].shape) and t.dtype == weights[k].dtype
        assert ck.total_bytes == sum(v.nbytes for v in weights.values())
        assert "config.json" in ck.side_files and "tokenizer.json" in ck.side_files
        assert not any(f.endswith((".safetensors", ".index.json")) for f in ck.side_files)
        assert ck.config["model_type"] == "gpt2"
    sharded = CheckpointDir(sharded32[1][0])
    assert sharded.sharded and sharded.shards == sorted(sharded.shards) and len(sharded.shards) > 2
    index = json.loads((sharded32[1][0] / "model.safetensors.index.json").read_text())
    assert sharded.weight_map == index["weight_map"]


def test_parse_dtype():
    # one dtype table (issue 12): bonesoup's names are soupkernels' own
    assert ckpt_mod.parse_dtype is soupkernels.parse_dtype
    assert ckpt_mod.MERGEABLE_DTYPES == soupkernels.SUPPORTED_DTYPES
    assert ckpt_mod.parse_dtype(None) is None
    assert ckpt_mod.parse_dtype("bf16") is torch.bfloat16
    assert ckpt_mod.parse_dtype("torch.float16") is torch.float16
    assert ckpt_mod.parse_dtype(torch.float32) is torch.float32
    with pytest.raises(ValueError, match="dtype must be one of"):
        ckpt_mod.parse_dtype(torch.float64)


def test_tiny_backbones_are_deterministic(tmp_path):
    sft_a, (bb_a,) = make_tiny_backbones(tmp_path / "a", 1, seed=5)
    sft_b, (bb_b,) = make_tiny_backbones(tmp_path / "b", 1, seed=5)
    wa, wb, ws = load_weights(bb_a), load_weights(bb_b), load_weights(sft_a)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert all(not torch.equal(wa[k], ws[k]) for k in wa)  # every tensor perturbed
    assert (bb_a / "tokenizer.json").read_bytes() == (bb_b / "tokenizer.json").read_bytes()


def test_truncated_shard_refused_before_writing(tmp_path):
    sft, bbs = make_tiny_backbones(tmp_path / "in", 2, seed=5)
    shard = bbs[1] / "model.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 1000])
    with pytest.raises(ValueError, match=r"truncated: key .* ends at byte"):
        merge_checkpoints(bbs, tmp_path / "out", preference=[0.5, 0.5], beta=0.7, progress=False)
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if "bonesoup-tmp" in p.name]


def test_stale_temp_dir_of_reused_pid_is_cleaned(tmp_path):
    """Same pid as a live process but another start time: the writer is dead."""
    from bonesoup.merge.checkpoint import _process_start

    start = _process_start(os.getpid())
    if start is None:
        pytest.skip("no /proc here")
    reused = tmp_path / f".out.bonesoup-tmp-{os.getpid()}.{start + 12345}-0badc0de"
    mine = tmp_path / f".out.bonesoup-tmp-{os.getpid()}.{start}-00c0ffee"
    reused.mkdir()
    mine.mkdir()
    removed = clean_stale_temp_dirs(tmp_path / "out")
    assert removed == [reused] and mine.is_dir()


@pytest.mark.gpu
def test_cuda_offline_merge_matches_cpu(tmp_path):
    sft, bbs = make_tiny_backbones(tmp_path / "in", 2, seed=9, dtype=torch.bfloat16, shard_size="100KB")
    kw = dict(preference=[0.6, 0.4], beta=0.7, alpha=0.1, sft=sft, progress=False)
    cpu = merge_checkpoints(bbs, tmp_path / "cpu", **kw)
    gpu = merge_checkpoints(bbs, tmp_path / "gpu", device="cuda", **kw)
    for f in sorted(p.name for p in cpu.glob("*.safetensors")):
        a, b = load_file(cpu / f), load_file(gpu / f)
        for k in a:  # Triton and C++ both accumulate in fp32: at most one bf16 ulp apart
            torch.testing.assert_close(b[k].float(), a[k].float(), rtol=2**-7, atol=1e-6)

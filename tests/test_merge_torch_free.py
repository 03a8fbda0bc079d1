"""The torch-free CPU merge (bonesoup/merge/cpu_merge.py): no torch imported, same files as the torch path.

The torch path (bonesoup.merge.offline) is checked against a float64
reference in test_checkpoint_merge.py; here the torch-free path must write
byte-identical shards over layouts, methods, extrapolation, output dtypes and
batch sizes, plus its own float64 check, its refusals and its failure modes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from bonesoup.merge import cpu_merge
from bonesoup.merge.checkpoint import ShardWriter
from bonesoup.merge.cpu_merge import MergeInput, merge_checkpoints_cpu, merge_weighted_cpu
from bonesoup.merge.offline import merge_checkpoints
from bonesoup.tasks.tiny_models import make_tiny_backbones

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    return make_tiny_backbones(tmp_path_factory.mktemp("tf_sharded"), 3, seed=21, shard_size="100KB")


@pytest.fixture(scope="module")
def bf16(tmp_path_factory):
    return make_tiny_backbones(tmp_path_factory.mktemp("tf_bf16"), 2, seed=22, dtype=torch.bfloat16)


def weights(d: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(Path(d).glob("*.safetensors")):
        out.update(load_file(f))
    return out


def same_files(a: Path, b: Path) -> None:
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    for name in names:
        if name != "bonesoup-merge.json":
            assert (a / name).read_bytes() == (b / name).read_bytes(), name
    ra, rb = (json.loads((d / "bonesoup-merge.json").read_text()) for d in (a, b))
    ra.pop("seconds"), rb.pop("seconds")
    assert ra == rb


def _run(code: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, cwd=REPO,
                          timeout=120)


_NO_TORCH = """
import sys
from bonesoup.cli import main
try:
    rc = main(sys.argv[1:])
except SystemExit as exc:
    rc = exc.code
heavy = sorted(m for m in ("torch", "transformers", "safetensors.torch") if m in sys.modules)
print("HEAVY", heavy, "RC", rc)
"""


def test_cli_merge_and_help_never_import_torch(sharded, tmp_path):
    sft, bbs = sharded
    help_run = _run(_NO_TORCH, "merge", "--help")
    assert "HEAVY [] RC 0" in help_run.stdout, help_run.stdout + help_run.stderr
    argv = ["merge", *map(str, bbs), "--out", str(tmp_path / "out"), "--preference", "0.2", "0.3", "0.5",
            "--beta", "0.7", "--alpha", "0.25", "--sft", str(sft), "--no-progress"]
    run = _run(_NO_TORCH, *argv)
    assert "HEAVY [] RC 0" in run.stdout, run.stdout + run.stderr
    merge_checkpoints(bbs, tmp_path / "ref", preference=[0.2, 0.3, 0.5], beta=0.7, alpha=0.25, sft=sft,
                      progress=False)
    same_files(tmp_path / "out", tmp_path / "ref")


@pytest.mark.parametrize("method, alpha", [("bone", 0.0), ("bone", 0.4), ("rewarded", 0.0), ("rewarded", -0.3)])
@pytest.mark.parametrize("dtype", [None, "bfloat16", "float16"])
def test_same_bytes_as_the_torch_path(sharded, tmp_path, monkeypatch, method, alpha, dtype):
    sft, bbs = sharded
    monkeypatch.setattr(cpu_merge, "MERGE_BATCH_BYTES", 20_000)  # many batches, tensors split across them
    kw = dict(preference=[0.6, 0.1, 0.3], beta=0.8, alpha=alpha, sft=sft if alpha else None, method=method,
              dtype=dtype, progress=False)
    merge_checkpoints_cpu(bbs, tmp_path / "cpu", **kw)
    merge_checkpoints(bbs, tmp_path / "torch", **kw)
    same_files(tmp_path / "cpu", tmp_path / "torch")


def test_bf16_matches_float64_reference_within_one_ulp(bf16, tmp_path):
    sft, bbs = bf16
    out = merge_checkpoints_cpu(bbs, tmp_path / "out", preference=[0.9, 0.1], beta=0.7, alpha=0.5, sft=sft,
                                progress=False)
    report = json.loads((out / "bonesoup-merge.json").read_text())
    coeffs = [i["coefficient"] for i in report["inputs"]]
    ins = [weights(d) for d in (*bbs, sft)]
    for key, got in weights(out).items():
        assert got.dtype == torch.bfloat16
        xs = [w[key].double() for w in ins]
        ref = sum(c * x for c, x in zip(coeffs, xs))
        mag = sum(abs(c) * x.abs() for c, x in zip(coeffs, xs))
        # one bf16 ulp at the reference (fp32 accumulation, one rounding), plus the fp32
        # accumulation error where terms cancel (as test_checkpoint_merge bounds the torch path)
        fi = torch.finfo(torch.bfloat16)
        _, e = torch.frexp(ref)
        ulp = torch.ldexp(torch.full_like(ref, fi.eps), e - 1).clamp(min=fi.smallest_normal * fi.eps)
        err = (got.double() - ref).abs()
        assert (err <= ulp + 1e-6 * mag).all(), f"{key}: max error {err.max().item():.3g}"


def test_weighted_sum_with_a_zero_coefficient_skips_that_input(sharded, tmp_path):
    sft, bbs = sharded
    inputs = [MergeInput(bbs[0], 0.75, "model"), MergeInput(bbs[1], 0.0, "model"), MergeInput(sft, 0.25, "base")]
    out = merge_weighted_cpu(inputs, tmp_path / "out", progress=False)
    report = json.loads((out / "bonesoup-merge.json").read_text())
    total = sum(t.nbytes for t in weights(bbs[0]).values())
    assert report["bytes_read"] == 2 * total and report["bytes_written"] == total
    a, s = weights(bbs[0]), weights(sft)
    for key, got in weights(out).items():
        torch.testing.assert_close(got.double(), 0.75 * a[key].double() + 0.25 * s[key].double(), rtol=0, atol=1e-6)


def _single(src: Path, dst: Path, edit) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        if not f.name.endswith(".safetensors") and not f.name.endswith(".index.json"):
            (dst / f.name).write_bytes(f.read_bytes())
    save_file(edit(weights(src)), str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def test_integer_buffers_are_copied_from_the_first_input(bf16, tmp_path):
    sft, bbs = bf16
    a = _single(bbs[0], tmp_path / "a", lambda w: {**w, "buf.ids": torch.arange(10)})
    b = _single(bbs[1], tmp_path / "b", lambda w: {**w, "buf.ids": torch.arange(10, 20)})
    out = merge_checkpoints_cpu([a, b], tmp_path / "out", preference=[0.5, 0.5], beta=0.7, progress=False)
    assert torch.equal(weights(out)["buf.ids"], torch.arange(10))


def test_overflow_and_nan_are_refused_naming_the_key(bf16, tmp_path):
    sft, bbs = bf16
    key = "transformer.ln_f.weight"
    big = _single(bbs[0], tmp_path / "big", lambda w: {**w, key: torch.full_like(w[key], 3e38)})
    with pytest.raises(ValueError, match=rf"{key}.*overflows torch.bfloat16"):
        merge_checkpoints_cpu([big, bbs[1]], tmp_path / "o1", preference=[0.9, 0.1], beta=0.7, progress=False)
    nan = _single(bbs[0], tmp_path / "nan", lambda w: {**w, key: w[key].clone().index_fill_(0, torch.tensor([3]),
                                                                                        float("nan"))})
    with pytest.raises(ValueError, match=rf"{key}.*holds NaN"):
        merge_checkpoints_cpu([nan, bbs[1]], tmp_path / "o2", preference=[0.5, 0.5], beta=0.7, progress=False)
    inf = _single(bbs[0], tmp_path / "inf", lambda w: {**w, key: torch.full_like(w[key], float("-inf"))})
    out = merge_checkpoints_cpu([inf, bbs[1]], tmp_path / "o3", preference=[0.5, 0.5], beta=0.7, progress=False)
    assert torch.isneginf(weights(out)[key].float()).all()  # an input's own -inf stays -inf: not an error
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("o")) == ["o3"]


def test_failure_in_the_writer_thread_leaves_nothing(sharded, tmp_path, monkeypatch):
    sft, bbs = sharded
    real = ShardWriter.write_bytes
    calls = []

    def write_bytes(self, key, data):
        calls.append(key)
        if len(calls) == 20:
            raise OSError(28, "No space left on device (simulated)")
        real(self, key, data)

    monkeypatch.setattr(ShardWriter, "write_bytes", write_bytes)
    monkeypatch.setattr(cpu_merge, "MERGE_BATCH_BYTES", 20_000)
    with pytest.raises(OSError, match="simulated"):
        merge_checkpoints_cpu(bbs, tmp_path / "out", preference=[0.2, 0.3, 0.5], beta=0.7, progress=False)
    assert os.listdir(tmp_path) == []


def test_misaligned_tensors_are_merged(bf16, tmp_path):
    """A valid file whose header length is odd maps 2-byte tensors at odd addresses: they are copied first."""
    sft, bbs = bf16
    dirs = []
    for i, b in enumerate(bbs):
        d = _single(b, tmp_path / f"m{i}", lambda w: w)
        raw = (d / "model.safetensors").read_bytes()
        n = int.from_bytes(raw[:8], "little")
        header = raw[8:8 + n].rstrip(b" ") + b" "  # pad to an odd length: JSON allows trailing spaces
        header += b" " * (1 - len(header) % 2)
        (d / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + raw[8 + n:])
        assert len(header) % 2 == 1
        dirs.append(d)
    out = merge_checkpoints_cpu(dirs, tmp_path / "out", preference=[0.3, 0.7], beta=0.7, progress=False)
    ref = merge_checkpoints_cpu(bbs, tmp_path / "ref", preference=[0.3, 0.7], beta=0.7, progress=False)
    got, want = weights(out), weights(ref)
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_no_fsync_writes_the_same_files_without_a_single_fsync(sharded, tmp_path, monkeypatch):
    sft, bbs = sharded
    kw = dict(preference=[0.2, 0.3, 0.5], beta=0.7, alpha=0.1, sft=sft, progress=False)
    durable = merge_checkpoints_cpu(bbs, tmp_path / "durable", **kw)
    calls = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: calls.append(fd) or real(fd))
    merge_checkpoints_cpu(bbs, tmp_path / "checked", **kw)
    assert calls, "the default path must fsync (else this test checks nothing)"
    calls.clear()
    fast = merge_checkpoints_cpu(bbs, tmp_path / "fast", fsync=False, **kw)
    assert calls == []
    same_files(durable, fast)
    # The CLI flag reaches the same path.
    from bonesoup.cli import main

    assert main(["merge", *map(str, bbs), "--out", str(tmp_path / "cli"), "--preference", "0.2", "0.3", "0.5",
                 "--beta", "0.7", "--alpha", "0.1", "--sft", str(sft), "--no-fsync", "--no-progress"]) == 0
    assert calls == []
    same_files(durable, tmp_path / "cli")

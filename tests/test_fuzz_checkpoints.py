"""Hostile checkpoints: a clear error naming the file, or a correct merge; never a file outside the output.

First the named case classes of issue 13 (path traversal through the index,
symlinks out of the directory, JSON bombs, headers the safetensors library
would refuse later, coefficients finite only in float64, overflowing
merges), then property tests (hypothesis, derandomized, a few seconds each)
that mutate valid files and indexes and check the invariants: a header we
accept loads through the safetensors library with the same bytes, every
file we read lies inside its checkpoint directory, and a merge we complete
equals the float64 reference.
"""

from __future__ import annotations

import json
import math
import os
import struct
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from bonesoup.merge.checkpoint import CheckpointDir
from bonesoup.merge.offline import merge_checkpoints
from merge_checks import assert_merged

FAST = settings(derandomize=True, max_examples=150, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
CONFIG = {"model_type": "toy", "architectures": ["Toy"]}
KW = dict(beta=0.7, progress=False)


def tensors(seed: int, dtype=torch.float32, scale: float = 1.0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"a": (scale * torch.randn(2, 3, generator=g)).to(dtype),
            "b": (scale * torch.randn(5, generator=g)).to(dtype),
            "steps": torch.tensor([seed], dtype=torch.int64)}


def write_ckpt(d: Path, ts: dict, *, shards: dict[str, list[str]] | None = None, config=None) -> Path:
    """config.json + model.safetensors, or the named shard files + an index (``shards``: file -> keys)."""
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps(CONFIG if config is None else config))
    if shards is None:
        save_file(ts, d / "model.safetensors", metadata={"format": "pt"})
    else:
        for name, keys in shards.items():
            save_file({k: ts[k] for k in keys}, d / name, metadata={"format": "pt"})
        weight_map = {k: name for name, keys in shards.items() for k in keys}
        (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return d


def raw_file(path: Path, header, data: bytes, *, pad: bytes = b"", length: int | None = None) -> Path:
    body = (header if isinstance(header, bytes) else json.dumps(header).encode()) + pad
    path.write_bytes(struct.pack("<Q", len(body) if length is None else length) + body + data)
    return path


def tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def reference(dirs, coeffs) -> dict[str, torch.Tensor]:
    ws = [load_file(Path(d) / "model.safetensors") for d in dirs]
    return {k: [w[k] for w in ws] for k in ws[0]}


# --------------------------------------------------------------------------- named case classes


@pytest.fixture
def pair(tmp_path):
    return [write_ckpt(tmp_path / f"bb{i}", tensors(i)) for i in range(2)]


def test_index_path_traversal_is_refused(tmp_path, pair):
    victim = write_ckpt(tmp_path / "victim", tensors(99))
    entries = ["../victim/model.safetensors", str(victim / "model.safetensors"), "sub/../../victim/model.safetensors"]
    for entry in entries:
        d = tmp_path / f"evil{abs(hash(entry))}"
        write_ckpt(d, tensors(5), shards={"model-00001-of-00001.safetensors": ["a", "b", "steps"]})
        idx = d / "model.safetensors.index.json"
        index = json.loads(idx.read_text())
        index["weight_map"]["a"] = entry
        idx.write_text(json.dumps(index))
        before = tree(tmp_path)
        with pytest.raises(ValueError, match=r"model.safetensors.index.json.*leaves the checkpoint directory"):
            merge_checkpoints([d, pair[1]], tmp_path / "out", preference=[0.5, 0.5], **KW)
        assert tree(tmp_path) == before


def test_symlinks_out_of_the_directory_are_refused(tmp_path, pair):
    victim = write_ckpt(tmp_path / "victim", tensors(99))
    cases = {"model.safetensors": victim / "model.safetensors", "config.json": victim / "config.json",
             "tokenizer.json": tmp_path / "secret.txt"}
    (tmp_path / "secret.txt").write_text("not yours")
    for name, target in cases.items():
        d = write_ckpt(tmp_path / f"link-{name}", tensors(1))
        (d / name).unlink(missing_ok=True)
        (d / name).symlink_to(target)
        with pytest.raises(ValueError, match=rf"{name}.*resolves to {target}, outside the checkpoint directory"):
            merge_checkpoints([d, pair[1]], tmp_path / "out", preference=[0.5, 0.5], **KW)
        assert not (tmp_path / "out").exists()


def test_symlinks_inside_and_the_hub_cache_layout_are_followed(tmp_path, pair):
    # A link inside the directory is copied as a file with the link's contents.
    d = write_ckpt(tmp_path / "inside", tensors(0))
    (d / "tokenizer_real.json").write_text('{"v": 1}')
    (d / "tokenizer.json").symlink_to("tokenizer_real.json")
    out = merge_checkpoints([d, pair[1]], tmp_path / "out", preference=[0.5, 0.5], **KW)
    assert not (out / "tokenizer.json").is_symlink() and (out / "tokenizer.json").read_text() == '{"v": 1}'
    # huggingface_hub's cache: snapshots/<rev>/<file> -> ../../blobs/<hash>
    repo = tmp_path / "models--toy--bb0"
    snap = write_ckpt(repo / "snapshots" / "abc123", tensors(0))
    (repo / "blobs").mkdir()
    for name in ("model.safetensors", "config.json"):
        os.replace(snap / name, repo / "blobs" / f"hash-{name}")
        (snap / name).symlink_to(Path("../../blobs") / f"hash-{name}")
    assert CheckpointDir(snap).keys == CheckpointDir(pair[0]).keys


def test_output_shard_names_never_come_from_the_input_index(tmp_path, pair):
    d = write_ckpt(tmp_path / "odd", tensors(0), shards={"weights-b.safetensors": ["b"],
                                                         "weights-a.safetensors": ["a", "steps"]})
    e = write_ckpt(tmp_path / "odd2", tensors(1), shards={"x.safetensors": ["a", "b", "steps"]})
    out = merge_checkpoints([d, e], tmp_path / "out", preference=[0.3, 0.7], **KW)
    names = sorted(p.name for p in out.glob("*.safetensors"))
    assert names == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(names)
    assert set(CheckpointDir(out).keys_in("model-00001-of-00002.safetensors")) == {"a", "steps"}


@pytest.mark.parametrize("where", ["config.json", "model.safetensors.index.json", "header"])
def test_deeply_nested_json_is_a_clear_error(tmp_path, pair, where):
    bomb = "[" * 100_000 + "]" * 100_000
    d = write_ckpt(tmp_path / "bomb", tensors(0), shards={"model-00001-of-00001.safetensors": ["a", "b", "steps"]})
    if where == "header":
        raw_file(d / "model-00001-of-00001.safetensors", f'{{"x": {bomb}}}'.encode(), b"")
    else:
        text = (d / where).read_text()
        (d / where).write_text(text[:-1] + f', "deep": {bomb}}}')
    with pytest.raises(ValueError, match=rf"{where if where != 'header' else 'safetensors'}.*nested 100001 levels"):
        CheckpointDir(d)


_VALID = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
          "b": {"dtype": "I64", "shape": [1], "data_offsets": [8, 16]}}


@pytest.mark.parametrize("edit, data_len, message", [
    (lambda h: h["b"].update(data_offsets=[9, 17]), 17, "contiguous"),                 # a gap the library refuses
    (lambda h: h["b"].update(data_offsets=[4, 12]), 16, "contiguous"),                 # overlapping keys
    (lambda h: None, 20, "trailing bytes"),                                            # data no tensor covers
    (lambda h: None, 12, "truncated"),
    (lambda h: h["a"].update(data_offsets=[0.0, 8]), 16, "data_offsets"),              # JSON types: 0.0
    (lambda h: h["a"].update(shape=[True, 2]), 16, "shape"),                           # true is not 1
    (lambda h: h["a"].update(shape=["2"]), 16, "shape"),
    (lambda h: h["a"].update(dtype="F128"), 16, "dtype"),
    (lambda h: h["a"].update(extra=1), 16, "exactly dtype, shape and data_offsets"),
    (lambda h: h.update(__metadata__={"format": 1}), 16, "__metadata__"),
    (lambda h: h["a"].update(data_offsets=[0, 8, 9]), 16, "data_offsets"),
])
def test_headers_the_library_would_refuse_are_refused_up_front(tmp_path, edit, data_len, message):
    header = json.loads(json.dumps(_VALID))
    edit(header)
    d = tmp_path / "ck"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(CONFIG))
    raw_file(d / "model.safetensors", header, bytes(data_len))
    with pytest.raises(ValueError, match=message) as err:
        CheckpointDir(d)
    assert str(d / "model.safetensors") in str(err.value)


def test_duplicate_keys_and_nan_literals_are_refused(tmp_path):
    d = tmp_path / "ck"
    d.mkdir()
    (d / "config.json").write_text('{"model_type": "toy", "model_type": "evil"}')
    with pytest.raises(ValueError, match=r"config.json is not valid JSON: duplicate key 'model_type'"):
        CheckpointDir(d)
    (d / "config.json").write_text('{"model_type": NaN}')
    with pytest.raises(ValueError, match=r"config.json is not valid JSON: NaN"):
        CheckpointDir(d)


def test_header_length_not_a_multiple_of_8_merges_correctly(tmp_path, pair):
    ts = tensors(7)
    d = tmp_path / "odd-header"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(CONFIG))
    save_file(ts, d / "tmp.safetensors", metadata={"format": "pt"})
    data = (d / "tmp.safetensors").read_bytes()
    (d / "tmp.safetensors").unlink()
    (n,) = struct.unpack("<Q", data[:8])
    header = data[8 : 8 + n].rstrip(b" ")
    pad = b" " * ((3 - len(header)) % 8)  # header length = 3 (mod 8): every tensor lands unaligned
    raw_file(d / "model.safetensors", header, data[8 + n :], pad=pad)
    assert (len(header) + len(pad)) % 8 == 3
    out = merge_checkpoints([d, pair[1]], tmp_path / "out", preference=[0.25, 0.75], **KW)
    merged = load_file(out / "model.safetensors")
    coeffs = [1.75 * 0.25 - 0.75 * 0.75, -0.75 * 0.25 + 1.75 * 0.75]  # B^-1 mu at beta 0.7
    for key, xs in reference([d, pair[1]], coeffs).items():
        if xs[0].dtype.is_floating_point:
            assert_merged(merged[key], xs, coeffs)


def test_coefficients_beyond_float32_are_refused_naming_alpha(tmp_path, pair):
    sft = write_ckpt(tmp_path / "sft", tensors(3))
    with pytest.raises(ValueError, match=r"alpha=1e\+39 .* beyond float32's range"):
        merge_checkpoints(pair, tmp_path / "out", preference=[0.5, 0.5], alpha=1e39, sft=sft, **KW)
    assert not (tmp_path / "out").exists()


def test_overflowing_merge_is_refused_naming_the_key(tmp_path, pair):
    sft = write_ckpt(tmp_path / "sft", tensors(3))
    overflow = r"key '(a|b)' \(in .*bb0/model.safetensors and 2 more input\(s\)\): the merge overflows torch.float16"
    with pytest.raises(ValueError, match=overflow):
        merge_checkpoints(pair, tmp_path / "out", preference=[0.9, 0.1], alpha=1e5, sft=sft, dtype="float16", **KW)
    assert not (tmp_path / "out").exists()
    # the same extrapolation into float32 fits, and is correct
    out = merge_checkpoints(pair, tmp_path / "out", preference=[0.9, 0.1], alpha=1e5, sft=sft, **KW)
    assert torch.isfinite(load_file(out / "model.safetensors")["a"]).all()


def test_nan_weights_are_refused_naming_key_and_file(tmp_path, pair):
    ts = tensors(4)
    ts["b"][2] = float("nan")
    d = write_ckpt(tmp_path / "nan", ts)
    with pytest.raises(ValueError, match=rf"key 'b' in {d / 'model.safetensors'} holds NaN"):
        merge_checkpoints([pair[0], d], tmp_path / "out", preference=[0.5, 0.5], **KW)


def test_force_over_a_symlinked_output_leaves_nothing_behind(tmp_path, pair):
    real = tmp_path / "real-out"
    link = tmp_path / "out"
    merge_checkpoints(pair, real, preference=[0.5, 0.5], **KW)
    link.symlink_to(real)
    for pref in ([0.2, 0.8], [0.6, 0.4]):
        merge_checkpoints(pair, link, preference=pref, force=True, **KW)
        assert not [n for n in os.listdir(tmp_path) if ".bonesoup-" in n]
    assert link.is_dir() and not link.is_symlink() and (real / "model.safetensors").is_file()


@pytest.mark.parametrize("index, message", [
    ({"weight_map": []}, "weight_map"),
    ({"weight_map": {}}, "non-empty"),
    ({"weight_map": {"a": 3}}, "maps 'a' to 3"),
    ({"weight_map": {"a": "model.safetensors"}, "metadata": []}, "metadata"),
    ([1, 2], "weight_map"),
])
def test_index_errors_name_the_index(tmp_path, index, message):
    d = write_ckpt(tmp_path / "ck", tensors(0))
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=message) as err:
        CheckpointDir(d)
    assert str(d / "model.safetensors.index.json") in str(err.value)


# --------------------------------------------------------------------------- property tests

_JSON = st.recursive(st.none() | st.booleans() | st.integers(-3, 2**65) | st.floats(allow_nan=True)
                     | st.text(max_size=4), lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=3), c,
                                                                                                  max_size=3),
                     max_leaves=6)
_BASE = {"__metadata__": {"format": "pt"},
         "w": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
         "h": {"dtype": "BF16", "shape": [4], "data_offsets": [24, 32]},
         "n": {"dtype": "U8", "shape": [3], "data_offsets": [32, 35]},
         "e": {"dtype": "F16", "shape": [0, 2], "data_offsets": [35, 35]}}
_FIELD_VALUES = {"dtype": st.sampled_from(["F32", "F16", "BF16", "I64", "U8", "BOOL", "F8_E4M3", "f32", "Q4"]),
                 "shape": st.lists(st.integers(-1, 7), max_size=3),
                 "data_offsets": st.lists(st.integers(-1, 40), min_size=1, max_size=3)}


@st.composite
def mutated_file(draw):
    header = json.loads(json.dumps(_BASE))
    deep = 0
    for _ in range(draw(st.sampled_from([0, 1, 1, 1, 2, 3]))):
        op = draw(st.sampled_from(["field", "json", "drop", "metadata", "offset-shift", "deep"]))
        key = draw(st.sampled_from(["w", "h", "n", "e"]))
        field = draw(st.sampled_from(list(_FIELD_VALUES)))
        if op == "field":
            header[key][field] = draw(_FIELD_VALUES[field])
        elif op == "json":
            header[key][field] = draw(_JSON)
        elif op == "drop":
            header[key].pop(field, None)
        elif op == "metadata":
            header["__metadata__"] = draw(_JSON)
        elif op == "offset-shift":
            d = draw(st.integers(-3, 3))
            offsets = header[key].get("data_offsets")
            if isinstance(offsets, list) and all(type(o) is int for o in offsets):
                header[key]["data_offsets"] = [o + d for o in offsets]
        else:
            deep = draw(st.integers(1, 200))
    body = json.dumps(header).encode()
    if deep:  # a nested list: [[[...]]]
        body = body[:-1] + b', "deep": ' + b"[" * deep + b"]" * deep + b"}"
    # Mostly well-formed around the mutation, so that accepted files are common enough to check.
    pad = draw(st.sampled_from([b"", b"", b" ", b"     ", b"\n", b"\x00", b"x"]))
    data = draw(st.binary(min_size=35, max_size=35)) + bytes(draw(st.sampled_from([0, 0, 0, 0, 1, 5])))
    data = data[: draw(st.sampled_from([40, 40, 40, 40, 34, 0]))]
    length = draw(st.sampled_from([None] * 6 + [0, 1, 2**63, len(body) + 100]))
    return body, pad, data, length


def _library_loads(path: Path):
    """{key: (dtype, shape, bytes)} as the safetensors library reads the file, or None if it refuses."""
    try:
        with safe_open(str(path), framework="pt") as f:
            out = {}
            for k in f.keys():
                t = f.get_tensor(k)
                out[k] = (t.dtype, tuple(t.shape), t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
            return out
    except Exception:
        return None


@FAST
@given(mutated_file())
def test_a_header_we_accept_never_fails_later(case):
    body, pad, data, length = case
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        (d / "config.json").write_text(json.dumps(CONFIG))
        path = raw_file(d / "model.safetensors", body, data, pad=pad, length=length)
        try:
            ck = CheckpointDir(d)
        except (ValueError, OSError) as exc:
            assert str(path) in str(exc)
            return
        lib = _library_loads(path)
        assert lib is not None, "we accepted a file the safetensors library refuses"
        start = path.stat().st_size - sum(t.nbytes for t in ck.tensors.values())
        raw = path.read_bytes()
        assert set(lib) == set(ck.tensors)
        for key, info in ck.tensors.items():
            dtype, shape, got = lib[key]
            assert (dtype, shape) == (info.dtype, info.shape)
            assert got == raw[start + info.offset : start + info.offset + info.nbytes]


_ENTRIES = ["s1.safetensors", "s2.safetensors", "./s1.safetensors", "../victim/model.safetensors", "ABS",
            "link_out.safetensors", "link_in.safetensors", "missing.safetensors", "sub/../s2.safetensors", "", 3,
            None, "s1.safetensors\x00"]


@FAST
@given(a=st.sampled_from(_ENTRIES), b=st.sampled_from(_ENTRIES), merge=st.booleans())
def test_an_index_never_reads_or_writes_outside(a, b, merge):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        victim = write_ckpt(root / "victim", {"a": torch.full((3,), 1e3), "b": torch.full((2,), 1e3)})
        d = write_ckpt(root / "ck", {"a": torch.ones(3), "b": torch.ones(2)},
                       shards={"s1.safetensors": ["a"], "s2.safetensors": ["b"]})
        (d / "link_out.safetensors").symlink_to(victim / "model.safetensors")
        (d / "link_in.safetensors").symlink_to("s1.safetensors")
        other = write_ckpt(root / "other", {"a": torch.zeros(3), "b": torch.zeros(2)})
        wm = {"a": str(victim / "model.safetensors") if a == "ABS" else a,
              "b": str(victim / "model.safetensors") if b == "ABS" else b}
        (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wm}))
        before = tree(root)
        try:
            ck = CheckpointDir(d)
        except (ValueError, OSError) as exc:
            assert "model.safetensors.index.json" in str(exc) or str(d) in str(exc)
            return
        assert all(p.resolve().is_relative_to(d.resolve()) for p in ck._files.values())
        if merge:
            out = merge_checkpoints([d, other], root / "out", preference=[1.0, 0.0], method="rewarded",
                                    progress=False)
            assert tree(root) - before == {"out"} | {f"out/{p}" for p in tree(out)}
            merged = {}
            for f in out.glob("*.safetensors"):
                merged.update(load_file(f))
            assert all(bool((t == 1).all()) for t in merged.values()), "read another checkpoint's weights"


_ALPHAS = st.sampled_from([0.0, 0.3, -0.2, 1e4, 1e39, 1e300])


@settings(derandomize=True, max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(2, 3), w=st.lists(st.floats(0.01, 1.0), min_size=3, max_size=3), alpha=_ALPHAS,
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
       out_dtype=st.sampled_from([None, "float16", "bfloat16", "float32"]), scale=st.sampled_from([1.0, 1e4, 3e38]),
       seed=st.integers(0, 1000))
def test_a_merge_we_complete_equals_the_float64_reference(n, w, alpha, dtype, out_dtype, scale, seed):
    pref = [x / sum(w[:n]) for x in w[:n]]
    pref[-1] = 1.0 - sum(pref[:-1])
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        scale = min(scale, torch.finfo(dtype).max / 8)  # finite inputs; the merge may still overflow
        bbs = [write_ckpt(root / f"bb{i}", tensors(seed + i, dtype, scale)) for i in range(n)]
        sft = write_ckpt(root / "sft", tensors(seed + 10, dtype, scale))
        try:
            out = merge_checkpoints(bbs, root / "out", preference=pref, alpha=alpha, sft=sft, dtype=out_dtype, **KW)
        except ValueError as exc:
            assert any(s in str(exc) for s in ("alpha", "overflows", "NaN", "inf")), exc
            assert not (root / "out").exists()
            return
        report = json.loads((out / "bonesoup-merge.json").read_text())
        coeffs = [i["coefficient"] for i in report["inputs"]]
        merged = load_file(out / "model.safetensors")
        for key, xs in reference([*bbs, sft], coeffs).items():
            if xs[0].dtype.is_floating_point:
                ref = sum(c * x.double() for c, x in zip(coeffs, xs))
                assert math.isfinite(ref.abs().max().item())
                assert_merged(merged[key], xs, coeffs)
            else:
                assert torch.equal(merged[key], xs[0])

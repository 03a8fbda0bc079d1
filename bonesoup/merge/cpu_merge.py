"""The offline merge on the CPU without torch: memory-mapped files straight into ``soupkernels._C``.

``bonesoup merge`` on the CPU spends most of a torch-based run starting
Python and importing torch, which the C++ kernel does not need: it takes raw
addresses, dtype codes and sizes. This module does the same streamed merge as
:func:`bonesoup.merge.offline.merge_checkpoints` with the standard library,
numpy and the extension only:

    out = sum_k c_k x_k   (fp32 accumulation, one pass per batch of tensors)

- Headers, configs and layouts come from the checkpoint layer
  (:class:`~bonesoup.merge.checkpoint.CheckpointDir`, ``validate_compatible``,
  ``ShardLayout``/``ShardWriter``, ``atomic_output_dir``): the same strict
  rules, confined paths, fixed output names, fsynced shards, atomic rename.
- Each input file is ``mmap``-ed once; a tensor is an address inside it.
- Keys are merged in batches of about :data:`MERGE_BATCH_BYTES` of output;
  a writer thread appends batch i to its shard while the kernel merges batch
  i + 1 (both release the GIL); batch i + 2 waits for batch i to be written,
  so at most two batches of output are alive (:class:`~bonesoup.merge.shard_stream.ShardStream`).
- Every merged output is checked for non-finite values with two integer
  reductions over its bits (no temporaries); a flagged tensor is compared
  with the float64 reference to tell an overflow from an input's own inf/NaN.
- Optional per-key ``deltas`` (float32 arrays, e.g. LoRA adapters' weighted
  deltas from :mod:`bonesoup.merge.adapter_merge`) are one more input of the
  same kernel call, coefficient 1: ``out = sum_k c_k x_k + delta``.
"""

from __future__ import annotations

import json
import logging
import mmap
import os
import re
import shutil
import struct
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Protocol, Sequence

import numpy as np

from soupkernels._dtypes import NAME_CODE, NAME_TO_SAFETENSORS, parse_dtype_name

from .checkpoint import (
    MERGEABLE_ST_DTYPES,
    MERGE_REPORT_NAME,
    CheckpointDir,
    ShardLayout,
    atomic_output_dir,
    copy_side_files,
    finish_shards,
    output_shard_names,
    validate_compatible,
)
from .coefficients import merge_coefficients
from .methods import get_merge_method
from .safetensors_file import ST_ITEMSIZE, TensorInfo, dtype_label
from .shard_stream import Progress, ShardStream

__all__ = ["MERGE_BATCH_BYTES", "FLOAT32_MAX", "MergeInput", "DeltaSource", "check_deltas",
           "check_float32_coefficients", "check_output_dir", "preference_inputs", "merge_checkpoints_cpu",
           "merge_weighted_cpu"]

log = logging.getLogger(__name__)

#: Output bytes per kernel call: as in bonesoup.merge.offline (same memory bound, < 1% per-call overhead).
MERGE_BATCH_BYTES = 32 * 2**20
#: Largest finite float32: coefficients beyond it are not representable in the kernels' precision.
FLOAT32_MAX = float(np.finfo(np.float32).max)

_ST_CODE = {st: NAME_CODE[name] for name, st in NAME_TO_SAFETENSORS.items()}
# Non-finite iff the exponent bits are all ones: as signed ints, a positive inf/NaN is >= the
# threshold; as unsigned, a negative one is >= the sign bit + threshold. Two max-reductions, no
# temporaries (numpy has no bfloat16 to call isfinite on anyway).
_NONFINITE = {"F32": (np.int32, np.uint32, 0x7F800000), "BF16": (np.int16, np.uint16, 0x7F80),
              "F16": (np.int16, np.uint16, 0x7C00)}


@dataclass(frozen=True)
class MergeInput:
    """One term ``coefficient * checkpoint`` of the weighted sum; ``role`` is for the report."""

    path: Path
    coefficient: float
    role: str


class DeltaSource(Protocol):
    """Per-key additions to a merge: ``shapes()`` {key: shape}, ``delta(key)`` float32 C-contiguous of that shape."""

    name: str

    def shapes(self) -> dict[str, tuple[int, ...]]: ...

    def delta(self, key: str) -> np.ndarray: ...


def check_deltas(first: CheckpointDir, deltas: DeltaSource) -> None:
    """Refuse deltas for keys the layout checkpoint lacks, of another shape, or on tensors that are not merged."""
    for key, shape in deltas.shapes().items():
        info = first.tensors.get(key)
        if info is None:
            raise ValueError(f"{deltas.name} changes {key!r}, which checkpoint {first.path} does not hold")
        if tuple(info.shape) != tuple(shape):
            raise ValueError(f"{deltas.name} changes {key!r} with shape {list(shape)} but it is {list(info.shape)} "
                             f"in {first.file_of(key)}")
        if info.st_dtype not in MERGEABLE_ST_DTYPES:
            raise ValueError(f"{deltas.name} changes {key!r}, a {dtype_label(info.st_dtype)} tensor of "
                             f"{first.file_of(key)}; only float tensors are merged")


def check_output_dir(out_dir: str | os.PathLike, inputs: Sequence[str | os.PathLike], force: bool) -> Path:
    """Refuse an ``out_dir`` that is or contains an input (``force`` would delete it) or exists without ``force``."""
    out_dir = Path(out_dir)
    for p in map(Path, inputs):
        if p.exists() and out_dir.exists() and p.resolve().is_relative_to(out_dir.resolve()):
            raise ValueError(f"out_dir {out_dir} is or contains the input {p}; write the output somewhere else")
    if out_dir.exists() and not force:
        raise FileExistsError(f"output directory {out_dir} already exists; pass force=True (--force) to replace it")
    return out_dir


def check_float32_coefficients(coeffs: Sequence[float], given: str) -> None:
    """Refuse coefficients that are finite in float64 but not in float32, the kernels' precision."""
    for c in coeffs:
        if not np.isfinite(c) or abs(float(c)) > FLOAT32_MAX:
            raise ValueError(f"{given} give the merge coefficient {float(c):.6g}, beyond float32's range "
                             f"({FLOAT32_MAX:.4g}), the precision of the merge kernels")


def preference_inputs(backbones: Sequence[str | os.PathLike], *, preference: Sequence[float],
                      beta: float | None = None, alpha: float = 0.0, sft: str | os.PathLike | None = None,
                      method: str = "bone") -> tuple[list[MergeInput], dict]:
    """A preference merge as one weighted sum: its inputs (backbones, then the SFT if given) and report fields.

    Validates the arguments (method, lengths, float32 range, ``sft`` when alpha extrapolates) before any
    file is read; shared by the CPU path and :func:`bonesoup.merge.offline.merge_checkpoints` on CUDA.
    """
    spec = get_merge_method(method)
    if isinstance(backbones, (str, os.PathLike)):
        raise TypeError(f"backbones must be a sequence of checkpoint directories, got the single path {backbones!r}")
    pref = list(preference)
    if len(backbones) != len(pref):
        raise ValueError(f"preference has {len(pref)} entries but {len(backbones)} backbones were given; "
                         "they must match (one weight per backbone)")
    coeffs, sft_coeff = merge_coefficients(pref, method=method, beta=beta, alpha=alpha)
    check_float32_coefficients([*coeffs, sft_coeff], f"preference {pref}, beta={beta!r}, alpha={alpha!r}")
    if sft_coeff != 0.0 and sft is None:
        raise ValueError(f"alpha={alpha!r} extrapolates away from the SFT model, so sft (its checkpoint "
                         "directory) is required")
    inputs = [MergeInput(Path(b), float(c), "backbone") for b, c in zip(backbones, coeffs)]
    if sft is not None:
        inputs.append(MergeInput(Path(sft), float(sft_coeff), "sft"))
    report = {"method": method, "preference": [float(x) for x in pref],
              "beta": None if not spec.needs_beta or beta is None else float(beta), "alpha": float(alpha)}
    return inputs, report


def merge_checkpoints_cpu(
    backbones: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    *,
    preference: Sequence[float],
    beta: float | None = None,
    alpha: float = 0.0,
    sft: str | os.PathLike | None = None,
    method: str = "bone",
    dtype: str | None = None,
    force: bool = False,
    progress: bool = True,
    fsync: bool = True,
) -> Path:
    """:func:`bonesoup.merge.offline.merge_checkpoints` on the CPU, without importing torch.

    Same parameters (less ``device``), same output files and report, same
    errors; see that function. ``dtype`` is a name (``"bfloat16"``, ``"bf16"``, ...) or a torch dtype.
    ``fsync``: see :func:`merge_weighted_cpu`.
    """
    inputs, report = preference_inputs(backbones, preference=preference, beta=beta, alpha=alpha, sft=sft,
                                       method=method)
    return merge_weighted_cpu(inputs, out_dir, dtype=dtype, force=force, progress=progress, report=report,
                              fsync=fsync)


def merge_weighted_cpu(
    inputs: Sequence[MergeInput],
    out_dir: str | os.PathLike,
    *,
    dtype: str | None = None,
    force: bool = False,
    progress: bool = True,
    report: dict | None = None,
    tokenizer_from: str | os.PathLike | None = None,
    deltas: DeltaSource | None = None,
    fsync: bool = True,
) -> Path:
    """Write ``sum_k inputs[k].coefficient * inputs[k]`` as a checkpoint directory ``out_dir``.

    Parameters
    ----------
    inputs : sequence of MergeInput, length >= 1
        Checkpoint directories and their coefficients (float64, must fit float32).
        The first one's shard layout, config, side files and non-float tensors
        are the output's (mergekit: the base model). Inputs with coefficient
        exactly 0 are validated but not read.
    out_dir : path
        Output directory; must not exist unless ``force``.
    dtype : {None, "float32", "bfloat16", "float16"}
        Output dtype of the merged tensors; None keeps each tensor's input dtype.
    report : dict, optional
        Fields put first in ``bonesoup-merge.json`` (method, preference, ...).
    tokenizer_from : path, optional
        Checkpoint directory whose tokenizer files (``tokenizer*``, vocab,
        merges, ``special_tokens_map.json``, ``*.model``) replace the layout
        input's (mergekit's ``tokenizer_source``); every other side file
        comes from the layout input.
    deltas : DeltaSource, optional
        Added to the weighted sum of the keys it names (fp32 accumulation in the same pass).
    fsync : bool
        fsync every file and directory before the output is renamed into place (default: after a power
        loss the output is absent or complete). False: still renamed into place only when complete, but
        the kernel flushes it later (``bonesoup merge --no-fsync``; mergekit does not fsync).

    Returns
    -------
    Path
        ``out_dir``, complete, with ``bonesoup-merge.json``.
    """
    started = time.perf_counter()
    if not inputs:
        raise ValueError("nothing to merge: no input checkpoints")
    check_float32_coefficients([i.coefficient for i in inputs], "the inputs")
    out_name = parse_dtype_name(dtype)
    out_st = None if out_name is None else NAME_TO_SAFETENSORS[out_name]
    out_dir = check_output_dir(out_dir, [i.path for i in inputs], force)

    # 1. Headers only; refuse disagreements before writing.
    checkpoints = [CheckpointDir(i.path) for i in inputs]
    tok_ckpt = CheckpointDir(tokenizer_from) if tokenizer_from is not None else None
    first = checkpoints[0]
    validate_compatible(checkpoints)
    if deltas is not None:
        check_deltas(first, deltas)
    used = [(ck, i.coefficient) for ck, i in zip(checkpoints, inputs) if i.coefficient != 0.0] or [(first, 0.0)]

    # 2. Plan the output: the layout input's files, each tensor's output dtype.
    def out_st_of(info: TensorInfo) -> str:
        return out_st if out_st is not None and info.st_dtype in MERGEABLE_ST_DTYPES else info.st_dtype

    names = output_shard_names(len(first.shards), first.sharded)
    layouts = [ShardLayout(name, [(k, out_st_of(first.tensors[k]), first.tensors[k].shape)
                                  for k in first.keys_in(shard)])
               for name, shard in zip(names, first.shards)]
    data_bytes = sum(lay.data_size for lay in layouts)
    side_bytes = sum((ck.path / name).stat().st_size for ck in (first, tok_ckpt) if ck for name in ck.side_files)
    required = sum(lay.file_size for lay in layouts) + side_bytes + 2**20
    config_updates = {k: out_name for k in ("dtype", "torch_dtype") if k in first.config} or {"dtype": out_name} \
        if out_name is not None else None

    # 3. Stream: merge batch i + 1 while a writer thread appends batch i.
    stats = {"bytes_read": 0, "bytes_written": 0, "merged_tensors": 0, "copied_tensors": 0}
    with atomic_output_dir(out_dir, force=force, required_bytes=required, fsync=fsync) as tmp:
        copy_side_files(first, tmp, config_updates=config_updates)
        if tok_ckpt is not None:
            _replace_tokenizer(first, tok_ckpt, tmp)
        with Progress(data_bytes, len(used), progress) as bar, ExitStack() as stack:
            maps = _Maps(stack)
            writer = ShardStream(tmp, stats, bar, fsync=fsync)
            try:
                for batch in _batches(layouts, first, out_st_of):
                    writer.reserve()  # at most two batches of output alive: this one and the one being written
                    writer.put(batch, _merge_batch(batch, first, used, maps, stats, deltas))
                    maps.release()  # copied tensors still queued are views: they fault back in if needed
                writer.finish()
            except BaseException:
                writer.abort()  # before the files are unmapped: the thread may still read them
                raise
        finish_shards(tmp, layouts, first, data_bytes)
        seconds = time.perf_counter() - started
        body = {
            **(report or {}),
            "dtype": out_name,
            "device": "cpu",
            "inputs": [{"path": str(i.path.absolute()), "role": i.role, "coefficient": i.coefficient}
                       for i in inputs],
            **stats,
            "seconds": round(seconds, 3),
        }
        (tmp / MERGE_REPORT_NAME).write_text(json.dumps(body, indent=2) + "\n")
    log.info("merged %d checkpoints into %s in %.2f s (coefficients %s; %d bytes read, %d written)",
             len(used), out_dir, seconds, [round(c, 6) for _, c in used], stats["bytes_read"],
             stats["bytes_written"])
    return out_dir


_TOKENIZER_FILE_RE = re.compile(r"tokenizer.*|special_tokens_map\.json|added_tokens\.json|vocab\..*|merges\.txt|"
                                r".*\.model|chat_template\..*")


def _replace_tokenizer(first: CheckpointDir, source: CheckpointDir, tmp: Path) -> None:
    """The output's tokenizer files become ``source``'s (none of ``first``'s are kept, so they never mix)."""
    names = [n for n in source.side_files if _TOKENIZER_FILE_RE.fullmatch(n)]
    if not names:
        raise ValueError(f"tokenizer source {source.path} holds no tokenizer files (tokenizer.json, "
                         "tokenizer_config.json, vocab, merges, ...)")
    for name in first.side_files:
        if _TOKENIZER_FILE_RE.fullmatch(name):
            (tmp / name).unlink()
    for name in names:
        shutil.copyfile(source.side_file_path(name), tmp / name)


# --------------------------------------------------------------------------- batches


@dataclass
class _Batch:
    """Consecutive keys of one output shard (in its write order), merged in one pass."""

    layout: ShardLayout
    keys: list[str]
    out_st: list[str]


def _batches(layouts: Sequence[ShardLayout], first: CheckpointDir, out_st_of) -> Iterator[_Batch]:
    """Cut each shard's keys into batches of at most MERGE_BATCH_BYTES output bytes (a larger tensor alone)."""
    limit = MERGE_BATCH_BYTES  # read at call time so tests can shrink it
    for layout in layouts:
        keys: list[str] = []
        size = 0
        for key in layout.keys:
            nbytes = first.tensors[key].numel * ST_ITEMSIZE[out_st_of(first.tensors[key])]
            if keys and size + nbytes > limit:
                yield _Batch(layout, keys, [out_st_of(first.tensors[k]) for k in keys])
                keys, size = [], 0
            keys.append(key)
            size += nbytes
        if keys:
            yield _Batch(layout, keys, [out_st_of(first.tensors[k]) for k in keys])


class _Maps:
    """Each weight file mapped once (read-only), closed with the stack.

    Pages a batch touched are dropped from this process's page tables once
    the batch is merged (:meth:`release`, ``MADV_DONTNEED``: the data stays in
    the page cache, a later read faults it back in), so the resident set stays
    near one batch of inputs, not whole models, although the files stay mapped.
    """

    def __init__(self, stack: ExitStack):
        self._stack = stack
        self._maps: dict[Path, tuple[mmap.mmap, int, int]] = {}
        self._touched: dict[Path, tuple[int, int]] = {}  # byte range read since the last release

    def tensor(self, ck: CheckpointDir, key: str) -> np.ndarray:
        """``key``'s bytes in ``ck`` as a uint8 array viewing the mapping (copied only if misaligned)."""
        path = ck.resolved_file(ck.tensors[key].file)
        if path not in self._maps:
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else None
            if mm is None:
                raise ValueError(f"{path} is empty")
            self._stack.callback(_close_map, mm)
            (header_len,) = struct.unpack_from("<Q", mm, 0)  # read_header validated it when the checkpoint opened
            self._maps[path] = (mm, 8 + header_len, size)
        mm, data_start, size = self._maps[path]
        info = ck.tensors[key]
        begin = data_start + info.offset
        if begin + info.nbytes > size:  # the file changed since its header was read
            raise ValueError(f"{path}: key {key!r} ends at byte {begin + info.nbytes}, past the file's {size} bytes "
                             "(was the file modified during the merge?)")
        lo, hi = self._touched.get(path, (begin, begin + info.nbytes))
        self._touched[path] = (min(lo, begin), max(hi, begin + info.nbytes))
        arr = np.frombuffer(mm, dtype=np.uint8, count=info.nbytes, offset=begin)
        # A valid file whose header length is not a multiple of the element size maps tensors at
        # unaligned addresses, which the kernel does not take: copy those to aligned memory.
        return arr.copy() if info.nbytes and arr.ctypes.data % info.itemsize else arr


    def release(self) -> None:
        """Drop the pages read since the last call from the resident set (safe: they are file-backed)."""
        for path, (lo, hi) in self._touched.items():
            mm = self._maps[path][0]
            start = lo - lo % mmap.PAGESIZE
            if hi > start:
                mm.madvise(mmap.MADV_DONTNEED, start, hi - start)
        self._touched.clear()


def _close_map(mm: mmap.mmap) -> None:
    try:
        mm.close()
    except BufferError:  # an array still views it (an error's traceback): unmapped when that is freed
        pass


def _merge_batch(batch: _Batch, first: CheckpointDir, used, maps: _Maps, stats: dict,
                 deltas: DeltaSource | None = None) -> list[np.ndarray]:
    """The batch's output bytes, one uint8 array per key (merged, or viewed from the layout input)."""
    from soupkernels.cpp_merge import merge_pointers

    coeffs = [c for _, c in used]
    changed = deltas.shapes() if deltas is not None else {}
    outs: list[np.ndarray] = []
    # (input code, output code, has a delta) -> positions, one kernel call each
    groups: dict[tuple[int, int, bool], list[int]] = {}
    ins: dict[int, list[np.ndarray]] = {}
    for pos, (key, out_st) in enumerate(zip(batch.keys, batch.out_st)):
        info = first.tensors[key]
        if info.st_dtype not in MERGEABLE_ST_DTYPES:  # integer / bool buffers: copied
            outs.append(maps.tensor(first, key))
            stats["bytes_read"] += info.nbytes
            stats["copied_tensors"] += 1
            continue
        outs.append(np.empty(info.numel * ST_ITEMSIZE[out_st], dtype=np.uint8))
        stats["merged_tensors"] += 1
        if info.numel:
            ins[pos] = [maps.tensor(ck, key) for ck, _ in used]
            stats["bytes_read"] += info.nbytes * len(used)
            if key in changed:
                d = np.ascontiguousarray(deltas.delta(key), dtype=np.float32)
                if d.size != info.numel:
                    raise ValueError(f"{deltas.name}: the delta of {key!r} has {d.size} elements, not {info.numel}")
                ins[pos].append(d.reshape(-1).view(np.uint8))
            groups.setdefault((_ST_CODE[info.st_dtype], _ST_CODE[out_st], key in changed), []).append(pos)
    for (in_code, out_code, has_delta), positions in groups.items():
        k = coeffs + [1.0] if has_delta else coeffs
        in_sts = [first.tensors[batch.keys[positions[0]]].st_dtype] * len(used) + (["F32"] if has_delta else [])
        merge_pointers([outs[p].ctypes.data for p in positions], out_code,
                       [x.ctypes.data for p in positions for x in ins[p]], [_ST_CODE[st] for st in in_sts], k,
                       [first.tensors[batch.keys[p]].numel for p in positions],
                       out_itemsize=ST_ITEMSIZE[batch.out_st[positions[0]]])
        for p in positions:
            key = batch.keys[p]
            names = [str(ck.file_of(key)) for ck, _ in used] + ([deltas.name] if has_delta else [])
            _check_finite(key, batch.out_st[p], outs[p], ins[p], in_sts, names, k)
    return outs


# --------------------------------------------------------------------------- finiteness


def _decode(data: np.ndarray, st: str) -> np.ndarray:
    """Raw little-endian bytes of a kernel dtype -> float64 (exact)."""
    if st == "BF16":
        return (data.view(np.uint16).astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    return data.view(np.float16 if st == "F16" else np.float32).astype(np.float64)


def _check_finite(key: str, out_st: str, out: np.ndarray, ins: list[np.ndarray], in_sts: list[str],
                  names: list[str], coeffs: list[float]) -> None:
    """Refuse an output that is not what the float64 reference gives (overflow, NaN); see offline._check_finite.

    ``ins[k]`` holds ``in_sts[k]`` data from ``names[k]`` (the weight file, or a delta source).
    """
    signed, unsigned, threshold = _NONFINITE[out_st]
    sign = np.iinfo(unsigned).max ^ np.iinfo(signed).max  # the sign bit
    if out.view(signed).max() < threshold and out.view(unsigned).max() < sign + threshold:
        return
    where = f"key {key!r} (in {names[0]} and {len(ins) - 1} more input(s))"
    xs = [_decode(x, st) for x, st in zip(ins, in_sts)]
    for name, x in zip(names, xs):
        if np.isnan(x).any():
            raise ValueError(f"key {key!r} in {name} holds NaN values; refusing to merge it")
    with np.errstate(all="ignore"):
        ref = sum(c * x for c, x in zip(coeffs, xs))
    if np.isnan(ref).any():
        raise ValueError(f"{where}: the inputs' infinite values cancel into NaN at the coefficients {coeffs}")
    wrong = ~np.isfinite(_decode(out, out_st)) & np.isfinite(ref)
    if wrong.any():
        raise ValueError(f"{where}: the merge overflows {dtype_label(out_st)} (the float64 reference reaches "
                         f"{np.abs(ref[wrong]).max():.4g}) at coefficients {coeffs}; lower alpha, "
                         "or merge into --dtype float32")

"""Offline merge of Hugging Face checkpoints: Bone Soup / Rewarded Soup on disk.

One call turns n backbone checkpoints (+ optionally the SFT checkpoint) and a
preference into one merged checkpoint directory:

    out = sum_j c_j theta_j + c_sft theta_sft,
    c = (1 + alpha) * lambda,  c_sft = -alpha,
    lambda = B^-1 mu (Bone Soup) or mu (Rewarded Soup).

The merge streams: for each output shard (the first backbone's layout), keys
are taken in batches of about :data:`MERGE_BATCH_BYTES` of output, the inputs
are memory-mapped, merged in one pass and appended to the shard file. Peak
memory is a batch or two of output plus the mapped input pages of a batch,
not one model (nor one shard).

On the CPU the merge is :func:`bonesoup.merge.cpu_merge.merge_checkpoints_cpu`
(memory-mapped files into ``soupkernels._C``, writes overlapped with the
next batch's merge): one home for it. This module adds the CUDA path
(``soupkernels.merge_many`` on the GPU, uploads double-buffered).
"""

from __future__ import annotations

import json
import logging
import os
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import torch
from tqdm.auto import tqdm

import soupkernels as sk

from .checkpoint import (
    MERGEABLE_DTYPES,
    MERGE_REPORT_NAME,
    CheckpointDir,
    ShardLayout,
    ShardWriter,
    atomic_output_dir,
    copy_side_files,
    finish_shards,
    output_shard_names,
    parse_dtype,
    validate_compatible,
)
from .cpu_merge import check_output_dir, merge_checkpoints_cpu, preference_inputs

__all__ = ["MERGE_BATCH_BYTES", "merge_checkpoints"]

log = logging.getLogger(__name__)

#: Output bytes merged per ``merge_many`` call. The working set of a merge is
#: about (inputs + 1) x max(this, largest tensor) (mapped input pages plus the
#: output batch), so it bounds peak memory whatever the model or shard size
#: (HF shards are often 5 GB). Measured on the 808 MB-per-checkpoint preset
#: of benchmarks/bench_checkpoint_merge.py (3 backbones + SFT): peak RSS 519
#: MiB at 64 MiB, 414 MiB at 32 MiB (223 MiB is python + torch). 32 MiB is
#: still ~5 ms of kernel time per call on 2 cores: per-call overhead < 1%.
MERGE_BATCH_BYTES = 32 * 2**20


def merge_checkpoints(
    backbones: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    *,
    preference: Sequence[float],
    beta: float | None = None,
    alpha: float = 0.0,
    sft: str | os.PathLike | None = None,
    method: str = "bone",
    dtype: str | torch.dtype | None = None,
    device: str | torch.device = "cpu",
    force: bool = False,
    progress: bool = True,
) -> Path:
    """Merge checkpoint directories with preference weights into ``out_dir``.

    Parameters
    ----------
    backbones : sequence of path, length n >= 2
        Checkpoint directories (config.json + safetensors), one per objective,
        in the order of ``preference``. The first one's shard layout, config
        and tokenizer files are used for the output.
    out_dir : path
        Output directory; must not exist unless ``force``.
    preference : sequence of float, length n
        The user preference mu (non-negative, sums to 1).
    beta : float, optional
        Backbone mixing strength in (0.5, 1); required for ``method="bone"``,
        ignored for ``"rewarded"``.
    alpha : float, default 0.0
        Extrapolation away from the SFT model:
        ``(1 + alpha) sum_j lambda_j theta_j - alpha theta_sft``.
    sft : path, optional
        SFT checkpoint directory; required when ``alpha != 0``.
    method : str, default "bone"
        A name registered in :mod:`bonesoup.merge.methods`: ``"bone"``:
        lambda = B^-1 mu (may be negative, never clipped); ``"rewarded"``: lambda = mu.
    dtype : {None, "float32", "bfloat16", "float16"} or torch.dtype
        Output dtype of the merged float tensors; None keeps each tensor's
        input dtype. Accumulation is fp32 either way.
    device : {"cpu", "cuda", "cuda:N"}
        Where the weighted sums run. On CUDA, batches are staged through
        pinned host memory and copied on a side stream, overlapping the copy
        of batch i + 1 with the merge of batch i.
    force : bool
        Replace an existing ``out_dir`` (only once the new one is complete).
    progress : bool
        Show a tqdm bar over output bytes.

    Returns
    -------
    Path
        ``out_dir``, complete. It also holds ``bonesoup-merge.json``: method,
        preference, beta, alpha, each input's path and coefficient, bytes
        read and written, and seconds taken (also logged at INFO level).

    Notes
    -----
    Tensors are merged when they are float32/bfloat16/float16; integer and
    bool tensors (buffers) are copied unchanged from the first backbone. Keys
    are whatever the files hold (GPT-2 files saved by transformers omit the
    tied ``lm_head.weight``; it is re-tied on load). Inputs whose coefficient
    is exactly 0 (a corner preference with Rewarded Soup) are validated but
    not read.

    Raises
    ------
    ValueError
        Bad method, preference, beta, alpha, dtype or device; inputs that
        disagree (names the key or config field and the files);
        ``out_dir`` equal to an input.
    FileNotFoundError
        A checkpoint directory, its config.json or its weights are missing.
    FileExistsError
        ``out_dir`` exists and ``force`` is False.
    OSError
        Not enough free disk space (ENOSPC), or a write failed; nothing is
        left at ``out_dir`` and the temporary directory is removed.

    Examples
    --------
    >>> merge_checkpoints(["ckpt/helpful", "ckpt/harmless"], "out/soup",
    ...                   preference=[0.3, 0.7], beta=0.7)  # doctest: +SKIP
    PosixPath('out/soup')
    """
    started = time.perf_counter()

    # 1. Where it runs: the CPU merge has one home (cpu_merge, torch-free); this function adds CUDA.
    device = torch.device(device)
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda[:N]', got {str(device)!r}")
    if device.type == "cpu":
        return merge_checkpoints_cpu(backbones, out_dir, preference=preference, beta=beta, alpha=alpha, sft=sft,
                                     method=method, dtype=dtype, force=force, progress=progress)
    inputs, fields = preference_inputs(backbones, preference=preference, beta=beta, alpha=alpha, sft=sft,
                                       method=method)
    out_dtype = parse_dtype(dtype)
    if not torch.cuda.is_available():
        raise ValueError(f"device={str(device)!r} was requested but CUDA is not available "
                         "(torch.cuda.is_available() is False); use device='cpu'")
    out_dir = check_output_dir(out_dir, [i.path for i in inputs], force)

    # 2. Open every input (headers only) and refuse disagreements before writing.
    all_inputs = [(CheckpointDir(i.path), i.coefficient, i.role) for i in inputs]
    validate_compatible([ck for ck, _, _ in all_inputs])
    checkpoints = [ck for ck, _, role in all_inputs if role == "backbone"]
    used = [(ck, c) for ck, c, _ in all_inputs if c != 0.0] or [(checkpoints[0], 0.0)]

    # 3. Plan the output: the first backbone's files, each tensor's output dtype.
    first = checkpoints[0]

    def out_dtype_of(info) -> torch.dtype:
        return out_dtype if out_dtype is not None and info.dtype in MERGEABLE_DTYPES else info.dtype

    # Output names come from the fixed scheme, never from an input's index
    # (a weight_map entry such as "../x.safetensors" would otherwise name a
    # file outside out_dir).
    names = output_shard_names(len(first.shards), first.sharded)
    layouts = [
        ShardLayout(name, [(k, out_dtype_of(first.tensors[k]), first.tensors[k].shape) for k in first.keys_in(shard)])
        for name, shard in zip(names, first.shards)
    ]
    data_bytes = sum(lay.data_size for lay in layouts)
    side_bytes = sum((first.path / name).stat().st_size for name in first.side_files)
    required = sum(lay.file_size for lay in layouts) + side_bytes + 2**20  # + index, report, slack
    config_updates = None
    if out_dtype is not None:
        dtype_name = str(out_dtype).removeprefix("torch.")
        config_updates = {k: dtype_name for k in ("dtype", "torch_dtype") if k in first.config} or {"dtype": dtype_name}

    # 4. Stream shard by shard into a temporary directory renamed into place at the end.
    stats = {"bytes_read": 0, "bytes_written": 0, "merged_tensors": 0, "copied_tensors": 0}
    with atomic_output_dir(out_dir, force=force, required_bytes=required) as tmp:
        copy_side_files(first, tmp, config_updates=config_updates)
        job = _Job(first, [ck for ck, _ in used], [c for _, c in used], device, stats)
        with tqdm(total=data_bytes, unit="B", unit_scale=True, unit_divisor=1024,
                  desc=f"merging {len(used)} checkpoints", disable=not progress) as bar:
            writer = None
            try:
                for batch, outs in _run_cuda(job, _batches(layouts, first, out_dtype_of)):
                    if writer is None or writer.layout is not batch.layout:
                        if writer is not None:
                            writer.close()
                        writer = ShardWriter(tmp / batch.layout.name, batch.layout)
                    written = _write_batch(writer, batch, outs)
                    stats["bytes_written"] += written
                    bar.update(written)
                    del outs  # before the next batch is merged: one batch of output alive at a time
                if writer is not None:
                    writer.close()
            except BaseException:
                if writer is not None:
                    writer.abort()
                raise
        finish_shards(tmp, layouts, first, data_bytes)
        seconds = time.perf_counter() - started
        report = {
            **fields,
            "dtype": None if out_dtype is None else str(out_dtype).removeprefix("torch."),
            "device": str(device),
            "inputs": [{"path": str(ck.path.absolute()), "role": role, "coefficient": c}
                       for ck, c, role in all_inputs],
            **stats,
            "seconds": round(seconds, 3),
        }
        (tmp / MERGE_REPORT_NAME).write_text(json.dumps(report, indent=2) + "\n")

    log.info("merged %d checkpoints into %s in %.2f s (coefficients %s; %d bytes read, %d written)",
             len(used), out_dir, seconds, [round(c, 6) for _, c in used],
             stats["bytes_read"], stats["bytes_written"])
    return out_dir


# --------------------------------------------------------------------------- batching


@dataclass
class _Batch:
    """Consecutive keys of one output shard, merged with one ``merge_many`` call."""

    layout: ShardLayout
    keys: list[str]
    shapes: list[tuple[int, ...]]
    out_dtypes: list[torch.dtype]
    merged: list[bool]  # False: a non-float tensor copied from the first backbone


@dataclass
class _Job:
    first: CheckpointDir  # non-float tensors are copied from here
    inputs: list[CheckpointDir]  # read for every merged tensor, in coefficient order
    coeffs: list[float]
    device: torch.device
    stats: dict


def _batches(layouts: Sequence[ShardLayout], first: CheckpointDir, out_dtype_of) -> Iterator[_Batch]:
    """Cut each shard's keys (in write order) into batches of at most MERGE_BATCH_BYTES output bytes.

    A tensor larger than the limit forms a batch of its own.
    """
    limit = MERGE_BATCH_BYTES  # read at call time so tests can shrink it

    def batch(keys: list[str]) -> _Batch:
        infos = [first.tensors[k] for k in keys]
        return _Batch(layout, keys, [t.shape for t in infos], [out_dtype_of(t) for t in infos],
                      [t.dtype in MERGEABLE_DTYPES for t in infos])

    for layout in layouts:
        keys: list[str] = []
        size = 0
        for key in layout.keys:
            info = first.tensors[key]
            nbytes = info.numel * out_dtype_of(info).itemsize
            if keys and size + nbytes > limit:
                yield batch(keys)
                keys, size = [], 0
            keys.append(key)
            size += nbytes
        if keys:
            yield batch(keys)


def _read(job: _Job, batch: _Batch, stack: ExitStack) -> list[list[torch.Tensor]]:
    """Memory-map a batch's inputs; per key, one tensor per input (merged) or [first backbone's] (copied).

    The files stay mapped until ``stack`` closes; the returned tensors may be views of them.
    """
    handles: dict = {}

    def get(ck: CheckpointDir, key: str) -> torch.Tensor:
        file = ck.tensors[key].file
        try:
            if (id(ck), file) not in handles:
                handles[(id(ck), file)] = stack.enter_context(ck.open_file(file))
            t = handles[(id(ck), file)].get_tensor(key)
        except OSError:
            raise
        except Exception as exc:  # the safetensors library's own errors: name the file and key
            raise ValueError(f"{ck.path / file}: cannot read key {key!r}: {exc}") from exc
        job.stats["bytes_read"] += ck.tensors[key].nbytes
        # A valid file whose header length (or a preceding tensor's size) is
        # not a multiple of this element size maps the tensor at an unaligned
        # address, which the kernels refuse: copy it to aligned memory.
        return t.clone() if t.numel() and t.data_ptr() % t.element_size() else t

    groups = []
    for key, merged in zip(batch.keys, batch.merged):
        groups.append([get(ck, key) for ck in job.inputs] if merged else [get(job.first, key)])
        job.stats["merged_tensors" if merged else "copied_tensors"] += 1
    return groups


def _merge(job: _Job, batch: _Batch, groups: list[list[torch.Tensor]]) -> list[torch.Tensor]:
    """Merge a batch's float groups with one kernel call on ``job.device``; pass copied ones through."""
    outs: list[torch.Tensor] = []
    todo: list[int] = []
    for i, (group, merged) in enumerate(zip(groups, batch.merged)):
        if merged:
            outs.append(torch.empty(batch.shapes[i], dtype=batch.out_dtypes[i], device=job.device))
            if outs[i].numel():
                todo.append(i)
        else:
            outs.append(group[0])
    if todo:
        sk.merge_many([groups[i] for i in todo], job.coeffs, outs=[outs[i] for i in todo])
        _check_finite(job, batch, groups, outs, todo)
    return outs


def _check_finite(job: _Job, batch: _Batch, groups, outs, todo: list[int]) -> None:
    """Refuse a merge whose output is not what the float64 reference gives (overflow, NaN).

    min and max propagate NaN and inf, so one read-only reduction per tensor
    (one sync for the batch) clears the common case; only a suspicious tensor
    pays for the float64 reference. Measured (3 x 192 MiB fp32, 2-core box,
    OMP_NUM_THREADS=1): 9 ms of a 268 ms merge, 16% of the kernel's 56 ms;
    isfinite().all() costs several times more (it writes a bool tensor).
    Folding a non-finite flag into the C++ kernel would make it free.
    """
    extremes = torch.stack([torch.stack(torch.aminmax(outs[i])).float() for i in todo])
    if bool(torch.isfinite(extremes).all()):
        return
    for i in todo:
        out = outs[i]
        if bool(torch.isfinite(out).all()):
            continue
        key = batch.keys[i]
        where = f"key {key!r} (in {job.inputs[0].file_of(key)} and {len(job.inputs) - 1} more input(s))"
        xs = [x.double() for x in groups[i]]
        for ck, x in zip(job.inputs, xs):
            if bool(torch.isnan(x).any()):
                raise ValueError(f"key {key!r} in {ck.file_of(key)} holds NaN values; refusing to merge it")
        ref = sum(c * x for c, x in zip(job.coeffs, xs))
        if bool(torch.isnan(ref).any()):
            raise ValueError(f"{where}: the inputs' infinite values cancel into NaN at the coefficients "
                             f"{job.coeffs}")
        wrong = ~torch.isfinite(out.double()) & torch.isfinite(ref)
        if bool(wrong.any()):
            raise ValueError(f"{where}: the merge overflows {out.dtype} (the float64 reference reaches "
                             f"{ref[wrong].abs().max().item():.4g}) at coefficients {job.coeffs}; lower alpha, "
                             "or merge into --dtype float32")
        # inf inputs that stay the same inf: the output is the reference's.


def _write_batch(writer: ShardWriter, batch: _Batch, outs: list[torch.Tensor]) -> int:
    """Append a batch to its shard; returns the bytes written (a function, so no loop variable outlives it)."""
    for key, out in zip(batch.keys, outs):
        writer.write(key, out)
    return sum(o.nbytes for o in outs)


def _run_cuda(job: _Job, batches: Iterator[_Batch]) -> Iterator[tuple[_Batch, list[torch.Tensor]]]:
    """Yield (batch, merged CPU tensors), merging on the GPU with double-buffered uploads.

    Batch i + 1 is read into pinned host memory and copied to the GPU on a
    side stream while batch i is merged on the compute stream; the merged
    batch then comes back with a synchronous device-to-host copy.
    """
    with torch.cuda.device(job.device):
        compute = torch.cuda.current_stream()
        side = torch.cuda.Stream()

        def upload(batch: _Batch):
            with ExitStack() as stack:  # mmap -> pinned host memory (CPU copy); then unmap
                groups = _read(job, batch, stack)
                pinned = [[t.pin_memory() for t in g] if m else [t.clone()] for g, m in zip(groups, batch.merged)]
            with torch.cuda.stream(side):
                dev = [[t.to(job.device, non_blocking=True) for t in g] if m else g
                       for g, m in zip(pinned, batch.merged)]
                ready = torch.cuda.Event()
                ready.record(side)
            return batch, pinned, dev, ready  # pinned stays referenced until its copy is known done

        it = iter(batches)
        nxt = next(it, None)
        staged = upload(nxt) if nxt is not None else None
        while staged is not None:
            batch, pinned, dev, ready = staged
            compute.wait_event(ready)
            for g, m in zip(dev, batch.merged):
                for t in g if m else ():
                    t.record_stream(compute)  # allocated on `side`, consumed on `compute`
            outs = _merge(job, batch, dev)  # queued on the compute stream
            nxt = next(it, None)
            staged = upload(nxt) if nxt is not None else None  # overlaps the merge just queued
            host = [o.cpu() if m else o for o, m in zip(outs, batch.merged)]  # waits for the merge
            del outs, dev, pinned
            yield batch, host
            del host

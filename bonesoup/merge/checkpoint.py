"""Hugging Face checkpoint directories: read headers, validate, write atomically.

A checkpoint directory holds ``config.json`` plus either ``model.safetensors``
or sharded ``model-XXXXX-of-YYYYY.safetensors`` files listed in
``model.safetensors.index.json``. Everything here reads safetensors headers
(the JSON at the start of each file) and memory-maps tensor data with
``safetensors.safe_open``; nothing ever unpickles (no ``torch.load``).

Writing is streamed: :class:`ShardWriter` writes a shard's header first and
then its tensors one at a time, so a merge never holds more than one batch of
output in memory, however large a shard is. :func:`atomic_output_dir` makes the
whole output appear at once (temporary directory beside the target, then
``os.replace``), so a crash never leaves a half-written model under the
target's name.
"""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import re
import secrets
import shutil
import struct
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import torch

__all__ = [
    "CONFIG_NAME",
    "SINGLE_WEIGHTS_NAME",
    "INDEX_NAME",
    "MERGE_REPORT_NAME",
    "MERGEABLE_DTYPES",
    "TensorInfo",
    "CheckpointDir",
    "validate_compatible",
    "ShardLayout",
    "ShardWriter",
    "write_index",
    "copy_side_files",
    "check_free_space",
    "clean_stale_temp_dirs",
    "atomic_output_dir",
    "parse_dtype",
]

log = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
SINGLE_WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
#: Provenance file written by bonesoup.merge.offline; never copied as a side file.
MERGE_REPORT_NAME = "bonesoup-merge.json"

#: Floating dtypes that are merged (the kernels accumulate them in fp32).
#: Every other dtype (integer buffers, bool masks) is copied from the first input.
MERGEABLE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# safetensors dtype names <-> torch dtypes (the format's spelling, little-endian).
_ST_TO_TORCH = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
for _name, _attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"),
                     ("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64")):
    if hasattr(torch, _attr):
        _ST_TO_TORCH[_name] = getattr(torch, _attr)
_TORCH_TO_ST = {v: k for k, v in _ST_TO_TORCH.items()}

# Files that hold weights (ours or another format's copy of the same weights):
# never copied into a merged output, which would otherwise carry stale weights.
_WEIGHT_FILE_RE = re.compile(
    r".*\.(safetensors|bin|pt|pth|ckpt|h5|msgpack|gguf|onnx)$|.*\.index\.json$"
)

_DTYPE_ALIASES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}


def parse_dtype(dtype: str | torch.dtype | None, name: str = "dtype") -> torch.dtype | None:
    """Turn ``None``, a torch dtype or a name (``"bfloat16"``, ``"bf16"``, ...) into a merge dtype.

    Only float32, bfloat16 and float16 are accepted (ValueError otherwise).
    """
    if dtype is None:
        return None
    if isinstance(dtype, str):
        key = dtype.strip().lower().removeprefix("torch.")
        if key not in _DTYPE_ALIASES:
            raise ValueError(f"{name} must be one of float32, bfloat16, float16 (or None), got {dtype!r}")
        return _DTYPE_ALIASES[key]
    if isinstance(dtype, torch.dtype) and dtype in MERGEABLE_DTYPES:
        return dtype
    raise ValueError(f"{name} must be one of float32, bfloat16, float16 (or None), got {dtype!r}")


# --------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class TensorInfo:
    """One tensor as described by a safetensors header (no data loaded).

    Attributes
    ----------
    key : str
        Parameter name, e.g. ``"transformer.h.0.attn.c_attn.weight"``.
    shape : tuple of int
    dtype : torch.dtype
    file : str
        Name of the file inside the checkpoint directory that holds it.
    offset : int
        Start of its data in the file's data section (gives the file order).
    """

    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    file: str
    offset: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


def _read_safetensors_header(path: Path) -> tuple[dict, int]:
    """Parse the JSON header of a safetensors file (8-byte little-endian length, then JSON).

    Returns ``(header, data_bytes)``: the header and the number of bytes after it.
    """
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise ValueError("file is shorter than the 8-byte header length")
            (n,) = struct.unpack("<Q", prefix)
            if n > size - 8 or n > 100 * 2**20:
                raise ValueError(f"header length {n} does not fit the file ({size} bytes)")
            header = json.loads(f.read(n))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is not a valid safetensors file: {exc}") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path} is not a valid safetensors file: header is not a JSON object")
    return header, size - 8 - n


class CheckpointDir:
    """A Hugging Face safetensors checkpoint directory, read lazily.

    Opening one reads ``config.json``, the index (if sharded) and every shard's
    header; tensor data stays on disk until :meth:`open_file` memory-maps it.

    Parameters
    ----------
    path : str or os.PathLike
        Directory with ``config.json`` and ``model.safetensors`` or
        ``model.safetensors.index.json`` plus its shards.

    Attributes
    ----------
    path : Path
    config : dict
        Parsed ``config.json``.
    sharded : bool
        True when the weights are listed by ``model.safetensors.index.json``.
    shards : list of str
        Weight file names, sorted (``model-00001-of-00003.safetensors``, ...).
    tensors : dict of str to TensorInfo
        Every tensor, in file order (shard by shard, by data offset).
    index_metadata : dict
        The index's ``"metadata"`` (empty for a single file).

    Raises
    ------
    FileNotFoundError
        The directory, ``config.json``, the weights or a listed shard is missing.
    ValueError
        A header or the index is malformed or they disagree.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_dir():
            raise FileNotFoundError(f"checkpoint directory {self.path} does not exist or is not a directory")
        config_path = self.path / CONFIG_NAME
        if not config_path.is_file():
            raise FileNotFoundError(f"{config_path} is missing: a checkpoint directory needs its config.json")
        try:
            self.config = json.loads(config_path.read_text())
        except (ValueError, UnicodeDecodeError) as exc:
            raise ValueError(f"{config_path} is not valid JSON: {exc}") from None
        if not isinstance(self.config, dict):
            raise ValueError(f"{config_path} does not hold a JSON object")

        index_path = self.path / INDEX_NAME
        if index_path.is_file():
            self.sharded = True
            try:
                index = json.loads(index_path.read_text())
                weight_map = index["weight_map"]
                if not isinstance(weight_map, dict):
                    raise TypeError("weight_map is not an object")
            except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
                raise ValueError(f"{index_path} is not a valid safetensors index: {exc!r}") from None
            self.index_metadata = dict(index.get("metadata") or {})
            self.shards = sorted(set(weight_map.values()))
        elif (self.path / SINGLE_WEIGHTS_NAME).is_file():
            self.sharded = False
            weight_map = None
            self.index_metadata = {}
            self.shards = [SINGLE_WEIGHTS_NAME]
        else:
            pickles = sorted(p.name for p in self.path.glob("*.bin"))
            hint = (f" (found {', '.join(pickles)}: pickled weights are never loaded; convert them to "
                    "safetensors first)") if pickles else ""
            raise FileNotFoundError(f"{self.path} has neither {SINGLE_WEIGHTS_NAME} nor {INDEX_NAME}{hint}")

        infos: dict[str, TensorInfo] = {}
        for shard in self.shards:
            shard_path = self.path / shard
            if not shard_path.is_file():
                raise FileNotFoundError(f"{shard_path} is listed in {index_path} but does not exist")
            header, data_bytes = _read_safetensors_header(shard_path)
            entries = []
            for key, desc in header.items():
                if key == "__metadata__":
                    continue
                try:
                    st_dtype, shape, (begin, end) = desc["dtype"], desc["shape"], desc["data_offsets"]
                    begin, end, shape = int(begin), int(end), [int(d) for d in shape]
                except (TypeError, KeyError, ValueError):
                    raise ValueError(f"{shard_path}: malformed header entry for key {key!r}") from None
                if st_dtype not in _ST_TO_TORCH:
                    raise ValueError(f"{shard_path}: key {key!r} has dtype {st_dtype}, which torch cannot hold")
                # A truncated or corrupt file is refused here, before anything is
                # written, not half-way through a merge.
                if end - begin != math.prod(shape) * _ST_TO_TORCH[st_dtype].itemsize or not 0 <= begin <= end:
                    raise ValueError(f"{shard_path}: key {key!r} has data_offsets {[begin, end]} that do not "
                                     f"match its shape {shape} and dtype {st_dtype}")
                if end > data_bytes:
                    raise ValueError(f"{shard_path} is truncated: key {key!r} ends at byte {end} of the data "
                                     f"but the file holds {data_bytes} data bytes")
                if key in infos:
                    raise ValueError(f"key {key!r} appears in both {infos[key].file} and {shard} of {self.path}")
                if weight_map is not None and weight_map.get(key) != shard:
                    raise ValueError(
                        f"{shard_path} holds key {key!r} but {index_path} maps it to {weight_map.get(key)!r}")
                entries.append(TensorInfo(key, tuple(int(s) for s in shape), _ST_TO_TORCH[st_dtype], shard, int(begin)))
            for info in sorted(entries, key=lambda t: t.offset):
                infos[info.key] = info
        if weight_map is not None:
            lost = [k for k in weight_map if k not in infos]
            if lost:
                raise ValueError(f"{index_path} maps key {lost[0]!r} to {weight_map[lost[0]]!r}, "
                                 f"but that file does not hold it ({len(lost)} such keys)")
        self.tensors = infos

    def __repr__(self) -> str:
        return f"CheckpointDir({str(self.path)!r}, {len(self.tensors)} tensors, {len(self.shards)} file(s))"

    @property
    def keys(self) -> list[str]:
        """All tensor keys, in file order."""
        return list(self.tensors)

    def keys_in(self, shard: str) -> list[str]:
        """Keys stored in ``shard``, in file order."""
        return [k for k, t in self.tensors.items() if t.file == shard]

    def file_of(self, key: str) -> Path:
        """Path of the weight file that holds ``key``."""
        return self.path / self.tensors[key].file

    @property
    def total_bytes(self) -> int:
        """Bytes of tensor data (sum over tensors of numel * itemsize)."""
        return sum(t.nbytes for t in self.tensors.values())

    @property
    def weight_map(self) -> dict[str, str]:
        """key -> file name, as in the index's ``weight_map``."""
        return {k: t.file for k, t in self.tensors.items()}

    @property
    def side_files(self) -> list[str]:
        """Top-level files to copy into a merged output.

        Everything that is not a weights file (any ``*.safetensors``, ``*.bin``,
        ``*.pt``, ... or ``*.index.json``), not hidden and not our own merge
        report: config.json, generation_config.json, tokenizer files, README.
        Sub-directories are not copied.
        """
        return sorted(
            p.name for p in self.path.iterdir()
            if p.is_file() and not p.name.startswith(".") and p.name != MERGE_REPORT_NAME
            and not _WEIGHT_FILE_RE.fullmatch(p.name)
        )

    def open_file(self, file: str):
        """Memory-map one weight file: ``safe_open(path, framework="pt")`` (use as a context manager)."""
        from safetensors import safe_open

        return safe_open(str(self.path / file), framework="pt", device="cpu")


def validate_compatible(checkpoints: Sequence[CheckpointDir]) -> None:
    """Refuse a set of checkpoints that cannot be merged, before anything is written.

    All must share ``config.json``'s ``architectures`` and ``model_type``, the
    same key set, and per key the same shape and dtype. Mergeable float tensors
    must be float32/bfloat16/float16; other float dtypes (float64, fp8) are
    refused because the kernels do not take them; integer/bool tensors are
    accepted and later copied from the first checkpoint.

    Raises
    ------
    ValueError
        Naming the key (or config field) and the files that disagree.
    """
    if not checkpoints:
        raise ValueError("no checkpoints to validate")
    ref = checkpoints[0]
    for field in ("architectures", "model_type"):
        for other in checkpoints[1:]:
            a, b = ref.config.get(field), other.config.get(field)
            if a != b:
                raise ValueError(f"config mismatch: {field} is {a!r} in {ref.path / CONFIG_NAME} "
                                 f"but {b!r} in {other.path / CONFIG_NAME}")
    for other in checkpoints[1:]:
        missing = [k for k in ref.tensors if k not in other.tensors]
        if missing:
            raise ValueError(f"key {missing[0]!r} is in {ref.file_of(missing[0])} but missing from checkpoint "
                             f"{other.path} ({len(missing)} missing key(s))")
        extra = [k for k in other.tensors if k not in ref.tensors]
        if extra:
            raise ValueError(f"key {extra[0]!r} is in {other.file_of(extra[0])} but missing from checkpoint "
                             f"{ref.path} ({len(extra)} extra key(s))")
        for key, t in ref.tensors.items():
            o = other.tensors[key]
            if t.shape != o.shape:
                raise ValueError(f"shape mismatch for key {key!r}: {list(t.shape)} in {ref.file_of(key)} "
                                 f"but {list(o.shape)} in {other.file_of(key)}")
            if t.dtype != o.dtype:
                raise ValueError(f"dtype mismatch for key {key!r}: {t.dtype} in {ref.file_of(key)} "
                                 f"but {o.dtype} in {other.file_of(key)}")
    for key, t in ref.tensors.items():
        if t.dtype.is_floating_point and t.dtype not in MERGEABLE_DTYPES:
            raise ValueError(f"key {key!r} in {ref.file_of(key)} has dtype {t.dtype}; only float32, bfloat16 "
                             "and float16 tensors can be merged")


# --------------------------------------------------------------------------- writing


class ShardLayout:
    """Byte layout of one output safetensors file, fixed before any data is written.

    Knowing every key's dtype and shape up front lets the header go first and
    the data stream after it, tensor by tensor.

    Parameters
    ----------
    name : str
        File name inside the output directory.
    entries : sequence of (key, dtype, shape)
        The tensors of this file.
    metadata : mapping of str to str, optional
        Header ``__metadata__``; defaults to ``{"format": "pt"}``, which
        transformers requires to load the file.

    Attributes
    ----------
    keys : list of str
        The order in which :class:`ShardWriter` expects tensors: larger
        element sizes first (so every tensor starts aligned to its element
        size, as safetensors' own writer does), then the given order.
    header : bytes
        8-byte length + JSON header, padded with spaces to a multiple of 8.
    file_size : int
    """

    def __init__(self, name: str, entries: Sequence[tuple[str, torch.dtype, tuple[int, ...]]],
                 metadata: Mapping[str, str] | None = None):
        self.name = name
        rank = {key: i for i, (key, _, _) in enumerate(entries)}
        ordered = sorted(entries, key=lambda e: (-e[1].itemsize, rank[e[0]]))
        self.keys = [e[0] for e in ordered]
        self.specs: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {}
        header: dict = {"__metadata__": dict(metadata if metadata is not None else {"format": "pt"})}
        offset = 0
        for key, dtype, shape in ordered:
            if dtype not in _TORCH_TO_ST:
                raise ValueError(f"cannot write key {key!r}: dtype {dtype} has no safetensors name")
            nbytes = math.prod(shape) * dtype.itemsize
            self.specs[key] = (dtype, tuple(shape), offset, offset + nbytes)
            header[key] = {"dtype": _TORCH_TO_ST[dtype], "shape": list(shape),
                           "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        body = json.dumps(header, separators=(",", ":")).encode()
        body += b" " * (-len(body) % 8)
        self.header = struct.pack("<Q", len(body)) + body
        self.data_size = offset
        self.file_size = len(self.header) + offset


class ShardWriter:
    """Write one safetensors file from a :class:`ShardLayout`, one tensor at a time.

    Tensors must arrive in ``layout.keys`` order with the planned dtype and
    shape. :meth:`close` checks that every tensor was written, then flushes
    and fsyncs (so a renamed-into-place output is on disk, not only in cache).
    """

    def __init__(self, path: str | os.PathLike, layout: ShardLayout):
        if sys.byteorder != "little":
            raise RuntimeError("safetensors files are little-endian; writing them on a big-endian host "
                               "is not supported")
        self.path = Path(path)
        self.layout = layout
        self._next = 0
        self._file = open(self.path, "xb")
        self._file.write(layout.header)

    def write(self, key: str, tensor: torch.Tensor) -> None:
        """Append ``tensor`` (CPU, the planned dtype and shape) as ``key``."""
        expected = self.layout.keys[self._next] if self._next < len(self.layout.keys) else None
        if key != expected:
            raise ValueError(f"{self.path}: expected key {expected!r} next, got {key!r}")
        dtype, shape, _, _ = self.layout.specs[key]
        if tensor.dtype != dtype or tuple(tensor.shape) != shape or tensor.device.type != "cpu":
            raise ValueError(f"{self.path}: key {key!r} planned as {dtype} {list(shape)} on cpu, "
                             f"got {tensor.dtype} {list(tensor.shape)} on {tensor.device}")
        if tensor.numel():
            # A byte view avoids numpy's missing bfloat16; memoryview writes without a copy.
            self._file.write(memoryview(tensor.contiguous().reshape(-1).view(torch.uint8).numpy()))
        self._next += 1

    def close(self) -> None:
        """Finish the file; raises ValueError if tensors are missing."""
        if self._next != len(self.layout.keys):
            missing = self.layout.keys[self._next]
            self.abort()
            raise ValueError(f"{self.path}: closed before key {missing!r} was written")
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()

    def abort(self) -> None:
        """Close without checks (the caller removes the whole temporary directory)."""
        if not self._file.closed:
            self._file.close()

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def write_index(out_dir: Path, weight_map: Mapping[str, str], metadata: Mapping) -> Path:
    """Write ``model.safetensors.index.json``: ``{"metadata": ..., "weight_map": ...}``, keys sorted."""
    path = Path(out_dir) / INDEX_NAME
    body = {"metadata": dict(metadata), "weight_map": {k: weight_map[k] for k in sorted(weight_map)}}
    path.write_text(json.dumps(body, indent=2) + "\n")
    return path


def copy_side_files(src: CheckpointDir, out_dir: Path, *, config_updates: Mapping | None = None) -> list[str]:
    """Copy ``src.side_files`` into ``out_dir``; ``config_updates`` are applied to config.json."""
    names = src.side_files
    for name in names:
        if name == CONFIG_NAME and config_updates:
            config = dict(src.config)
            config.update(config_updates)
            (Path(out_dir) / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        else:
            shutil.copyfile(src.path / name, Path(out_dir) / name)
    return names


# --------------------------------------------------------------------------- atomic output


def _format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    raise AssertionError("unreachable")


def check_free_space(directory: str | os.PathLike, required_bytes: int) -> None:
    """Raise ``OSError(ENOSPC)`` unless ``directory``'s filesystem has ``required_bytes`` free."""
    free = shutil.disk_usage(directory).free
    if free < required_bytes:
        raise OSError(errno.ENOSPC,
                      f"not enough free disk space in {directory}: the merged checkpoint needs "
                      f"{_format_bytes(required_bytes)}, only {_format_bytes(free)} is free")


def _temp_dir_re(target_name: str) -> re.Pattern:
    # pid, then (Linux) ".start-time" of that process, then a random tag
    return re.compile(rf"\.{re.escape(target_name)}\.bonesoup-(tmp|old)-(\d+)(?:\.(\d+))?-[0-9a-f]+")


def _process_start(pid: int) -> int | None:
    """Start time of ``pid`` in clock ticks since boot (Linux), else None.

    PIDs are reused (in containers the same PIDs come back on every run), so a
    temporary directory names its writer by pid AND start time.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        return int(stat[stat.rindex(b")") + 2 :].split()[19])  # field 22 overall
    except (OSError, ValueError, IndexError):
        return None


def _writer_tag() -> str:
    start = _process_start(os.getpid())
    return f"{os.getpid()}" + (f".{start}" if start is not None else "")


def _writer_alive(pid: int, start: int | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        pass
    except OSError:
        return False
    if start is not None:
        now = _process_start(pid)
        if now is not None and now != start:
            return False  # the pid was reused by another process
    return True


def clean_stale_temp_dirs(target: str | os.PathLike) -> list[Path]:
    """Remove temporary directories that a killed run left beside ``target``.

    They are recognised by name: ``.{target}.bonesoup-tmp-{pid}.{start}-{hex}``
    (an output being written) and ``.{target}.bonesoup-old-{pid}.{start}-{hex}``
    (a previous output moved aside by ``force``), and are removed only when
    process ``pid`` with that start time is no longer alive (on this host; a
    reused pid does not keep a dead run's leftovers alive). An ``old`` directory is
    put back as ``target`` if the run died between the two renames and the
    target is missing. Returns the paths removed.
    """
    target = Path(target)
    if not target.parent.is_dir():
        return []
    pattern = _temp_dir_re(target.name)
    removed = []
    for entry in sorted(target.parent.iterdir()):
        m = pattern.fullmatch(entry.name)
        if not m or not entry.is_dir() or _writer_alive(int(m.group(2)), m.group(3) and int(m.group(3))):
            continue
        if m.group(1) == "old" and not target.exists():
            log.warning("restoring %s from %s, left by a run (pid %s) that died while replacing it",
                        target, entry, m.group(2))
            os.replace(entry, target)
            continue
        log.warning("removing stale temporary directory %s left by a dead run (pid %s)", entry, m.group(2))
        shutil.rmtree(entry, ignore_errors=True)
        removed.append(entry)
    return removed


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_output_dir(target: str | os.PathLike, *, force: bool = False, required_bytes: int = 0) -> Iterator[Path]:
    """Yield a fresh temporary directory that becomes ``target`` when the block completes.

    The temporary directory, ``.{name}.bonesoup-tmp-{pid}.{start}-{hex}``, is created
    beside ``target`` (same filesystem, so the final ``os.replace`` is
    atomic). If the block raises, it is removed and ``target`` is untouched.
    Before creating it, stale temporary directories of dead runs for the same
    target are removed and the free space is checked against
    ``required_bytes``.

    Parameters
    ----------
    target : path
        The output directory; its parent is created if needed.
    force : bool
        Replace an existing ``target``. The old one is moved aside only after
        the new one is complete, then deleted.
    required_bytes : int
        Bytes the output will occupy.

    Raises
    ------
    FileExistsError
        ``target`` exists and ``force`` is False, or exists and is not a directory.
    OSError
        ENOSPC when the free space is below ``required_bytes``.
    """
    target = Path(target).absolute()
    parent = target.parent

    def refuse_existing() -> None:
        if target.exists() or target.is_symlink():
            if not target.is_dir():
                raise FileExistsError(f"output {target} exists and is not a directory; refusing to replace it")
            if not force:
                raise FileExistsError(f"output directory {target} already exists; pass force=True (--force) "
                                      "to replace it")

    parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temp_dirs(target)  # first: it may put back a target that a killed --force run moved aside
    refuse_existing()
    check_free_space(parent, required_bytes)
    tag = f"{_writer_tag()}-{secrets.token_hex(4)}"
    tmp = parent / f".{target.name}.bonesoup-tmp-{tag}"
    tmp.mkdir()
    try:
        yield tmp
        # Everything on disk before the rename makes it visible: after a power
        # loss the output is either absent or complete (shards fsync
        # themselves; config, tokenizer, index and report files here).
        for f in tmp.iterdir():
            if f.is_file():
                _fsync_file(f)
        _fsync_dir(tmp)
        refuse_existing()  # it may have appeared while we were writing
        if target.exists():
            old = parent / f".{target.name}.bonesoup-old-{tag}"
            os.replace(target, old)
            try:
                os.replace(tmp, target)
            except BaseException:
                os.replace(old, target)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
        _fsync_dir(parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

"""One safetensors file: the header read strictly, and a streaming writer.

A safetensors file is an 8-byte little-endian header length N, N bytes of
UTF-8 JSON, then the data section. The header rules here are at least as
strict as the safetensors library's own (which refuses a file only when a
tensor is read), so a file accepted here never fails later, half-way through
a merge: JSON types checked (integers are JSON integers, not ``1.0``,
``"1"`` or ``true``), tensors contiguous from byte 0 of the data section in
offset order with no gap or overlap, the data section fully covered, no
trailing bytes. JSON is parsed with a nesting-depth limit (a deeply nested
header or config.json is a ValueError, not a RecursionError).

Nothing here imports torch until a torch dtype or tensor is asked for
(``TensorInfo.dtype``, ``ST_TO_TORCH``, :meth:`ShardWriter.write`): the CPU
merge (:mod:`bonesoup.merge.cpu_merge`) reads headers and writes shards
from raw buffers without it.

:class:`ShardWriter` writes a shard's header first and then its tensors one at
a time, so a merge never holds more than one batch of output in memory.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

__all__ = [
    "MAX_HEADER_BYTES",
    "MAX_JSON_DEPTH",
    "ST_ITEMSIZE",
    "ST_TO_TORCH",
    "TORCH_TO_ST",
    "TensorInfo",
    "dtype_label",
    "load_json",
    "read_header",
    "ShardLayout",
    "ShardWriter",
]

#: The safetensors library's own limit on the header length.
MAX_HEADER_BYTES = 100_000_000
#: Nesting depth allowed in any JSON we parse (headers, index, config.json); real files use < 10.
MAX_JSON_DEPTH = 64

#: safetensors dtype names (the format's spelling, little-endian) -> bytes per element.
ST_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
               "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}
# safetensors dtype name -> torch dtype attribute (ST_TO_TORCH / TORCH_TO_ST are built from it on first use).
_ST_TORCH_ATTR = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
                  "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
                  "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "U16": "uint16", "U32": "uint32",
                  "U64": "uint64"}


def dtype_label(st_dtype: str) -> str:
    """How messages name a safetensors dtype: torch's spelling (``"torch.bfloat16"``), without importing torch."""
    return f"torch.{_ST_TORCH_ATTR.get(st_dtype, st_dtype)}"


def __getattr__(name):
    if name in ("ST_TO_TORCH", "TORCH_TO_ST"):
        import torch

        st_to_torch = {st: getattr(torch, a) for st, a in _ST_TORCH_ATTR.items() if hasattr(torch, a)}
        globals().update(ST_TO_TORCH=st_to_torch, TORCH_TO_ST={v: k for k, v in st_to_torch.items()})
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

_BRACKETS = bytes(range(256)).translate(None, b"[]{}")  # delete table: everything but brackets
_STRING_RE = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)


def _json_depth(data: bytes) -> int:
    """Deepest nesting of ``[``/``{`` outside strings, in linear time (numpy), whatever the size."""
    brackets = _STRING_RE.sub(b"", data).translate(None, _BRACKETS)
    if not brackets:
        return 0
    b = np.frombuffer(brackets, dtype=np.uint8)
    steps = np.where((b == ord("[")) | (b == ord("{")), 1, -1)
    return int(np.cumsum(steps).max())


def _refuse_duplicates(pairs):
    obj = {}
    for k, v in pairs:
        if k in obj:
            raise ValueError(f"duplicate key {k!r}")
        obj[k] = v
    return obj


def _refuse_constant(name):
    raise ValueError(f"{name} is not valid JSON")


def load_json(data: bytes | str, what: str, *, max_depth: int = MAX_JSON_DEPTH):
    """Parse JSON strictly: a depth limit, no duplicate keys, no NaN/Infinity.

    Parameters
    ----------
    data : bytes or str
        UTF-8 JSON text.
    what : str
        Names the source in the error (a file path).

    Raises
    ------
    ValueError
        ``"{what} is not valid JSON: ..."`` for any problem, including nesting deeper than ``max_depth``.
    """
    raw = data.encode() if isinstance(data, str) else bytes(data)
    try:
        depth = _json_depth(raw)
        if depth > max_depth:
            raise ValueError(f"nested {depth} levels deep (the limit is {max_depth})")
        return json.loads(raw.decode("utf-8"), object_pairs_hook=_refuse_duplicates,
                          parse_constant=_refuse_constant)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise ValueError(f"{what} is not valid JSON: {exc}") from None


@dataclass(frozen=True)
class TensorInfo:
    """One tensor as described by a safetensors header (no data loaded).

    Attributes
    ----------
    key : str
        Parameter name, e.g. ``"transformer.h.0.attn.c_attn.weight"``.
    shape : tuple of int
    st_dtype : str
        The safetensors dtype name (``"BF16"``, ``"F32"``, ``"I64"``, ...);
        ``dtype`` is the matching torch dtype (imports torch).
    file : str
        Name of the file inside the checkpoint directory that holds it.
    offset : int
        Start of its data in the file's data section (gives the file order).
    """

    key: str
    shape: tuple[int, ...]
    st_dtype: str
    file: str
    offset: int

    @property
    def dtype(self):
        """The torch dtype (imports torch)."""
        return __getattr__("ST_TO_TORCH")[self.st_dtype]

    @property
    def itemsize(self) -> int:
        return ST_ITEMSIZE[self.st_dtype]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.itemsize


def _is_uint(v) -> bool:
    return type(v) is int and 0 <= v < 2**64  # bool is not int here, nor 1.0


def read_header(path: Path, file: str | None = None) -> list[TensorInfo]:
    """Read and validate a safetensors file's header; the tensors in data order.

    Parameters
    ----------
    path : Path
        The file.
    file : str, optional
        Name stored in each :class:`TensorInfo` (default ``path.name``).

    Raises
    ------
    ValueError
        ``"{path}: ..."`` naming the rule (and key) that the file breaks.
    """
    file = path.name if file is None else file
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise ValueError("the file is shorter than the 8-byte header length")
            (n,) = struct.unpack("<Q", prefix)
            if n > MAX_HEADER_BYTES or n > size - 8:
                raise ValueError(f"header length {n} does not fit the file ({size} bytes; "
                                 f"the format allows at most {MAX_HEADER_BYTES})")
            raw = f.read(n)
    except OSError as exc:
        raise OSError(exc.errno, f"cannot read {path}: {exc.strerror}") from None
    except ValueError as exc:
        raise ValueError(f"{path} is not a valid safetensors file: {exc}") from None
    if not raw.startswith(b"{"):
        raise ValueError(f"{path} is not a valid safetensors file: the header does not start with '{{'")
    header = load_json(raw, f"the header of {path}")
    if not isinstance(header, dict):
        raise ValueError(f"{path} is not a valid safetensors file: the header is not a JSON object")
    meta = header.pop("__metadata__", None)
    if meta is not None and not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
        raise ValueError(f"{path}: __metadata__ must be an object of strings, got {meta!r:.80}")
    infos = []
    for key, desc in header.items():
        if not isinstance(desc, dict) or set(desc) != {"dtype", "shape", "data_offsets"}:
            raise ValueError(f"{path}: malformed header entry for key {key!r}: expected an object with exactly "
                             f"dtype, shape and data_offsets, got {desc!r:.120}")
        st_dtype, shape, offsets = desc["dtype"], desc["shape"], desc["data_offsets"]
        if not isinstance(st_dtype, str) or st_dtype not in ST_ITEMSIZE:
            raise ValueError(f"{path}: key {key!r} has dtype {st_dtype!r:.40}, which torch cannot hold")
        if not isinstance(shape, list) or not all(_is_uint(d) for d in shape):
            raise ValueError(f"{path}: key {key!r} has shape {shape!r:.80}; expected a list of integers >= 0")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_uint(o) for o in offsets)):
            raise ValueError(f"{path}: key {key!r} has data_offsets {offsets!r:.80}; expected [begin, end], "
                             "integers >= 0")
        infos.append((offsets[0], offsets[1], key, tuple(shape), st_dtype))
    # The data section must be exactly the tensors, back to back in offset
    # order (the library's rule): no gap that hides bytes, no overlap that
    # lets two keys share data, nothing after the last tensor.
    infos.sort(key=lambda e: (e[0], e[1]))
    pos = 0
    for begin, end, key, shape, dtype in infos:
        nbytes = math.prod(shape) * ST_ITEMSIZE[dtype]
        if begin != pos or end - begin != nbytes:
            raise ValueError(f"{path}: key {key!r} has data_offsets {[begin, end]}, but the tensors must be "
                             f"contiguous: it should start at byte {pos} and take {nbytes} bytes "
                             f"({list(shape)} {dtype})")
        pos = end
    data_bytes = size - 8 - n
    if pos > data_bytes:
        key, end = next((e[2], e[1]) for e in infos if e[1] > data_bytes)
        raise ValueError(f"{path} is truncated: key {key!r} ends at byte {end} of the data but the file holds "
                         f"{data_bytes} data bytes")
    if pos < data_bytes:
        raise ValueError(f"{path} has {data_bytes - pos} trailing bytes that no tensor covers (the header "
                         f"describes {pos} data bytes, the file holds {data_bytes})")
    return [TensorInfo(key, shape, dtype, file, begin) for begin, _end, key, shape, dtype in infos]


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
        The tensors of this file; dtype a torch dtype or a safetensors name (``"BF16"``).
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

    def __init__(self, name: str, entries: Sequence[tuple[str, object, tuple[int, ...]]],
                 metadata: Mapping[str, str] | None = None):
        self.name = name
        named = []
        for key, dtype, shape in entries:
            st = dtype if isinstance(dtype, str) else __getattr__("TORCH_TO_ST").get(dtype)
            if st not in ST_ITEMSIZE:
                raise ValueError(f"cannot write key {key!r}: dtype {dtype} has no safetensors name")
            named.append((key, st, shape))
        rank = {key: i for i, (key, _, _) in enumerate(named)}
        ordered = sorted(named, key=lambda e: (-ST_ITEMSIZE[e[1]], rank[e[0]]))
        self.keys = [e[0] for e in ordered]
        #: key -> (safetensors dtype name, shape, begin, end) in the data section
        self.specs: dict[str, tuple[str, tuple[int, ...], int, int]] = {}
        header: dict = {"__metadata__": dict(metadata if metadata is not None else {"format": "pt"})}
        offset = 0
        for key, st, shape in ordered:
            nbytes = math.prod(shape) * ST_ITEMSIZE[st]
            self.specs[key] = (st, tuple(shape), offset, offset + nbytes)
            header[key] = {"dtype": st, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
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
    and fsyncs (so a renamed-into-place output is on disk, not only in cache;
    ``fsync=False`` leaves the flush to the kernel).
    """

    def __init__(self, path: str | os.PathLike, layout: ShardLayout, *, fsync: bool = True):
        if sys.byteorder != "little":
            raise RuntimeError("safetensors files are little-endian; writing them on a big-endian host "
                               "is not supported")
        self.path = Path(path)
        self.layout = layout
        self.fsync = bool(fsync)
        self._next = 0
        self._file = open(self.path, "xb")
        self._file.write(layout.header)

    def _expect(self, key: str) -> tuple[str, tuple[int, ...], int, int]:
        expected = self.layout.keys[self._next] if self._next < len(self.layout.keys) else None
        if key != expected:
            raise ValueError(f"{self.path}: expected key {expected!r} next, got {key!r}")
        return self.layout.specs[key]

    def write(self, key: str, tensor) -> None:
        """Append ``tensor`` (a torch tensor on the CPU, the planned dtype and shape) as ``key``."""
        import torch

        st, shape, _, _ = self._expect(key)
        dtype = __getattr__("ST_TO_TORCH")[st]
        if tensor.dtype != dtype or tuple(tensor.shape) != shape or tensor.device.type != "cpu":
            raise ValueError(f"{self.path}: key {key!r} planned as {dtype} {list(shape)} on cpu, "
                             f"got {tensor.dtype} {list(tensor.shape)} on {tensor.device}")
        if tensor.numel():
            # A byte view avoids numpy's missing bfloat16; memoryview writes without a copy.
            self._file.write(memoryview(tensor.contiguous().reshape(-1).view(torch.uint8).numpy()))
        self._next += 1

    def write_bytes(self, key: str, data) -> None:
        """Append ``key``'s raw little-endian bytes (any C-contiguous buffer: numpy array, mmap slice).

        The torch-free path; the buffer's byte length must be the planned one.
        """
        st, shape, begin, end = self._expect(key)
        view = memoryview(data).cast("B")
        if view.nbytes != end - begin:
            raise ValueError(f"{self.path}: key {key!r} planned as {st} {list(shape)} ({end - begin} bytes), "
                             f"got {view.nbytes} bytes")
        if view.nbytes:
            self._file.write(view)
        self._next += 1

    def close(self) -> None:
        """Finish the file; raises ValueError if tensors are missing."""
        if self._next != len(self.layout.keys):
            missing = self.layout.keys[self._next]
            self.abort()
            raise ValueError(f"{self.path}: closed before key {missing!r} was written")
        self._file.flush()
        if self.fsync:
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

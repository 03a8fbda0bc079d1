"""Hugging Face checkpoint directories: find and confine their files, validate them, write an index.

A checkpoint directory holds ``config.json`` plus either ``model.safetensors``
or sharded ``model-XXXXX-of-YYYYY.safetensors`` files listed in
``model.safetensors.index.json``. Every file named by the directory (the
index's ``weight_map`` entries, the fixed names, the side files copied into a
merge) is resolved, symlinks first, and must stay inside the directory: an
index entry ``../other/model.safetensors`` or a symlinked tokenizer pointing
at ``/etc`` is refused with the name, where it leads and why. Headers are read
by :mod:`bonesoup.merge.safetensors_file`; tensor data is memory-mapped with
``safetensors.safe_open``; nothing ever unpickles (no ``torch.load``).

The file and atomic-output helpers live in ``safetensors_file`` and
``atomic_dir``; they are re-exported here, where callers have always found them.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Mapping, Sequence

from soupkernels._dtypes import NAME_TO_SAFETENSORS

from .atomic_dir import _process_start, atomic_output_dir, check_free_space, clean_stale_temp_dirs  # noqa: F401
from .safetensors_file import ShardLayout, ShardWriter, TensorInfo, dtype_label, load_json, read_header

__all__ = [
    "CONFIG_NAME",
    "SINGLE_WEIGHTS_NAME",
    "INDEX_NAME",
    "MERGE_REPORT_NAME",
    "MERGEABLE_DTYPES",
    "MERGEABLE_ST_DTYPES",
    "TensorInfo",
    "CheckpointDir",
    "validate_compatible",
    "output_shard_names",
    "ShardLayout",
    "ShardWriter",
    "write_index",
    "copy_side_files",
    "check_free_space",
    "clean_stale_temp_dirs",
    "atomic_output_dir",
    "parse_dtype",
]

CONFIG_NAME = "config.json"
SINGLE_WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
#: Provenance file written by bonesoup.merge.offline; never copied as a side file.
MERGE_REPORT_NAME = "bonesoup-merge.json"

#: Floating dtypes that are merged, by safetensors name: soupkernels' table (the kernels
#: accumulate them in fp32). Every other dtype (integer buffers, bool masks) is copied from the
#: first input. ``MERGEABLE_DTYPES`` (the torch dtypes) and ``parse_dtype`` import torch on first use.
MERGEABLE_ST_DTYPES = tuple(NAME_TO_SAFETENSORS.values())
_FLOAT_ST_DTYPES = frozenset({"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"})


def __getattr__(name):
    if name in ("MERGEABLE_DTYPES", "parse_dtype"):
        from soupkernels import _dtypes

        return _dtypes.SUPPORTED_DTYPES if name == "MERGEABLE_DTYPES" else _dtypes.parse_dtype
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

# Files that hold weights (ours or another format's copy of the same weights):
# never copied into a merged output, which would otherwise carry stale weights.
_WEIGHT_FILE_RE = re.compile(
    r".*\.(safetensors|bin|pt|pth|ckpt|h5|msgpack|gguf|onnx)$|.*\.index\.json$"
)


def output_shard_names(n_files: int, sharded: bool) -> list[str]:
    """Output weight file names from the fixed Hugging Face scheme, never from an input's index.

    ``["model.safetensors"]`` for a single file, else
    ``model-00001-of-0000N.safetensors`` ... (transformers' ``save_pretrained`` names).
    """
    if not sharded:
        return [SINGLE_WEIGHTS_NAME]
    return [f"model-{i:05d}-of-{n_files:05d}.safetensors" for i in range(1, n_files + 1)]


def _confined(root: Path, name: str, what: str) -> Path:
    """``root / name`` with symlinks resolved, or ValueError unless it stays inside ``root``.

    ``root`` is already resolved. One layout outside ``root`` is allowed: the
    Hugging Face hub cache, where ``<repo>/snapshots/<rev>/<file>`` are
    symlinks to ``<repo>/blobs/<hash>`` (the same repository's store).
    """
    if not isinstance(name, str) or not name or "\x00" in name:
        raise ValueError(f"{what} names the file {name!r}, which is not a file name")
    rel = Path(name)
    if rel.is_absolute() or ".." in rel.parts:
        raise ValueError(f"{what} names the file {name!r}, which leaves the checkpoint directory {root}; "
                         "files must be given relative to it, without '..'")
    target = (root / rel).resolve()
    if target.is_relative_to(root) and target != root:
        return target
    if root.parent.name == "snapshots" and target.parent == root.parent.parent / "blobs":
        return target
    raise ValueError(f"{what}: {name!r} is a symlink that resolves to {target}, outside the checkpoint "
                     f"directory {root}; refusing to read it (copy the file into the directory instead)")


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
        A header, config.json or the index is malformed, they disagree, or a
        file they name resolves outside the directory. The message names the file.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_dir():
            raise FileNotFoundError(f"checkpoint directory {self.path} does not exist or is not a directory")
        self._root = self.path.resolve()
        config_path = self.path / CONFIG_NAME
        if not config_path.is_file():
            raise FileNotFoundError(f"{config_path} is missing: a checkpoint directory needs its config.json")
        self.config = load_json(self._read_small(CONFIG_NAME), str(config_path))
        if not isinstance(self.config, dict):
            raise ValueError(f"{config_path} does not hold a JSON object")

        index_path = self.path / INDEX_NAME
        if index_path.is_file() or index_path.is_symlink():
            self.sharded = True
            index = load_json(self._read_small(INDEX_NAME), str(index_path))
            weight_map = index.get("weight_map") if isinstance(index, dict) else None
            if not isinstance(weight_map, dict) or not weight_map:
                raise ValueError(f"{index_path} is not a valid safetensors index: it needs a non-empty "
                                 "\"weight_map\" object (tensor name -> file name)")
            for key, file in weight_map.items():
                if not isinstance(file, str):
                    raise ValueError(f"{index_path}: weight_map maps {key!r} to {file!r}, not a file name")
            metadata = index.get("metadata")
            if metadata is not None and not isinstance(metadata, dict):
                raise ValueError(f"{index_path}: \"metadata\" must be an object, got {type(metadata).__name__}")
            self.index_metadata = dict(metadata or {})
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

        source = str(index_path) if weight_map is not None else f"checkpoint {self.path}"
        self._files: dict[str, Path] = {}
        for shard in self.shards:  # every name confined before any file is read
            shard_path = _confined(self._root, shard, source)
            if shard_path in self._files.values():
                raise ValueError(f"{source} names the same file twice ({shard!r} resolves to {shard_path})")
            self._files[shard] = shard_path
        infos: dict[str, TensorInfo] = {}
        for shard, shard_path in self._files.items():
            if not shard_path.is_file():
                raise FileNotFoundError(f"{self.path / shard} is listed in {source} but does not exist "
                                        "or is not a regular file")
            for info in read_header(shard_path, shard):
                key = info.key
                if key in infos:
                    raise ValueError(f"key {key!r} appears in both {infos[key].file} and {shard} of {self.path}")
                if weight_map is not None and weight_map.get(key) != shard:
                    raise ValueError(f"{self.path / shard} holds key {key!r} but {index_path} maps it to "
                                     f"{weight_map.get(key)!r}")
                infos[key] = info
        if weight_map is not None:
            lost = [k for k in weight_map if k not in infos]
            if lost:
                raise ValueError(f"{index_path} maps key {lost[0]!r} to {weight_map[lost[0]]!r}, "
                                 f"but that file does not hold it ({len(lost)} such keys)")
        self.tensors = infos

    def _read_small(self, name: str) -> bytes:
        """A JSON file of the directory (config, index), confined and size-capped."""
        path = _confined(self._root, name, f"checkpoint {self.path}")
        if not path.is_file():
            raise ValueError(f"{self.path / name} is not a regular file")
        if path.stat().st_size > 64 * 2**20:
            raise ValueError(f"{self.path / name} is {path.stat().st_size} bytes; a JSON file of a checkpoint "
                             "is expected to be far below 64 MiB")
        return path.read_bytes()

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
        """Path of the weight file that holds ``key`` (as named in the directory)."""
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
        Sub-directories and special files (FIFOs, devices) are not copied; a
        symlink is copied only when it resolves inside the directory
        (ValueError otherwise, naming it and its target).
        """
        names = []
        for p in sorted(self.path.iterdir()):
            name = p.name
            if name.startswith(".") or name == MERGE_REPORT_NAME or _WEIGHT_FILE_RE.fullmatch(name):
                continue
            if p.is_symlink():
                target = _confined(self._root, name, f"side file {p}")
                if not target.exists():
                    raise ValueError(f"side file {p} is a symlink to {target}, which does not exist")
            if p.is_file():
                names.append(name)
        return names

    def side_file_path(self, name: str) -> Path:
        """Resolved path of one side file (confined to the directory)."""
        return _confined(self._root, name, f"side file {self.path / name}")

    def open_file(self, file: str):
        """Memory-map one weight file: ``safe_open(path, framework="pt")`` (use as a context manager)."""
        from safetensors import safe_open

        return safe_open(str(self._files[file]), framework="pt", device="cpu")

    def resolved_file(self, file: str) -> Path:
        """The confined, symlink-resolved path of one weight file (what :meth:`open_file` maps)."""
        return self._files[file]


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
            if t.st_dtype != o.st_dtype:
                raise ValueError(f"dtype mismatch for key {key!r}: {dtype_label(t.st_dtype)} in {ref.file_of(key)} "
                                 f"but {dtype_label(o.st_dtype)} in {other.file_of(key)}")
    for key, t in ref.tensors.items():
        if t.st_dtype in _FLOAT_ST_DTYPES and t.st_dtype not in MERGEABLE_ST_DTYPES:
            raise ValueError(f"key {key!r} in {ref.file_of(key)} has dtype {dtype_label(t.st_dtype)}; only "
                             "float32, bfloat16 and float16 tensors can be merged")


def write_index(out_dir: Path, weight_map: Mapping[str, str], metadata: Mapping) -> Path:
    """Write ``model.safetensors.index.json``: ``{"metadata": ..., "weight_map": ...}``, keys sorted."""
    path = Path(out_dir) / INDEX_NAME
    body = {"metadata": dict(metadata), "weight_map": {k: weight_map[k] for k in sorted(weight_map)}}
    path.write_text(json.dumps(body, indent=2) + "\n")
    return path


def finish_shards(out_dir: Path, layouts: Sequence[ShardLayout], first: "CheckpointDir", data_bytes: int) -> None:
    """Complete a merge's shards in ``out_dir``: write the layouts no tensor opened (empty files), and
    ``model.safetensors.index.json`` when the first input is sharded (its metadata, the new total size)."""
    for lay in layouts:
        if not lay.keys:
            ShardWriter(out_dir / lay.name, lay).close()
    if first.sharded:
        metadata = dict(first.index_metadata)
        metadata["total_size"] = data_bytes
        write_index(out_dir, {key: lay.name for lay in layouts for key in lay.keys}, metadata)


def copy_side_files(src: CheckpointDir, out_dir: Path, *, config_updates: Mapping | None = None) -> list[str]:
    """Copy ``src.side_files`` into ``out_dir`` (contents, never links); ``config_updates`` go into config.json."""
    names = src.side_files
    for name in names:
        if name == CONFIG_NAME and config_updates:
            config = dict(src.config)
            config.update(config_updates)
            (Path(out_dir) / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        else:
            shutil.copyfile(src.side_file_path(name), Path(out_dir) / name)
    return names

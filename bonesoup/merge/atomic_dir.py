"""Atomic output directories: write beside the target, rename into place when complete.

:func:`atomic_output_dir` makes a whole output appear at once (a temporary
directory beside the target, then ``os.replace``), so a crash never leaves a
half-written model under the target's name; temporary directories left by a
killed run are recognisable by name (writer pid and start time) and cleaned
by the next run for the same target.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import secrets
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

__all__ = ["check_free_space", "clean_stale_temp_dirs", "atomic_output_dir"]

log = logging.getLogger(__name__)



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
        if not m or not (entry.is_dir() or entry.is_symlink()):  # a link: a symlinked output moved aside
            continue
        if _writer_alive(int(m.group(2)), m.group(3) and int(m.group(3))):
            continue
        if m.group(1) == "old" and not target.exists():
            log.warning("restoring %s from %s, left by a run (pid %s) that died while replacing it",
                        target, entry, m.group(2))
            os.replace(entry, target)
            continue
        log.warning("removing stale temporary directory %s left by a dead run (pid %s)", entry, m.group(2))
        _remove_entry(entry)
        removed.append(entry)
    return removed


def _remove_entry(path: Path) -> None:
    """Remove a directory tree, or only the link when ``path`` is a symlink.

    A symlinked output replaced with ``force`` moves the link aside, not its
    target: unlink it (rmtree refuses symlinks, which used to leave a
    ``.NAME.bonesoup-old-*`` entry behind on every run), never the directory
    it points to.
    """
    if path.is_symlink():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)


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
def atomic_output_dir(target: str | os.PathLike, *, force: bool = False, required_bytes: int = 0,
                      fsync: bool = True) -> Iterator[Path]:
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
    fsync : bool
        fsync the files and directories before and after the rename (the
        default: after a power loss the output is absent or complete). False
        keeps the rename atomic against a crash of this process but leaves
        the flush to the kernel (what mergekit and ``save_pretrained`` do).

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
        if fsync:
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
            _remove_entry(old)
        else:
            os.replace(tmp, target)
        if fsync:
            _fsync_dir(parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

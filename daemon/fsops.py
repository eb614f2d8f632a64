"""File operations that never leave a half-written file where a user can see it.

Every file dcmdb puts in a shared folder goes through here: written or copied to a hidden
`.tmp-*` name in the target folder (Samba vetoes those), fsynced, then renamed into place.
Standard library only; used by ingest, and by DICOMDIR and NIfTI writers.
"""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

TEMP_PREFIX = ".tmp-"

# A write that fails with these ran out of room (EDQUOT: the dcmdb user's quota), not a bad file.
NO_SPACE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})

# Hot paths pass plain strings: pathlib costs more than the system calls here.
StrPath = str | os.PathLike[str]


def temp_name_for(target: StrPath) -> Path:
    """A hidden name beside target, unique to this process."""
    target = Path(target)
    return target.with_name(f"{TEMP_PREFIX}{target.name}-{os.getpid()}")


def write_bytes_atomically(target: Path, data: bytes) -> None:
    """Replace target with data; readers see the old file or the new one, never a part."""
    temp = temp_name_for(target)
    try:
        with open(temp, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temp, target)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def link_no_replace(source: StrPath, target: StrPath) -> None:
    """Give source the name target as well, atomically, failing with FileExistsError if target
    exists. Falls back to a checked rename where the filesystem has no hard links."""
    try:
        os.link(source, target)
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK):
            raise
        # No hard links here (some network or FAT filesystems): a rename after a check. The
        # window between the two is only open to someone else writing into the archive.
        if os.path.lexists(target):
            raise FileExistsError(errno.EEXIST, "target exists", os.fspath(target)) from exc
        os.rename(source, target)
        return
    os.unlink(source)


def copy_no_replace(source: StrPath, target: StrPath) -> None:
    """Copy source to target through a hidden temp name + fsync; FileExistsError if target
    exists. The source is left alone."""
    temp = temp_name_for(target)
    try:
        with open(source, "rb") as src, open(temp, "wb") as out:
            shutil.copyfileobj(src, out, 1 << 20)
            out.flush()
            os.fsync(out.fileno())
        link_no_replace(temp, target)  # fails if target exists: never overwrite
    finally:
        temp.unlink(missing_ok=True)


def move_no_replace(source: StrPath, target: StrPath) -> None:
    """Move source to target atomically without ever replacing an existing target.

    Same filesystem: a hard link + unlink (a crash in between leaves both names on one inode,
    which recovery resolves). Across filesystems: copy to a hidden temp name, fsync, link into
    place, then remove the source.
    """
    try:
        link_no_replace(source, target)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        copy_no_replace(source, target)
        os.unlink(source)


def remove_temp_files_for(target: Path) -> None:
    """Remove temp files a killed process left for target."""
    parent = target.parent
    if not parent.is_dir():
        return
    prefix = f"{TEMP_PREFIX}{target.name}-"
    for entry in os.scandir(parent):
        if entry.name.startswith(prefix):
            Path(entry.path).unlink(missing_ok=True)


class LockBusyError(Exception):
    """Another process holds the lock."""


@contextmanager
def exclusive_lock(path: Path) -> Iterator[None]:
    """Hold an advisory lock on `path` (created if missing) for the block; LockBusyError at
    once if another process holds it. The kernel releases it when its holder dies."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as lock:
        try:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            raise LockBusyError(str(path)) from exc
        try:
            yield
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)

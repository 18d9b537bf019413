# -*- coding: utf-8 -*-
# Copyright: pacs.orthanc contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Orthanc's SQLite index: who holds it, a consistent copy of the whole ``index*`` set,
and what the copy says (schema version, counts, attachments).

The copy is taken in two steps. ``capture_index_set`` takes every ``index*`` file as it is, while
nobody holds the index: by reflink (``FICLONE``) where the filesystem shares extents (XFS with
``reflink=1``, btrfs), which takes milliseconds whatever the index size, else by copying the
bytes. ``finish_capture`` then replays the write-ahead log into the copy and leaves one
self-contained file: it works on the copy only, so it can run once Orthanc runs again. A
captured set that is not finished yet can already be read (SQLite replays the log as it reads)."""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import sqlite3
import struct
import time

from ansible_collections.pacs.orthanc.plugins.module_utils._common import PacsError, os_error_cause

__metaclass__ = type

# SQLite's unix VFS locks bytes from PENDING_BYTE (0x40000000): pending, reserved, then the
# 510-byte shared range. Orthanc (locking_mode=EXCLUSIVE) keeps a write lock there while it runs.
_LOCK_START = 0x40000000
_LOCK_LEN = 512
_FLOCK = "hhqqi4x"  # struct flock on Linux 64-bit: type, whence, start, len, pid

RESOURCE_TYPES = {1: "patients", 2: "studies", 3: "series", 4: "instances"}

FICLONE = 0x40049409  # _IOW(0x94, 9, int): share the source's extents (linux/fs.h)
# what FICLONE answers where it cannot clone: another filesystem, or one without shared extents
_CANNOT_CLONE = {errno.EXDEV, errno.EOPNOTSUPP, errno.ENOTTY, errno.EINVAL, errno.ENOSYS, errno.EPERM}
CAPTURE_REFLINK = "reflink"
CAPTURE_COPY = "copy"


SIDE_FILES = ("index-wal", "index-shm", "index-journal")  # what SQLite reads beside ``index``


def index_files(index_dir: str) -> list:
    """The files of an index set: ``index`` and its ``index-wal`` / ``index-shm`` / journal."""
    try:
        names = os.listdir(index_dir)
    except OSError as exc:
        raise PacsError("find index", f"cannot list the index folder: {os_error_cause(exc)}")
    return sorted(name for name in names if name == "index" or name.startswith("index-"))


def lock_holder(index_file: str):
    """The PID of a process holding a SQLite lock on ``index_file``, or None when it is free.

    Uses F_GETLK, which reads the lock table without taking or changing anything."""
    try:
        fd = os.open(index_file, os.O_RDONLY)
    except OSError as exc:
        raise PacsError("check index lock", f"cannot open the index: {os_error_cause(exc)}")
    try:
        query = struct.pack(_FLOCK, fcntl.F_WRLCK, os.SEEK_SET, _LOCK_START, _LOCK_LEN, 0)
        answer = fcntl.fcntl(fd, fcntl.F_GETLK, query)
        lock_type, _whence, _start, _length, pid = struct.unpack(_FLOCK, answer)
    finally:
        os.close(fd)
    return None if lock_type == fcntl.F_UNLCK else pid


def wait_until_free(index_file: str, timeout: float, poll: float = 0.1) -> float:
    """Wait until no process holds the index; returns the seconds waited."""
    start = time.monotonic()
    while True:
        pid = lock_holder(index_file)
        if pid is None:
            return time.monotonic() - start
        if time.monotonic() - start >= timeout:
            raise PacsError(
                "check index lock",
                f"process {pid} still holds the SQLite index {index_file} after {timeout:.0f} s: "
                "Orthanc is still running (did the stop command work?). The index cannot be "
                "copied consistently while Orthanc runs")
        time.sleep(poll)


def connect(path: str, readonly: bool = True) -> sqlite3.Connection:
    uri = f"file:{path}?mode={'ro' if readonly else 'rw'}"
    return sqlite3.connect(uri, uri=True, timeout=5, isolation_level=None)


def consolidate(index_file: str) -> None:
    """Replay the WAL of a *copied* index into its main file and leave one self-contained file."""
    try:
        conn = connect(index_file, readonly=False)
        try:
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
            mode = conn.execute("PRAGMA journal_mode=DELETE").fetchone()[0]
        finally:
            conn.close()
    except sqlite3.Error as exc:
        raise PacsError("open index copy", f"SQLite cannot open the copied index {index_file}: {exc}")
    if mode.lower() != "delete":
        raise PacsError("open index copy", f"the copied index stays in journal mode {mode}")
    for suffix in ("-wal", "-shm"):
        if os.path.exists(index_file + suffix):
            os.unlink(index_file + suffix)


def clone_file(src: str, dest: str) -> bool:
    """Reflink ``src`` to ``dest`` (created 0600); False, and no ``dest``, where the filesystem
    cannot (another filesystem, or one without shared extents)."""
    with open(src, "rb") as source:
        fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            fcntl.ioctl(fd, FICLONE, source.fileno())
        except OSError as exc:
            os.close(fd)
            os.unlink(dest)
            if exc.errno in _CANNOT_CLONE:
                return False
            raise
        os.close(fd)
    return True


def _copy_private(src: str, dest: str) -> None:
    """Copy ``src`` to ``dest``, created 0600 before any byte is written (an index holds patient data)."""
    os.close(os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600))
    os.chmod(dest, 0o600)  # an earlier file of that name keeps its mode through O_CREAT
    shutil.copyfile(src, dest)


def capture_index_set(index_dir: str, dest_dir: str, reflink: bool = True) -> dict:
    """Take every ``index*`` file together, as it is: by reflink where the filesystem can
    (``index_capture: reflink``), else by copy (``copy``). The set is not consolidated yet: call
    ``finish_capture`` (it can wait until Orthanc runs again). The caller makes sure nobody holds
    the index (``wait_until_free``)."""
    names = index_files(index_dir)
    if "index" not in names:
        raise PacsError("find index", f"there is no SQLite index file 'index' in {index_dir}")
    os.makedirs(dest_dir, mode=0o700, exist_ok=True)
    # an earlier attempt's side files: SQLite would replay a stale index-wal into the copy (only
    # those names: dest may be a folder of the administrator's, sqlite_capture's O(dest))
    for name in index_files(dest_dir):
        if name in SIDE_FILES and name not in names:
            try:
                os.unlink(os.path.join(dest_dir, name))
            except OSError as exc:
                raise PacsError("copy index", os_error_cause(exc))
    copied, cloned = {}, reflink
    for name in names:
        src, dest = os.path.join(index_dir, name), os.path.join(dest_dir, name)
        try:
            if not (cloned and clone_file(src, dest)):
                cloned = False  # one refusal is enough: the other files live on the same filesystems
                _copy_private(src, dest)
            copied[name] = os.path.getsize(src)
        except OSError as exc:
            raise PacsError("copy index", os_error_cause(exc))
    return {"source_files": copied, "path": os.path.join(dest_dir, "index"),
            "index_capture": CAPTURE_REFLINK if cloned else CAPTURE_COPY}


def finish_capture(captured: dict) -> dict:
    """Consolidate a captured set (``capture_index_set``'s result) into one file; adds its size."""
    target = captured["path"]
    consolidate(target)
    os.chmod(target, 0o600)
    captured["size"] = os.path.getsize(target)
    return captured


def copy_index_set(index_dir: str, dest_dir: str) -> dict:
    """Capture every ``index*`` file together (by reflink where possible), then consolidate the
    copy into one file. The caller makes sure nobody holds the index (``wait_until_free``)."""
    return finish_capture(capture_index_set(index_dir, dest_dir))


def check_integrity(path: str, level: str = "full") -> list:
    """Run PRAGMA integrity_check (full) or quick_check (quick): returns the problems found."""
    if level == "none":
        return []
    pragma = "integrity_check" if level == "full" else "quick_check"
    try:
        conn = connect(path)
        try:
            rows = [row[0] for row in conn.execute(f"PRAGMA {pragma}(20)")]
        finally:
            conn.close()
    except sqlite3.Error as exc:
        return [f"SQLite cannot read the index: {exc}"]
    return [] if rows == ["ok"] else rows


def read_summary(path: str) -> dict:
    """Schema version and resource counts of an index that nobody holds."""
    try:
        conn = connect(path)
        try:
            row = conn.execute("SELECT value FROM GlobalProperties WHERE property = 1").fetchone()
            patch = conn.execute("SELECT value FROM GlobalProperties WHERE property = 4").fetchone()
            counts = {name: 0 for name in RESOURCE_TYPES.values()}
            for rtype, count in conn.execute(
                    "SELECT resourceType, COUNT(*) FROM Resources GROUP BY resourceType"):
                if rtype in RESOURCE_TYPES:
                    counts[RESOURCE_TYPES[rtype]] = count
            columns = [r[1] for r in conn.execute("PRAGMA table_info(AttachedFiles)")]
        finally:
            conn.close()
    except sqlite3.Error as exc:
        raise PacsError("read index", f"{path} is not a readable Orthanc index: {exc}")
    return {"schema_version": str(row[0]) if row else None, "patch_level": str(patch[0]) if patch else None,
            "counts": counts, "attached_files_columns": columns}


def attachments(path: str) -> dict:
    """{uuid: (compressedSize, compressedMD5 or '')} for every file the index lists (small
    indexes and tests: it holds every file; ``iter_attachments`` streams them)."""
    return {uuid: (size, md5) for uuid, size, md5 in iter_attachments(path)}


def iter_attachments(path: str):
    """(uuid, compressedSize, compressedMD5 or '') of every file the index lists, one at a time."""
    try:
        conn = connect(path)
        try:
            for uuid, size, md5 in conn.execute("SELECT uuid, compressedSize, compressedMD5 FROM AttachedFiles"):
                yield uuid, int(size), md5 or ""
        finally:
            conn.close()
    except sqlite3.Error as exc:
        raise PacsError("read index", f"cannot list the attachments of {path}: {exc}")


def attachment_totals(path: str) -> tuple:
    """(number, total compressed size) of the files the index lists."""
    try:
        conn = connect(path)
        try:
            count, size = conn.execute("SELECT COUNT(*), COALESCE(SUM(compressedSize), 0) FROM AttachedFiles").fetchone()
            return int(count), int(size)
        finally:
            conn.close()
    except sqlite3.Error as exc:
        raise PacsError("read index", f"cannot list the attachments of {path}: {exc}")

# -*- coding: utf-8 -*-
# Copyright: pacs.orthanc contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Orthanc's SQLite index: who holds it, a consistent copy of the whole ``index*`` set,
and what the copy says (schema version, counts, attachments)."""

from __future__ import annotations

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


def copy_index_set(index_dir: str, dest_dir: str) -> dict:
    """Copy every ``index*`` file together, then consolidate the copy into one file.

    The caller makes sure nobody holds the index (``wait_until_free``)."""
    names = index_files(index_dir)
    if "index" not in names:
        raise PacsError("find index", f"there is no SQLite index file 'index' in {index_dir}")
    os.makedirs(dest_dir, mode=0o700, exist_ok=True)
    copied = {}
    for name in names:
        src = os.path.join(index_dir, name)
        try:
            shutil.copyfile(src, os.path.join(dest_dir, name))
            copied[name] = os.path.getsize(src)
        except OSError as exc:
            raise PacsError("copy index", os_error_cause(exc))
    target = os.path.join(dest_dir, "index")
    consolidate(target)
    os.chmod(target, 0o600)
    return {"source_files": copied, "path": target, "size": os.path.getsize(target)}


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
    """{uuid: (compressedSize, compressedMD5 or '')} for every file the index lists."""
    try:
        conn = connect(path)
        try:
            return {uuid: (int(size), md5 or "") for uuid, size, md5 in conn.execute(
                "SELECT uuid, compressedSize, compressedMD5 FROM AttachedFiles")}
        finally:
            conn.close()
    except sqlite3.Error as exc:
        raise PacsError("read index", f"cannot list the attachments of {path}: {exc}")

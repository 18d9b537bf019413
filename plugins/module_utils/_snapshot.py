# -*- coding: utf-8 -*-
# Copyright: pacs.orthanc contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Crash-consistent captures of a running Orthanc from a filesystem snapshot.

An atomic snapshot of the filesystem (or btrfs subvolume) holding Orthanc's SQLite index and its
storage is what a sudden kill of Orthanc would leave on disk: SQLite in WAL mode recovers from
that to the last committed transaction, and a storage file that was written but not yet committed
to the index is only an orphan. So the index is captured from the snapshot (every ``index*`` file
together, the WAL replayed into the copy), the storage is taken from the snapshot (a hot pass with
no settle time, then the delta pass against the captured index drops the orphans), and the
snapshot is released, always. Orthanc is never stopped.

Snapshots are named ``.pacs-orthanc-snapshot.<backup name>`` and live in the root of the snapshotted
subvolume. While one capture runs it holds an ``flock`` on ``.pacs-orthanc-snapshot.lock`` there;
a snapshot of that name found while the lock is free was left by a run that was killed, and is
deleted before the new one is taken.

Only btrfs is implemented. LVM thin and ZFS snapshots could not be tested where this collection is
developed (no device-mapper, no ZFS in its kernel), so they are refused with a clear message rather
than shipped untested."""

from __future__ import annotations

import os
import shutil
import threading
import time

from ansible_collections.pacs.orthanc.plugins.module_utils import _lock, _rest, _sqlite, _storage
from ansible_collections.pacs.orthanc.plugins.module_utils._common import (
    PacsError, iso, os_error_cause, run_command, utc_now)

__metaclass__ = type

PREFIX = ".pacs-orthanc-snapshot."
LOCK_NAME = PREFIX + "lock"
BTRFS_SUBVOLUME_ROOT_INODE = 256  # BTRFS_FIRST_FREE_OBJECTID: the root folder of every subvolume
STEP_PRECONDITIONS = "check snapshot preconditions"
UNTESTED = {
    "lvm": "LVM thin snapshots are not implemented: they could not be tested where this collection is "
           "developed (its kernel has no device-mapper)",
    "zfs": "ZFS snapshots are not implemented: they could not be tested where this collection is "
           "developed (its kernel has no ZFS)",
}


def precondition(cause: str, **details) -> PacsError:
    """A failure before anything was created: a fallback to stopping Orthanc is still possible."""
    return PacsError(STEP_PRECONDITIONS, cause, precondition_failed=True, **details)


# --------------------------------------------------------------------------------------------
# Where a path lives: its mount (from /proc/self/mountinfo) and its btrfs subvolume


def _unescape(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as octal (\\040 ...)."""
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and i + 3 < len(field) and field[i + 1:i + 4].isdigit():
            out.append(chr(int(field[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def mount_of(path: str, mountinfo: str = "/proc/self/mountinfo") -> dict:
    """The mount holding ``path`` (the longest mount point that is a prefix of its real path):
    mount point, filesystem type, source device, mount options."""
    real = os.path.realpath(path)
    best = None
    try:
        with open(mountinfo, "r", encoding="utf-8", errors="replace") as handle:
            lines = handle.read().splitlines()
    except OSError as exc:
        raise precondition(f"cannot read the mount table: {os_error_cause(exc)}")
    for line in lines:
        left, _sep, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if len(fields) < 6 or len(tail) < 2:
            continue
        point = _unescape(fields[4])
        inside = real == point or real.startswith(point.rstrip("/") + "/")
        if inside and (best is None or len(point) >= len(best["mount_point"])):
            best = {"mount_point": point, "fstype": tail[0], "source": _unescape(tail[1]),
                    "options": fields[5].split(",") + (tail[2].split(",") if len(tail) > 2 else [])}
    if best is None:
        raise precondition(f"no mount holds {real}")
    return best


def btrfs_subvolume_of(path: str) -> str:
    """The root folder of the btrfs subvolume that holds ``path``: the nearest folder up from it
    whose inode is 256 (each subvolume's root folder has that inode and a device of its own)."""
    current = os.path.realpath(path)
    st = os.stat(current)
    while st.st_ino != BTRFS_SUBVOLUME_ROOT_INODE:
        parent = os.path.dirname(current)
        if parent == current:
            raise precondition(f"found no btrfs subvolume root above {path}")
        current, st = parent, os.stat(parent)
    return current


# --------------------------------------------------------------------------------------------
# Polling Orthanc while the capture runs: the downtime is 0 only when every poll answered


class Poller:
    """GET /system every ``interval`` seconds in a thread; counts answers and failures and the
    longest time between two answers."""

    def __init__(self, url: str, username: str | None, password: str | None, interval: float = 0.05):
        self.url, self.username, self.password, self.interval = url, username, password, interval
        self.polls = self.failures = 0
        self.first_failure = None
        self.longest_gap = 0.0
        self._last_answer = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="orthanc-poller", daemon=True)

    def _poll_once(self) -> None:
        try:
            _rest.get(self.url, "/system", self.username, self.password, timeout=2)
            ok, error = True, None
        except Exception as exc:  # pylint: disable=broad-except  # any failure is a failed poll
            ok, error = False, f"{type(exc).__name__}: {exc}"
        now = time.monotonic()
        self.polls += 1
        if ok:
            if self._last_answer is not None:
                self.longest_gap = max(self.longest_gap, now - self._last_answer)
            self._last_answer = now
        else:
            self.failures += 1
            self.first_failure = self.first_failure or error

    def _run(self) -> None:
        while not self._stop.is_set():
            self._poll_once()
            self._stop.wait(self.interval)

    def start(self) -> None:
        self._poll_once()  # one answer before anything is done
        self._thread.start()

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join()
        self._poll_once()  # and one after everything
        return {"polls": self.polls, "failures": self.failures, "interval_seconds": self.interval,
                "longest_gap_seconds": round(self.longest_gap, 3), "first_failure": self.first_failure}


# --------------------------------------------------------------------------------------------
# btrfs


class BtrfsSnapshot:
    """Preconditions, leftover clean-up, creation and release of one read-only btrfs snapshot."""

    def __init__(self, index_directory: str, storage_directory: str, volume: str | None, name: str,
                 min_free_bytes: int, timeout: float = 120):
        self.index_directory = os.path.realpath(index_directory)
        self.storage_directory = os.path.realpath(storage_directory)
        self.requested_volume = volume
        self.name = name
        self.min_free_bytes = min_free_bytes
        self.timeout = timeout
        self.volume = None
        self.path = None
        self.program = None
        self.lock_fd = None
        self.created = False
        self._created_mono = 0.0
        self.removed_leftovers: list = []
        self.info: dict = {"kind": "btrfs"}

    # -- before anything is created ----------------------------------------------------------

    def check(self) -> dict:
        for label, folder in (("index", self.index_directory), ("storage", self.storage_directory)):
            if not os.path.isdir(folder):
                raise precondition(f"the {label} folder {folder} does not exist")
        mounts = {label: mount_of(folder) for label, folder in
                  (("index", self.index_directory), ("storage", self.storage_directory))}
        for label, mount in mounts.items():
            if mount["fstype"] != "btrfs":
                folder = self.index_directory if label == "index" else self.storage_directory
                raise precondition(
                    f"orthanc_backup_snapshot=btrfs, but the {label} folder {folder} is on a {mount['fstype']} "
                    f"filesystem ({mount['source']} mounted at {mount['mount_point']}), not btrfs: put Orthanc's "
                    "index and storage into one btrfs subvolume (see docs/snapshots.md) or set "
                    "orthanc_backup_snapshot=none")
        index_volume = btrfs_subvolume_of(self.index_directory)
        storage_volume = btrfs_subvolume_of(self.storage_directory)
        if self.requested_volume:
            wanted = os.path.realpath(self.requested_volume)
            if not os.path.isdir(wanted) or os.stat(wanted).st_ino != BTRFS_SUBVOLUME_ROOT_INODE:
                raise precondition(f"orthanc_backup_snapshot_volume={self.requested_volume} is not the root "
                                   "of a btrfs subvolume")
            for label, folder, found in (("index", self.index_directory, index_volume),
                                         ("storage", self.storage_directory, storage_volume)):
                if found != wanted:
                    raise precondition(
                        f"the {label} folder {folder} is not inside the subvolume {wanted} (it is in the "
                        f"subvolume {found}): a snapshot of {wanted} would not hold it")
        if index_volume != storage_volume:
            raise precondition(
                f"the index folder {self.index_directory} is in the btrfs subvolume {index_volume} but the storage "
                f"folder {self.storage_directory} is in {storage_volume}: one snapshot cannot capture both at the "
                "same instant. Keep both in one subvolume (see docs/snapshots.md)")
        self.volume = index_volume
        if "ro" in mounts["index"]["options"]:
            raise precondition(f"{mounts['index']['mount_point']} is mounted read-only: no snapshot can be created")
        self.program = shutil.which("btrfs")
        if not self.program:
            raise precondition("the btrfs program is not installed or not on the PATH (Debian package btrfs-progs)")
        if os.geteuid() != 0:
            raise precondition("creating and deleting btrfs snapshots needs root: run the role with become: true")
        st = os.statvfs(self.volume)
        free = st.f_bavail * st.f_frsize
        if free < self.min_free_bytes:
            raise precondition(
                f"only {free} bytes are free on the btrfs filesystem of {self.volume}, "
                f"{self.min_free_bytes} are required: while the snapshot exists, files Orthanc deletes or "
                "writes keep their old blocks")
        self.path = os.path.join(self.volume, PREFIX + self.name)
        self.info.update({"volume": self.volume, "path": self.path, "mount_point": mounts["index"]["mount_point"],
                          "device": mounts["index"]["source"], "free_bytes_before": free,
                          "index_relative": os.path.relpath(self.index_directory, self.volume),
                          "storage_relative": os.path.relpath(self.storage_directory, self.volume)})
        return self.info

    def leftovers(self) -> list:
        """Snapshots of earlier runs in the subvolume's root (read-only subvolumes of our name)."""
        found = []
        vol_dev = os.stat(self.volume).st_dev
        for entry in sorted(os.listdir(self.volume)):
            full = os.path.join(self.volume, entry)
            if not entry.startswith(PREFIX) or entry == LOCK_NAME:
                continue
            try:
                st = os.lstat(full)
            except FileNotFoundError:
                continue
            if os.path.isdir(full) and not os.path.islink(full) and st.st_ino == BTRFS_SUBVOLUME_ROOT_INODE \
                    and st.st_dev != vol_dev:
                found.append(full)
        return found

    def lock(self) -> None:
        """Hold an flock for the life of this capture: the next run knows that a snapshot of our name is
        a leftover when it can take the lock. Two captures of one subvolume at once are refused."""
        path = os.path.join(self.volume, LOCK_NAME)
        try:
            fd = _lock.try_flock(path)
        except OSError as exc:
            raise precondition(f"cannot create the snapshot lock: {os_error_cause(exc)}")
        if fd is None:
            raise precondition(f"another snapshot backup of {self.volume} is running (it holds {path}); "
                               "wait for it to end")
        self.lock_fd = fd

    def unlock(self) -> None:
        _lock.unflock(self.lock_fd)
        self.lock_fd = None

    # -- the snapshot ------------------------------------------------------------------------

    def remove_leftovers(self) -> list:
        for leftover in self.leftovers():
            self._delete(leftover, "remove a snapshot left by an interrupted backup")
            self.removed_leftovers.append(leftover)
        return self.removed_leftovers

    def create(self) -> None:
        if os.path.lexists(self.path):
            raise precondition(f"{self.path} exists already and is not a snapshot of an earlier run; "
                               "remove it by hand")
        start = time.monotonic()
        self.info["created_at"] = iso(utc_now())
        try:
            run_command([self.program, "subvolume", "snapshot", "-r", self.volume, self.path],
                        "create the btrfs snapshot", timeout=self.timeout)
        except PacsError as exc:
            # a snapshot that got created after all (a timeout, say) is released by the caller
            self.created = os.path.lexists(self.path)
            raise precondition(exc.cause) if not self.created else exc
        self.created = True
        self.info["create_seconds"] = round(time.monotonic() - start, 3)
        self._created_mono = time.monotonic()

    def release(self) -> None:
        if not self.created:
            return
        start = time.monotonic()
        self._delete(self.path, "release the btrfs snapshot")
        self.created = False
        self.info.update({"released_at": iso(utc_now()), "release_seconds": round(time.monotonic() - start, 3),
                          "held_seconds": round(time.monotonic() - self._created_mono, 3)})

    def _delete(self, path: str, step: str) -> None:
        try:
            run_command([self.program, "subvolume", "delete", path], step, timeout=self.timeout)
        except PacsError as exc:
            raise PacsError(step, f"{exc.cause}. The snapshot {path} is still there: delete it with "
                            f"'btrfs subvolume delete {path}'")
        if os.path.lexists(path):
            raise PacsError(step, f"btrfs reported {path} deleted but it is still there: delete it with "
                            f"'btrfs subvolume delete {path}'")

    def inside(self, folder: str) -> str:
        """Where ``folder`` (of the live subvolume) is in the snapshot."""
        return os.path.normpath(os.path.join(self.path, os.path.relpath(folder, self.volume)))


# --------------------------------------------------------------------------------------------
# The capture


def capture(kind: str, index_directory: str, storage_directory: str, name: str, index_dest: str,
            storage_dest: str, state_file: str, previous: str | None = None, link_mode: str = "auto",
            workers: int = 4, volume: str | None = None, integrity: str = "quick",
            min_free_bytes: int = 64 * 1024 * 1024, poll: dict | None = None, check_mode: bool = False) -> dict:
    """Take a snapshot, capture the index and the storage from it, release it (always).

    ``poll``: {url, username, password, interval} to poll Orthanc during the capture, or None.
    Returns a result whose ``details`` goes into the manifest."""
    if kind in UNTESTED:
        raise precondition(f"orthanc_backup_snapshot={kind}: {UNTESTED[kind]}. Use btrfs, or none to stop "
                           "Orthanc briefly (docs/snapshots.md)")
    if kind != "btrfs":
        raise precondition(f"unknown snapshot kind {kind!r}")
    if link_mode == "hardlink":
        raise precondition("orthanc_backup_link_mode=hardlink cannot be used with a snapshot: files in a btrfs "
                           "snapshot cannot be hard-linked from another subvolume, and the snapshot is released "
                           "at the end. Use auto or copy")
    snap = BtrfsSnapshot(index_directory, storage_directory, volume, name, min_free_bytes)
    info = snap.check()
    result = {"changed": not check_mode, "warnings": [], "snapshot": info, "released": True}
    if check_mode:  # nothing is created, not even the lock file
        info["would_remove_leftovers"] = snap.leftovers()
        result["details"] = {"kind": kind, "snapshot": info, "check_mode": True}
        return result

    poller = Poller(poll["url"], poll.get("username"), poll.get("password"), poll.get("interval", 0.05)) \
        if poll else None
    timings = {}
    failure = None
    snap.lock()
    try:
        if poller:
            poller.start()
        snap.remove_leftovers()
        t0 = time.monotonic()
        snap.create()
        timings["snapshot"] = round(time.monotonic() - t0, 3)

        t0 = time.monotonic()
        snap_index, snap_storage = snap.inside(snap.index_directory), snap.inside(snap.storage_directory)
        index = _sqlite.copy_index_set(snap_index, index_dest)  # every index* file, WAL replayed
        index.update(_sqlite.read_summary(index["path"]))
        problems = _sqlite.check_integrity(index["path"], integrity)
        if problems:
            raise PacsError("check the index captured from the snapshot",
                            f"{integrity} check of {index['path']} failed: {'; '.join(problems[:5])}")
        index["integrity_check"] = integrity
        timings["index"] = round(time.monotonic() - t0, 3)

        t0 = time.monotonic()
        hot = _storage.hot_pass(snap_storage, storage_dest, state_file, previous=previous,
                                link_mode=link_mode, settle=0, workers=workers)
        timings["storage"] = round(time.monotonic() - t0, 3)

        t0 = time.monotonic()
        with _storage.Delta(snap_storage, storage_dest, state_file, index=index["path"], previous=previous,
                            link_mode=link_mode, workers=workers) as compare:
            differences = compare.differences()
            absent = sorted(u for u, _size, placed in differences if placed is None)
            if absent:
                raise PacsError("copy storage from the snapshot",
                                f"{len(absent)} files that the captured index lists are not in the snapshot of "
                                f"{snap_storage} (e.g. {absent[0]}): either the live archive is already damaged, or "
                                "Orthanc committed them to the index before they reached the disk "
                                "(SyncStorageArea false?)")
            short = sorted((u, size, placed) for u, size, placed in differences if placed is not None)
            if short:
                u, size, placed = short[0]
                raise PacsError("copy storage from the snapshot",
                                f"{len(short)} files have in the snapshot another size than the captured index says "
                                f"(e.g. {u}: {placed} bytes, the index says {size}): the snapshot is not "
                                "crash-consistent for these files (SyncStorageArea false?)")
            delta = compare.fetch()
            delta.update(compare.tidy())
        if delta["missing_files"] or delta["fetched_files"]:  # cannot happen after the checks above
            raise PacsError("copy storage from the snapshot", f"unexpected delta from the snapshot: {delta}")
        timings["orphans"] = round(time.monotonic() - t0, 3)
        result.update({"capture": index, "hot": hot, "delta": delta,
                       "orphans_dropped": delta["removed_files"]})
    except (PacsError, OSError) as exc:
        failure = exc if isinstance(exc, PacsError) else PacsError("capture from the snapshot", os_error_cause(exc))
    finally:
        try:
            try:
                snap.release()
            except PacsError as exc:
                if failure is not None:
                    failure = PacsError(failure.step, f"{failure.cause}; and then: {exc}", released=False)
                else:
                    failure = PacsError(exc.step, exc.cause, released=False)
        finally:
            snap.unlock()
            polls = poller.stop() if poller else None
    if failure is not None:
        failure.details.setdefault("released", not snap.created)
        info["removed_leftovers"] = snap.removed_leftovers
        failure.details["snapshot"] = info
        raise failure

    info["removed_leftovers"] = snap.removed_leftovers
    info["timings"] = timings
    if polls is None:
        downtime = None
        result["warnings"].append("Orthanc was not polled during the capture (it was not running): "
                                  "the downtime is not recorded")
    elif polls["failures"] == 0 and polls["polls"] >= 2:
        downtime = 0.0
    else:
        downtime = None
        result["warnings"].append(
            f"{polls['failures']} of {polls['polls']} polls of {poll['url']}/system failed during the snapshot "
            f"capture (first: {polls['first_failure']}); Orthanc was not stopped by this backup, but the downtime "
            "is not recorded as 0")
    result.update({"downtime_seconds": downtime, "polls": polls,
                   "details": {"kind": kind, "snapshot": info, "polls": polls,
                               "orphans_dropped": result["orphans_dropped"],
                               "index_integrity_check": integrity,
                               "index_source_files": index["source_files"],
                               "index_capture": index["index_capture"]}})
    return result

# -*- coding: utf-8 -*-
# Copyright: pacs.orthanc contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Shipping complete backups to a backup server, and their life there.

The managed host pushes its backup with rsync over SSH into
``<server root>/<host>/<name>.incomplete/`` (``--link-dest`` to that host's newest complete
backup on the server, so unchanged files become hard links); then, on the server, the copy is
verified offline (as ``backup_verify`` does: SHA-256 of the manifest's files, the index's
integrity, every indexed storage file's size, the MD5 of every file that is not a hard link to
the previous backup), renamed ``<name>/``, pointed at by ``latest``, and retention applies.
Nothing is ever renamed complete before its check passed. Standard library only: the server
side runs wherever Ansible can reach with Python 3."""

from __future__ import annotations

import contextlib
import datetime
import os
import re
import shlex
import shutil
import tempfile
import threading
import time

from ansible_collections.pacs.orthanc.plugins.module_utils import _backupset, _layout, _lock, _storage, _verify
from ansible_collections.pacs.orthanc.plugins.module_utils._common import (
    PacsError, Program, iso, os_error_cause, run_command, utc_now)

__metaclass__ = type

INCOMPLETE = _layout.INCOMPLETE
DELETING = _layout.DELETING
_STAT = re.compile(r"^(Total bytes sent|Total bytes received|Literal data|Matched data|Total file size|"
                   r"Total transferred file size|Number of regular files transferred|Number of files)"
                   r":\s*([\d,.]+)", re.M)
RSYNC_EXIT = {1: "syntax or usage error", 2: "protocol incompatibility", 3: "errors selecting files",
              5: "error starting the client-server protocol", 10: "error in socket I/O",
              11: "error in file I/O", 12: "error in the rsync data stream", 20: "interrupted by a signal",
              23: "partial transfer because of an error", 24: "source files vanished",
              30: "timeout in data send/receive", 35: "timeout waiting for the daemon connection",
              255: "SSH could not connect or authenticate"}


# -- names and retention (pure) ------------------------------------------------------------

def parse_name(name: str) -> datetime.datetime:
    """The UTC time of a backup name (``20261129T073335Z``, optionally with microseconds)."""
    base = name.split(".")[0].rstrip("Z")
    return datetime.datetime.strptime(base, "%Y%m%dT%H%M%S").replace(tzinfo=datetime.timezone.utc)


def select_kept(names: list, last: int, daily: int, weekly: int, monthly: int) -> list:
    """Which backups retention keeps, newest first.

    ``last`` newest backups; for each of the ``daily`` newest days (UTC) that hold a backup, the
    newest backup of that day; the same for ISO weeks and for months. The union is kept; the
    newest backup always is."""
    newest_first = sorted(names, reverse=True)
    if not newest_first:
        return []
    kept = {newest_first[0]}
    kept.update(newest_first[:max(0, last)])
    periods = ((daily, lambda t: t.date()), (weekly, lambda t: tuple(t.isocalendar())[:2]),
               (monthly, lambda t: (t.year, t.month)))
    for count, period in periods:
        seen = set()
        for name in newest_first:
            if len(seen) >= count:
                break
            slot = period(parse_name(name))
            if slot not in seen:
                seen.add(slot)
                kept.add(name)
    return [name for name in newest_first if name in kept]


# -- server side -----------------------------------------------------------------------------


def prepare(folder: str, name: str, check_mode: bool = False) -> dict:
    """Create the host's folder, remove what interrupted runs left (``*.incomplete``), create
    ``<name>.incomplete/`` and say which complete backup the transfer can link to."""
    step = "prepare the server folder"
    result = {"changed": False, "folder": folder, "name": name, "path": os.path.join(folder, name + INCOMPLETE),
              "removed_incomplete": [], "already_complete": False, "previous": None}
    if not os.path.isdir(folder):
        result["changed"] = True
        if check_mode:
            return result
        try:
            os.makedirs(folder, mode=0o700)
        except OSError as exc:
            raise PacsError(step, f"cannot create {folder}: {os_error_cause(exc)}")
    complete = _layout.complete_backups(folder)
    if name in complete:
        result.update(already_complete=True, path=os.path.join(folder, name))
        return result
    older = [n for n in complete if n < name]
    result["previous"] = older[-1] if older else None
    if check_mode:
        result["changed"] = True
        return result
    try:
        with _lock.FolderLock(folder, step):
            for leftover in sorted(os.listdir(folder)):
                if leftover.endswith(INCOMPLETE):
                    shutil.rmtree(os.path.join(folder, leftover), ignore_errors=True)
                    if os.path.lexists(os.path.join(folder, leftover)):
                        raise PacsError(step, f"cannot remove the leftover {os.path.join(folder, leftover)}")
                    result["removed_incomplete"].append(leftover)
            os.mkdir(result["path"], 0o700)
            st = os.statvfs(folder)
            result["free_bytes"] = st.f_bavail * st.f_frsize
    except OSError as exc:
        raise PacsError(step, os_error_cause(exc))
    result["changed"] = True
    return result


def find(folder: str, which: str) -> dict:
    """The complete backup ``which`` names in a host's folder on the server: ``latest`` (the newest
    complete one) or a timestamp. Read only."""
    step = "find the backup on the server"
    complete = _layout.complete_backups(folder)
    if not complete:
        raise PacsError(step, f"the backup server holds no complete backup in {folder}")
    name = complete[-1] if which == "latest" else which
    if not _layout.NAME_RE.match(name):
        raise PacsError(step, f"{which!r} is neither latest nor a backup timestamp")
    if name not in complete:
        raise PacsError(step, f"the backup server holds no complete backup {name} in {folder} "
                              f"(newest: {complete[-1]})")
    return {"changed": False, "name": name, "path": os.path.join(folder, name), "folder": folder,
            "complete": complete}


class NewFiles:
    """``new(uuid)``: whether a storage file of ``path`` is not the same file (inode) as in
    ``previous``; it counts the new ones it was asked about (``count``). Nothing is held per
    file: a verification asks it about each file it checks."""

    def __init__(self, path: str, previous: str | None):
        self.storage = os.path.join(path, _layout.STORAGE)
        self.previous = os.path.join(previous, _layout.STORAGE) if previous else None
        self.count = 0

    def __call__(self, uuid: str) -> bool:
        rel = _storage.relpath(uuid)
        if self.previous:
            try:
                if os.stat(os.path.join(self.previous, rel)).st_ino == os.stat(os.path.join(self.storage, rel)).st_ino:
                    return False
            except FileNotFoundError:
                pass
        self.count += 1
        return True


def complete(folder: str, name: str, host: str, keep_last: int, keep_daily: int, keep_weekly: int,
             keep_monthly: int, md5: str = "new", workers: int = 2, check_mode: bool = False) -> dict:
    """Verify ``<name>.incomplete/`` on the server; only when it passes, rename it ``<name>/``,
    point ``latest`` at it and apply retention."""
    step = "check the copy on the server"
    path = os.path.join(folder, name + INCOMPLETE)
    final = os.path.join(folder, name)
    if _layout.is_complete(final) and not os.path.isdir(path):
        return {"changed": False, "path": final, "already_complete": True, "deleted_by_retention": [],
                "verification": None}
    if not os.path.isdir(path):
        raise PacsError(step, f"there is no transferred copy at {path}")
    with _lock.FolderLock(folder, step):
        try:
            manifest = _layout.read_manifest(path)
        except (OSError, ValueError) as exc:
            raise PacsError(step, f"the copy in {path} has no readable manifest.json: {exc}")
        if manifest.get("name") != name or (host and manifest.get("host") != host):
            raise PacsError(step, f"the copy in {path} is the backup {manifest.get('name')} of "
                            f"{manifest.get('host')}, not {name} of {host}")
        older = [n for n in _layout.complete_backups(folder) if n < name]
        previous = os.path.join(folder, older[-1]) if older else None
        fresh = NewFiles(path, previous) if md5 == "new" else None
        report = _verify.verify_backup(path, md5=md5, workers=workers, hash_filter=fresh)
        if not report["ok"]:
            raise PacsError(step, f"the copy in {path} failed its check: "
                            f"{_verify.describe_problems(report['problems'])}", verification=report)
        result = {"changed": True, "path": final, "verification": report, "already_complete": False,
                  "previous": previous, "new_files": fresh.count if fresh is not None else None,
                  "deleted_by_retention": []}
        if check_mode:
            return result
        try:
            _layout.complete_folder(folder, name)
            result.update(retention(folder, name, keep_last, keep_daily, keep_weekly, keep_monthly))
        except OSError as exc:
            raise PacsError(step, os_error_cause(exc))
    return result


def retention(folder: str, name: str, keep_last: int, keep_daily: int, keep_weekly: int, keep_monthly: int) -> dict:
    """Remove the complete backups of ``folder`` that ``select_kept`` does not keep, never ``name``
    (the one just completed) nor a pre-upgrade backup before its ``keep_until`` (those are not
    counted by ``select_kept`` either)."""
    names = _layout.complete_backups(folder)
    held = [n for n in names if _layout.held_for_upgrade(os.path.join(folder, n))]
    kept = select_kept([n for n in names if n not in held], keep_last, keep_daily, keep_weekly, keep_monthly)
    deleted = []
    for doomed in names:
        if doomed not in kept and doomed not in held and doomed != name:
            _layout.remove_backup(folder, doomed, ignore_errors=True)
            deleted.append(doomed)
    return {"deleted_by_retention": deleted, "kept": kept, "kept_for_upgrade": held}


def discard(folder: str, name: str, check_mode: bool = False) -> dict:
    """Remove ``<name>.incomplete/`` (never a complete backup)."""
    path = os.path.join(folder, name + INCOMPLETE)
    existed = os.path.isdir(path)
    if existed and not check_mode:
        with _lock.FolderLock(folder, "remove the incomplete copy on the server"):
            shutil.rmtree(path, ignore_errors=True)
    return {"changed": existed, "removed": path if existed else None}


# -- managed host side -----------------------------------------------------------------------

def ssh_command(port: int, user: str, key: str | None, known_hosts: str | None,
                strict_host_key_checking: str, connect_timeout: int) -> list:
    argv = ["ssh", "-p", str(port), "-l", user, "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes",
            "-o", f"StrictHostKeyChecking={strict_host_key_checking}", "-o", f"ConnectTimeout={connect_timeout}",
            "-o", "ServerAliveInterval=15", "-o", "ServerAliveCountMax=4", "-o", "ControlMaster=no",
            "-o", "PasswordAuthentication=no", "-o", "KbdInteractiveAuthentication=no"]
    if key:
        argv += ["-i", key]
    if known_hosts:
        argv += ["-o", f"UserKnownHostsFile={known_hosts}"]
    return argv


def parse_stats(text: str) -> dict:
    """The figures of ``rsync --stats`` (digit groups removed)."""
    keys = {"Total bytes sent": "bytes_sent", "Total bytes received": "bytes_received",
            "Literal data": "literal_bytes", "Matched data": "matched_bytes", "Total file size": "file_bytes",
            "Total transferred file size": "transferred_file_bytes",
            "Number of regular files transferred": "files_transferred", "Number of files": "files"}
    stats = {}
    for label, value in _STAT.findall(text):
        stats[keys[label]] = int(re.sub(r"[,.]", "", value))
    return stats


def rsync_passes(source: str, remote: str, previous: str | None, ssh: list, bwlimit: int,
                 io_timeout: int) -> list:
    """The two rsync runs of a transfer.

    1. ``storage/`` compared by name and size only (Orthanc never changes a stored file, so an
       unchanged name and size is unchanged content), without times, so that a file copied anew
       on the managed host (a full local backup) still becomes a hard link on the server.
    2. Everything else (configuration, index, manifest last) with rsync's usual check of size
       and time, hard-linking what did not change.

    Without ``--protect-args`` (``-s``), which ``rrsync`` refuses: the remote paths hold only
    characters that no shell splits or expands (``transfer`` checks ``SAFE_REMOTE_PATH``)."""
    common = ["rsync", "--recursive", "--links", "--perms", "--owner", "--group", "--devices", "--specials",
              "--numeric-ids", "--stats", "-e", shlex.join(ssh), f"--timeout={io_timeout}"]
    if bwlimit:
        common.append(f"--bwlimit={bwlimit}")
    storage = common + ["--size-only"]
    rest = common + ["--times", "--exclude=/storage/"]
    if previous:
        storage.append(f"--link-dest=../../{previous}/storage")
        rest.append(f"--link-dest=../{previous}")
    passes = []
    if os.path.isdir(os.path.join(source, "storage")):
        passes.append(storage + [os.path.join(source, "storage") + "/", f"{remote}/storage/"])
    passes.append(rest + [source.rstrip("/") + "/", remote + "/"])
    return passes


# the remote paths of a transfer go to the server's shell (or rrsync) as they are: no quoting needed
SAFE_REMOTE_PATH = re.compile(r"^[A-Za-z0-9_./@%+,:=-]+$")

_OS_ERROR = re.compile(r"^rsync: .*\(\d+\)\s*$")  # "rsync: [receiver] write failed on ...: No space left on device (28)"


def describe_rsync_failure(rc: int, err: str) -> str:
    lines = [line.strip() for line in err.strip().splitlines()]
    tail = " ".join(lines[-3:])
    # the first error the OS gave is the cause; what rsync says last is often a consequence
    # (a broken pipe, "error in file IO"), the more so when its progress output races with it
    first = next((line for line in lines[:-3] if _OS_ERROR.match(line)), None)
    if first:
        tail = f"{first} ... {tail}"
    meaning = RSYNC_EXIT.get(rc, "failed")
    return f"rsync exited with {rc} ({meaning}): {tail}" if tail else f"rsync exited with {rc} ({meaning})"


# rsync --info=progress2: "  1,048,576  50%  1.00MB/s  0:00:01 (xfr#1, to-chk=1/3)"
_PROGRESS2 = re.compile(rb"^\s*([\d,]+)\s+(\d+)%.*?(?:to-chk=(\d+)/(\d+))?\)?\s*$")


def progress_runner(progress, pass_fds=()):
    """A runner (as run_command) that gives rsync --info=progress2 and feeds its overall progress
    (bytes done, their share of the total, files left of the files known) into ``progress``,
    read from its output by a thread as it comes."""

    def run(argv, step, check=False, pass_fds=pass_fds):
        argv = argv[:1] + ["--info=progress2"] + argv[1:]
        with tempfile.TemporaryFile() as out:
            done = threading.Event()
            offset = [0]

            def feed():
                while True:
                    stop = done.wait(max(0.2, min(2.0, progress.interval / 4)))
                    size = os.fstat(out.fileno()).st_size
                    if size > offset[0]:
                        tail = os.pread(out.fileno(), min(size - offset[0], 65536), max(offset[0], size - 65536))
                        offset[0] = size
                        for chunk in reversed(re.split(rb"[\r\n]", tail)):
                            match = _PROGRESS2.match(chunk)
                            if match:
                                nbytes, share = int(match.group(1).replace(b",", b"")), int(match.group(2))
                                files = total_files = None
                                if match.group(4):
                                    total_files = int(match.group(4))
                                    files = total_files - int(match.group(3))
                                progress.set(files=files, nbytes=nbytes, files_total=total_files,
                                             bytes_total=int(nbytes * 100 / share) if share else None)
                                break
                    if stop:
                        return

            watcher = threading.Thread(target=feed, daemon=True)
            with Program(argv, step, stdout=out, pass_fds=pass_fds) as program:
                watcher.start()
                try:
                    rc = program.wait()
                finally:
                    done.set()
                    watcher.join()
                err = program.errors()
            out.seek(0)
            return rc, out.read().decode("utf-8", "replace"), err
    return run


def slots_folder(dest: str) -> str:
    """The server's transfer slots: ``<server root>/.slots`` (``dest`` is ``<root>/<host>/<name>.incomplete``)."""
    return os.path.join(os.path.dirname(os.path.dirname(os.path.normpath(dest))), _lock.SLOTS_FOLDER)


def transfer(source: str, server: str, dest: str, previous: str | None, port: int = 22, user: str = "root",
             key: str | None = None, known_hosts: str | None = None, strict_host_key_checking: str = "yes",
             bwlimit: int = 0, io_timeout: int = 300, connect_timeout: int = 30, runner=run_command,
             progress=None, max_parallel: int = 0, slot_timeout: float = 86400, who: dict | None = None) -> dict:
    """Push the local backup ``source`` into ``dest`` (the ``.incomplete`` folder on the server).
    ``progress`` (a _progress.Progress): the storage pass reports rsync's own progress into it.
    ``max_parallel``: first take one of that many transfer slots on the server (_lock.RemoteSlot,
    waiting up to ``slot_timeout`` seconds), held until rsync has ended; 0, no bound. ``who`` (host,
    backup) is what the slot records for the messages of those who wait."""
    step = "send the backup to the server"
    if not _layout.is_complete(source):
        raise PacsError(step, f"{source} is not a complete backup (no manifest.json)")
    if key and not os.path.isfile(key):
        raise PacsError(step, f"the SSH key {key} does not exist on this host")
    if not dest.endswith(INCOMPLETE):
        raise PacsError(step, f"refusing to write into {dest}: transfers go into a '{INCOMPLETE}' folder only")
    for path in (dest, previous or ""):
        if path and not SAFE_REMOTE_PATH.match(path):
            raise PacsError(step, f"the server path {path} holds a character that a shell would split or expand "
                            "(orthanc_ship_root and the host's name: letters, digits and ._/@%+,:=- only)")
    ssh = ssh_command(port, user, key, known_hosts, strict_host_key_checking, connect_timeout)
    remote = f"{server}:{dest}"
    totals: dict = {}
    slot = contextlib.nullcontext()
    if max_parallel:
        def waiting(busy):
            if progress is not None:
                progress.wait_note(f"waiting for a transfer slot on {server}: all {max_parallel} taken by "
                                   f"{_lock.describe_holders(busy)}")
        slot = _lock.RemoteSlot(ssh + [server, "--"], slots_folder(dest), max_parallel, slot_timeout, who or {}, step,
                                where=f"the backup server {server}", waiting=waiting,
                                remedy="or set orthanc_ship_slots: play (the transfers are then bounded by the play's "
                                       "throttle, and the key needs to run rsync only)")
    with slot:
        inherit = getattr(slot, "inherit", ())
        started, started_at = time.monotonic(), iso(utc_now())
        if progress is not None:
            progress.begin()
        for number, argv in enumerate(rsync_passes(source, remote, previous, ssh, bwlimit, io_timeout)):
            run = progress_runner(progress, inherit) if progress is not None and number == 0 else runner
            rc, out, err = run(argv, step, check=False, **({"pass_fds": inherit} if inherit else {}))
            if rc != 0:
                raise PacsError(step, describe_rsync_failure(rc, err), rc=rc)
            for key_, value in parse_stats(out).items():
                totals[key_] = totals.get(key_, 0) + value
        # before the slot is released: the next transfer starts after it
        seconds, ended_at = round(time.monotonic() - started, 3), iso(utc_now())
    totals.setdefault("bytes_sent", 0)
    return {"changed": True, "stats": totals, "bytes_sent": totals["bytes_sent"],
            "remote": remote, "previous": previous, "seconds": seconds, "started_at": started_at, "ended_at": ended_at,
            "slot": getattr(slot, "number", None), "slot_wait_seconds": round(getattr(slot, "waited", 0.0), 3)}


def fetch(server: str, remote: str, name: str, dest: str, port: int = 22, user: str = "root", key: str | None = None,
          known_hosts: str | None = None, strict_host_key_checking: str = "yes", bwlimit: int = 0,
          io_timeout: int = 300, connect_timeout: int = 30, check_mode: bool = False, runner=run_command) -> dict:
    """Pull the complete backup ``remote`` (a path on the server, found by ``find``) into
    ``<dest>/<name>/`` on this host with rsync over SSH, through _layout.fetch_into (whole or not at
    all). The server is only read."""
    step = "fetch the backup from the server"
    if not _layout.NAME_RE.match(name):
        raise PacsError(step, f"'{name}' is not a backup name")
    if key and not os.path.isfile(key):
        raise PacsError(step, f"the SSH key {key} does not exist on this host")
    target = os.path.join(dest, name)
    result = {"name": name, "path": target, "remote": f"{server}:{remote}"}
    if check_mode:
        return dict(result, changed=True)
    ssh = ssh_command(port, user, key, known_hosts, strict_host_key_checking, connect_timeout)
    argv = ["rsync", "--recursive", "--links", "--perms", "--times", "--owner", "--group", "--numeric-ids",
            "--protect-args", "--stats", "-e", shlex.join(ssh), f"--timeout={io_timeout}"]
    if bwlimit:
        argv.append(f"--bwlimit={bwlimit}")
    stats: dict = {}

    def fill(partial):
        rc, out, err = runner(argv + [f"{server}:{remote.rstrip('/')}/", partial + "/"], step, check=False)
        if rc != 0:
            raise PacsError(step, describe_rsync_failure(rc, err), rc=rc)
        stats.update(parse_stats(out))

    def whole(partial):
        if not _layout.is_complete(partial):
            raise PacsError(step, f"the copy of {remote} holds no {_layout.MANIFEST}")

    try:
        _layout.fetch_into(dest, name, fill, whole)
    except OSError as exc:
        raise PacsError(step, f"cannot fetch into {dest}: {os_error_cause(exc)}")
    return dict(result, changed=True, stats=stats, bytes_received=stats.get("bytes_received", 0))


def remove_local(root: str, name: str, check_mode: bool = False, stale_lock_seconds: int = 900) -> dict:
    """Remove a local complete backup once it is on the server (``orthanc_backup_keep: 0``).

    Not while another backup of this root runs (it may be linking from this one). ``latest``
    goes too when it names this backup: the next local backup is then a full one."""
    step = "remove the local copy"
    path = os.path.join(root, name)
    if not os.path.isdir(path):
        return {"changed": False, "removed": None}
    if _layout.held_for_upgrade(path):
        return {"changed": False, "removed": None, "kept_for_upgrade": path}
    lock = os.path.join(root, _backupset.LOCK)
    if not _lock.holder_is_dead(lock, stale_lock_seconds):
        raise PacsError(step, f"another backup of {root} is running ({lock}); the local copy {path} is kept")
    if check_mode:
        return {"changed": True, "removed": path}
    try:
        _layout.unpoint_latest(root, name)
        _layout.remove_backup(root, name, ignore_errors=True)
        _layout.fsync_dir(root)
    except OSError as exc:
        raise PacsError(step, os_error_cause(exc))
    return {"changed": True, "removed": path}

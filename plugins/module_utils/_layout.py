# -*- coding: utf-8 -*-
# Copyright: pacs.orthanc contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The layout of a folder of backups, shared by the managed host and the backup server.

One folder of backups (``orthanc_backup_root`` on a host, ``<server root>/<host>`` on the server)
holds ``<UTC timestamp>/`` complete backups (each with ``manifest.json``), at most one
``<UTC timestamp>.incomplete/`` being written (its working files in ``.work/``) and ``latest``,
a symbolic link to the newest complete backup. Every name of that layout is here, and the few
operations that keep it safe on a crash: atomic writes (temporary file, fsync, rename, fsync of
the folder), switching ``latest`` atomically, removing a backup by renaming it incomplete first,
reading a manifest. Standard library only."""

from __future__ import annotations

import concurrent.futures
import concurrent.futures.process
import contextlib
import datetime
import json
import multiprocessing
import os
import re
import shutil
import tempfile

__metaclass__ = type

FORMAT = "pacs.orthanc.backup"
FORMAT_VERSION = 1
NAME_RE = re.compile(r"^\d{8}T\d{6}(\.\d{1,6})?Z$")

# names inside a folder of backups
INCOMPLETE = ".incomplete"          # <name>.incomplete/: a backup being written, never a complete one
DELETING = ".deleting" + INCOMPLETE  # <name>.deleting.incomplete/: a backup being removed
LATEST = "latest"                   # symbolic link to the newest complete backup
LATEST_NEW = ".latest.new"          # the next ``latest``, renamed over it
# names inside one backup
MANIFEST = "manifest.json"
CONFIG = "config"
INDEX = "index"
STORAGE = "storage"
DATABASE = "database"
WORK = ".work"                      # working files of an incomplete backup, removed when it completes
STATE_FILE = "storage.db"           # in .work/: where every storage file of this backup came from (SQLite)
RECORDS = "records"                 # in .work/: one JSON record per capture step (see _record)
# database dumps, by engine and pg_dump format
DUMP_NAMES = {"custom": "orthanc.pgdump", "directory": "orthanc.pgdir", "sql": "orthanc.sql"}


class ManifestError(ValueError):
    """A manifest that exists but cannot be read or is not a JSON object."""


def dump_name(engine: str, fmt: str = "custom") -> str:
    """The file name of a database dump inside ``database/``."""
    return DUMP_NAMES["sql" if engine == "mysql" else ("directory" if fmt == "directory" else "custom")]


def dump_kind(path: str):
    """(engine, format) of a dump, from its name's suffix; None when it is not a dump's name."""
    for fmt, name in DUMP_NAMES.items():
        if path.rstrip("/").endswith(os.path.splitext(name)[1]):
            return ("mysql" if fmt == "sql" else "postgresql"), fmt
    return None


def dump_engine(path: str) -> str:
    """The engine that wrote a dump, from its name."""
    return (dump_kind(path) or ("postgresql", None))[0]


def find_dump(backup: str):
    """(engine, format, path) of the dump in a backup's ``database/`` folder, or None."""
    for fmt, name in DUMP_NAMES.items():
        path = os.path.join(backup, DATABASE, name)
        if os.path.exists(path):
            return ("mysql" if fmt == "sql" else "postgresql"), fmt, path
    return None


def state_file(backup: str) -> str:
    return os.path.join(backup, WORK, STATE_FILE)


def incomplete_of(path: str):
    """The ``<name>.incomplete`` folder that holds ``path`` (or is it), else None."""
    current = os.path.abspath(path or "/")
    while current != os.path.dirname(current):
        if os.path.basename(current).endswith(INCOMPLETE):
            return current
        current = os.path.dirname(current)
    return None


def complete_backups(root: str) -> list:
    """Names of complete backups (a timestamp folder holding manifest.json), oldest first."""
    try:
        names = os.listdir(root)
    except FileNotFoundError:
        return []
    return sorted(n for n in names if NAME_RE.match(n) and not os.path.islink(os.path.join(root, n))
                  and os.path.isfile(os.path.join(root, n, MANIFEST)))


def is_complete(backup: str) -> bool:
    return os.path.isfile(os.path.join(backup, MANIFEST))


def read_manifest(backup: str) -> dict:
    """The manifest of a backup. FileNotFoundError when it has none (not a complete backup),
    ManifestError when it is unreadable; the caller words the message."""
    path = os.path.join(backup, MANIFEST)
    try:
        with open(path, "r", encoding="utf-8") as handle:
            manifest = json.load(handle)
    except FileNotFoundError:
        raise
    except (OSError, ValueError) as exc:
        raise ManifestError(f"cannot read {path}: {exc}") from exc
    if not isinstance(manifest, dict):
        raise ManifestError(f"{path} is not a manifest")
    return manifest


# -- pre-upgrade backups ---------------------------------------------------------------------
# A backup taken before an upgrade carries the manifest key ``pre_upgrade`` (an object: the
# versions of Orthanc, of its plugins and of the database schema, and ``keep_until``). Retention,
# here and on the backup server, keeps it until then, whatever its count or age.
PRE_UPGRADE = "pre_upgrade"


def parse_time(text: str) -> datetime.datetime:
    """A UTC time written by this collection ('2026-11-30T07:00:00Z', with or without microseconds)."""
    moment = datetime.datetime.fromisoformat(str(text).replace("Z", "+00:00"))
    return moment if moment.tzinfo else moment.replace(tzinfo=datetime.timezone.utc)


def pre_upgrade_of(backup: str):
    """The ``pre_upgrade`` object of a backup's manifest, or None (an ordinary backup, or an
    unreadable manifest)."""
    try:
        marker = read_manifest(backup).get(PRE_UPGRADE)
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


def held_for_upgrade(backup: str, now: datetime.datetime | None = None) -> bool:
    """True while a pre-upgrade backup must be kept (``keep_until`` not yet reached; a marker
    without a readable ``keep_until`` is kept: better a backup too many than one lost)."""
    marker = pre_upgrade_of(backup)
    if marker is None:
        return False
    now = now or datetime.datetime.now(datetime.timezone.utc)
    try:
        return parse_time(marker["keep_until"]) > now
    except (KeyError, TypeError, ValueError):
        return True


# -- writing safely ------------------------------------------------------------------------

def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_writer(path: str, mode: int = 0o600, sync_dir: bool = False, encoding=None, durable: bool = True):
    """A file to write ``path`` through: a temporary file beside it, fsynced and renamed into
    place when the block ends without an error (removed otherwise); with ``sync_dir`` the folder
    is fsynced too, so that the new name survives a crash. Text when ``encoding`` is given.
    ``durable=False`` skips the fsync, for a file that means nothing after a crash (a lock's step
    note: a reboot frees the lock anyway); readers still see the old file or the new one."""
    directory = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
    try:
        with os.fdopen(fd, "w" if encoding else "wb", encoding=encoding) as handle:
            yield handle
            handle.flush()
            if durable:
                os.fsync(handle.fileno())
        os.chmod(tmp, mode)
        os.rename(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    if sync_dir:
        fsync_dir(directory)


def write_bytes_atomic(path: str, data: bytes, mode: int = 0o600, sync_dir: bool = False) -> None:
    with atomic_writer(path, mode, sync_dir) as handle:
        handle.write(data)


def write_text_atomic(path: str, text: str, mode: int = 0o600, sync_dir: bool = False,
                      encoding: str = "utf-8") -> None:
    write_bytes_atomic(path, text.encode(encoding), mode, sync_dir)


def write_json_atomic(path: str, data, mode: int = 0o600, sync_dir: bool = False, indent=2) -> None:
    write_text_atomic(path, json.dumps(data, indent=indent, sort_keys=True) + "\n", mode, sync_dir)


def point_latest(root: str, name: str) -> None:
    """Point ``<root>/latest`` at ``name`` in one rename (a reader sees the old or the new)."""
    tmp = os.path.join(root, LATEST_NEW)
    if os.path.lexists(tmp):
        os.unlink(tmp)
    os.symlink(name, tmp)
    os.rename(tmp, os.path.join(root, LATEST))
    fsync_dir(root)


def unpoint_latest(root: str, name: str) -> None:
    """Remove ``latest`` when it names ``name``."""
    latest = os.path.join(root, LATEST)
    if os.path.islink(latest) and os.readlink(latest) == name:
        os.unlink(latest)


REMOVE_WORKERS = 4  # processes that unlink a backup's storage/: 4 beat 2 on 2 CPUs (benchmarks/retention.py)


def _remove_shard(path: str) -> None:
    """One top-level folder of a storage tree, in a worker process of ``remove_tree``. What cannot
    be removed stays, for the last ``shutil.rmtree`` to name."""
    shutil.rmtree(path, ignore_errors=True)


def remove_tree(path: str, ignore_errors: bool = False, workers: int = REMOVE_WORKERS) -> None:
    """``shutil.rmtree(path)``, whose ``storage/`` (a file per instance in ``xx/yy/``: nearly all
    of a backup) is first removed by ``workers`` processes, its top-level folders handed out one
    at a time (benchmarks/retention.py). Then ``shutil.rmtree`` removes the rest, and raises the
    OSError of the first file that none could remove (unless ``ignore_errors``)."""
    storage = os.path.join(path, STORAGE)
    try:
        # never through a symbolic link: the workers would empty the folder it points to (the
        # live storage, say), where shutil.rmtree refuses a link and removes only the link
        shards = [] if os.path.islink(storage) else sorted(
            entry.path for entry in os.scandir(storage) if entry.is_dir(follow_symlinks=False))
    except OSError:  # no storage/ (a dump holding the files), or unreadable: rmtree says what
        shards = []
    if workers > 1 and len(shards) > 1:
        try:
            with concurrent.futures.ProcessPoolExecutor(min(workers, len(shards)),
                                                        mp_context=multiprocessing.get_context("fork")) as pool:
                for _done in pool.map(_remove_shard, shards):
                    pass
        except (OSError, concurrent.futures.process.BrokenProcessPool):
            pass  # a worker could not start or died: what is left is removed below
    shutil.rmtree(path, ignore_errors=ignore_errors)


def remove_backup(root: str, name: str, ignore_errors: bool = False) -> None:
    """Remove ``<root>/<name>``: renamed ``.deleting.incomplete`` first, so that a half-removed
    backup never looks complete, then deleted (``remove_tree``)."""
    trash = os.path.join(root, name + DELETING)
    if os.path.lexists(trash):
        remove_tree(trash, ignore_errors=True)
    os.rename(os.path.join(root, name), trash)
    remove_tree(trash, ignore_errors=ignore_errors)


def complete_folder(root: str, name: str) -> str:
    """Rename ``<name>.incomplete`` (its contents already synced) to ``<name>`` durably and point
    ``latest`` at it. Returns the final path."""
    path = os.path.join(root, name + INCOMPLETE)
    final = os.path.join(root, name)
    fsync_dir(path)
    os.rename(path, final)
    point_latest(root, name)
    return final


# -- a backup fetched from elsewhere (off site, the backup server) into a staging folder --------

FETCHING = ".fetching"  # <staging>/<name>.fetching/: a backup being fetched, never taken for a whole one


def _remove_path(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.unlink(path)


def fetch_into(folder: str, name: str, fill, check) -> str:
    """The one way a backup fetched from a source (a restic snapshot, the backup server) lands in a
    local staging folder: ``fill(partial)`` writes it into ``<folder>/<name>.fetching/`` (what an
    interrupted fetch left there is removed first), ``check(partial)`` raises unless it is whole,
    and only then is it renamed ``<folder>/<name>/`` (replacing an older copy). ``folder`` is made
    private (0700), and so are the parents it creates: a backup holds patients' images. On any failure the partial
    copy is removed. Returns the final path."""
    if not NAME_RE.match(name):
        raise ValueError(f"{name!r} is not a backup name")
    partial, final = os.path.join(folder, name + FETCHING), os.path.join(folder, name)
    parent = os.path.dirname(os.path.abspath(folder))
    if not os.path.isdir(parent):
        os.makedirs(parent, mode=0o700)  # the staging folder, private when it is made here
    os.makedirs(folder, mode=0o700, exist_ok=True)
    os.chmod(folder, 0o700)  # private whatever it was (never the parent: it may be /var/tmp)
    _remove_path(partial)
    os.mkdir(partial, 0o700)
    try:
        fill(partial)
        check(partial)
        _remove_path(final)
        os.rename(partial, final)
    except BaseException:
        with contextlib.suppress(OSError):
            _remove_path(partial)
        raise
    return final

# -*- coding: utf-8 -*-
# Copyright: pacs.orthanc contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Offline verification of a backup folder against the index it holds.

Orthanc's index records the size and the MD5 of every stored file (``AttachedFiles``), so a
backup can be checked file by file without any Orthanc running."""

from __future__ import annotations

import bisect
import collections
import concurrent.futures
import concurrent.futures.process
import hashlib
import itertools
import multiprocessing
import os
import shutil
import sqlite3
import stat
import tempfile

from ansible_collections.pacs.orthanc.plugins.module_utils import _layout, _record, _sqlite, _storage
from ansible_collections.pacs.orthanc.plugins.module_utils._db import dump as db_dump, listing as db_listing
from ansible_collections.pacs.orthanc.plugins.module_utils._common import (
    HASH_CHUNK, PacsError, _READ_FLAGS, hash_open_file, os_error_cause, safe_relative, sha256_file)

__metaclass__ = type

MAX_EXAMPLES = 10


class Report:
    def __init__(self):
        self.problems: dict = {}
        self.stats = {"files_checked": 0, "bytes_checked": 0, "files_hashed": 0, "bytes_hashed": 0,
                      "orphans": 0}
        self.orphan_examples: list = []

    def add(self, kind: str, example: str) -> None:
        entry = self.problems.setdefault(kind, {"count": 0, "examples": []})
        entry["count"] += 1
        if len(entry["examples"]) < MAX_EXAMPLES:
            entry["examples"].append(example)

    @property
    def ok(self) -> bool:
        return not self.problems

    def as_dict(self) -> dict:
        result = {"ok": self.ok, "problems": self.problems, "orphan_examples": self.orphan_examples}
        result.update(self.stats)
        return result


def describe_problems(problems: dict) -> str:
    """'2 missing storage files (e.g. 0b4f...); 1 index integrity errors (e.g. ...)'."""
    return "; ".join(f"{entry['count']} {kind} (e.g. {entry['examples'][0]})"
                     for kind, entry in sorted(problems.items()))


def check_manifest_files(backup: str, manifest: dict, report: Report) -> set:
    """The SHA-256 of every file the manifest names; returns the names whose SHA-256 matches."""
    matched = set()
    for rel, digest in sorted(manifest.get("files", {}).items()):
        if not safe_relative(rel):
            report.add("paths outside the backup named by the manifest", repr(rel))
            continue
        path = os.path.join(backup, rel)
        if not os.path.isfile(path):
            report.add("missing files outside storage", rel)
        elif sha256_file(path) != digest:
            report.add("files outside storage with a wrong SHA-256", rel)
        else:
            matched.add(rel)
    return matched


INDEX_CHECKED = "integrity_check"  # manifest verification.index_integrity: the completion check ran it and it passed
# the check of what changed ran PRAGMA quick_check only (a third of the CPU at 200,000 instances:
# it does not compare each table's indexes with its rows): a later backup_verify runs the full check
INDEX_QUICK = "quick_check"
INDEX_REL = _layout.INDEX + "/index"


HASH_WINDOW = 2048  # index rows per batch handed to a worker: memory stays flat however many files
PIPELINE = 2        # batches in flight per worker


def default_workers() -> int:
    """One worker per CPU: reading and hashing scale with the cores (each worker is a process,
    so Python's own per-file work runs in parallel too), and a worker waiting for the disk
    leaves its core to another."""
    return max(1, os.cpu_count() or 1)


_WORKER: dict = {}  # what the pool's processes share, set before they are forked


# Where the rows of attachments come from: (table, size column, MD5 column) of a SQLite file
INDEX_ROWS = ("AttachedFiles", "compressedSize", "compressedMD5")  # an Orthanc index
LISTING_ROWS = ("listing", "size", "md5")                         # a dump's listing (DumpListing)


def _rows_query(rows: tuple) -> str:
    table, size, md5 = rows
    return f"SELECT uuid, {size}, COALESCE({md5}, '') FROM {table}"


def _start_worker(storage: str, known_missing, index_file: str | None = None, hashing: bool = True,
                  rows: tuple = INDEX_ROWS) -> None:
    """A worker's setup: what it checks against. ``index_file``: the SQLite file (an index, or a
    dump's listing: ``rows``) it reads its rows from itself (``_check_part``), opened read-only on
    first use in this process."""
    _WORKER.clear()  # nothing of the parent's (a connection it opened) is used after a fork
    _WORKER.update(storage=storage, known_missing=known_missing, index=index_file, hashing=hashing, rows=rows)


def _stop_worker() -> None:
    conn = _WORKER.pop("conn", None)
    if conn is not None:
        conn.close()
    _WORKER.clear()


def _listing(storage: str, shard: tuple, problems: list):
    """The names in storage/xx/yy (empty when it does not exist); None, and a problem noted,
    when it cannot be read."""
    try:
        return set(os.listdir(os.path.join(storage, shard[0], shard[1])))
    except FileNotFoundError:
        return set()
    except OSError as exc:
        problems.append(("unreadable storage folders", f"{shard[0]}/{shard[1]} ({os_error_cause(exc)})"))
        return None


_DIR_FLAGS = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0)


def _open_folder(storage: str, shard: tuple, problems: list, listing: bool = True) -> tuple:
    """(descriptor, names) of storage/xx/yy: the folder opened once, its names listed through
    the descriptor (with ``listing``) and its files then opened relative to it, so that the
    kernel looks up one name per file instead of the whole path. (None, empty set) when it does
    not exist; (None, None), a problem noted, when it cannot be read."""
    try:
        fd = os.open(os.path.join(storage, shard[0], shard[1]), _DIR_FLAGS)
    except FileNotFoundError:
        return None, set()
    except OSError as exc:
        problems.append(("unreadable storage folders", f"{shard[0]}/{shard[1]} ({os_error_cause(exc)})"))
        return None, None
    if not listing:
        return fd, None
    try:
        return fd, set(os.listdir(fd))
    except OSError as exc:
        os.close(fd)
        problems.append(("unreadable storage folders", f"{shard[0]}/{shard[1]} ({os_error_cause(exc)})"))
        return None, None


# O_NOATIME where the kernel has it: reading a file whose ctime is newer than its atime (every file
# a backup's pass has just hard-linked: a link changes the inode's ctime) makes the kernel write
# its atime under ``relatime``, i.e. dirty and journal one inode per file on the first check of a
# backup. Allowed to the file's owner and to root (CAP_FOWNER); for anyone else open fails with
# EPERM, and the file is opened again without it (and so are the next ones, in this process).
_NOATIME = getattr(os, "O_NOATIME", 0)
_OPEN_FLAGS = [_READ_FLAGS | _NOATIME]


def _is_stored(path: str) -> bool:
    """What walk_storage counts as a storage file: a regular file (not a link), no dot file."""
    try:
        return stat.S_ISREG(os.lstat(path).st_mode) and not os.path.basename(path).startswith(".")
    except OSError:
        return False


def check_batch(rows: list, wanted, shards: list, storage: str | None = None, known_missing=None) -> dict:
    """Check a batch of index rows (uuid, size, md5), sorted by uuid, against storage/: the one
    routine that checks storage files, in a worker process or in the caller's.

    ``wanted``: None to hash every file that has an MD5, False to hash none, else one flag per
    row. ``shards``: the (xx, yy) folders of storage/ this batch answers for (every folder whose
    name sorts after the previous batch's last row and up to this batch's last): each is listed
    once, so a missing file costs no failed open, and the files it holds that no row names are
    the orphans. Returns counts, problems (kind, example) in row order and orphans."""
    storage = storage if storage is not None else _WORKER["storage"]
    known_missing = known_missing if known_missing is not None else _WORKER["known_missing"]
    result = {"files_checked": 0, "bytes_checked": 0, "files_hashed": 0, "bytes_hashed": 0, "known_missing": 0,
              "problems": [], "orphans": 0, "orphan_examples": []}
    problems = result["problems"]
    answers = set(shards)
    listed: dict = {}  # shard: its names (None: unreadable), listed once
    present = 0  # distinct uuids found in the folders this batch answers for
    checked = bytes_checked = hashed = bytes_hashed = known = 0
    previous = None
    md5_of = hashlib.md5
    open_file, read, fstat, close, stat_path = os.open, os.read, os.fstat, os.close, os.stat
    flags = _OPEN_FLAGS[0]
    # one flag per row: hash it (when it has an MD5) or only stat it
    choices = itertools.repeat(wanted is None) if wanted is None or wanted is False else wanted
    folder_key = names = counted = folder = None  # the folder of the previous row: rows come folder by folder
    try:
        for (uuid, size, expected), selected in zip(rows, choices):
            if uuid[0:4] != folder_key:
                folder_key = uuid[0:4]
                shard = (uuid[0:2], uuid[2:4])
                counted = shard in answers  # else a folder outside storage/'s xx/yy tree, or orphans not asked for
                if folder is not None:
                    close(folder)
                    folder = None
                if shard in listed:  # rows of one folder apart (not sorted by uuid): listed already
                    folder, names = _open_folder(storage, shard, problems, listing=False)
                    names = listed[shard] if folder is not None else names
                else:
                    folder, names = _open_folder(storage, shard, problems)
                    listed[shard] = names
            if names is None:  # its folder cannot be read: noted once, above
                continue
            if uuid not in names:  # (names is empty, and folder None, when the folder does not exist)
                if uuid in known_missing:
                    known += 1
                else:
                    problems.append(("missing storage files", uuid))
                continue
            if counted and uuid != previous:
                present += 1
                previous = uuid
            want = expected and selected
            try:  # a name listed in the folder (never a path): opened relative to the folder's descriptor
                if want:
                    try:
                        fd = open_file(uuid, flags, dir_fd=folder)
                    except PermissionError:
                        if flags == _READ_FLAGS:
                            raise
                        fd = open_file(uuid, _READ_FLAGS, dir_fd=folder)  # not the owner: O_NOATIME refused
                        flags = _OPEN_FLAGS[0] = _READ_FLAGS
                    try:
                        if size <= HASH_CHUNK:  # hash_open_file's small case, inline: most storage files
                            data = read(fd, size + 1)  # one more than expected: a longer file shows at once
                            if len(data) == size:
                                actual, digest = size, md5_of(data).hexdigest()
                            else:
                                actual, digest = fstat(fd).st_size, None
                        else:
                            actual, digest = hash_open_file(fd, md5_of, size)
                    finally:
                        close(fd)
                else:
                    actual = stat_path(uuid, dir_fd=folder).st_size
            except FileNotFoundError:  # listed, then gone: a backup being changed under the check
                problems.append(("missing storage files", uuid))
                continue
            except OSError as exc:
                problems.append(("unreadable storage files", f"{uuid} ({os_error_cause(exc)})"))
                continue
            checked += 1
            bytes_checked += actual
            if actual != size:
                problems.append(("storage files with a wrong size", f"{uuid} ({actual} bytes, index says {size})"))
                continue
            if want:
                hashed += 1
                bytes_hashed += size
                if digest != expected:
                    problems.append(("storage files with a wrong MD5", uuid))
    finally:
        if folder is not None:
            close(folder)
    for shard in shards:  # the folders this batch answers for that no row named
        if shard not in listed:
            listed[shard] = _listing(storage, shard, problems)
    result.update(files_checked=checked, bytes_checked=bytes_checked, files_hashed=hashed, bytes_hashed=bytes_hashed,
                  known_missing=known)
    if present == sum(len(listed[shard] or ()) for shard in shards):
        return result  # every name in these folders is a file the rows name: no orphan
    named: dict = {}
    for uuid, _size, _md5 in rows:
        named.setdefault((uuid[0:2], uuid[2:4]), set()).add(uuid)
    for shard in shards:
        extra = (listed[shard] or set()) - named.get(shard, set())
        for name in sorted(extra):
            if _is_stored(os.path.join(storage, shard[0], shard[1], name)):
                result["orphans"] += 1
                if len(result["orphan_examples"]) < MAX_EXAMPLES:
                    result["orphan_examples"].append(name)
    return result


def _shards(storage: str) -> list:
    """The (xx, yy) folders of storage/, sorted: what walk_storage walks."""
    found = []
    try:
        level1 = _storage.shard_folders(storage)
    except FileNotFoundError:
        return found
    except OSError as exc:
        raise PacsError("walk storage", f"cannot list the storage folder: {os_error_cause(exc)}")
    for name1 in level1:
        try:
            level2 = _storage.shard_folders(os.path.join(storage, name1))
        except OSError as exc:
            raise PacsError("walk storage", f"cannot list {os.path.join(storage, name1)}: {os_error_cause(exc)}")
        found.extend((name1, name2) for name2 in level2)
    return found


def _batches(rows, shards: list, hash_filter):
    """(rows, wanted, shards) batches of about HASH_WINDOW rows, each ending at the end of a
    folder (rows come sorted by uuid, i.e. in folder order), with the storage folders each
    answers for; the last one answers for every folder left."""
    lookahead = None
    first_shard = 0
    while True:
        batch = [lookahead] if lookahead is not None else []
        lookahead = None
        batch.extend(rows.fetchmany(max(1, HASH_WINDOW - len(batch))))
        if batch:
            last = (batch[-1][0][0:2], batch[-1][0][2:4])
            while True:  # the rest of the last row's folder
                row = rows.fetchone()
                if row is None:
                    break
                if (row[0][0:2], row[0][2:4]) != last:
                    lookahead = row
                    break
                batch.append(row)
        if lookahead is None:  # the last batch answers for every folder left
            end = len(shards)
        else:
            end = bisect.bisect_right(shards, last, lo=first_shard)
        if not batch and end == first_shard:
            return
        if hash_filter is None:
            wanted = None
        else:
            wanted = [bool(hash_filter(uuid)) for uuid, _size, _md5 in batch]  # the filter sees every file
        yield batch, wanted, shards[first_shard:end]
        first_shard = end
        if lookahead is None:
            return


# --------------------------------------------------------------------------------------------
# The check of every file against a SQLite index (backup_verify, md5 all or none): each worker
# reads its own part of the index, sorted, and checks it folder by folder
#
# The caller used to sort every attachment by uuid (the index has no index on it), hand them
# to the workers pickled, batch by batch, and compute the SHA-256 of the index first: at 1 M
# files that cost it about 2 s of CPU for the sort, 1 s to pickle, and the workers waited for
# the first batch (benchmarks/README.md, "At scale"). Here storage/'s xx folders are split into
# PARTS_PER_WORKER ranges per worker; a worker opens the index read-only and asks SQLite for
# the attachments of one range, sorted (a scan of the table and a sort of that range, in the
# worker, beside the others), then checks them batch by batch with ``check_batch``: every folder
# listed once, orphans exactly per folder. The files are read folder by folder, the order they
# sit in on disk (reading them in the table's order instead, as an earlier version of this did,
# cost the kernel a third more when the page cache was short).

PARTS_PER_WORKER = 3


def _parts(groups: list, count: int) -> list:
    """``count`` ranges (low, high) of uuids, None for unbounded, that split the xx folders
    ``groups`` (sorted) evenly; together they cover every uuid, hexadecimal or not."""
    count = max(1, min(count, len(groups)))
    bounds = [groups[len(groups) * number // count] for number in range(1, count)]
    return list(zip([None] + bounds, bounds + [None]))


def _check_part(low: str | None, high: str | None, groups: list) -> dict:
    """Check the attachments whose uuid is in [low, high) against the xx folders ``groups`` of
    storage/ (those in that range); runs in a worker (or the caller's process), which reads the
    rows from the index itself. Returns check_batch's result for the whole range, or an error."""
    worker = _WORKER
    conn = worker.get("conn")
    if conn is None:
        conn = worker["conn"] = _sqlite.connect(worker["index"])
    storage = worker["storage"]
    shards = []
    for name1 in groups:
        top = os.path.join(storage, name1)
        try:
            shards.extend((name1, name2) for name2 in _storage.shard_folders(top))
        except FileNotFoundError:
            continue
        except OSError as exc:
            return {"error": f"cannot list {top}: {os_error_cause(exc)}"}
    where, args = [], []
    if low is not None:
        where.append("uuid >= ?")
        args.append(low)
    if high is not None:
        where.append("uuid < ?")
        args.append(high)
    query = _rows_query(worker["rows"]) + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY uuid"
    part = Report()  # counts, and problems by kind (a count and examples): small, however many
    part.stats["known_missing"] = 0
    wanted = None if worker["hashing"] else False
    for batch, _wanted, folders in _batches(conn.execute(query, args), shards, None):
        result = check_batch(batch, wanted, folders, storage, worker["known_missing"])
        for key in part.stats:
            part.stats[key] += result[key]
        for kind, example in result["problems"]:
            part.add(kind, example)
        room = MAX_EXAMPLES - len(part.orphan_examples)
        part.orphan_examples.extend(result["orphan_examples"][:room])
    return {"stats": part.stats, "problems": part.problems, "orphan_examples": part.orphan_examples}


def _check_index_files(conn, index_file: str, storage: str, report: Report, hashing: bool, workers: int,
                       orphans: bool, known_missing, progress, started, rows: tuple = INDEX_ROWS) -> None:
    """Every attachment of a SQLite file (an index, a dump's listing: ``rows``) against storage/
    (see above)."""
    table, size, _md5 = rows
    count = conn.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]
    try:
        groups = _storage.shard_folders(storage)
    except FileNotFoundError:
        groups = []
    except OSError as exc:
        raise PacsError("walk storage", f"cannot list the storage folder: {os_error_cause(exc)}")
    if progress is not None and hashing and progress.files_total is None:
        total = conn.execute(f"SELECT COALESCE(SUM({size}), 0) FROM {table}").fetchone()[0]
        progress.totals(count, total)
    workers = max(1, min(workers, -(-count // HASH_WINDOW)))
    parts = _parts(groups, workers * PARTS_PER_WORKER) if groups or count else []
    tasks = [(low, high, [g for g in groups if (low is None or g >= low) and (high is None or g < high)]
              if orphans else []) for low, high in parts]
    errors = []
    try:
        if workers == 1:
            _start_worker(storage, known_missing, index_file, hashing, rows)
            if started is not None:
                started()
            results = (_check_part(*task) for task in tasks)
            _gather_parts(results, report, progress, errors)
        else:
            context = multiprocessing.get_context("fork")
            with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context, initializer=_start_worker,
                                                        initargs=(storage, known_missing, index_file, hashing,
                                                                  rows)) as pool:
                pool.submit(_ready).result()  # the first submit forks every worker, before any thread
                if started is not None:
                    started()
                futures = [pool.submit(_check_part, *task) for task in tasks]
                _gather_parts((future.result() for future in futures), report, progress, errors)
    finally:
        if workers == 1:
            _stop_worker()
    if errors:
        raise PacsError("walk storage", errors[0])


def _gather_parts(results, report: Report, progress, errors: list) -> None:
    stats = report.stats
    for result in results:
        if "error" in result:
            errors.append(result["error"])
            continue
        for key, value in result["stats"].items():
            if key != "known_missing" or value:
                stats[key] = stats.get(key, 0) + value
        for kind, entry in result["problems"].items():
            mine = report.problems.setdefault(kind, {"count": 0, "examples": []})
            mine["count"] += entry["count"]
            mine["examples"].extend(entry["examples"][:MAX_EXAMPLES - len(mine["examples"])])
        report.orphan_examples.extend(result["orphan_examples"][:MAX_EXAMPLES - len(report.orphan_examples)])
        if progress is not None:
            progress.add(result["stats"]["files_hashed"], result["stats"]["bytes_hashed"])


DUMP_RECORDED = "recorded"  # verification.dump_listing: the listing the delta pass recorded in the state
DUMP_READ = "read"          # the dump read again
STORAGE_CHECK_ALL = "all"          # manifest verification.storage_check: every file listed by the index statted
STORAGE_CHECK_CHANGED = "changed"  # the index compared with the storage state in SQL; only new files statted


def _compare_with_state(state, index_file: str, report: Report) -> int:
    """The part of a completion check that needs no disk (issue 15): the captured index's
    attachments against the files the backup's passes placed (the storage state, ``_storage.State``,
    which records each file placed with its size: linked from the previous backup, linked from the
    live file or copied). Every attachment must be placed with the size the index lists (else
    "missing storage files", "storage files with a wrong size", as the full check words them); the
    files placed that the index does not list are the orphans. The files placed new (not linked
    from the previous backup) go into the table ``temp.listing`` (uuid, size, md5) of the state's
    connection: the only ones the caller then checks on disk, as the full check would (exist, size,
    MD5). A file linked from the previous backup needs no look on disk: ``os.link`` of the previous
    backup's file succeeded (so the name exists, on that file's inode), after its size was found
    equal to the listed one (``_storage.Placer.place``), and that file was itself checked (size,
    and MD5 with md5=new) when it was placed new in an earlier backup that then completed. One
    pass over the index in SQLite with a primary-key look-up per row; returns the rows compared."""
    try:
        if index_file is not None:  # else a dump's listing, streamed into the state's connection
            state.attach_index(index_file)
        conn = state.conn
        conn.execute("CREATE TEMP TABLE IF NOT EXISTS listing (uuid TEXT PRIMARY KEY, size INTEGER NOT NULL, md5 TEXT) "
                     "WITHOUT ROWID")
        conn.execute("DELETE FROM temp.listing")
        missing = 0
        pending: list = []

        def flush() -> None:
            with conn:
                conn.execute("BEGIN")
                conn.executemany("INSERT OR IGNORE INTO temp.listing VALUES (?, ?, ?)", pending)
            pending.clear()

        for uuid, size, md5, placed, _origin in state.completion_rows():
            if placed is None:
                missing += 1
                report.add("missing storage files", uuid)
            elif placed != size:
                report.add("storage files with a wrong size", f"{uuid} ({placed} bytes as placed, index says {size})")
            else:
                pending.append((uuid, size, md5))
                if len(pending) >= HASH_WINDOW:
                    flush()
        flush()
        rows, distinct, placed_files = state.counts()
        if missing or distinct != placed_files:
            unlisted = state.orphans()
            report.stats["orphans"] += len(unlisted)
            report.orphan_examples.extend(unlisted[:MAX_EXAMPLES - len(report.orphan_examples)])
    except sqlite3.Error as exc:
        raise PacsError("read index", f"cannot compare {index_file or 'the dump listing'} with the storage state "
                        f"{state.path}: {exc}")
    report.stats["files_compared"] = rows
    return rows


def check_storage(backup: str, index_file: str | None, report: Report, hash_filter=None,
                  workers: int | None = None, orphans: bool = True, rows: tuple = INDEX_ROWS,
                  known_missing=frozenset(), progress=None, started=None, state=None) -> None:
    """Every attachment the index lists is in storage/ with its size, and, for the uuids that
    ``hash_filter(uuid)`` accepts (all when None), its MD5; the files in storage/ the index does
    not list are orphans. ``index_file`` is a SQLite file whose ``rows`` (table, size column, MD5
    column) list the attachments: an Orthanc index (``INDEX_ROWS``), or a database dump's listing
    (``LISTING_ROWS``, the file of a ``DumpListing``); ``known_missing`` are files that the
    manifest records as deleted while the dump ran.

    The rows are read sorted by uuid (SQLite sorts on disk), i.e. folder by folder, the order
    the files sit in storage/, and checked in batches of HASH_WINDOW by ``workers`` processes
    (one per CPU when None): each lists the folders of its batch once and reads and hashes its
    files (``check_batch``). Every file of an index file (md5 all or none, no state, no dump):
    each worker reads its own ranges of uuids from the index (``_check_part``); otherwise the
    caller reads the rows and hands them to the workers, a few batches in flight. Orphans come out of the same listings, so
    storage/ is walked once. Memory does not grow with the number of files
    (benchmarks/memory.py). ``progress`` (a _progress.Progress) counts the files checked; its
    totals are the index's when every file is hashed, else what the caller set. ``started()``
    is called once the worker processes run: a thread the caller starts then is not forked.

    ``state`` (the ``_storage.State`` of this backup; a captured SQLite index, or with
    ``index_file`` None a dump's listing in the state's connection, ``use_dump_listing``): the check of
    what changed (``_compare_with_state``): the index is compared with the state in SQL, and only
    the files placed new are checked on disk, by the same batches; the orphans are the files placed
    that the index does not list (storage/'s folders are not listed)."""
    storage = os.path.join(backup, _layout.STORAGE)
    source = "the dump's listing" if rows == LISTING_ROWS else index_file
    listed = None  # a connection the caller owns, with a table listing(uuid, size, md5)
    if state is not None:
        listed, orphans, rows = state.conn, False, LISTING_ROWS
        source = f"{index_file or 'the dump listing'} and the storage state"
    query = _rows_query(rows) + " ORDER BY uuid"
    workers = default_workers() if not workers else workers
    try:
        conn = listed if listed is not None else _sqlite.connect(index_file)
    except sqlite3.Error as exc:
        raise PacsError("read index", f"cannot list the attachments of {source}: {exc}")
    if listed is None and hash_filter in (None, _hash_none):  # every file of a SQLite file: the workers read it
        try:
            _check_index_files(conn, index_file, storage, report, hash_filter is None, workers, orphans, known_missing,
                               progress, started, rows)
        except sqlite3.Error as exc:
            raise PacsError("read index", f"cannot list the attachments of {source}: {exc}")
        except concurrent.futures.process.BrokenProcessPool as exc:
            raise PacsError("verify storage", f"a hashing process died: {exc}")
        finally:
            conn.close()
        return

    def batches():
        """What is checked on disk: (count of rows, batches)."""
        if state is not None:
            _compare_with_state(state, index_file, report)
        table, size, _md5 = rows
        count, total = conn.execute(f"SELECT COUNT(*), COALESCE(SUM({size}), 0) FROM {table}").fetchone()
        if progress is not None and hash_filter is None and progress.files_total is None:
            progress.totals(count, total)
        return count, _batches(conn.execute(query), _shards(storage) if orphans else [], hash_filter)

    try:
        if state is not None:
            # the files placed new are at most what the comparison hands on: the workers are forked
            # (and ``started`` called) before it, so that the caller's thread runs beside it
            found = None
            count = state.summary()["new_files"]
        else:
            found = batches()
            count = found[0]
        workers = max(1, min(workers, -(-count // HASH_WINDOW)))  # no process without a batch to check
        if workers == 1:
            if started is not None:
                started()
            results = (check_batch(batch, wanted, folders, storage, known_missing)
                       for batch, wanted, folders in (found or batches())[1])
            _gather(results, report, progress)
        else:
            context = multiprocessing.get_context("fork")
            with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context, initializer=_start_worker,
                                                        initargs=(storage, known_missing)) as pool:
                pool.submit(_ready).result()  # the first submit forks every worker, before any thread
                if started is not None:
                    started()
                _gather(_in_flight(pool, (found or batches())[1], workers * PIPELINE), report, progress)
    except sqlite3.Error as exc:
        raise PacsError("read index", f"cannot list the attachments of {source}: {exc}")
    except concurrent.futures.process.BrokenProcessPool as exc:
        raise PacsError("verify storage", f"a hashing process died: {exc}")
    finally:
        if listed is None:
            conn.close()


def _ready() -> bool:
    """Nothing: submitted first, so that the pool forks its workers at once."""
    return True


def _in_flight(pool, batches, limit: int):
    """Results of check_batch over ``batches`` in their order, at most ``limit`` submitted ahead."""
    pending = collections.deque()
    for batch, wanted, folders in batches:
        pending.append(pool.submit(check_batch, batch, wanted, folders))
        if len(pending) >= limit:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def _gather(results, report: Report, progress) -> None:
    stats = report.stats
    for result in results:
        for key in ("files_checked", "bytes_checked", "files_hashed", "bytes_hashed"):
            stats[key] += result[key]
        if result["known_missing"]:
            stats["known_missing"] = stats.get("known_missing", 0) + result["known_missing"]
        for kind, example in result["problems"]:
            report.add(kind, example)
        stats["orphans"] += result["orphans"]
        room = MAX_EXAMPLES - len(report.orphan_examples)
        report.orphan_examples.extend(result["orphan_examples"][:room])
        if progress is not None:
            progress.add(result["files_hashed"], result["bytes_hashed"])


def _hash_none(_uuid: str) -> bool:
    return False


def _read_manifest(backup: str, report: Report, check_files: bool = True):
    """(manifest or None, names of the files whose SHA-256 matches it: None when not checked)."""
    try:
        manifest = _layout.read_manifest(backup)
    except FileNotFoundError:
        return None, set()
    except _layout.ManifestError as exc:
        report.add("unreadable manifest", str(exc.__cause__ or exc))
        return None, set()
    return manifest, (check_manifest_files(backup, manifest, report) if check_files else None)


def index_checked_before(manifest, matched: set) -> bool:
    """The index is byte for byte (SHA-256) the one that passed PRAGMA integrity_check when the
    backup was completed (the manifest says so): running it again would find the same."""
    return (INDEX_REL in matched and isinstance(manifest, dict) and isinstance(manifest.get("verification"), dict)
            and manifest["verification"].get("index_integrity") == INDEX_CHECKED)


def _compare_counts(manifest, counts: dict, report: Report) -> None:
    if manifest:
        for key, value in counts.items():
            recorded = manifest.get("counts", {}).get(key)
            if recorded is not None and recorded != value:
                report.add("counts that differ from the manifest", f"{key}: manifest {recorded}, index {value}")


class DumpListing:
    """What a database dump lists, streamed into a SQLite file of its own (``path``, in a private
    temporary folder removed when closed) in batches, as the dump's delta pass does
    (``_storage.State.load_listing``): ``listing(uuid, size, md5)`` the attachments,
    ``stored(uuid, size, md5)`` the files kept in the database. Nothing per file is held in
    Python, however many the dump lists; the check's workers read their own ranges of the file
    (``check_storage`` with ``LISTING_ROWS``), as they read a SQLite index. Given ``conn`` (a
    storage state's connection), the two tables are ``tables`` of it instead: TEMPORARY (dropped
    when closed), for the state to compare with in SQL, or RECORDED, kept in the state file (the
    delta pass records them there, ``RecordedDump``; with ``fill`` False they are used as they are).
    The rows are appended to staging tables as they come and moved into the tables keyed by uuid
    sorted, by ``finish`` (``_storage.move_sorted``): call it once the dump is read."""

    TEMPORARY = {"listing": _storage.DUMP_LISTING, "stored": "temp.dump_stored"}
    RECORDED = {"listing": _storage.RECORDED_DUMP_LISTING, "stored": _storage.RECORDED_DUMP_STORED}

    def __init__(self, conn=None, tables: dict | None = None, fill: bool = True):
        self.shared = conn is not None
        self.folder = self.path = None
        if self.shared:
            self.conn = conn
            self.tables = tables or self.TEMPORARY
        else:
            self.folder = tempfile.mkdtemp(prefix="pacs-orthanc-listing-")
            self.path = os.path.join(self.folder, "listing.sqlite")
            self.tables = {"listing": "listing", "stored": "stored"}
            try:
                self.conn = sqlite3.connect(self.path, isolation_level=None)
                self.conn.execute("PRAGMA journal_mode = OFF")  # scratch: a crash discards it
                self.conn.execute("PRAGMA synchronous = OFF")
            except BaseException:
                shutil.rmtree(self.folder, ignore_errors=True)
                raise
        self.fill = fill
        if fill:
            for table in self.tables.values():
                self.conn.execute(f"DROP TABLE IF EXISTS {table}")  # a listing recorded by an earlier run
                self.conn.execute(f"CREATE TABLE {table} (uuid TEXT PRIMARY KEY, size INTEGER, md5 TEXT) WITHOUT ROWID")
                self.conn.execute(f"CREATE TABLE {_storage.staging_table(table)} (uuid TEXT, size INTEGER, md5 TEXT)")
        self.pending: dict = {"listing": [], "stored": []}

    def _add(self, table: str, row: tuple) -> None:
        rows = self.pending[table]
        rows.append(row)
        if len(rows) >= HASH_WINDOW:
            self.flush()

    def attachment(self, uuid, size, md5) -> None:
        self._add("listing", (uuid, size, md5))

    def stored(self, uuid, size, md5) -> None:
        self._add("stored", (uuid, size, md5))

    def flush(self) -> None:
        with self.conn:
            self.conn.execute("BEGIN")
            for kind, rows in self.pending.items():
                if rows:
                    self.conn.executemany(f"INSERT INTO {_storage.staging_table(self.tables[kind])} VALUES (?, ?, ?)",
                                          rows)
                    rows.clear()

    def finish(self) -> None:
        """The rows staged go to the tables keyed by uuid (the last of two rows for one uuid wins,
        as it did in a dict)."""
        self.flush()
        for table in self.tables.values():
            _storage.move_sorted(self.conn, table)

    def has_stored(self) -> bool:
        return self.conn.execute(f"SELECT 1 FROM {self.tables['stored']} LIMIT 1").fetchone() is not None

    def close(self) -> None:
        if self.shared:
            for table in self.tables.values():
                if self.tables is self.TEMPORARY:
                    self.conn.execute(f"DROP TABLE IF EXISTS {table}")
                if self.fill:
                    self.conn.execute(f"DROP TABLE IF EXISTS {_storage.staging_table(table)}")
        else:
            try:
                self.conn.close()
            finally:
                shutil.rmtree(self.folder, ignore_errors=True)


def verify_database_backup(backup: str, found: tuple, manifest, report: Report, md5: str = "all",
                           workers: int | None = None, hash_filter=None, known_missing=frozenset(),
                           progress=None, state=None) -> dict:
    """A backup whose index is a database dump: the dump reads back and lists what the backup
    holds, whether the files are in the dump (large objects, LONGBLOBs) or in storage/. ``state``
    (a completion with md5 new or none, no file deleted while the dump ran, files in storage/):
    the dump's listing is compared with the storage state in SQL and only the files placed new
    are read on disk (``storage_check: changed``), as for a captured SQLite index; the listing is
    the one the delta pass recorded in the state file when the dump is the very file it read
    (``_storage.State.recorded_dump``: result ``dump_listing: recorded``), else the dump is read
    (``dump_listing: read``). The dump reads back either way (``check_dump``: pg_restore lists it)."""
    engine, fmt, path = found
    known = set((manifest or {}).get("storage", {}).get("deleted_during_capture") or []) | set(known_missing)
    by_state = state is not None and md5 != "all" and not known
    # the database container that made the dump reads it, when it runs here (versions match); an
    # incomplete backup being checked before it is called complete has its dump's record instead
    dump_record = (manifest or {}).get("dump")
    if not dump_record:
        try:
            dump_record = _record.read_records(backup).get("dump")
        except (OSError, ValueError):
            dump_record = None
    container = (dump_record or {}).get("container")
    recorded = state.recorded_dump(path) if by_state else None
    try:
        if recorded is not None:
            listed = DumpListing(state.conn, DumpListing.RECORDED, fill=False)
        else:
            listed = DumpListing(state.conn if by_state else None)
    except sqlite3.Error as exc:
        raise PacsError("verify backup", f"cannot keep the listing of the dump {path} in a temporary database: {exc}")
    except OSError as exc:
        raise PacsError("verify backup", f"cannot make a temporary folder for the listing of the dump {path}: "
                        f"{os_error_cause(exc)}")
    try:
        try:
            db_dump.check_dump(engine, path, fmt, container=container)
            if recorded is not None:
                summary = recorded
            else:
                summary = db_listing.stream_dump(engine, path, listed.attachment, listed.stored, with_contents=True,
                                                 container=container)
                listed.finish()
        except PacsError as exc:
            report.add("unreadable database dump", exc.cause)
            return report.as_dict()
        in_database = listed.has_stored() or bool((manifest or {}).get("storage_in_database"))
        by_state = by_state and not in_database
        if in_database:
            _check_in_database(listed, md5, report)
        elif by_state:
            state.use_dump_listing(listed.tables["listing"])
            check_storage(backup, None, report, _hash_none if md5 == "none" else None, workers, progress=progress,
                          state=state)
        else:
            chosen = _hash_none if md5 == "none" else (None if md5 == "all" else hash_filter)
            check_storage(backup, listed.path, report, chosen, workers, rows=LISTING_ROWS, known_missing=known,
                          progress=progress)
    except sqlite3.Error as exc:
        raise PacsError("verify backup", f"cannot keep the listing of the dump {path} in a temporary database: {exc}")
    finally:
        listed.close()
    _compare_counts(manifest, summary["counts"], report)
    result = report.as_dict()
    result.update({"counts": summary["counts"], "schema_version": summary["schema_version"],
                   "schema_patch_level": summary.get("patch_level"),
                   "dump": {"engine": engine, "format": fmt, "path": path}, "storage_in_database": in_database,
                   "storage_check": STORAGE_CHECK_CHANGED if by_state else STORAGE_CHECK_ALL,
                   "dump_listing": DUMP_RECORDED if recorded is not None else DUMP_READ})
    return result


class RecordedDump:
    """The dump's delta pass (``_storage.Delta``'s ``wanted``): the dump read once into the state
    file (RECORDED tables of a ``DumpListing``, and ``State.record_dump``), compared there with
    what the hot pass placed; the completion check then uses that listing instead of reading the
    dump again (at 1,000,000 instances a read costs about 3.6 s: pg_restore and the parse)."""

    def __init__(self, engine: str, path: str, container: str | None = None):
        self.engine, self.path, self.container = engine, path, container

    def load_into(self, state) -> None:
        listed = DumpListing(state.conn, DumpListing.RECORDED)
        try:
            summary = db_listing.stream_dump(self.engine, self.path, listed.attachment, listed.stored,
                                             with_contents=True, container=self.container)
            listed.finish()
        finally:
            listed.close()
        state.record_dump(self.path, summary)
        state.use_dump_listing(_storage.RECORDED_DUMP_LISTING)


def _check_in_database(listed: DumpListing, md5: str, report: Report) -> None:
    """Every attachment the dump lists is kept in it (large object, LONGBLOB) with its size and MD5."""
    query = (f"SELECT l.uuid, l.size, l.md5, s.size, s.md5 FROM {listed.tables['listing']} AS l "
             f"LEFT JOIN {listed.tables['stored']} AS s ON s.uuid = l.uuid ORDER BY l.uuid")
    for uuid, size, expected_md5, stored_size, stored_md5 in listed.conn.execute(query):
        if stored_size is None:
            report.add("files missing from the database dump", uuid)
            continue
        report.stats["files_checked"] += 1
        report.stats["bytes_checked"] += stored_size
        if stored_size != size:
            report.add("files in the dump with a wrong size", f"{uuid} ({stored_size} bytes, index says {size})")
        elif expected_md5 and md5 != "none":
            report.stats["files_hashed"] += 1
            report.stats["bytes_hashed"] += size
            if stored_md5 != expected_md5:
                report.add("files in the dump with a wrong MD5", uuid)


def verify_backup(backup: str, md5: str = "all", workers: int | None = None, hash_filter=None,
                  known_missing=frozenset(), progress=None, state=None, started=None, index_check="full") -> dict:
    """Check a complete or incomplete backup folder. ``md5``: all, new (via hash_filter) or none.
    ``known_missing``: storage files recorded as deleted in Orthanc while its database was dumped.
    ``state``: the storage state (``_storage.State``) of an incomplete backup being completed:
    with md5 new or none, a captured SQLite index or a dump (no file deleted while it ran, files in
    storage/), the storage check is the check of what changed (``check_storage``'s ``state``,
    result ``storage_check: changed``); md5=all and a backup without a state get the check of
    every file (``storage_check: all``).
    ``index_check``: with ``quick``, the check of what changed runs PRAGMA quick_check on the
    index (result ``index_check: quick_check``); everywhere else the full integrity_check runs
    (``index_check: integrity_check``), or none when the manifest says that this very index
    passed it (``unchanged``). ``started()``, when given, is called once the hashing processes
    are forked (with a SQLite index), when the side thread starts: a thread the caller starts then
    is not forked."""
    report = Report()
    found = db_dump.find_dump(backup)
    manifest, matched = _read_manifest(backup, report, check_files=bool(found))
    if found:
        return verify_database_backup(backup, found, manifest, report, md5, workers, hash_filter, known_missing,
                                      progress, state)
    index_file = os.path.join(backup, _layout.INDEX, "index")
    if not os.path.isfile(index_file):
        if manifest:
            check_manifest_files(backup, manifest, report)
        report.add("missing index", "index/index")
        return report.as_dict()
    # What reads the index and the files outside storage/ runs in a thread beside the storage
    # check (whose hashing is the long part), started once the hashing processes are forked:
    # the SHA-256 of the files the manifest names (the index among them), then the integrity
    # check (SQLite, which releases the GIL; about as much CPU per instance as hashing a small
    # file), skipped when the index is, by that SHA-256, the one that passed it when the backup
    # was completed, then the index's counts. The check of what changed (a nightly's completion)
    # with index_check quick runs PRAGMA quick_check (index_check quick_check, recorded in the
    # manifest): the full integrity_check then runs at the next backup_verify.
    by_state = state is not None and md5 != "all" and not known_missing
    level = "quick" if by_state and index_check == "quick" else "full"
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as side:
        side_future: list = []

        def start_side() -> None:
            if not side_future:
                side_future.append(side.submit(_check_index, backup, manifest, index_file, level))
                if started is not None:
                    started()

        if md5 == "none":
            chosen = _hash_none
        elif md5 == "all":
            chosen = None
        else:
            chosen = hash_filter
        storage_report = Report()
        storage_error = None
        if by_state:
            chosen = _hash_none if md5 == "none" else None  # what the state selects is new: all hashed
        try:
            check_storage(backup, index_file, storage_report, chosen, workers, progress=progress,
                          started=start_side, state=state if by_state else None)
        except PacsError as exc:
            storage_error = exc
        start_side()  # when the storage check stopped before it started it
        files_report, index_check, integrity, summary = side_future[0].result()
    for kind, entry in files_report.problems.items():
        report.problems[kind] = entry
    for problem in integrity:
        report.add("index integrity errors", problem)
    if integrity:
        return report.as_dict()  # storage findings against a damaged index would mislead
    if storage_error:
        raise storage_error
    for kind, entry in storage_report.problems.items():
        report.problems[kind] = entry
    report.stats.update(storage_report.stats)
    report.orphan_examples = storage_report.orphan_examples
    _compare_counts(manifest, summary["counts"], report)
    result = report.as_dict()
    result.update({"counts": summary["counts"], "schema_version": summary["schema_version"],
                   "schema_patch_level": summary.get("patch_level"), "index_check": index_check,
                   "storage_check": STORAGE_CHECK_CHANGED if by_state else STORAGE_CHECK_ALL})
    return result


def _check_index(backup: str, manifest, index_file: str, level: str = "full") -> tuple:
    """The side thread of verify_backup: (report of the files the manifest names, index_check,
    integrity problems, the index's summary or None when it has problems). ``level``: full
    (PRAGMA integrity_check) or quick (quick_check)."""
    files_report = Report()
    matched = check_manifest_files(backup, manifest, files_report) if manifest else set()
    if index_checked_before(manifest, matched):
        index_check, level = "unchanged", "none"
    else:
        index_check = INDEX_QUICK if level == "quick" else INDEX_CHECKED
    integrity = _sqlite.check_integrity(index_file, level)
    return files_report, index_check, integrity, (None if integrity else _sqlite.read_summary(index_file))

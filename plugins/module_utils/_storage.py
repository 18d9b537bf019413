# -*- coding: utf-8 -*-
# Copyright: pacs.orthanc contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Incremental snapshots of Orthanc's storage folder (``xx/yy/uuid``).

Orthanc writes a file once and never changes it, so a name that is already in the previous
backup (with the same size) can be hard-linked from there, and a backup on the filesystem of
the storage itself can hard-link the live file. Everything else is copied.

A snapshot is taken in two passes. The *hot* pass runs while Orthanc runs: it walks the storage
tree, skips files modified in the last ``settle`` seconds (they may still be being written) and
records every file it placed, with its size, in a state file (a SQLite database, see ``State``).
The *delta* pass runs while Orthanc is stopped and does not walk the live tree: the captured
index lists every attachment and its size, so the delta is computed from that list and the state
file alone, by SQLite: files the index lists that the hot pass did not place (or placed with
another size) are fetched (``Delta.fetch``, inside the window); files the hot pass placed that
the index no longer lists (deleted meanwhile) are removed (``Delta.tidy``, after the start).

Inside the window the comparison need not read every attachment (issue 15.2): before it walks,
the hot pass records Orthanc's change position (the ``seq`` of its last ``Changes`` row, from
``GET /changes?last``) and, as it walks, the files it skipped (not settled). Whatever the hot
pass could not have placed was committed after that position, so the window's candidates are the
attachments of the resources named by the captured index's ``Changes`` rows past it, plus the
skipped files (``Delta.window_plan``, ``Delta.fetch(changes_since=...)``): a range of the change
log and a primary-key look-up per candidate, whatever the archive's size. The full comparison
runs when the position cannot be trusted (none recorded, an older state file, a dump's listing,
a change log cleared or trimmed past it), and, once Orthanc runs again, always, as a safety net:
Orthanc adds a few attachments without logging a change (an attachment compressed or
uncompressed over REST, the ``dicom-until-pixel-data`` file it adds lazily to instances stored by
Orthanc 1.9.0 or older); those are placed then, from the live storage or the previous backup."""

from __future__ import annotations

import collections
import concurrent.futures
import concurrent.futures.process
import itertools
import json
import multiprocessing
import os
import re
import shutil
import sqlite3
import time
import urllib.parse

from ansible_collections.pacs.orthanc.plugins.module_utils._common import PacsError, os_error_cause

__metaclass__ = type

_SHARD = re.compile(r"^[0-9a-f]{2}$")

ORIGIN_PREVIOUS = "previous"   # hard link to the previous backup's file
ORIGIN_LINK = "link"           # hard link to the live file (same filesystem)
ORIGIN_COPY = "copy"           # copied bytes

# Processes linking the hot pass's files, each a run of xx folders at a time (at most the CPUs).
# Processes, not threads: one stat and one link per file, each releasing and taking the GIL
# again, and two threads doing so hand the GIL back and forth on every call: at 1,000,000 files
# two threads took 25-33 s against 18-21 s for one, two processes 12.6-13.6 s (ext4, 2 CPUs,
# benchmarks/README.md).
LINK_WORKERS = 2
_IN_FLIGHT = 4      # xx folders per process handed out ahead of the one being recorded
_DIR_FLAGS = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0)
MAX_PENDING = 4096             # copies queued at most before the oldest are waited for
BATCH = 5000                   # rows written to the state database per statement


def relpath(uuid: str) -> str:
    return os.path.join(uuid[0:2], uuid[2:4], uuid)


def walk_storage(root: str):
    """Yield (uuid, DirEntry) for every file in root/xx/yy/. Other files (an index kept in the
    storage folder, plugin databases) are not part of the storage tree and are skipped."""
    try:
        level1 = shard_folders(root)
    except OSError as exc:
        raise PacsError("walk storage", f"cannot list the storage folder: {os_error_cause(exc)}")
    for name1 in level1:
        for name2 in shard_folders(os.path.join(root, name1)):
            for entry in os.scandir(os.path.join(root, name1, name2)):
                if entry.is_file(follow_symlinks=False) and not entry.name.startswith("."):
                    yield entry.name, entry


def shard_folders(path: str) -> list:
    """The storage folders directly in ``path`` (named by two lowercase hex digits: the xx level
    of storage/, or the yy level of one xx folder), sorted. Raises OSError."""
    with os.scandir(path) as listing:
        return sorted(e.name for e in listing if _SHARD.match(e.name) and e.is_dir(follow_symlinks=False))


def mount_point(path: str) -> str | None:
    """The mount point that holds ``path`` (from /proc/self/mountinfo), None where that is unknown."""
    path = os.path.realpath(path)
    best = None
    try:
        with open("/proc/self/mountinfo", "r", encoding="utf-8", errors="replace") as handle:
            for line in handle:
                fields = line.split()
                if len(fields) < 5:
                    continue
                point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4])
                if path == point or path.startswith(point.rstrip("/") + "/"):
                    if best is None or len(point) >= len(best):
                        best = point
    except OSError:
        return None
    return best


def same_filesystem(a: str, b: str) -> bool:
    """Whether a file of ``a`` can be hard-linked into ``b``: the same device AND the same mount
    (Linux refuses link() across two mounts of one filesystem, such as the bind mount dockerd makes
    of its data root, where the volumes are)."""
    return os.stat(a).st_dev == os.stat(b).st_dev and mount_point(a) == mount_point(b)


class Placer:
    """Puts files into a backup's storage tree: link from the previous backup, link from the
    live storage (same filesystem) or copy; copies run in a small thread pool."""

    def __init__(self, source: str, dest: str, previous: str | None, link_source: bool,
                 workers: int = 4, check_mode: bool = False, owner: tuple | None = None):
        self.source, self.dest, self.previous = source, dest, previous
        self.owner = owner
        self.link_source = link_source
        self.check_mode = check_mode
        self.made_dirs: set = set()
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=max(1, workers))
        self.pending: collections.deque = collections.deque()
        self.vanished: list = []
        self.on_done = None  # progress: called (files, bytes) as each file is in place (see hot_pass)

    def _ensure_dir(self, uuid: str) -> None:
        shard = os.path.join(uuid[0:2], uuid[2:4])
        if shard not in self.made_dirs:
            if not self.check_mode:
                os.makedirs(os.path.join(self.dest, shard), mode=0o700, exist_ok=True)
                if self.owner:
                    os.chown(os.path.join(self.dest, uuid[0:2]), *self.owner)
                    os.chown(os.path.join(self.dest, shard), *self.owner)
            self.made_dirs.add(shard)

    def place(self, uuid: str, size: int | None) -> tuple:
        """Place one file; returns (origin, size) or (None, 0) when the source is missing.
        Copies are queued; call ``finish`` to wait for them."""
        rel = relpath(uuid)
        src = os.path.join(self.source, rel)
        target = os.path.join(self.dest, rel)
        if self.previous:
            prev = os.path.join(self.previous, rel)
            try:
                prev_size = os.stat(prev).st_size
            except FileNotFoundError:
                prev_size = None
            if prev_size is not None and (size is None or prev_size == size):
                self._ensure_dir(uuid)
                if not self.check_mode:
                    os.link(prev, target)
                if self.on_done:
                    self.on_done(1, prev_size)
                return ORIGIN_PREVIOUS, prev_size
        if size is None:
            try:
                size = os.stat(src).st_size
            except FileNotFoundError:
                return None, 0
        self._ensure_dir(uuid)
        if self.check_mode:
            if self.on_done:
                self.on_done(1, size)
            return (ORIGIN_LINK if self.link_source else ORIGIN_COPY), size
        if self.link_source:
            try:
                os.link(src, target)
            except FileNotFoundError:
                return None, 0
            if self.owner:
                os.chown(target, *self.owner)
            if self.on_done:
                self.on_done(1, size)
            return ORIGIN_LINK, size
        self.pending.append((uuid, self.pool.submit(self._copy, src, target, self.owner), size))
        if len(self.pending) >= MAX_PENDING:
            self._drain(MAX_PENDING // 2)  # memory stays flat however many files are copied
        elif self.on_done:
            while self.pending and self.pending[0][1].done():
                self._drain(len(self.pending) - 1)  # the copies done so far count as done
        return ORIGIN_COPY, size

    def _drain(self, keep: int) -> None:
        while len(self.pending) > keep:
            uuid, future, size = self.pending.popleft()
            if not future.result():
                self.vanished.append(uuid)
            elif self.on_done:
                self.on_done(1, size)

    @staticmethod
    def _copy(src: str, target: str, owner: tuple | None = None) -> bool:
        """Copy through a temporary name; False when the source no longer exists."""
        tmp = target + ".part"
        try:
            shutil.copyfile(src, tmp)
            if owner:
                os.chown(tmp, *owner)
            os.rename(tmp, target)
            return True
        except BaseException as exc:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            if isinstance(exc, FileNotFoundError) and exc.filename == src:
                return False
            raise

    def finish(self, step: str) -> list:
        """Wait for the copies; returns the uuids whose source vanished before it was copied."""
        try:
            self._drain(0)
        except OSError as exc:
            raise PacsError(step, os_error_cause(exc))
        finally:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pending.clear()
        vanished, self.vanished = self.vanished, []
        return vanished


# --------------------------------------------------------------------------------------------
# The state: where every file of this backup's storage came from
#
# A small SQLite database in the incomplete backup's .work/ (removed when the backup completes):
# one row (uuid, size, origin) per file placed, uuid as its primary key. The hot pass writes it
# in batches while Orthanc runs; the delta pass attaches the captured index to it and asks SQLite
# only for the attachments that it lacks or holds with another size: while Orthanc is stopped,
# nothing is read into Python, held in memory or rewritten for every file; what remains per file
# is one primary-key look-up inside SQLite (about 1.2 us at 1 M files, benchmarks/stop_window.py),
# and the copying follows what changed since the hot pass.

_SQLITE_MAGIC = b"SQLite format 3\x00"
_SCHEMA = ("CREATE TABLE IF NOT EXISTS placed (uuid TEXT PRIMARY KEY, size INTEGER NOT NULL, "
           "origin TEXT NOT NULL) WITHOUT ROWID")
# what the hot pass knows beyond the files it placed (state files of collection versions before
# 0.3.x lack both tables: their window pass is the full comparison)
_SCHEMA_FACTS = "CREATE TABLE IF NOT EXISTS facts (key TEXT PRIMARY KEY, value) WITHOUT ROWID"
_SCHEMA_SKIPPED = "CREATE TABLE IF NOT EXISTS skipped (uuid TEXT PRIMARY KEY) WITHOUT ROWID"
CHANGE_POSITION = "change_position"

WINDOW_CHANGES = "changes"     # the window pass examined what Orthanc's change log names
WINDOW_FULL = "full"           # the window pass compared every attachment of the index


_SQLITE_CAUSES = {"SQLITE_FULL": "No space left on device", "SQLITE_IOERR": "Input/output error",
                  "SQLITE_READONLY": "Read-only file system or file", "SQLITE_CANTOPEN": "cannot open the file"}


def _state_failure(step: str, path: str | None, exc: sqlite3.Error) -> PacsError:
    """The error of a state file that SQLite cannot read or write, in the words of the OS."""
    cause = _SQLITE_CAUSES.get("_".join(str(getattr(exc, "sqlite_errorname", "")).split("_")[:2]), "")
    return PacsError(step, f"cannot use the state file {path}: "
                     + (f"{cause} (SQLite: {exc})" if cause else f"SQLite: {exc}"))


def _uri(path: str, mode: str) -> str:
    return f"file:{urllib.parse.quote(os.path.abspath(path))}?mode={mode}"


def staging_table(table: str) -> str:
    """The rowid table beside ``table`` (keyed by uuid) into which rows are first appended as they
    come: ``move_sorted`` then fills ``table`` in key order."""
    return "temp.staged_" + table.rsplit(".", 1)[-1]


def move_sorted(conn, table: str) -> None:
    """Fill ``table`` (uuid PRIMARY KEY, WITHOUT ROWID) from its staging table, sorted by uuid, and
    drop the staging table; of two rows for one uuid the later one wins. Rows of random uuids
    (a dump's, in its table's order) inserted one by one into the key's B-tree land on random
    pages, which outgrow SQLite's page cache: 15.8 s at 1 M rows, against 3.6 s appended to the
    staging table and moved over sorted (SQLite's sorter, in bounded memory; benchmarks/README.md)."""
    staged = staging_table(table)
    with conn:
        conn.execute("BEGIN")
        conn.execute(f"INSERT OR REPLACE INTO {table} SELECT * FROM {staged} ORDER BY uuid, rowid")
        conn.execute(f"DROP TABLE {staged}")


_INDEX_LISTING = "(SELECT uuid, compressedSize AS size FROM idx.AttachedFiles)"
DUMP_LISTING = "temp.dump_listing"  # a dump's attachments (uuid, size, md5) streamed into this connection
# A dump's listing recorded in the state file by the delta pass (``record_dump``): the attachments
# (uuid, size, md5) and the files kept in the database; the completion check uses them instead of
# reading the dump once more, when the dump is the very file that was read (``recorded_dump``)
RECORDED_DUMP_LISTING = "main.dump_listing"
RECORDED_DUMP_STORED = "main.dump_stored"
RECORDED_DUMP = "recorded_dump"  # facts: the dump read (path, size, mtime, inode) and its summary


# The window's candidates from the change log. NOT INDEXED: the changes past the position are read
# by their rowid range (seq is the INTEGER PRIMARY KEY). Without it SQLite scans Orthanc's
# ChangesIndex (on internalId, which gives the DISTINCT for free) over every change ever logged:
# a pass over millions of rows inside the stop window (0.25-0.58 s at 5 M instances on XFS).
CHANGED_SINCE = ("SELECT a.uuid, a.compressedSize, p.size "
                 "FROM (SELECT DISTINCT internalId FROM idx.Changes NOT INDEXED WHERE seq > ?) AS c "
                 "JOIN idx.AttachedFiles AS a ON a.id = c.internalId "
                 "LEFT JOIN main.placed AS p ON p.uuid = a.uuid "
                 "WHERE p.uuid IS NULL OR p.size IS NOT a.compressedSize")


class State:
    """The state database of one backup's storage. ``readonly`` reads the file as it is;
    ``check_mode`` works on a copy in memory; neither writes the file. A state file that does not
    exist reads as empty."""

    def __init__(self, path: str | None, check_mode: bool = False, readonly: bool = False,
                 step: str = "write storage state"):
        self.path = path
        self.step = step  # named in the error when the state cannot be written (a full disk)
        self.listing = None  # the table of (uuid, size) the captured index or dump lists
        in_memory = check_mode or readonly or not path
        try:
            if readonly and not check_mode and _is_database(path):
                self.conn = sqlite3.connect(_uri(path, "ro"), uri=True, isolation_level=None)
                self.conn.execute("SELECT 1 FROM placed LIMIT 1").fetchall()
                return
            if path and not in_memory:
                _migrate_tsv(path)
                os.makedirs(os.path.dirname(os.path.abspath(path)), mode=0o700, exist_ok=True)
            self.conn = sqlite3.connect(":memory:" if in_memory else _uri(path, "rwc"), uri=not in_memory,
                                        isolation_level=None)
            self.conn.execute("PRAGMA synchronous = OFF")  # a working file: a crash discards the backup anyway
            for statement in (_SCHEMA, _SCHEMA_FACTS, _SCHEMA_SKIPPED):
                self.conn.execute(statement)
            if in_memory and path and os.path.exists(path) and os.path.getsize(path) > 0:
                _migrate_tsv(path, self.conn)
                if self.is_empty():
                    self.conn.execute("ATTACH DATABASE ? AS saved", (_uri(path, "ro"),))
                    self.conn.execute("INSERT INTO main.placed SELECT uuid, size, origin FROM saved.placed")
                    self.conn.execute("DETACH DATABASE saved")
        except sqlite3.Error as exc:
            raise _state_failure(step, path, exc)
        except OSError as exc:
            raise PacsError(step, f"cannot use the state file {path}: {os_error_cause(exc)}")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def close(self) -> None:
        self.conn.close()

    def is_empty(self) -> bool:
        return self.conn.execute("SELECT 1 FROM placed LIMIT 1").fetchone() is None

    def known(self, uuid: str) -> bool:
        return self.conn.execute("SELECT 1 FROM placed WHERE uuid = ?", (uuid,)).fetchone() is not None

    def _write(self, statement: str, rows) -> None:
        try:
            with self.conn:
                self.conn.execute("BEGIN")
                self.conn.executemany(statement, rows)
        except sqlite3.Error as exc:
            raise _state_failure(self.step, self.path, exc)

    def put(self, rows: list) -> None:
        """Record (uuid, size, origin) rows, replacing what was recorded for these uuids."""
        if rows:
            self._write("INSERT OR REPLACE INTO placed (uuid, size, origin) VALUES (?, ?, ?)", rows)

    def remove(self, uuids) -> None:
        uuids = list(uuids)
        if uuids:
            self._write("DELETE FROM placed WHERE uuid = ?", ((u,) for u in uuids))

    def skip(self, uuids) -> None:
        """Record files the hot pass saw and left to the delta pass (not settled yet)."""
        uuids = list(uuids)
        if uuids:
            self._write("INSERT OR IGNORE INTO skipped (uuid) VALUES (?)", ((u,) for u in uuids))

    def set_change_position(self, position: int | None) -> None:
        """Record Orthanc's change position read before a hot pass walked. A second hot pass into
        the same backup keeps the first (the earlier position names more changes: never fewer)."""
        if position is not None:
            self._write(f"INSERT OR IGNORE INTO facts (key, value) VALUES ('{CHANGE_POSITION}', ?)",
                        [(int(position),)])

    def change_position(self) -> int | None:
        """The change position the hot pass recorded; None when none was (or an older state file)."""
        try:
            row = self.conn.execute("SELECT value FROM facts WHERE key = ?", (CHANGE_POSITION,)).fetchone()
        except sqlite3.Error:  # no such table: a state file of an older collection version
            return None
        return int(row[0]) if row is not None and row[0] is not None else None

    def rows(self):
        """Every (uuid, size, origin), by uuid."""
        return self.conn.execute("SELECT uuid, size, origin FROM placed ORDER BY uuid")

    def is_new(self, uuid: str) -> bool:
        """Whether a file was placed and not linked from the previous backup (one look-up: what
        a verification with md5=new asks about each file, instead of holding the set of them)."""
        row = self.conn.execute("SELECT origin FROM placed WHERE uuid = ?", (uuid,)).fetchone()
        return row is not None and row[0] != ORIGIN_PREVIOUS

    def summary(self) -> dict:
        totals = {"files": 0, "bytes": 0, "new_files": 0, "new_bytes": 0, "linked_files": 0,
                  "linked_bytes": 0, "copied_files": 0, "copied_bytes": 0}
        for origin, files, size in self.conn.execute(
                "SELECT origin, COUNT(*), COALESCE(SUM(size), 0) FROM placed GROUP BY origin"):
            totals["files"] += files
            totals["bytes"] += size
            kind = "linked" if origin == ORIGIN_PREVIOUS else "new"
            totals[f"{kind}_files"] += files
            totals[f"{kind}_bytes"] += size
            if origin == ORIGIN_COPY:
                totals["copied_files"] += files
                totals["copied_bytes"] += size
        return totals

    # what the captured index (or a dump) lists, compared with what was placed

    def attach_index(self, index: str) -> None:
        """List the attachments of a captured SQLite index (read, never changed)."""
        try:
            self.conn.execute("ATTACH DATABASE ? AS idx", (_uri(index, "ro"),))
            self.conn.execute("SELECT uuid, compressedSize FROM idx.AttachedFiles LIMIT 1").fetchall()
        except sqlite3.Error as exc:
            raise PacsError("read index", f"cannot list the attachments of {index}: {exc}")
        self.listing = _INDEX_LISTING

    def use_dump_listing(self, table: str = DUMP_LISTING) -> None:
        """List the attachments of a database dump that were streamed into this connection's
        table ``table`` (uuid, size, md5) (``_verify.DumpListing``): DUMP_LISTING, or the one the
        delta pass recorded in the state file (RECORDED_DUMP_LISTING): what the delta pass and the
        completion check of a dump backup compare with the state."""
        self.listing = table

    def record_dump(self, path: str, summary: dict) -> None:
        """Record that RECORDED_DUMP_LISTING and RECORDED_DUMP_STORED hold what the dump ``path``
        lists (``summary``: its counts and schema version, ``_db.listing.stream_dump``'s), with what
        identifies that file (size, modification time, inode)."""
        st = os.stat(path)
        identity = {"path": os.path.abspath(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
                    "inode": st.st_ino, "summary": summary}
        self._write("INSERT OR REPLACE INTO facts (key, value) VALUES (?, ?)", [(RECORDED_DUMP, json.dumps(identity))])

    def recorded_dump(self, path: str):
        """The summary of the dump ``path`` when the delta pass recorded its listing and the file
        is still the one it read (same path, size, modification time and inode), else None."""
        try:
            row = self.conn.execute("SELECT value FROM facts WHERE key = ?", (RECORDED_DUMP,)).fetchone()
            if row is None:
                return None
            self.conn.execute(f"SELECT 1 FROM {RECORDED_DUMP_LISTING} LIMIT 1").fetchall()
            self.conn.execute(f"SELECT 1 FROM {RECORDED_DUMP_STORED} LIMIT 1").fetchall()
            recorded = json.loads(row[0])
            st = os.stat(path)
        except (sqlite3.Error, ValueError, OSError):
            return None  # an older state file, or no such dump: it is read again
        same = (recorded.get("path") == os.path.abspath(path) and recorded.get("size") == st.st_size
                and recorded.get("mtime_ns") == st.st_mtime_ns and recorded.get("inode") == st.st_ino)
        return recorded.get("summary") if same and isinstance(recorded.get("summary"), dict) else None

    def load_listing(self, wanted) -> None:
        """List the (uuid, size) pairs given, a {uuid: size} or any iterable of pairs (a dump's
        attachments, streamed: they go to SQLite in batches and are not kept in Python)."""
        pairs = iter(wanted.items() if isinstance(wanted, dict) else wanted)
        try:
            self.conn.execute("CREATE TEMP TABLE wanted (uuid TEXT PRIMARY KEY, size INTEGER NOT NULL) WITHOUT ROWID")
            self.conn.execute(f"CREATE TABLE {staging_table('temp.wanted')} (uuid TEXT, size INTEGER NOT NULL)")
            with self.conn:
                self.conn.execute("BEGIN")
                while True:
                    batch = list(itertools.islice(pairs, BATCH))
                    if not batch:
                        break
                    self.conn.executemany(f"INSERT INTO {staging_table('temp.wanted')} VALUES (?, ?)", batch)
            move_sorted(self.conn, "temp.wanted")
        except sqlite3.Error as exc:
            raise _state_failure(self.step, self.path, exc)
        self.listing = "temp.wanted"

    def differences(self) -> list:
        """(uuid, listed size, placed size or None) of every file listed that was not placed, or
        placed with another size. One pass over the listing in SQLite, one primary-key look-up
        into the state per row: nothing of the archive is held in memory, only the answer."""
        query = (f"SELECT w.uuid, w.size, p.size FROM {self.listing} AS w "
                 "LEFT JOIN main.placed AS p ON p.uuid = w.uuid "
                 "WHERE p.uuid IS NULL OR p.size IS NOT w.size")
        try:
            seen, found = set(), []
            for uuid, size, placed in self.conn.execute(query):
                if uuid not in seen:  # an index lists a file once; never fetch one twice
                    seen.add(uuid)
                    found.append((uuid, int(size), placed))
            return found
        except sqlite3.Error as exc:
            raise PacsError("read index", f"cannot compare the index with the storage state: {exc}")

    def distrust(self, position: int | None) -> str | None:
        """Why the captured index's change log cannot name what changed since ``position`` (then
        the window compares every attachment), or None when it can. It can when the index's
        ``Changes`` table still holds a row at or before the position: Orthanc numbers changes
        with AUTOINCREMENT, so no row past it was lost to a ``DELETE /changes`` (which empties the
        table) or to trimming (which drops the oldest); the rows of deleted resources go with
        them, and so do their attachments."""
        if self.listing != _INDEX_LISTING:
            return "the attachments come from a dump's listing, not from a captured index"
        if position is None:
            return "the hot pass recorded no change position (Orthanc's REST API did not give it, or an older state file)"
        if position <= 0:
            return "Orthanc's change log was empty when the hot pass began"
        try:
            last = self.conn.execute("SELECT seq FROM idx.sqlite_sequence WHERE name = 'Changes'").fetchone()
            kept = self.conn.execute("SELECT 1 FROM idx.Changes WHERE seq <= ? LIMIT 1", (position,)).fetchone()
        except sqlite3.Error as exc:
            return f"the captured index's change log cannot be read ({exc})"
        if last is None or last[0] is None or int(last[0]) < position:
            return (f"the captured index's change log ends before position {position} that the hot pass "
                    "recorded (not the index of the Orthanc the hot pass asked?)")
        if kept is None:
            return (f"Orthanc's change log was cleared or trimmed since the hot pass began (no change at or "
                    f"before position {position} is left)")
        return None

    def changed_since(self, position: int) -> list:
        """The window's candidates (see the module's docstring), in the shape of ``differences``:
        (uuid, listed size, placed size or None) of each attachment of a resource named by a
        change past ``position`` that was not placed or was placed with another size; then
        (uuid, None, None) of each file the hot pass skipped and did not place (its size is read
        from the storage: the index cannot be searched by uuid without reading all of it). A
        range of the change log, a primary-key look-up per candidate: nothing per archived file."""
        changed = CHANGED_SINCE
        skipped = ("SELECT s.uuid FROM main.skipped AS s "
                   "WHERE NOT EXISTS (SELECT 1 FROM main.placed AS p WHERE p.uuid = s.uuid)")
        try:
            seen, found = set(), []
            for uuid, size, placed in self.conn.execute(changed, (position,)):
                if uuid not in seen:
                    seen.add(uuid)
                    found.append((uuid, int(size), placed))
            for (uuid,) in self.conn.execute(skipped):
                if uuid not in seen:
                    seen.add(uuid)
                    found.append((uuid, None, None))
            return found
        except sqlite3.Error as exc:
            raise PacsError("read index", f"cannot read the changes of the index since position {position}: {exc}")

    def completion_rows(self):
        """What a backup's completion check needs of the attached index (``attach_index``) or of a
        dump's listing (``use_dump_listing``), in one
        pass over its attachments with one primary-key look-up into the state per row, as
        ``differences`` does (about 1.2 us per file, benchmarks/stop_window.py): (uuid, listed size,
        MD5 or '', placed size or None, origin or None) of each attachment not placed, placed with
        another size, or placed new (not linked from the previous backup). An attachment linked
        from the previous backup with the size the index lists is not returned: nothing else is
        read into Python, however many files the archive holds."""
        if self.listing == _INDEX_LISTING:
            source, size, md5 = "idx.AttachedFiles", "a.compressedSize", "a.compressedMD5"
        elif self.listing in (DUMP_LISTING, RECORDED_DUMP_LISTING):
            source, size, md5 = self.listing, "a.size", "a.md5"
        else:
            raise PacsError("read index", "the completion check compares the state with a captured index or a "
                            "dump's listing only")
        query = (f"SELECT a.uuid, {size}, COALESCE({md5}, ''), p.size, p.origin "
                 f"FROM {source} AS a LEFT JOIN main.placed AS p ON p.uuid = a.uuid "
                 f"WHERE p.uuid IS NULL OR p.size IS NOT {size} OR p.origin IS NOT ?")
        try:
            return self.conn.execute(query, (ORIGIN_PREVIOUS,))
        except sqlite3.Error as exc:
            raise PacsError("read index", f"cannot compare the index with the storage state: {exc}")

    def counts(self) -> tuple:
        """(attachments listed, distinct uuids listed, files placed). Every uuid listed is placed
        and as many files are placed as distinct uuids are listed: then nothing placed is unlisted
        (no orphan), found without building the set of every uuid listed (``orphans``). The distinct
        uuids are counted by grouping (SQLite's sorter, in bounded memory, spilling to temporary
        files): 4x less CPU than ``COUNT(DISTINCT uuid)``, whose temporary B-tree outgrows the
        page cache (0.19 s against 0.80 s at 200,000 attachments, benchmarks/README.md)."""
        try:
            return (self.conn.execute(f"SELECT COUNT(*) FROM {self.listing}").fetchone()[0],
                    self.conn.execute(f"SELECT COUNT(*) FROM (SELECT uuid FROM {self.listing} GROUP BY uuid)").fetchone()[0],
                    self.conn.execute("SELECT COUNT(*) FROM main.placed").fetchone()[0])
        except sqlite3.Error as exc:
            raise PacsError("read index", f"cannot count the attachments and the files placed: {exc}")

    def changes_since(self, position: int) -> int:
        """How many changes the captured index logs past ``position``."""
        return self.conn.execute("SELECT COUNT(*) FROM idx.Changes WHERE seq > ?", (position,)).fetchone()[0]

    def orphans(self, all_listed_placed: bool = False) -> list:
        """uuids placed that the listing no longer lists (deleted since the hot pass).
        ``all_listed_placed``: every file listed is placed (a fetch without missing files); then
        equal counts mean no orphan, found without building the set of every uuid listed."""
        try:
            listed = self.listing
            if all_listed_placed and listed != "temp.wanted" and (
                    self.conn.execute(f"SELECT COUNT(*) FROM {listed}").fetchone()[0]
                    == self.conn.execute("SELECT COUNT(*) FROM main.placed").fetchone()[0]):
                return []
            if listed != "temp.wanted":
                self.conn.execute("CREATE TEMP TABLE IF NOT EXISTS listed (uuid TEXT PRIMARY KEY) WITHOUT ROWID")
                with self.conn:  # in key order: an index's uuids come in random order (3.7 s against 0.9 s at 1 M)
                    self.conn.execute("BEGIN")
                    self.conn.execute(f"INSERT OR IGNORE INTO temp.listed SELECT uuid FROM {listed} ORDER BY uuid")
                listed = "temp.listed"
            return [u for (u,) in self.conn.execute(
                f"SELECT uuid FROM main.placed AS p WHERE NOT EXISTS (SELECT 1 FROM {listed} AS w WHERE w.uuid = p.uuid)")]
        except sqlite3.Error as exc:
            raise PacsError("read index", f"cannot compare the storage state with the index: {exc}")


def is_state_database(path: str | None) -> bool:
    """Whether ``path`` is a state database (not missing, not the text file of older versions)."""
    return _is_database(path)


def _is_database(path: str | None) -> bool:
    try:
        with open(path or "", "rb") as handle:
            return handle.read(len(_SQLITE_MAGIC)) == _SQLITE_MAGIC
    except OSError:
        return False


def _migrate_tsv(path: str, conn: sqlite3.Connection | None = None) -> None:
    """A state file written as tab-separated text (collection versions before the database):
    rewrite it as a database (or, given ``conn``, load it there)."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(len(_SQLITE_MAGIC))
    except FileNotFoundError:
        return
    if head in (_SQLITE_MAGIC, b""):
        return  # a database already, or an empty file (SQLite makes it a new database)
    if conn is None:
        target = sqlite3.connect(path + ".new", isolation_level=None)
        target.execute(_SCHEMA)
    else:
        target = conn
    with open(path, "r", encoding="ascii") as handle:
        rows = (tuple(parts) for parts in (line.rstrip("\n").split("\t") for line in handle) if len(parts) == 3)
        with target:
            target.execute("BEGIN")
            target.executemany("INSERT OR REPLACE INTO placed VALUES (?, ?, ?)",
                               ((u, int(s), o) for u, s, o in rows))
    if conn is None:
        target.close()
        os.replace(path + ".new", path)


def read_state(path: str) -> dict:
    """{uuid: (size, origin)} of a state file (small archives and tests only: it holds every file)."""
    if not path or not os.path.exists(path):
        return {}
    with State(path, readonly=True) as state:
        return {uuid: (size, origin) for uuid, size, origin in state.rows()}


def summarize(state: dict) -> dict:
    """The totals of a {uuid: (size, origin)} state (see State.summary)."""
    with State(None) as memory:
        memory.put([(u, size, origin) for u, (size, origin) in state.items()])
        return memory.summary()


def _prepare(source: str, dest: str, previous: str | None, link_mode: str, check_mode: bool):
    if not os.path.isdir(source):
        raise PacsError("check storage", f"the storage folder {source} does not exist")
    if previous and not os.path.isdir(previous):
        previous = None
    if not check_mode:
        try:
            os.makedirs(dest, mode=0o700, exist_ok=True)
        except OSError as exc:
            raise PacsError("create backup storage folder", os_error_cause(exc))
    probe = dest
    while not os.path.isdir(probe) and os.path.dirname(probe) != probe:
        probe = os.path.dirname(probe)  # check mode: the folder does not exist yet
    same_fs = same_filesystem(source, probe)
    if link_mode == "hardlink" and not same_fs:
        raise PacsError("check storage", f"link_mode=hardlink, but {dest} is not on the filesystem of {source}")
    return previous, (same_fs if link_mode == "auto" else link_mode == "hardlink")


def hot_pass(source: str, dest: str, state_file: str, previous: str | None = None,
             link_mode: str = "auto", settle: float = 5.0, workers: int = 4,
             check_mode: bool = False, progress=None, limit_rate: int = 0,
             change_position: int | None = None, link_workers: int = LINK_WORKERS) -> dict:
    """``progress``: a _progress.Progress told of every file walked (placed, deferred or gone).
    ``limit_rate``: at most so many bytes per second placed (0: no limit), to spare a busy disk.
    ``change_position``: Orthanc's change position, read before this call (recorded before the
    walk, with the files skipped as not settled: what lets the window examine only what changed).
    ``link_workers``: processes that walk the xx/yy folders and link their files (``_ShardLinker``,
    ``_linked_in_order``), at most one per CPU; copies still go to ``workers`` threads."""
    began = time.monotonic()
    placed_bytes = 0
    count = progress.add if progress is not None else _uncounted  # files walked but not placed
    previous, link_source = _prepare(source, dest, previous, link_mode, check_mode)
    with State(state_file, check_mode, step="copy storage (hot pass)") as state:
        again = not state.is_empty()  # a second hot pass into the same backup skips what is placed
        state.set_change_position(change_position)  # before the walk: what it misses comes after
        placer = Placer(source, dest, previous, link_source, workers, check_mode)
        placer.on_done = progress.add if progress is not None else None
        linker = _ShardLinker(source, dest, previous, link_source, check_mode, time.time() - settle,
                              known=state.known if again else None)
        # in this process when the state is read per file (a second pass) or the rate is limited
        processes = 1 if (again or limit_rate > 0) else max(1, min(link_workers, os.cpu_count() or 1))
        deferred = 0
        batch: list = []
        skipped: list = []
        try:
            for work in _linked_in_order(linker, source, processes):
                count(work.walked, work.walked_bytes)
                deferred += len(work.skipped)
                skipped.extend(work.skipped)
                batch.extend(work.rows)
                for uuid, size in work.copies:  # another filesystem: copied by the placer's threads
                    origin, size = placer.place(uuid, size)
                    if origin is None:
                        count(1, size)  # gone meanwhile: walked all the same
                    else:
                        batch.append((uuid, size, origin))
                if limit_rate > 0:
                    placed_bytes += work.source_bytes + sum(size for _uuid, size in work.copies)
                    ahead = placed_bytes / limit_rate - (time.monotonic() - began)
                    if ahead > 0:
                        time.sleep(ahead)
                if len(skipped) >= BATCH:
                    state.skip(skipped)
                    skipped = []
                if len(batch) >= BATCH:
                    state.put(batch)
                    batch = []
        except (OSError, PacsError, concurrent.futures.process.BrokenProcessPool) as exc:
            placer.pool.shutdown(wait=True, cancel_futures=True)
            if isinstance(exc, PacsError):
                raise
            if isinstance(exc, concurrent.futures.process.BrokenProcessPool):
                raise PacsError("copy storage (hot pass)", f"a linking process died: {exc}")
            raise PacsError("copy storage (hot pass)", os_error_cause(exc))
        state.put(batch)
        state.skip(skipped)
        state.remove(placer.finish("copy storage (hot pass)"))  # deleted by Orthanc while the hot pass ran
        result = state.summary()
    result.update({"phase": "hot", "deferred_files": deferred, "hardlink_from_source": link_source,
                   "previous": previous, "seconds": round(time.monotonic() - began, 3),
                   "change_position": change_position})
    return result


def _shards(root: str):
    """The "xx/yy" folders of a storage tree, in the order ``walk_storage`` walks them."""
    try:
        level1 = shard_folders(root)
    except OSError as exc:
        raise PacsError("walk storage", f"cannot list the storage folder: {os_error_cause(exc)}")
    for name1 in level1:
        try:
            level2 = shard_folders(os.path.join(root, name1))
        except FileNotFoundError:
            continue  # emptied and removed by Orthanc since it was listed
        for name in level2:
            yield name1 + "/" + name


def _linked_in_order(linker, source: str, processes: int):
    """``linker.run(shard)`` of every xx/yy folder of ``source``, in ``_shards``' order: in this
    process, or by ``processes`` forked processes, each handed one xx folder's yy folders at a time
    (about 1/256 of the archive), at most ``_IN_FLIGHT`` per process ahead of the one being
    recorded (memory stays flat however many files). The forked processes only list, stat and
    link; the state is written by this process alone."""
    if processes <= 1:
        for shard in _shards(source):
            yield linker.run(shard)
        return
    context = multiprocessing.get_context("fork")
    with concurrent.futures.ProcessPoolExecutor(processes, mp_context=context) as pool:
        pending: collections.deque = collections.deque()
        try:
            for group in _shard_groups(source):
                pending.append(pool.submit(_link_group, linker, group))
                if len(pending) >= _IN_FLIGHT * processes:
                    yield from pending.popleft().result()
            while pending:
                yield from pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()


def _shard_groups(source: str):
    """The xx/yy folders of ``source`` in ``_shards``' order, as lists of one xx folder's each."""
    group: list = []
    for shard in _shards(source):
        if group and group[0][:2] != shard[:2]:
            yield group
            group = []
        group.append(shard)
    if group:
        yield group


def _link_group(linker, shards: list) -> list:
    """In a linking process: the work of each folder of ``shards``."""
    return [linker.run(shard) for shard in shards]


class _ShardWork:
    """What the hot pass did in one xx/yy folder."""
    __slots__ = ("rows", "skipped", "copies", "walked", "walked_bytes", "source_bytes")

    def __init__(self):
        self.rows: list = []        # (uuid, size, origin) of each file linked
        self.skipped: list = []     # uuids not settled, left to the delta pass
        self.copies: list = []      # (uuid, size) to copy (the live storage is on another filesystem)
        self.walked = 0             # files linked, skipped or gone (the copies are counted when done)
        self.walked_bytes = 0
        self.source_bytes = 0       # bytes linked from the live storage (what limit_rate counts)


class _ShardLinker:
    """The hot pass's work in one xx/yy folder, the syscalls relative to the folders' descriptors
    (no path is resolved from the root per file): list the previous backup's folder once (names
    and inode numbers), then per live file one ``stat`` (size, mtime) and one ``link``. A live file
    that is the very inode the previous backup holds under its name (the storage and the backups
    on one filesystem: linked from there before) is that file; another is linked from the previous
    backup only when the sizes match (one more ``stat``), as ``Placer.place`` does. ``run`` may be
    called from several threads for different folders."""

    def __init__(self, source: str, dest: str, previous: str | None, link_source: bool, check_mode: bool,
                 cutoff: float, known=None):
        self.source, self.dest, self.previous = source, dest, previous
        self.link_source, self.check_mode, self.cutoff, self.known = link_source, check_mode, cutoff, known

    def run(self, shard: str) -> _ShardWork:
        work = _ShardWork()
        try:
            src_fd = os.open(os.path.join(self.source, shard), _DIR_FLAGS)
        except FileNotFoundError:
            return work  # emptied and removed by Orthanc since it was listed
        prev_fd = dest_fd = None
        try:
            prev: dict = {}  # name -> inode number (None: not comparable, another filesystem)
            if self.previous:
                try:
                    prev_fd = os.open(os.path.join(self.previous, shard), _DIR_FLAGS)
                except FileNotFoundError:
                    prev_fd = None
                if prev_fd is not None:
                    same_dev = os.fstat(prev_fd).st_dev == os.fstat(src_fd).st_dev
                    with os.scandir(prev_fd) as listing:
                        prev = {e.name: (e.inode() if same_dev else None) for e in listing}
            with os.scandir(src_fd) as listing:
                entries = [e for e in listing if not e.name.startswith(".") and e.is_file(follow_symlinks=False)]
            for entry in entries:
                uuid = entry.name
                if self.known is not None and self.known(uuid):
                    continue
                try:
                    st = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue  # deleted by Orthanc since it was listed
                size = st.st_size
                if st.st_mtime > self.cutoff:
                    work.skipped.append(uuid)  # may still be being written: left to the delta pass
                    work.walked += 1
                    work.walked_bytes += size
                    continue
                from_fd, origin = None, None
                if uuid in prev:
                    inode = prev[uuid]
                    if inode is not None and inode == st.st_ino:
                        from_fd, origin = prev_fd, ORIGIN_PREVIOUS  # the same file
                    else:
                        try:
                            prev_size = os.stat(uuid, dir_fd=prev_fd).st_size
                        except FileNotFoundError:
                            prev_size = None
                        if prev_size == size:
                            from_fd, origin = prev_fd, ORIGIN_PREVIOUS
                if origin is None:
                    if not self.link_source:
                        work.copies.append((uuid, size))
                        continue
                    from_fd, origin = src_fd, ORIGIN_LINK
                if not self.check_mode:
                    if dest_fd is None:
                        dest_fd = self._dest_folder(shard)
                    try:
                        os.link(uuid, uuid, src_dir_fd=from_fd, dst_dir_fd=dest_fd)
                    except FileNotFoundError:
                        if origin == ORIGIN_PREVIOUS:
                            raise
                        work.walked += 1  # gone meanwhile: walked all the same
                        work.walked_bytes += size
                        continue
                if origin == ORIGIN_LINK:
                    work.source_bytes += size
                work.rows.append((uuid, size, origin))
                work.walked += 1
                work.walked_bytes += size
        finally:
            for fd in (src_fd, prev_fd, dest_fd):
                if fd is not None:
                    os.close(fd)
        return work

    def _dest_folder(self, shard: str) -> int:
        path = os.path.join(self.dest, shard)
        try:
            os.mkdir(path, 0o700)
        except FileNotFoundError:
            os.makedirs(path, mode=0o700, exist_ok=True)
        except FileExistsError:
            pass
        return os.open(path, _DIR_FLAGS)


def _uncounted(_files: int, _nbytes: int) -> None:
    """The progress of a pass that reports none."""


class Delta:
    """The delta pass, in two steps: ``fetch`` places what the captured index (``index``, a
    SQLite file) or a dump's list (``wanted``: {uuid: size} or an iterable of (uuid, size); or an
    object whose ``load_into(state)`` reads the dump into the state file, as the dump's delta pass
    does: ``_verify.RecordedDump``) lists and the hot pass did not place
    (or placed with another size): the only step that must run while Orthanc is stopped, its
    work follows what changed since the hot pass. ``tidy`` removes what the hot pass placed and
    the index no longer lists, and sums up the storage: it can wait until Orthanc runs again."""

    def __init__(self, source: str, dest: str, state_file: str, wanted=None,
                 index: str | None = None, previous: str | None = None, link_mode: str = "auto",
                 workers: int = 4, check_mode: bool = False):
        if (wanted is None) == (index is None):
            raise ValueError("Delta needs either wanted or index")
        self.source, self.dest, self.workers, self.check_mode = source, dest, workers, check_mode
        self.fetched_all = False  # a fetch placed every file listed
        self.previous, self.link_source = _prepare(source, dest, previous, link_mode, check_mode)
        self.state = State(state_file, check_mode, step="copy storage (delta pass)")
        try:
            if index is not None:
                self.state.attach_index(index)
            elif callable(getattr(wanted, "load_into", None)):  # a dump read into the state (_verify.RecordedDump)
                wanted.load_into(self.state)
            else:
                self.state.load_listing(wanted)
        except BaseException:
            self.state.close()
            raise

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def close(self) -> None:
        self.state.close()

    def differences(self) -> list:
        return self.state.differences()

    def window_plan(self) -> dict:
        """How the window pass can run: ``{"mode": "changes", "change_position": P}`` when the
        captured index's change log names every change since the hot pass's position P (then
        ``fetch(changes_since=P)``), else ``{"mode": "full", "reason": why}`` (then ``fetch()``)."""
        position = self.state.change_position()
        reason = self.state.distrust(position)
        if reason is not None:
            return {"mode": WINDOW_FULL, "reason": reason, "change_position": position}
        return {"mode": WINDOW_CHANGES, "reason": None, "change_position": position,
                "changes": self.state.changes_since(position)}

    def fetch(self, missing_out: list | None = None, changes_since: int | None = None) -> dict:
        """Place what the index lists and the state lacks (or holds with another size). With
        ``changes_since`` (see ``window_plan``), only the window's candidates are examined; call
        ``fetch()`` again once Orthanc runs (the safety net: what the change log did not name)."""
        placer = Placer(self.source, self.dest, self.previous, self.link_source, self.workers, self.check_mode)
        missing, missing_live, placed_rows, unlisted = [], [], [], set()
        began = time.monotonic()
        candidates = (self.state.differences() if changes_since is None
                      else self.state.changed_since(changes_since))
        compared = time.monotonic() - began
        try:
            for uuid, size, known_size in candidates:
                if size is None:  # skipped by the hot pass: the index is not searched for it
                    unlisted.add(uuid)
                    origin, placed = placer.place(uuid, None)
                    if origin is not None:  # else deleted since: not listed, or the safety net says so
                        placed_rows.append((uuid, placed, origin))
                    continue
                target = os.path.join(self.dest, relpath(uuid))
                if known_size is not None and not self.check_mode:
                    try:
                        os.unlink(target)  # placed while still being written
                    except FileNotFoundError:
                        pass
                if known_size is None and not os.path.lexists(os.path.join(self.source, relpath(uuid))):
                    # the hot pass did not see it and it is not there now: the live archive lost it
                    # (the previous backup may still hold it, and then this backup does too)
                    missing_live.append(uuid)
                origin, placed = placer.place(uuid, size)
                if origin is None:
                    missing.append(uuid)
                else:
                    placed_rows.append((uuid, placed, origin))
        except OSError as exc:
            placer.pool.shutdown(wait=True, cancel_futures=True)
            raise PacsError("copy storage (delta pass)", os_error_cause(exc))
        vanished = set(placer.finish("copy storage (delta pass)"))
        missing.extend(vanished - unlisted)
        self.state.put([row for row in placed_rows if row[0] not in vanished])
        self.state.remove(missing)
        missing.sort()
        self.fetched_all = not missing and changes_since is None
        if missing_out is not None:
            missing_out.extend(missing)
        return {"phase": "delta", "fetched_files": len(placed_rows) - len(vanished),
                "compare_seconds": round(compared, 3),  # finding the candidates, before placing them
                "fetched_examples": list(itertools.islice((r[0] for r in placed_rows if r[0] not in vanished), 10)),
                "missing_files": len(missing), "missing_examples": missing[:10],
                # listed by the index, gone live, kept from the previous backup
                "lost_in_live_storage": sorted(set(missing_live) - set(missing)),
                "hardlink_from_source": self.link_source, "previous": self.previous}

    def tidy(self) -> dict:
        orphans = self.state.orphans(self.fetched_all)
        if not self.check_mode:
            for uuid in orphans:
                try:
                    os.unlink(os.path.join(self.dest, relpath(uuid)))
                except FileNotFoundError:
                    pass
        self.state.remove(orphans)
        result = self.state.summary()
        result["removed_files"] = len(orphans)
        return result


def delta_pass(source: str, dest: str, state_file: str, wanted=None, previous: str | None = None,
               link_mode: str = "auto", workers: int = 4, check_mode: bool = False,
               missing_out: list | None = None, index: str | None = None) -> dict:
    """The whole delta pass at once (``Delta``'s fetch, then tidy), for a capture during which
    Orthanc runs on. ``wanted``: {uuid: size} or (uuid, size) pairs (a dump's list), or ``index``:
    the captured index.
    Every uuid that the source lacks is appended to ``missing_out`` when given."""
    with Delta(source, dest, state_file, wanted=wanted, index=index, previous=previous, link_mode=link_mode,
               workers=workers, check_mode=check_mode) as delta:
        result = delta.fetch(missing_out)
        result.update(delta.tidy())
    return result

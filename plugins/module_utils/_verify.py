# -*- coding: utf-8 -*-
# Copyright: pacs.orthanc contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Offline verification of a backup folder against the index it holds.

Orthanc's index records the size and the MD5 of every stored file (``AttachedFiles``), so a
backup can be checked file by file without any Orthanc running."""

from __future__ import annotations

import concurrent.futures
import os

from ansible_collections.pacs.orthanc.plugins.module_utils import _layout, _record, _sqlite, _storage
from ansible_collections.pacs.orthanc.plugins.module_utils._db import dump as db_dump, listing as db_listing
from ansible_collections.pacs.orthanc.plugins.module_utils._common import PacsError, md5_file, safe_relative, sha256_file

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


def check_manifest_files(backup: str, manifest: dict, report: Report) -> None:
    for rel, digest in sorted(manifest.get("files", {}).items()):
        if not safe_relative(rel):
            report.add("paths outside the backup named by the manifest", repr(rel))
            continue
        path = os.path.join(backup, rel)
        if not os.path.isfile(path):
            report.add("missing files outside storage", rel)
        elif sha256_file(path) != digest:
            report.add("files outside storage with a wrong SHA-256", rel)


HASH_WINDOW = 2048  # files handed to the hashing threads at once: memory stays flat however many


class _Hasher:
    """Hashes files in windows of HASH_WINDOW on ``workers`` threads and reports wrong MD5s."""

    def __init__(self, report: Report, workers: int, progress=None):
        self.report = report
        self.progress = progress
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=workers) if workers > 1 else None
        self.window: list = []

    def add(self, uuid: str, path: str, md5: str, size: int) -> None:
        self.window.append((uuid, path, md5, size))
        if len(self.window) >= HASH_WINDOW:
            self.flush()

    def flush(self) -> None:
        window, self.window = self.window, []
        if self.pool is None:  # a pool of one thread only adds its own cost
            digests = (md5_file(item[1]) for item in window)
        else:
            digests = self.pool.map(lambda item: md5_file(item[1]), window)
        for (uuid, _path, expected, size), actual in zip(window, digests):
            self.report.stats["files_hashed"] += 1
            self.report.stats["bytes_hashed"] += size
            if self.progress is not None:
                self.progress.add(1, size)
            if actual != expected:
                self.report.add("storage files with a wrong MD5", uuid)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)


def check_storage(backup: str, index_file: str | None, report: Report, hash_filter=None,
                  workers: int = 2, orphans: bool = True, listed: dict | None = None,
                  known_missing=frozenset(), progress=None) -> None:
    """Every attachment the index lists is in storage/ with its size, and, for the uuids that
    ``hash_filter(uuid)`` accepts (all when None), its MD5. ``listed`` ({uuid: (size, md5)})
    replaces the index file (a database dump's listing); ``known_missing`` are files that the
    manifest records as deleted while the dump ran.

    The index's attachments are read one at a time and hashed in bounded windows, and orphans
    (files the index does not list) are found by counting: when the storage holds as many files
    as the index lists and finds present, and the index lists no uuid twice, there is none; only
    otherwise are they looked up, in a set that SQLite keeps on disk. Memory does not grow with
    the number of files (benchmarks/memory.py). ``progress`` (a _progress.Progress) counts the
    files hashed; its totals are the index's when every file is hashed, else what the caller set."""
    storage = os.path.join(backup, _layout.STORAGE)
    if listed is None:
        rows = _sqlite.iter_attachments(index_file)
    else:
        rows = ((uuid, size, md5) for uuid, (size, md5) in listed.items())
    present = 0  # listed files found in storage/, whatever their size
    hasher = _Hasher(report, workers, progress)
    if progress is not None and hash_filter is None and progress.files_total is None:
        progress.totals(*(_sqlite.attachment_totals(index_file) if listed is None else
                          (len(listed), sum(size for size, _md5 in listed.values()))))
    try:
        for uuid, size, md5 in rows:
            path = os.path.join(storage, _storage.relpath(uuid))
            try:
                actual = os.stat(path).st_size
            except FileNotFoundError:
                if uuid in known_missing:
                    report.stats["known_missing"] = report.stats.get("known_missing", 0) + 1
                    continue
                report.add("missing storage files", uuid)
                continue
            present += 1
            report.stats["files_checked"] += 1
            report.stats["bytes_checked"] += actual
            if actual != size:
                report.add("storage files with a wrong size", f"{uuid} ({actual} bytes, index says {size})")
                continue
            if (hash_filter is None or hash_filter(uuid)) and md5:  # the filter sees every file in place
                hasher.add(uuid, path, md5, size)
        hasher.flush()
    finally:
        hasher.close()
    if orphans and os.path.isdir(storage):
        stored = sum(1 for _entry in _storage.walk_storage(storage))
        distinct = True if listed is not None else _sqlite.uuids_are_distinct(index_file)
        if stored != present or not distinct:
            members = listed if listed is not None else _sqlite.UuidSet(index_file)
            try:
                for uuid, _entry in _storage.walk_storage(storage):
                    if uuid not in members:
                        report.stats["orphans"] += 1
                        if len(report.orphan_examples) < MAX_EXAMPLES:
                            report.orphan_examples.append(uuid)
            finally:
                if listed is None:
                    members.close()


def _hash_none(_uuid: str) -> bool:
    return False


def _read_manifest(backup: str, report: Report):
    try:
        manifest = _layout.read_manifest(backup)
    except FileNotFoundError:
        return None
    except _layout.ManifestError as exc:
        report.add("unreadable manifest", str(exc.__cause__ or exc))
        return None
    check_manifest_files(backup, manifest, report)
    return manifest


def _compare_counts(manifest, counts: dict, report: Report) -> None:
    if manifest:
        for key, value in counts.items():
            recorded = manifest.get("counts", {}).get(key)
            if recorded is not None and recorded != value:
                report.add("counts that differ from the manifest", f"{key}: manifest {recorded}, index {value}")


def verify_database_backup(backup: str, found: tuple, manifest, report: Report, md5: str = "all",
                           workers: int = 2, hash_filter=None, known_missing=frozenset(), progress=None) -> dict:
    """A backup whose index is a database dump: the dump reads back and lists what the backup
    holds, whether the files are in the dump (large objects, LONGBLOBs) or in storage/."""
    engine, fmt, path = found
    # the database container that made the dump reads it, when it runs here (versions match); an
    # incomplete backup being checked before it is called complete has its dump's record instead
    dump_record = (manifest or {}).get("dump")
    if not dump_record:
        try:
            dump_record = _record.read_records(backup).get("dump")
        except (OSError, ValueError):
            dump_record = None
    container = (dump_record or {}).get("container")
    try:
        db_dump.check_dump(engine, path, fmt, container=container)
        listing = db_listing.read_dump(engine, path, with_contents=True, container=container)
    except PacsError as exc:
        report.add("unreadable database dump", exc.cause)
        return report.as_dict()
    in_database = bool(listing["stored"]) or bool((manifest or {}).get("storage_in_database"))
    if in_database:
        for uuid, (size, expected_md5) in listing["attachments"].items():
            stored = listing["stored"].get(uuid)
            if stored is None or stored[0] is None:
                report.add("files missing from the database dump", uuid)
                continue
            report.stats["files_checked"] += 1
            report.stats["bytes_checked"] += stored[0]
            if stored[0] != size:
                report.add("files in the dump with a wrong size", f"{uuid} ({stored[0]} bytes, index says {size})")
            elif expected_md5 and md5 != "none":
                report.stats["files_hashed"] += 1
                report.stats["bytes_hashed"] += size
                if stored[1] != expected_md5:
                    report.add("files in the dump with a wrong MD5", uuid)
    else:
        chosen = _hash_none if md5 == "none" else (None if md5 == "all" else hash_filter)
        known = set((manifest or {}).get("storage", {}).get("deleted_during_capture") or []) | set(known_missing)
        check_storage(backup, None, report, chosen, workers, listed=listing["attachments"], known_missing=known,
                      progress=progress)
    _compare_counts(manifest, listing["counts"], report)
    result = report.as_dict()
    result.update({"counts": listing["counts"], "schema_version": listing["schema_version"],
                   "schema_patch_level": listing.get("patch_level"),
                   "dump": {"engine": engine, "format": fmt, "path": path}, "storage_in_database": in_database})
    return result


def verify_backup(backup: str, md5: str = "all", workers: int = 2, hash_filter=None,
                  known_missing=frozenset(), progress=None) -> dict:
    """Check a complete or incomplete backup folder. ``md5``: all, new (via hash_filter) or none.
    ``known_missing``: storage files recorded as deleted in Orthanc while its database was dumped."""
    report = Report()
    manifest = _read_manifest(backup, report)
    found = db_dump.find_dump(backup)
    if found:
        return verify_database_backup(backup, found, manifest, report, md5, workers, hash_filter, known_missing,
                                      progress)
    index_file = os.path.join(backup, _layout.INDEX, "index")
    if not os.path.isfile(index_file):
        report.add("missing index", "index/index")
        return report.as_dict()
    # The integrity check (SQLite, which releases the GIL) runs beside the storage check, whose
    # hashing is the other long part: on a large index the two take about as long.
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as side:
        integrity_future = side.submit(_sqlite.check_integrity, index_file, "full")
        if md5 == "none":
            chosen = _hash_none
        elif md5 == "all":
            chosen = None
        else:
            chosen = hash_filter
        storage_report = Report()
        storage_error = None
        try:
            check_storage(backup, index_file, storage_report, chosen, workers, progress=progress)
        except PacsError as exc:
            storage_error = exc
        integrity = integrity_future.result()
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
    summary = _sqlite.read_summary(index_file)
    _compare_counts(manifest, summary["counts"], report)
    result = report.as_dict()
    result.update({"counts": summary["counts"], "schema_version": summary["schema_version"],
                   "schema_patch_level": summary.get("patch_level")})
    return result

# -*- coding: utf-8 -*-
# Copyright: pacs.orthanc contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The life of one backup folder under a backup root.

``<root>/<UTC timestamp>.incomplete/`` is written first; only a backup that is complete and
checked is renamed to ``<root>/<UTC timestamp>/`` and pointed at by ``<root>/latest``. A lock file
keeps two backups of one root apart; a folder left ``.incomplete`` by an interrupted run is
removed by the next run that holds the lock. Retention never deletes the newest complete backup."""

from __future__ import annotations

import concurrent.futures
import os
import shutil
import time

from ansible_collections.pacs.orthanc.plugins.module_utils import _container, _layout, _lock, _record, _sqlite, _storage, _verify
from ansible_collections.pacs.orthanc.plugins.module_utils._common import (
    PacsError, Ticker, copy_tree_as_is, iso, os_error_cause, owner_of, sha256_file, utc_now)

__metaclass__ = type

# the layout's names live in _layout; these stay for the modules that import them from here
FORMAT = _layout.FORMAT
FORMAT_VERSION = _layout.FORMAT_VERSION
NAME_RE = _layout.NAME_RE
INCOMPLETE = _layout.INCOMPLETE
LOCK = ".lock"
WORK = _layout.WORK
STATE_FILE = _layout.STATE_FILE


HEARTBEAT_SECONDS = 60


class Heartbeat:
    """While a step of a backup runs (a hot pass, a dump, a verification), it is registered with
    the run's lock keeper (should this process die without finishing, the keeper takes the run for
    gone and ends, so the next run takes the lock over at once), and the lock is touched every
    HEARTBEAT_SECONDS (a lock from another host is taken over once nobody touched it for
    stale_lock_seconds). ``path`` is anything inside ``<root>/<name>.incomplete``; outside a backup
    folder this does nothing."""

    def __init__(self, path: str, interval: float = HEARTBEAT_SECONDS):
        self.lock_path = None
        self.name = None
        self.interval = interval
        self._ticker = Ticker(self.beat)
        self._step = None
        current = os.path.abspath(path or "/")
        while current != os.path.dirname(current):
            base = os.path.basename(current)
            if base.endswith(INCOMPLETE):
                lock = os.path.join(os.path.dirname(current), LOCK)
                if _read_lock(lock).get("name") == base[:-len(INCOMPLETE)]:
                    self.lock_path = lock
                    self.name = base[:-len(INCOMPLETE)]
                break
            current = os.path.dirname(current)

    def beat(self) -> None:
        try:
            os.utime(self.lock_path)
        except OSError:
            pass

    def __enter__(self):
        if self.lock_path:
            self._step = _lock.register_step(self.lock_path, self.name)
            self.beat()
            self._ticker.start(self.interval)
        return self

    def __exit__(self, *exc):
        if self._ticker.stop():
            self.beat()
            _lock.unregister_step(self._step)
        return False


complete_backups = _layout.complete_backups


def latest_backup(root: str):
    names = complete_backups(root)
    return os.path.join(root, names[-1]) if names else None


def _read_lock(path: str):
    return _lock.read_record(path)


def _free_bytes(path: str) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def previous_work(previous: str | None) -> dict | None:
    """What the previous backup's manifest says of its work: its long steps' times (``steps``)
    and its storage's bytes and files; the role estimates this run's steps from it (whether a
    step is short enough to run without its progress loop). None without a readable manifest."""
    if not previous:
        return None
    try:
        manifest = _layout.read_manifest(previous)
    except (OSError, ValueError):
        return None
    storage = manifest.get("storage") if isinstance(manifest.get("storage"), dict) else {}
    return {"steps": manifest.get("steps") or {}, "storage_bytes": storage.get("bytes"),
            "storage_files": storage.get("files")}


def open_backup(root: str, config_path: str, index_dir: str, storage_dir: str,
                expected_storage_bytes: int = 0, min_free_bytes: int = 0,
                stale_lock_seconds: int = 900, space_check: bool = True,
                check_mode: bool = False, expected_dump_bytes: int = 0, orthanc: dict | None = None,
                dump_format: str = "custom", pre_upgrade_keep_days: int | None = None) -> dict:
    """Take the lock, clean up leftovers, check room, create the incomplete folder, copy the
    configuration, write the records ``orthanc`` (what ``orthanc_info`` found, when given),
    ``open``, and ``pre_upgrade`` when ``pre_upgrade_keep_days`` is given (a backup before an
    upgrade). Returns the names and paths the later steps use."""
    step = "prepare backup folder"
    if pre_upgrade_keep_days is not None and pre_upgrade_keep_days < 1:
        raise PacsError(step, f"pre_upgrade_keep_days must be at least 1, not {pre_upgrade_keep_days}")
    now = utc_now()
    name = now.strftime("%Y%m%dT%H%M%SZ")
    path = os.path.join(root, name + INCOMPLETE)
    result = {"name": name, "root": root, "started_at": iso(now), "removed_incomplete": [], "path": path,
              "lock_taken_over": None,
              "previous": None, "previous_storage": None, "state_file": _layout.state_file(path),
              "storage_path": os.path.join(path, _layout.STORAGE), "index_path": os.path.join(path, _layout.INDEX),
              "dump_path": None}
    backend = (orthanc or {}).get("backend")
    if backend in ("postgresql", "mysql"):
        result["dump_path"] = os.path.join(path, _layout.DATABASE, _layout.dump_name(backend, dump_format))
    if not os.path.isdir(root):
        if check_mode:
            result["changed"] = True
            return result
        try:
            os.makedirs(root, mode=0o700)
        except OSError as exc:
            raise PacsError(step, f"cannot create the backup root: {os_error_cause(exc)}")
    if not os.access(root, os.W_OK | os.X_OK):
        raise PacsError(step, f"the backup root {root} is not writable")

    lock_path = os.path.join(root, LOCK)
    # a live holder is refused before anything else is looked at; a dead one is taken over below
    verdict = _lock.judge(lock_path, stale_lock_seconds)
    if verdict is not None:
        verdict.close()
        if verdict.alive:
            raise PacsError(step, _lock.refusal(lock_path, verdict, stale_lock_seconds))
        result["lock_taken_over"] = verdict.taken_over()
    previous = latest_backup(root)
    index_bytes = 0
    if index_dir and os.path.isdir(index_dir):
        index_bytes = sum(os.path.getsize(os.path.join(index_dir, f)) for f in _sqlite.index_files(index_dir))
    needed = index_bytes + expected_dump_bytes + min_free_bytes
    if storage_dir and not _storage.same_filesystem(storage_dir, root):
        already = 0
        if previous:
            try:
                already = int(_layout.read_manifest(previous).get("storage", {}).get("bytes", 0))
            except (OSError, ValueError, TypeError, AttributeError):
                already = 0
        needed += max(0, expected_storage_bytes - already)
    free = _free_bytes(root)
    result["previous_work"] = previous_work(previous)
    result.update({"previous": previous, "free_bytes": free, "needed_bytes": needed,
                   "previous_storage": os.path.join(previous, _layout.STORAGE) if previous else None})
    if space_check and free < needed:
        raise PacsError(step, f"not enough free space in {root}: about {needed} bytes are needed "
                        f"(index {index_bytes}, database dump about {expected_dump_bytes}, new storage files, margin "
                        f"{min_free_bytes}), {free} are free")
    if check_mode:
        result["changed"] = True
        return result
    try:
        taken = _lock.acquire(lock_path, name, iso(now), stale_lock_seconds, step)
    except OSError as exc:
        raise PacsError(step, os_error_cause(exc))
    result["lock_taken_over"] = taken
    try:
        for leftover in sorted(os.listdir(root)):
            if leftover.endswith(INCOMPLETE) and leftover != name + INCOMPLETE:
                _layout.remove_tree(os.path.join(root, leftover))
                result["removed_incomplete"].append(leftover)
        if os.path.exists(path) or os.path.exists(os.path.join(root, name)):
            raise PacsError(step, f"a backup named {name} exists already; try again in a second")
        os.makedirs(os.path.join(path, WORK), mode=0o700)
        os.chmod(path, 0o700)
        if taken:
            _record.write_record(path, "lock", taken)
        container = (orthanc or {}).get("container")
        if container:
            result["config_files"] = _save_container_configuration(container, os.path.join(path, _layout.CONFIG))
        else:
            result["config_files"] = copy_tree_as_is(config_path, os.path.join(path, _layout.CONFIG))
        if orthanc:
            _record.write_record(path, "orthanc", _record.orthanc_record(orthanc))
        _record.write_record(path, "open", {"started_at": result["started_at"], "previous": previous})
        if pre_upgrade_keep_days is not None:
            result["pre_upgrade"] = _record.pre_upgrade_record(orthanc or {}, now, pre_upgrade_keep_days)
            _record.write_record(path, "pre_upgrade", result["pre_upgrade"])
    except (OSError, PacsError) as exc:
        # nothing of this run may stay behind: its folder goes, its lock is released
        shutil.rmtree(path, ignore_errors=True)
        _release_lock(root, name)
        if isinstance(exc, PacsError):
            raise
        raise PacsError(step, os_error_cause(exc))
    result["changed"] = True
    return result


def _save_container_configuration(record: dict, dest: str) -> list:
    """The configuration of the Orthanc in the container that orthanc_info described (``record``),
    as it runs now, into the backup's config/ (see _container.save_configuration)."""
    step = "copy the configuration of Orthanc's container"
    engine = _container.Engine(record["engine"])
    found = engine.inspect(record["id"], step)
    if found is None:
        raise PacsError(step, f"{engine.name} container {record.get('name') or record['id']} is gone")
    process = found.process() if found.running else None
    _container.save_configuration(found, record.get("effective_config_files") or [], dest,
                                  process["environ"] if process else None)
    return sorted(os.path.relpath(os.path.join(d, f), dest) for d, _s, fs in os.walk(dest) for f in fs)


def _release_lock(root: str, name: str) -> None:
    """Release this run's lock (never another run's): its keeper ends."""
    _lock.release(os.path.join(root, LOCK), name)


def discard_backup(root: str, name: str, check_mode: bool = False) -> dict:
    """Remove an incomplete backup (never a complete one) and release its lock."""
    path = os.path.join(root, name + INCOMPLETE)
    existed = os.path.isdir(path)
    if not check_mode:
        try:
            if existed:
                _layout.remove_tree(path)
        finally:
            # released even when the folder could not be removed (it stays '.incomplete', never
            # complete, and the next run removes it): else the run's keeper would hold the lock
            # until it idles out, refusing every run meanwhile
            if os.path.isdir(root):
                _release_lock(root, name)
    return {"changed": existed, "removed": path if existed else None}


def retention(root: str, keep: int, protect: str, check_mode: bool = False) -> list:
    """Delete the complete backups beyond the ``keep`` newest, never ``protect`` nor a
    pre-upgrade backup before its ``keep_until`` (those do not count among the ``keep``)."""
    names = [n for n in complete_backups(root) if not _layout.held_for_upgrade(os.path.join(root, n))]
    keep = max(1, keep)
    doomed = [n for n in names[:-keep] if n != protect]
    if not check_mode:
        for name in doomed:
            _layout.remove_backup(root, name)  # renamed first: a half-deleted backup never looks complete
    return doomed


def _container_record(container):
    """What the manifest keeps of the container (None for an Orthanc on the host): enough to find
    it again and to rebuild it (its image and digest, compose project, volumes)."""
    if not container:
        return None
    keep = ("engine", "id", "name", "image", "image_id", "image_digest", "compose_project", "compose_service",
            "compose_files", "compose_working_dir", "effective_config", "effective_config_files", "volumes",
            "orthanc_argv")
    return {key: container.get(key) for key in keep}


def _dump_record(dump, path: str):
    """What the manifest keeps of db_dump's result: the dump relative to the backup, its size,
    SHA-256, format, the engine's and tool's versions and the database container whose tool made
    it (never the connection's password)."""
    if not dump:
        return None
    keep = ("engine", "format", "bytes", "sha256", "server_version", "tool", "tool_version", "dump_seconds",
            "container", "compression")
    record = {k: dump.get(k) for k in keep}
    record["path"] = os.path.relpath(dump["path"], path) if dump.get("path") else None
    connection = dump.get("connection") or {}
    kept = ("host", "port", "database", "username", "unix_socket", "container")
    record["database"] = {k: connection.get(k) for k in kept}
    return record


def _digests(path: str) -> dict:
    """{relative path: SHA-256} of the files of a backup folder outside storage/ and .work/ (the
    manifest's ``files``), the manifest itself left out."""
    files = {}
    for directory, subdirs, filenames in os.walk(path):
        rel_dir = os.path.relpath(directory, path)
        if rel_dir == os.curdir:
            subdirs[:] = [d for d in subdirs if d not in (_layout.STORAGE, WORK)]  # storage/ is not walked
        if rel_dir.split(os.sep)[0] in (_layout.STORAGE, WORK):
            continue
        for filename in filenames:
            rel = os.path.normpath(os.path.join(rel_dir, filename))
            if rel != _layout.MANIFEST:
                files[rel] = sha256_file(os.path.join(directory, filename))
    return files


def close_backup(root: str, name: str, host: str, facts: dict | None, keep: int, md5: str = "new",
                 workers: int = 2, check_mode: bool = False, index_check: str = "full") -> dict:
    """Check the incomplete backup, write its manifest (from the records its steps wrote, see
    _record; ``facts`` only fills what no record says), rename it complete, point ``latest`` at
    it, apply retention and release the lock. Fails, leaving it incomplete, when a check fails."""
    step = "check and complete backup"
    path = os.path.join(root, name + INCOMPLETE)
    if not os.path.isdir(path):
        raise PacsError(step, f"there is no incomplete backup {path}")
    try:
        records = _record.read_records(path)
    except (OSError, ValueError) as exc:
        raise PacsError(step, f"cannot read the records of {path}: {exc}")
    facts = dict(facts or {}, **_record.facts_from(records))
    deleted_during_capture = _record.deleted_during_capture(records)
    lost_in_live_storage = _record.lost_in_live_storage(records)
    lock_taken_over = records.get("lock") or None
    checked_from = time.monotonic()
    state_path = _layout.state_file(path)
    # the SHA-256 of the files outside storage/ (the index is most of their bytes: 959 MiB at
    # 1,000,000 instances) in a thread beside the check (which reads them, never writes them),
    # started once the check's hashing processes are forked
    with _storage.State(state_path, readonly=True) as state, Heartbeat(path), \
            concurrent.futures.ThreadPoolExecutor(max_workers=1) as hashing:
        digests: list = []

        def start_digests() -> None:
            if not digests:
                digests.append(hashing.submit(_digests, path))

        storage_totals = state.summary()
        # what changed: the index is compared with the state in SQL and only the files placed new
        # are read on disk (storage_check: changed); md5=all, a dump or a backup without a state
        # database check every file, hashing those the state says are new (hash_filter)
        report = _verify.verify_backup(path, md5=md5, workers=workers, hash_filter=state.is_new,
                                       known_missing=set(deleted_during_capture),
                                       state=state if _storage.is_state_database(state_path) else None,
                                       started=start_digests, index_check=index_check)
        start_digests()  # a dump's check, or one that ended early, did not start it
        try:
            files = digests[0].result()
        except OSError as exc:
            raise PacsError(step, f"cannot read the files of {path}: {os_error_cause(exc)}")
    if not report["ok"]:
        raise PacsError(step, f"the backup in {path} failed its check: "
                        f"{_verify.describe_problems(report['problems'])}", verification=report)

    ended = utc_now()
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "name": name,
        "host": host,
        "orthanc": {"version": facts.get("orthanc_version"), "name": facts.get("orthanc_name"),
                    "database_version": report.get("schema_version")},
        "database_schema_version": report.get("schema_version"),
        "backend": facts.get("backend", "sqlite"),
        "strategy": facts.get("strategy", "stop"),
        "capture": facts.get("capture"),
        # how the SQLite index files were taken: reflink (FICLONE) or copy; None for a dump
        "index_capture": facts.get("index_capture"),
        # strategy stop: how the storage delta ran inside the window, by Orthanc's change log
        # (mode changes) or comparing every attachment (full, and why); files placed after the start
        "window_pass": facts.get("window_pass"),
        "storage_compression": facts.get("storage_compression"),
        "source": {"config_path": facts.get("config_path"), "storage_directory": facts.get("storage_directory"),
                   "index_directory": facts.get("index_directory"), "config_is_folder": facts.get("config_is_folder"),
                   "storage_owner": facts.get("storage_owner")},
        "container": _container_record(facts.get("container")),
        "config_files": {rel[len("config/"):]: owner_of(os.path.join(path, rel))
                         for rel in sorted(files) if rel.startswith("config/")},
        "started_at": facts.get("started_at"),
        "stopped_at": facts.get("stopped_at"),
        "restarted_at": facts.get("restarted_at"),
        "ended_at": iso(ended),
        "downtime_seconds": facts.get("downtime_seconds"),
        "downtime_phases": facts.get("downtime_phases"),
        "storage_in_database": bool(report.get("storage_in_database", False)),
        "dump": _dump_record(facts.get("dump"), path),
        "lock_taken_over": lock_taken_over,
        "counts": report["counts"],
        "storage": {"files": storage_totals["files"], "bytes": storage_totals["bytes"],
                    "new_files": storage_totals["new_files"], "new_bytes": storage_totals["new_bytes"],
                    "linked_files": storage_totals["linked_files"], "linked_bytes": storage_totals["linked_bytes"],
                    "copied_files": storage_totals["copied_files"], "copied_bytes": storage_totals["copied_bytes"],
                    "previous": facts.get("previous"),
                    "deleted_during_capture": deleted_during_capture,
                    "lost_in_live_storage": lost_in_live_storage},
        "steps": dict(_record.step_times(records), check={
            "seconds": round(time.monotonic() - checked_from, 3), "files": report["files_checked"]}),
        # storage_check: changed (the index compared with the storage state in SQL, files_compared
        # rows; only the files placed new statted and hashed on disk, files_checked) or all (every
        # file the index lists statted, storage/'s folders listed for orphans)
        "verification": {"md5": md5, "storage_check": report.get("storage_check"),
                         "files_compared": report.get("files_compared"), "files_checked": report["files_checked"],
                         "files_hashed": report["files_hashed"], "orphans": report["orphans"],
                         # the index passed PRAGMA integrity_check: a later check whose SHA-256 of
                         # index/index matches need not run it again (_verify.index_checked_before)
                         "index_integrity": report.get("index_check"),
                         # a dump backup: the listing the delta pass recorded, or the dump read again
                         "dump_listing": report.get("dump_listing")},
        "files": files,
    }
    if records.get("pre_upgrade") is not None:
        manifest[_layout.PRE_UPGRADE] = dict(records["pre_upgrade"], index_schema_version=report.get("schema_version"),
                                             index_schema_patch_level=report.get("schema_patch_level"))
    final = os.path.join(root, name)
    result = {"changed": True, "path": final, "manifest": manifest, "verification": report}
    if check_mode:
        return result
    try:
        shutil.rmtree(os.path.join(path, WORK))
        _layout.write_json_atomic(os.path.join(path, _layout.MANIFEST), manifest)
        _layout.complete_folder(root, name)
    except OSError as exc:
        raise PacsError(step, os_error_cause(exc))
    # the backup is complete and checked from here on: a retention that fails does not undo it
    # (the rescue would discard nothing and say that no backup was completed); it is a warning,
    # and the lock is released either way
    try:
        result["deleted_by_retention"] = retention(root, keep, protect=name)
    except OSError as exc:
        result["deleted_by_retention"] = []
        result["warnings"] = [f"the backup {final} is complete, but retention could not remove an older "
                              f"backup of {root}: {os_error_cause(exc)}; the next run tries again"]
    finally:
        _release_lock(root, name)
    return result

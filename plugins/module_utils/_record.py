# -*- coding: utf-8 -*-
# Copyright: pacs.orthanc contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""What each step of one backup learnt, kept in the incomplete backup itself.

Every capture step writes its own record, ``<backup>.incomplete/.work/records/<step>.json``
(atomically: a crash leaves the old record or the new one), and ``backup_set state=complete``
reads them all to build the manifest. Nothing of a backup's record travels through the
playbook. The steps:

``lock``      the lock of a dead run that ``prepare`` took over (only when it took one over)
``orthanc``   what ``orthanc_info`` found (written by ``backup_set state=prepare``)
``open``      the backup's start time and previous backup
``hot``       the hot pass of the storage (``storage_copy phase=hot``)
``delta``     a delta pass run alone (``storage_copy phase=delta``): files deleted during a dump
``stopped``   the downtime (``stopped_capture``): times, phases, files gone from the live storage
``snapshot``  a snapshot capture (``snapshot_capture``), or why no snapshot could be taken
``dump``      the database dump (``db_dump``)
``pre_upgrade`` a backup taken before an upgrade: versions of Orthanc, its plugins and schema, and
              how long it is kept (``backup_set state=prepare pre_upgrade=true``)
"""

from __future__ import annotations

import datetime
import json
import os
import re

from ansible_collections.pacs.orthanc.plugins.module_utils import _layout

__metaclass__ = type

STEPS = ("lock", "orthanc", "open", "hot", "delta", "stopped", "snapshot", "dump", "pre_upgrade")
_STEP = re.compile(r"^[a-z_]+$")


def records_dir(backup: str) -> str:
    return os.path.join(backup, _layout.WORK, _layout.RECORDS)


def write_record(backup: str, step: str, data: dict) -> str:
    """Write (or replace) the record of ``step`` in the incomplete ``backup``."""
    if not _STEP.match(step):
        raise ValueError(f"not a step name: {step!r}")
    folder = records_dir(backup)
    os.makedirs(folder, mode=0o700, exist_ok=True)
    path = os.path.join(folder, step + ".json")
    _layout.write_json_atomic(path, data)
    return path


def record_beside(path: str, step: str, data: dict, check_mode: bool = False):
    """Write the record of ``step`` into the incomplete backup that holds ``path`` (a module's
    destination); nothing when ``path`` is not inside one (a module used on its own)."""
    backup = _layout.incomplete_of(path)
    if check_mode or backup is None or not os.path.isdir(backup):
        return None
    return write_record(backup, step, data)


def read_records(backup: str) -> dict:
    """{step: record} of every record in the incomplete ``backup``."""
    folder = records_dir(backup)
    records = {}
    try:
        names = sorted(os.listdir(folder))
    except FileNotFoundError:
        return records
    for name in names:
        if name.endswith(".json") and _STEP.match(name[:-5]):
            with open(os.path.join(folder, name), "r", encoding="utf-8") as handle:
                records[name[:-5]] = json.load(handle)
    return records


ORTHANC_KEYS = ("version", "name", "backend", "storage", "storage_compression", "config_path", "config_is_folder",
                "storage_owner", "storage_directory", "index_directory", "container")


def orthanc_record(info: dict) -> dict:
    """The part of ``orthanc_info``'s result that a backup records."""
    return {key: info.get(key) for key in ORTHANC_KEYS}


def pre_upgrade_record(info: dict, started_at, keep_days: int) -> dict:
    """What a pre-upgrade backup records of the Orthanc it was taken from (``orthanc_info``'s
    result): its version, every loaded plugin's version, the database schema version Orthanc
    reports (``/system`` DatabaseVersion: for PostgreSQL and MySQL, the plugin's schema), the
    index plugin and its version, and until when retention keeps the backup."""
    started = started_at if isinstance(started_at, datetime.datetime) else _layout.parse_time(started_at)
    plugins = info.get("plugin_versions")
    backend = info.get("backend")
    index_plugin = None
    if backend in ("postgresql", "mysql") and plugins:
        found = sorted(name for name in plugins if name.startswith(backend) and "index" in name)
        if found:
            index_plugin = {"id": found[0], "version": plugins[found[0]]}
    return {"orthanc_version": info.get("version"), "plugins": plugins,
            "database_version": info.get("database_version"), "backend": backend, "index_plugin": index_plugin,
            "keep_days": keep_days,
            "keep_until": (started + datetime.timedelta(days=keep_days)).strftime("%Y-%m-%dT%H:%M:%SZ")}


def facts_from(records: dict) -> dict:
    """The facts of the manifest (the keys of backup_set's ``facts`` option) from the records.
    Only what the records say: a key no record gives is absent."""
    facts = {}
    orthanc = records.get("orthanc")
    if orthanc is not None:
        facts.update({"orthanc_version": orthanc.get("version"), "orthanc_name": orthanc.get("name"),
                      "backend": orthanc.get("backend"), "storage_compression": orthanc.get("storage_compression"),
                      "config_path": orthanc.get("config_path"), "config_is_folder": orthanc.get("config_is_folder"),
                      "storage_owner": orthanc.get("storage_owner"),
                      "storage_directory": orthanc.get("storage_directory"),
                      "index_directory": orthanc.get("index_directory"),
                      "container": orthanc.get("container")})
    opened = records.get("open")
    if opened is not None:
        facts.update({"previous": opened.get("previous"), "started_at": opened.get("started_at")})
    stopped, snapshot, dump = records.get("stopped"), records.get("snapshot"), records.get("dump")
    if stopped is not None:
        facts.update({"strategy": "stop", "stopped_at": stopped.get("stopped_at"),
                      "restarted_at": stopped.get("restarted_at"),
                      "downtime_seconds": stopped.get("downtime_seconds"),
                      "downtime_phases": stopped.get("phases") or {}, "dump": None, "capture": None,
                      "index_capture": stopped.get("index_capture"), "window_pass": stopped.get("window_pass")})
        if snapshot is not None and snapshot.get("precondition_failed"):
            facts["capture"] = {
                "fallback_from": "snapshot", "snapshot_kind": snapshot.get("kind"),
                "warning": f"no {snapshot.get('kind')} snapshot: {snapshot.get('cause')}; Orthanc was stopped "
                           "instead (orthanc_backup_snapshot_fallback=stop)"}
    elif snapshot is not None and not snapshot.get("precondition_failed"):
        facts.update({"strategy": "snapshot", "stopped_at": None, "restarted_at": None,
                      "downtime_seconds": snapshot.get("downtime_seconds"), "downtime_phases": {},
                      "dump": None, "capture": snapshot.get("details") or {},
                      "index_capture": (snapshot.get("details") or {}).get("index_capture")})
    elif dump is not None:
        delta = records.get("delta") or {}
        in_database = (orthanc or {}).get("storage") not in (None, "filesystem")
        facts.update({"strategy": "dump", "stopped_at": None, "restarted_at": None,
                      "downtime_seconds": 0,  # Orthanc is never stopped by this strategy
                      "downtime_phases": {}, "dump": dump,
                      "capture": {"orthanc_stopped": False, "storage_in_database": in_database,
                                  "dump_seconds": dump.get("dump_seconds"),
                                  "deleted_during_capture": len(delta.get("deleted_during_capture") or [])}})
    return facts


def deleted_during_capture(records: dict) -> list:
    return sorted((records.get("delta") or {}).get("deleted_during_capture") or [])


def lost_in_live_storage(records: dict) -> list:
    """Files the index lists that were gone from the live storage while Orthanc was stopped."""
    return sorted((records.get("stopped") or {}).get("lost_in_live_storage") or [])


def step_times(records: dict) -> dict:
    """{step: {seconds, files, bytes}} of the long steps the records time (the manifest's
    ``steps``; the summary line names the longest, with its rate)."""
    steps = {}
    hot, dump = records.get("hot") or {}, records.get("dump") or {}
    if hot.get("seconds") is not None:
        steps["hot pass"] = {"seconds": hot["seconds"], "files": hot.get("files"), "bytes": hot.get("bytes")}
    if dump.get("dump_seconds") is not None:
        steps["dump"] = {"seconds": dump["dump_seconds"], "bytes": dump.get("bytes")}
    return steps


def last_time(previous_storage, step: str):
    """What ``step`` took in the backup whose storage folder is ``previous_storage``, from its
    manifest: {seconds, files, bytes}; a manifest without step times gives the whole backup's
    seconds (``whole_backup``). None without a readable manifest."""
    if not previous_storage:
        return None
    try:
        manifest = _layout.read_manifest(os.path.dirname(os.path.normpath(previous_storage)))
    except (OSError, ValueError):
        return None
    timed = (manifest.get("steps") or {}).get(step)
    if timed:
        return dict(timed, backup=manifest.get("name"))
    storage = manifest.get("storage") or {}
    try:
        started = datetime.datetime.strptime(manifest["started_at"], "%Y-%m-%dT%H:%M:%S.%fZ")
        ended = datetime.datetime.strptime(manifest["ended_at"], "%Y-%m-%dT%H:%M:%S.%fZ")
    except (KeyError, TypeError, ValueError):
        return None
    return {"seconds": round((ended - started).total_seconds(), 3), "files": storage.get("files"),
            "bytes": storage.get("bytes"), "backup": manifest.get("name"), "whole_backup": True}

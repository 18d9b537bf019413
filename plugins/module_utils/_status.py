# -*- coding: utf-8 -*-
# Copyright: pacs.orthanc contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""A host's backup status for monitoring: a small JSON file and, optionally, a node-exporter
textfile metric. Both are rewritten whole and atomically (temporary file, fsync, rename), so a
reader never sees half a file. The last success is kept across failures."""

from __future__ import annotations

import datetime
import json
import os

from ansible_collections.pacs.orthanc.plugins.module_utils import _layout
from ansible_collections.pacs.orthanc.plugins.module_utils._common import (
    PacsError, iso, os_error_cause, utc_now, write_json_atomic, write_text_atomic)

__metaclass__ = type

FORMAT = "pacs.orthanc.status"
PROM_PREFIX = "pacs_orthanc_backup_"


def _parse_iso(text):
    if not text:
        return None
    try:
        return datetime.datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=datetime.timezone.utc)
    except ValueError:
        return None


def _epoch(text):
    moment = _parse_iso(text)
    return round(moment.timestamp(), 3) if moment else None


def read_status(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def backup_facts(backup_path: str) -> dict:
    """What the status records of a complete backup, read from its manifest."""
    try:
        manifest = _layout.read_manifest(backup_path)
    except (OSError, ValueError) as exc:
        raise PacsError("write the backup status", f"cannot read the manifest of {backup_path}: {exc}")
    storage = manifest.get("storage", {})
    try:
        index_bytes = os.path.getsize(os.path.join(backup_path, _layout.INDEX, "index"))
    except OSError:
        index_bytes = 0
    started, ended = _parse_iso(manifest.get("started_at")), _parse_iso(manifest.get("ended_at"))
    return {"time": manifest.get("ended_at"), "name": manifest.get("name"), "path": backup_path,
            "size_bytes": int(storage.get("bytes", 0) or 0) + index_bytes,
            "new_bytes": int(storage.get("new_bytes", 0) or 0),
            "duration_seconds": round((ended - started).total_seconds(), 3) if started and ended else None,
            "downtime_seconds": manifest.get("downtime_seconds"), "strategy": manifest.get("strategy"),
            "instances": manifest.get("counts", {}).get("instances")}


def update(status: dict, host: str, event: str, result: str, backup_path=None, started_at=None,
           step=None, cause=None, ship=None, now=None, offsite=None) -> dict:
    """The new status after a backup (``event`` backup), a transfer to the backup server (``event``
    ship) or off site (``event`` offsite: ``offsite`` says what, its ``snapshot_time`` the time of
    the snapshot that holds the backup, kept as ``newest_offsite_snapshot``)."""
    now = now or utc_now()
    status = dict(status)
    status.pop("progress", None)  # the step that reported it has ended
    status.update({"format": FORMAT, "format_version": 1, "host": host})
    if event == "backup":
        run = {"time": iso(now), "result": result}
        if result == "ok":
            facts = backup_facts(backup_path)
            run.update(facts)
            status["last_success"] = facts
            status["consecutive_failures"] = 0
        else:
            started = _parse_iso(started_at)
            run.update({"step": step, "cause": cause,
                        "duration_seconds": round((now - started).total_seconds(), 3) if started else None})
            status["last_failure"] = run
            status["consecutive_failures"] = int(status.get("consecutive_failures", 0)) + 1
        status["last_run"] = run
        status["result"] = result
    elif event == "offsite":
        record = {"time": iso(now), "result": result}
        record.update(offsite or {})
        if result != "ok":
            record.update({"step": step, "cause": cause})
        else:
            status["last_offsite_success"] = record
            known = (status.get("newest_offsite_snapshot") or {}).get("time") or ""
            if record.get("snapshot_time") and record["snapshot_time"] >= known:
                status["newest_offsite_snapshot"] = {"id": record.get("snapshot_id"), "time": record["snapshot_time"],
                                                     "backup": record.get("backup")}
        status["last_offsite"] = record
    else:
        record = {"time": iso(now), "result": result}
        record.update(ship or {})
        if result != "ok":
            record.update({"step": step, "cause": cause})
        else:
            status["last_ship_success"] = record
        status["last_ship"] = record
    return status


def prom_text(status: dict) -> str:
    """The status as node-exporter textfile metrics (gauges; absent values are left out)."""
    host = str(status.get("host", "")).replace("\\", "\\\\").replace('"', '\\"')
    last_run = status.get("last_run", {})
    success = status.get("last_success", {})
    ship = status.get("last_ship", {})
    ship_ok = status.get("last_ship_success", {})
    offsite = status.get("last_offsite", {})
    offsite_ok = status.get("last_offsite_success", {})
    metrics = [
        ("last_run_timestamp_seconds", "Time the last backup ended (success or failure)", _epoch(last_run.get("time"))),
        ("last_result", "1 when the last backup succeeded, 0 when it failed",
         (1 if status.get("result") == "ok" else 0) if status.get("result") else None),
        ("last_success_timestamp_seconds", "Time the last successful backup ended", _epoch(success.get("time"))),
        ("last_duration_seconds", "Duration of the last backup", last_run.get("duration_seconds")),
        ("last_size_bytes", "Size of the last successful backup (storage and index)", success.get("size_bytes")),
        ("last_new_bytes", "Storage bytes new in the last successful backup", success.get("new_bytes")),
        ("last_downtime_seconds", "Orthanc's downtime during the last successful backup", success.get("downtime_seconds")),
        ("consecutive_failures", "Backups failed since the last success", status.get("consecutive_failures")),
        ("last_ship_result", "1 when the last transfer to the backup server succeeded, 0 when it failed",
         (1 if ship.get("result") == "ok" else 0) if ship else None),
        ("last_ship_success_timestamp_seconds", "Time the last transfer to the backup server succeeded",
         _epoch(ship_ok.get("time"))),
        ("last_ship_bytes", "Bytes sent by the last successful transfer", ship_ok.get("bytes_sent")),
        ("last_offsite_result", "1 when the last off-site shipping succeeded, 0 when it failed",
         (1 if offsite.get("result") == "ok" else 0) if offsite else None),
        ("last_offsite_success_timestamp_seconds", "Time the last off-site shipping succeeded",
         _epoch(offsite_ok.get("time"))),
        ("offsite_newest_snapshot_timestamp_seconds",
         "Time of the newest off-site snapshot (its age: time() minus this)",
         _epoch((status.get("newest_offsite_snapshot") or {}).get("time"))),
    ]
    progress = status.get("progress") if isinstance(status.get("progress"), dict) else {}
    if progress.get("state") == "running":  # a step running now (see _progress)
        metrics += [
            ("progress_running", "1 while a long step of a backup, transfer or restore runs", 1),
            ("progress_ratio", "Share of the running step done (0 to 1)",
             None if progress.get("percent") is None else progress["percent"] / 100),
            ("progress_files_done", "Files the running step has done", progress.get("files_done")),
            ("progress_files_total", "Files the running step has in all (may be an estimate)", progress.get("files_total")),
            ("progress_bytes_done", "Bytes the running step has done", progress.get("bytes_done")),
            ("progress_bytes_total", "Bytes the running step has in all (may be an estimate)", progress.get("bytes_total")),
            ("progress_rate_bytes_per_second", "Mean rate of the running step", progress.get("rate_bytes_per_second")),
            ("progress_eta_seconds", "Estimated seconds left in the running step", progress.get("eta_seconds")),
        ]
    lines = []
    for name, text, value in metrics:
        if value is None:
            continue
        lines += [f"# HELP {PROM_PREFIX}{name} {text}.", f"# TYPE {PROM_PREFIX}{name} gauge",
                  f'{PROM_PREFIX}{name}{{host="{host}"}} {value}']
    return "\n".join(lines) + "\n"


def write(path: str, status: dict, textfile: str | None = None, check_mode: bool = False) -> dict:
    step = "write the backup status"
    if check_mode:
        return {"changed": True, "path": path, "status": status, "textfile": textfile}
    try:
        os.makedirs(os.path.dirname(path) or ".", mode=0o700, exist_ok=True)
        write_json_atomic(path, status, mode=0o644)
        if textfile:
            os.makedirs(os.path.dirname(textfile) or ".", mode=0o755, exist_ok=True)
            write_text_atomic(textfile, prom_text(status), 0o644)  # read by node-exporter
    except OSError as exc:
        raise PacsError(step, os_error_cause(exc))
    return {"changed": True, "path": path, "status": status, "textfile": textfile}


def set_progress(path: str, progress: dict, textfile: str | None = None) -> None:
    """Put the progress of the running step (a _progress record) into the status file, the rest
    unchanged, atomically (and into the textfile metrics when given). Raises OSError."""
    status = read_status(path)
    status["progress"] = progress
    status.setdefault("format", FORMAT)
    status.setdefault("format_version", 1)
    if progress.get("host"):
        status.setdefault("host", progress["host"])
    os.makedirs(os.path.dirname(path) or ".", mode=0o700, exist_ok=True)
    write_json_atomic(path, status, mode=0o644)
    if textfile:
        write_text_atomic(textfile, prom_text(status), 0o644)


def age_hours(text, now, digits: int | None = 2) -> float | None:
    """Hours from ``text`` (a time as ``iso`` writes it) to ``now``, rounded to ``digits`` (None:
    exact, for comparing with a threshold)."""
    moment = _parse_iso(text)
    if not moment:
        return None
    hours = (now - moment).total_seconds() / 3600
    return hours if digits is None else round(hours, digits)


def freshness(now, max_age_hours: float, backup_time=None, ship_time=None, offsite_time=None,
              expect_ship: bool = False, expect_offsite: bool = False) -> dict:
    """Whether a host's newest complete backup, shipped copy and off-site snapshot (each a time as
    ``iso`` writes it, or None when there is none) are younger than ``max_age_hours``. A copy that is
    not expected is not judged; one that is expected and missing is stale."""
    checks = [("backup", "newest complete backup", backup_time, True),
              ("ship", "shipped copy", ship_time, expect_ship),
              ("offsite", "off-site snapshot", offsite_time, expect_offsite)]
    ages, stale = {}, []
    for key, words, moment, expected in checks:
        if not expected:
            continue
        age = age_hours(moment, now)
        ages[key] = {"time": moment, "age_hours": age}
        if age is None:
            stale.append(f"no {words}")
        elif age_hours(moment, now, None) > max_age_hours:  # exact: a rounded age could hide a small excess
            stale.append(f"{words} {age:g} h old")
    return {"fresh": not stale, "stale": stale, "ages": ages}


def newest_backup_time(root: str):
    """When the newest complete backup in ``root`` ended (its manifest's ``ended_at``), or None."""
    for name in reversed(_layout.complete_backups(root)):
        try:
            ended = _layout.read_manifest(os.path.join(root, name)).get("ended_at")
        except (OSError, ValueError):
            continue
        if ended:
            return ended
    return None

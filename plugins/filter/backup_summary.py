# -*- coding: utf-8 -*-
# Copyright: pacs.orthanc contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Filters that turn the per-host results of the backup role into a summary."""

from __future__ import annotations

DOCUMENTATION = r"""
name: backup_result
short_description: One summary line and one record from a host's backup result
version_added: 0.1.0
description:
  - Takes a pair C([orthanc_backup_result or none, host]), or a triple that adds the host's
    C(orthanc_ship_result) (or none when no backup server is configured), and returns C(line), a
    sentence for a person, C(record), a flat dictionary for AWX's C(set_stats), and C(ok), whether
    the host was backed up (and shipped, when shipping was expected).
positional: _input
options:
  _input:
    description: The pair or triple.
    type: list
    required: true
"""

EXAMPLES = r"""
- name: Summarise
  ansible.builtin.debug:
    msg: "{{ [hostvars[h].orthanc_backup_result | default(none), h] | pacs.orthanc.backup_result }}"
"""

RETURN = r"""
_value:
  description: C(line), C(record) and C(ok).
  type: dict
"""
# backup_results(hosts, hostvars) does the same for a list of hosts (with their orthanc_ship_result
# when they have one), and backup_totals(results) sums them up; both are documented in the
# playbook that uses them (playbooks/backup.yml). orthanc_state_sentence(probe, host) words the
# result of pacs.orthanc.orthanc_probe for the roles' messages. The words about Orthanc's state
# come from module_utils/_probe.py, as the modules' do.

from ansible_collections.pacs.orthanc.plugins.module_utils import _probe


def human_bytes(value) -> str:
    size = float(value or 0)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size} B"


def _duration(seconds) -> str:
    seconds = max(0, int(round(float(seconds or 0))))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def longest_step(steps, ship=None):
    """(text, fields) of the longest timed step of a host's run: the manifest's ``steps``
    ({name: {seconds, files, bytes}}) and the transfer to the backup server, with its rate."""
    timed = {name: step for name, step in (steps or {}).items() if isinstance(step, dict) and step.get("seconds") is not None}
    if not timed:
        return "", {}  # a backup without step times (made before they were recorded)
    if isinstance(ship, dict) and ship.get("result") == "ok" and ship.get("seconds") is not None:
        timed["shipping"] = {"seconds": ship.get("seconds"), "bytes": ship.get("bytes_sent")}
    if not timed:
        return "", {}
    name, step = max(timed.items(), key=lambda kv: float(kv[1]["seconds"] or 0))
    seconds = float(step["seconds"] or 0)
    if step.get("bytes") is not None and seconds > 0:
        rate = int(step["bytes"] or 0) / seconds
        shown = f"{rate / 1e6:.1f} MB/s" if rate >= 1e5 else f"{rate / 1e3:.1f} kB/s"
        return (f"; longest step: {name} {_duration(seconds)} at {shown}",
                {"longest_step": name, "longest_step_seconds": seconds, "longest_step_bytes_per_second": round(rate, 1)})
    if step.get("files") is not None and seconds > 0:
        rate = int(step["files"] or 0) / seconds
        return (f"; longest step: {name} {_duration(seconds)} at {rate:.0f} files/s",
                {"longest_step": name, "longest_step_seconds": seconds, "longest_step_files_per_second": round(rate, 1)})
    return f"; longest step: {name} {_duration(seconds)}", {"longest_step": name, "longest_step_seconds": seconds}


def last_time_part(last) -> str:
    """What the previous backup's hot pass took (check mode)."""
    if not isinstance(last, dict) or last.get("seconds") is None:
        return ""
    what = "backup" if last.get("whole_backup") else "hot pass"
    return f"; the last {what} took {_duration(last['seconds'])} for {int(last.get('bytes') or 0) / 2 ** 30:.2f} GiB"


def ship_part(ship) -> tuple:
    """(text for the line, fields for the record, ok) of a host's transfer to the backup server."""
    if not ship:
        return "", {}, True
    state = ship.get("result")
    if state == "ok":
        sent = int(ship.get("bytes_sent") or 0)
        text = (f"; shipped to {ship.get('server')}:{ship.get('path')}, {human_bytes(sent)} sent "
                f"in {float(ship.get('seconds') or 0):.1f} s")
        if ship.get("already_on_server"):
            text = f"; already on {ship.get('server')}:{ship.get('path')}"
        return text, {"ship_result": "ok", "shipped_bytes": sent, "ship_server": ship.get("server"),
                      "ship_path": ship.get("path"), "ship_seconds": ship.get("seconds")}, True
    if state == "failed":
        return (f"; SHIPPING to {ship.get('server')} FAILED at '{ship.get('step')}': {ship.get('cause')}",
                {"ship_result": "failed", "shipped_bytes": 0, "ship_server": ship.get("server"),
                 "ship_step": ship.get("step"), "ship_cause": ship.get("cause")}, False)
    if state == "check mode":
        return f"; would ship to {ship.get('server')}", {"ship_result": "check mode"}, True
    return (f"; NOT SHIPPED to {ship.get('server')} (the run ended before the transfer)",
            {"ship_result": "not shipped", "shipped_bytes": 0, "ship_server": ship.get("server")}, False)


def backup_result(pair):
    result, host = pair[0], pair[1]
    ship = pair[2] if len(pair) > 2 else None
    if not result:
        return {"line": f"{host}: NOT BACKED UP (unreachable, or the run stopped before this host)",
                "record": {"host": host, "result": "not run", "ok": False}, "ok": False}
    if result.get("result") == "check mode":
        storage = result.get("storage") or {}  # null: no hot pass (files in a database)
        return {"line": f"{host}: check mode, would back up {storage.get('files', 0)} files "
                        f"({storage.get('new_files', 0)} new, {storage.get('linked_files', 0)} from the previous backup) "
                        f"and {storage.get('deferred_files', 0)} recent ones, {human_bytes(storage.get('new_bytes'))} "
                        f"to copy or link anew, into {result.get('path')}"
                        + (", and stop Orthanc briefly" if result.get("would_stop_orthanc") else "")
                        + last_time_part(storage.get("last_time")),
                "record": {"host": host, "result": "check mode", "path": result.get("path"), "ok": True},
                "ok": True}
    if result.get("result") != "ok":
        return {"line": f"{host}: FAILED at '{result.get('step')}': {result.get('cause')} ({_probe.phrase(result)})",
                "record": {"host": host, "result": "failed", "step": result.get("step"),
                           "cause": result.get("cause"), "orthanc_running": result.get("orthanc_running"),
                           "orthanc_state": result.get("orthanc_state"),
                           "orthanc_http_status": result.get("orthanc_http_status"), "ok": False},
                "ok": False}
    storage = result.get("storage") or {}  # null: no hot pass (files in a database)
    counts = result.get("counts") or {}
    downtime = result.get("downtime_seconds")
    strategy = result.get("strategy") or "stop"
    if downtime is None:
        stopped = "downtime not measured"
    elif strategy != "stop" and float(downtime) == 0:
        stopped = "Orthanc not stopped"
    else:
        stopped = f"downtime {float(downtime):.1f} s"
    dump = f", dump {human_bytes(result['dump_bytes'])}" if result.get("dump_bytes") not in (None, "") else ""
    lost = result.get("lost_in_live_storage") or []
    warning = (f" WARNING: {len(lost)} files the index lists are gone from the live storage "
               "(kept in this backup from the previous one)") if lost else ""
    line = (f"{host}: ok, {result.get('backend')}, {counts.get('instances', 0)} instances{dump}, "
            f"{human_bytes(storage.get('bytes'))} in {storage.get('files', 0)} files "
            f"({storage.get('new_files', 0)} new, {human_bytes(storage.get('new_bytes'))}; "
            f"{storage.get('linked_files', 0)} linked), {stopped} ({strategy}), {result.get('path')}{warning}")
    taken = result.get("lock_taken_over") if isinstance(result.get("lock_taken_over"), dict) else None
    if taken:
        line += (f"; took over the lock of the run {taken.get('name')} ({taken.get('host')}, started "
                 f"{taken.get('started')}): {taken.get('reason')}")
    record = {"host": host, "result": "ok", "backend": result.get("backend"), "path": result.get("path"),
              "instances": counts.get("instances", 0), "files": storage.get("files", 0),
              "bytes": storage.get("bytes", 0), "new_files": storage.get("new_files", 0),
              "new_bytes": storage.get("new_bytes", 0), "linked_files": storage.get("linked_files", 0),
              "downtime_seconds": downtime, "strategy": strategy, "dump_bytes": result.get("dump_bytes"),
              "lost_in_live_storage": len(lost), "lock_taken_over": taken}
    ship_text, ship_fields, ship_ok = ship_part(ship)
    step_text, step_fields = longest_step(result.get("steps"), ship)
    record.update(step_fields)
    ship_text += step_text
    record.update(ship_fields)
    record["ok"] = ship_ok
    return {"line": line + ship_text, "record": record, "ok": ship_ok}


def add_offsite(entry: dict, offsite) -> dict:
    """A host's summary entry with its off-site shipping (pacs.orthanc.offsite) added."""
    if not isinstance(offsite, dict):
        return entry
    if offsite.get("result") == "ok":
        text = (f"; off site: snapshot {str(offsite.get('snapshot_id') or '')[:8]}"
                + (" (already there)" if offsite.get("already_shipped") in (True, "True", "true") else
                   f", {human_bytes(offsite.get('data_added'))} added"))
        fields, ok = {"offsite_result": "ok", "offsite_snapshot": offsite.get("snapshot_id")}, True
    elif offsite.get("result") == "failed":
        text = f"; OFF-SITE SHIPPING FAILED at '{offsite.get('step')}': {offsite.get('cause')}"
        fields, ok = {"offsite_result": "failed", "offsite_step": offsite.get("step"),
                      "offsite_cause": offsite.get("cause")}, False
    else:
        text, fields, ok = f"; off site: {offsite.get('result')}", {"offsite_result": offsite.get("result")}, True
    record = dict(entry["record"], **fields)
    record["ok"] = bool(entry["ok"] and ok)
    return {"line": entry["line"] + text, "record": record, "ok": record["ok"]}


def backup_results(hosts, hostvars):
    """``backup_result`` for each host, whether or not it has an ``orthanc_backup_result``
    (a host that was never reached, or whose batch never started, has none)."""
    results = []
    for host in hosts:
        variables = hostvars[host]
        result = variables["orthanc_backup_result"] if "orthanc_backup_result" in variables else None
        ship = variables["orthanc_ship_result"] if "orthanc_ship_result" in variables else None
        entry = backup_result([result, host, ship])
        if "orthanc_offsite_result" in variables:
            entry = add_offsite(entry, variables["orthanc_offsite_result"])
        results.append(entry)
    return results


def backup_totals(results):
    """Totals over the results of ``backup_results``: a line for a person and a record."""
    records = [r["record"] for r in results]
    ok = [r for r in records if r.get("result") == "ok"]
    failed = [r for r in records if r.get("result") == "failed"]
    shipped = [r for r in records if r.get("ship_result") == "ok"]
    ship_failed = [r for r in records if r.get("ship_result") in ("failed", "not shipped")]
    downtimes = [float(r.get("downtime_seconds") or 0) for r in ok]
    totals = {"hosts": len(records), "backed_up": len(ok), "failed": len(failed),
              "not_run": len([r for r in records if r.get("result") == "not run"]),
              "shipped": len(shipped), "ship_failed": len(ship_failed),
              "shipped_bytes": sum(int(r.get("shipped_bytes") or 0) for r in shipped),
              "backup_bytes": sum(int(r.get("bytes") or 0) for r in ok),
              "new_bytes": sum(int(r.get("new_bytes") or 0) for r in ok),
              "max_downtime_seconds": max(downtimes) if downtimes else None,
              "all_ok": all(r.get("ok") for r in records)}
    line = (f"{totals['backed_up']} of {totals['hosts']} hosts backed up ({totals['failed']} failed, "
            f"{totals['not_run']} not run), {human_bytes(totals['new_bytes'])} new of {human_bytes(totals['backup_bytes'])}")
    if shipped or ship_failed:
        line += (f"; {totals['shipped']} shipped ({human_bytes(totals['shipped_bytes'])} sent), "
                 f"{totals['ship_failed']} not shipped")
    if downtimes:
        line += f"; longest downtime {max(downtimes):.1f} s"
    totals["line"] = line
    return totals


def orthanc_state_sentence(probe, host=None, start_hint=None):
    """The sentence on Orthanc's state, from a pacs.orthanc.orthanc_probe result (see _probe)."""
    return _probe.sentence(probe, host, start_hint)


class FilterModule:
    def filters(self):
        return {"backup_result": backup_result, "backup_results": backup_results, "backup_totals": backup_totals,
                "orthanc_state_sentence": orthanc_state_sentence}

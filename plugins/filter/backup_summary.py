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
  - Takes a pair C([orthanc_backup_result or none, host]) and returns C(line), a sentence for a
    person, and C(record), a flat dictionary for AWX's C(set_stats).
positional: _input
options:
  _input:
    description: The pair.
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
  description: C(line) and C(record).
  type: dict
"""
# backup_results(hosts, hostvars) does the same for a list of hosts; it is documented in the
# playbook that uses it (playbooks/backup.yml).


def human_bytes(value) -> str:
    size = float(value or 0)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size} B"


def backup_result(pair):
    result, host = pair
    if not result:
        return {"line": f"{host}: NOT BACKED UP (unreachable, or the run stopped before this host)",
                "record": {"host": host, "result": "not run"}}
    if result.get("result") == "check mode":
        storage = result.get("storage", {})
        return {"line": f"{host}: check mode, would back up {storage.get('files', 0)} files "
                        f"({storage.get('new_files', 0)} new, {storage.get('linked_files', 0)} from the previous backup) "
                        f"and {storage.get('deferred_files', 0)} recent ones, into {result.get('path')}"
                        + (", and stop Orthanc briefly" if result.get("would_stop_orthanc") else ""),
                "record": {"host": host, "result": "check mode", "path": result.get("path")}}
    if result.get("result") != "ok":
        running = "Orthanc running" if result.get("orthanc_running") else "ORTHANC NOT ANSWERING"
        return {"line": f"{host}: FAILED at '{result.get('step')}': {result.get('cause')} ({running})",
                "record": {"host": host, "result": "failed", "step": result.get("step"),
                           "cause": result.get("cause"), "orthanc_running": result.get("orthanc_running")}}
    storage = result.get("storage", {})
    counts = result.get("counts", {})
    downtime = result.get("downtime_seconds")
    line = (f"{host}: ok, {result.get('backend')}, {counts.get('instances', 0)} instances, "
            f"{human_bytes(storage.get('bytes'))} in {storage.get('files', 0)} files "
            f"({storage.get('new_files', 0)} new, {human_bytes(storage.get('new_bytes'))}; "
            f"{storage.get('linked_files', 0)} linked), downtime {float(downtime or 0):.1f} s, {result.get('path')}")
    record = {"host": host, "result": "ok", "backend": result.get("backend"), "path": result.get("path"),
              "instances": counts.get("instances", 0), "files": storage.get("files", 0),
              "bytes": storage.get("bytes", 0), "new_files": storage.get("new_files", 0),
              "new_bytes": storage.get("new_bytes", 0), "linked_files": storage.get("linked_files", 0),
              "downtime_seconds": downtime}
    return {"line": line, "record": record}


def backup_results(hosts, hostvars):
    """``backup_result`` for each host, whether or not it has an ``orthanc_backup_result``
    (a host that was never reached, or whose batch never started, has none)."""
    results = []
    for host in hosts:
        variables = hostvars[host]
        result = variables["orthanc_backup_result"] if "orthanc_backup_result" in variables else None
        results.append(backup_result([result, host]))
    return results


class FilterModule:
    def filters(self):
        return {"backup_result": backup_result, "backup_results": backup_results}

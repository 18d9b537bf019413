#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: pacs.orthanc contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: backup_status
short_description: Record the outcome of an Orthanc backup or transfer in a status file and a node-exporter metric
version_added: 0.1.0
description:
  - Updates the JSON status file O(path) of one host after a backup (O(event=backup)) or a
    transfer to the backup server (O(event=ship)), keeping what earlier runs recorded. The time,
    size, duration, downtime and counts of a successful backup are read from its manifest
    (O(backup_path)); a failure records its step and cause and keeps the last success.
  - With O(textfile), also writes the status as node-exporter textfile metrics
    (C(pacs_orthanc_backup_last_success_timestamp_seconds), C(..._last_duration_seconds),
    C(..._last_size_bytes), C(..._last_downtime_seconds), C(..._last_result) and more, each
    labelled C(host)).
  - Both files are written to a temporary file, synced and renamed into place.
options:
  path:
    description: The status file (JSON).
    type: path
    required: true
  host:
    description: The host's name, recorded in the file and as the metrics' C(host) label.
    type: str
    required: true
  event:
    description: What ended, a backup, a transfer to the backup server, or a shipping off site.
    type: str
    choices: [backup, ship, offsite]
    default: backup
  result:
    description: How it ended.
    type: str
    choices: [ok, failed]
    required: true
  backup_path:
    description: The complete backup (a folder holding C(manifest.json)); required for a successful backup.
    type: path
  started_at:
    description: When the failed backup started (UTC, C(%Y-%m-%dT%H:%M:%S.%fZ)), for its duration.
    type: str
  step:
    description: The step that failed.
    type: str
  cause:
    description: Why it failed.
    type: str
  ship:
    description: What a transfer did (server, path, bytes_sent, seconds), recorded with O(event=ship).
    type: dict
  offsite:
    description:
      - What an off-site shipping did (repository, snapshot_id, snapshot_time, backup, data_added), recorded
        with O(event=offsite). The newest C(snapshot_time) is kept as C(newest_offsite_snapshot), and in the
        metric C(pacs_orthanc_backup_offsite_newest_snapshot_timestamp_seconds) (its age is C(time()) minus it).
    type: dict
  textfile:
    description: Node-exporter textfile to write too (a C(.prom) file in the collector's folder), or none.
    type: path
attributes:
  check_mode:
    support: full
    description: Returns the status it would write; writes nothing.
author:
  - pacs.orthanc developers (@pacs-orthanc)
"""

EXAMPLES = r"""
- name: Record a successful backup
  pacs.orthanc.backup_status:
    path: /var/backups/orthanc/status.json
    host: "{{ inventory_hostname }}"
    result: ok
    backup_path: /var/backups/orthanc/20261129T070000Z
    textfile: /var/lib/prometheus/node-exporter/pacs_orthanc_backup.prom
"""

RETURN = r"""
status:
  description: The status written.
  type: dict
  returned: always
  sample: {"result": "ok", "last_success": {"time": "2026-11-29T07:00:41.000000Z", "size_bytes": 1048576}}
path:
  description: The status file.
  type: str
  returned: always
textfile:
  description: The metrics file, or null.
  type: str
  returned: always
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.pacs.orthanc.plugins.module_utils import _status
from ansible_collections.pacs.orthanc.plugins.module_utils._common import PacsError, run_module


def act(module):
    p = module.params
    if p["event"] == "backup" and p["result"] == "ok" and not p["backup_path"]:
        raise PacsError("write the backup status", "a successful backup needs 'backup_path'")
    status = _status.update(_status.read_status(p["path"]), p["host"], p["event"], p["result"], p["backup_path"],
                            p["started_at"], p["step"], p["cause"], p["ship"], offsite=p["offsite"])
    return _status.write(p["path"], status, p["textfile"], module.check_mode)


def main():
    module = AnsibleModule(
        argument_spec=dict(
            path=dict(type="path", required=True),
            host=dict(type="str", required=True),
            event=dict(type="str", choices=["backup", "ship", "offsite"], default="backup"),
            result=dict(type="str", choices=["ok", "failed"], required=True),
            backup_path=dict(type="path"),
            started_at=dict(type="str"),
            step=dict(type="str"),
            cause=dict(type="str"),
            ship=dict(type="dict"),
            offsite=dict(type="dict"),
            textfile=dict(type="path"),
        ),
        supports_check_mode=True,
    )
    run_module(module, act)


if __name__ == "__main__":
    main()

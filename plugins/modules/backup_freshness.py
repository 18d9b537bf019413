#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: pacs.orthanc contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: backup_freshness
short_description: Say whether a host's newest Orthanc backup, shipped copy and off-site snapshot are fresh
version_added: 0.3.0
description:
  - Runs on the managed host and reads only. The newest complete backup is the newest timestamp
    folder of O(backup_root) holding a manifest (its C(ended_at)); the shipped copy is the last
    successful transfer to the backup server recorded in the status file O(status_file); the off-site
    snapshot is O(offsite_time) when given (the repository's own list, as the freshness playbook
    asks it), else the newest one the status file recorded.
  - Each one expected (the backup always, the others with O(expect_ship) and O(expect_offsite)) must be
    at most O(max_age_hours) old; one that is expected and missing is stale. The module does not fail
    on a stale host, it says so (C(fresh), C(stale)), and the playbook decides.
options:
  backup_root:
    description: The folder holding the host's backups.
    type: path
    required: true
  status_file:
    description: The host's status file (M(pacs.orthanc.backup_status)).
    type: path
  max_age_hours:
    description: The age above which a copy is stale.
    type: float
    default: 26
  expect_ship:
    description: Judge the shipped copy too (a backup server is configured).
    type: bool
    default: false
  expect_offsite:
    description: Judge the off-site snapshot too (C(orthanc_offsite) is set).
    type: bool
    default: false
  offsite_time:
    description: The time of the newest off-site snapshot (UTC, C(%Y-%m-%dT%H:%M:%S.%fZ)), as the repository says.
    type: str
attributes:
  check_mode:
    support: full
    description: Reads only; the same in check mode.
author:
  - pacs.orthanc developers (@pacs-orthanc)
"""

EXAMPLES = r"""
- name: Is this host's newest backup at most 26 hours old?
  pacs.orthanc.backup_freshness:
    backup_root: /var/backups/orthanc
    status_file: /var/backups/orthanc/status.json
    expect_ship: true
  register: fresh
"""

RETURN = r"""
fresh:
  description: Whether every expected copy is at most O(max_age_hours) old.
  type: bool
  returned: always
stale:
  description: What is stale or missing, in words (C(newest complete backup 30.5 h old), C(no off-site snapshot)).
  type: list
  elements: str
  returned: always
ages:
  description: Per copy (C(backup), C(ship), C(offsite)), its time and its age in hours.
  type: dict
  returned: always
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.pacs.orthanc.plugins.module_utils import _status
from ansible_collections.pacs.orthanc.plugins.module_utils._common import run_module, utc_now


def act(module):
    p = module.params
    status = _status.read_status(p["status_file"]) if p["status_file"] else {}
    offsite = p["offsite_time"] or (status.get("newest_offsite_snapshot") or {}).get("time")
    result = _status.freshness(utc_now(), p["max_age_hours"],
                               backup_time=_status.newest_backup_time(p["backup_root"]),
                               ship_time=(status.get("last_ship_success") or {}).get("time"),
                               offsite_time=offsite, expect_ship=p["expect_ship"], expect_offsite=p["expect_offsite"])
    return dict(result, changed=False)


def main():
    module = AnsibleModule(
        argument_spec=dict(
            backup_root=dict(type="path", required=True),
            status_file=dict(type="path"),
            max_age_hours=dict(type="float", default=26),
            expect_ship=dict(type="bool", default=False),
            expect_offsite=dict(type="bool", default=False),
            offsite_time=dict(type="str"),
        ),
        supports_check_mode=True,
    )
    run_module(module, act)


if __name__ == "__main__":
    main()

#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: pacs.orthanc contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: backup_server
short_description: Receive, check, complete and retain Orthanc backups on a backup server
version_added: 0.1.0
description:
  - Runs on the backup server (for instance with C(delegate_to)), on one managed host's folder
    O(folder) (C(<server root>/<host>)). Needs Python 3's standard library only.
  - C(prepare) creates the folder (mode 0700), removes C(*.incomplete) folders that interrupted
    transfers left, creates C(<name>.incomplete/) and returns the newest complete backup older
    than O(name) (C(previous)), for M(pacs.orthanc.backup_ship) to link unchanged files to.
    When C(<name>/) is complete already it changes nothing and says so.
  - C(complete) checks the transferred copy offline, as M(pacs.orthanc.backup_verify) does (the
    SHA-256 of every file C(manifest.json) lists, the index's integrity, every indexed storage
    file's size, the manifest's counts, and the MD5 of O(md5) files), and
    that its manifest names O(host) and O(name). Only then it renames the copy C(<name>/),
    points C(latest) at it and applies retention; a failed check leaves it incomplete.
  - Retention keeps the union of the O(keep_last) newest backups and, for each of the
    O(keep_daily) newest days, O(keep_weekly) newest ISO weeks and O(keep_monthly) newest months
    (UTC) that hold a backup, the newest backup of that period. The newest backup is always kept.
    A pre-upgrade backup (manifest key C(pre_upgrade)) is kept until its C(keep_until), outside
    that count; after it, it is an ordinary backup.
    A deleted backup is first renamed C(*.incomplete), so that a half-deleted one never looks complete.
  - C(discard) removes C(<name>.incomplete/) (never a complete backup).
  - C(found) reads only and returns the complete backup O(name) names, C(latest) (the newest) or a
    timestamp (C(name), C(path)), for M(pacs.orthanc.backup_ship) C(state=fetched) to pull back.
  - Each state holds an C(flock) on C(<folder>/.lock) while it acts; the kernel releases it when
    the module ends, so a killed run never blocks the next one.
options:
  state:
    description: What to do.
    type: str
    choices: [prepare, complete, discard, found]
    required: true
  folder:
    description: The managed host's folder on the server, C(<server root>/<host>).
    type: path
    required: true
  name:
    description: The backup's name (the local backup's UTC timestamp); with C(found), also C(latest).
    type: str
    required: true
  host:
    description: The managed host the backup must belong to (checked against its manifest by C(complete)).
    type: str
  keep_last:
    description: Newest complete backups to keep.
    type: int
    default: 3
  keep_daily:
    description: Days whose newest backup is kept.
    type: int
    default: 7
  keep_weekly:
    description: ISO weeks whose newest backup is kept.
    type: int
    default: 4
  keep_monthly:
    description: Months whose newest backup is kept.
    type: int
    default: 6
extends_documentation_fragment:
  - pacs.orthanc.completion
attributes:
  check_mode:
    support: full
    description: C(complete) runs its check and reports what it would rename and delete; nothing is written.
author:
  - pacs.orthanc developers (@pacs-orthanc)
"""

EXAMPLES = r"""
- name: Prepare the server folder
  pacs.orthanc.backup_server:
    state: prepare
    folder: /srv/orthanc-backups/pacs-1
    name: 20261129T070000Z
  delegate_to: backup-1
  register: prepared

- name: Check the copy and mark it complete
  pacs.orthanc.backup_server:
    state: complete
    folder: /srv/orthanc-backups/pacs-1
    name: 20261129T070000Z
    host: pacs-1
    keep_daily: 14
  delegate_to: backup-1
"""

RETURN = r"""
path:
  description: The backup's folder on the server (C(.incomplete) after C(prepare)).
  type: str
  returned: always
previous:
  description: With C(prepare), the name of the newest complete backup older than O(name); with C(complete), its path.
  type: str
  returned: prepare, complete
already_complete:
  description: Whether the backup was complete on the server already.
  type: bool
  returned: prepare, complete
removed_incomplete:
  description: Leftovers of interrupted transfers that C(prepare) removed.
  type: list
  elements: str
  returned: prepare
free_bytes:
  description: Free bytes on the server's filesystem after C(prepare).
  type: int
  returned: prepare, when the folder was prepared
verification:
  description: The check C(complete) ran (as M(pacs.orthanc.backup_verify) returns it).
  type: dict
  returned: complete
new_files:
  description: Storage files that are not hard links to the previous backup on the server (with O(md5=new)).
  type: int
  returned: complete
kept:
  description: The complete backups retention kept, newest first.
  type: list
  elements: str
  returned: complete
kept_for_upgrade:
  description: Pre-upgrade backups kept outside retention (their C(keep_until) is not reached).
  type: list
  elements: str
  returned: complete
deleted_by_retention:
  description: Complete backups that retention deleted.
  type: list
  elements: str
  returned: complete
removed:
  description: The incomplete folder C(discard) removed, or null.
  type: str
  returned: discard
"""

import os

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.pacs.orthanc.plugins.module_utils import _layout, _ship, _specs
from ansible_collections.pacs.orthanc.plugins.module_utils._common import PacsError, run_module


def act(module):
    p = module.params
    if p["state"] == "found":
        return _ship.find(os.path.abspath(p["folder"]), p["name"])
    if not _layout.NAME_RE.match(p["name"]):
        raise PacsError("backup server", f"'{p['name']}' is not a backup name (a UTC timestamp like 20261129T070000Z)")
    folder = os.path.abspath(p["folder"])
    if p["state"] == "prepare":
        return _ship.prepare(folder, p["name"], module.check_mode)
    if p["state"] == "discard":
        return _ship.discard(folder, p["name"], module.check_mode)
    return _ship.complete(folder, p["name"], p["host"] or "", p["keep_last"], p["keep_daily"], p["keep_weekly"],
                          p["keep_monthly"], p["md5"], p["workers"], module.check_mode)


def main():
    module = AnsibleModule(
        argument_spec=dict(
            state=dict(type="str", choices=["prepare", "complete", "discard", "found"], required=True),
            folder=dict(type="path", required=True),
            name=dict(type="str", required=True),
            host=dict(type="str"),
            keep_last=dict(type="int", default=3),
            keep_daily=dict(type="int", default=7),
            keep_weekly=dict(type="int", default=4),
            keep_monthly=dict(type="int", default=6),
            **_specs.COMPLETION,
        ),
        supports_check_mode=True,
    )
    run_module(module, act)


if __name__ == "__main__":
    main()

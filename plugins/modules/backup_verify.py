#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: pacs.orthanc contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: backup_verify
short_description: Verify an Orthanc backup offline, file by file, against its own index
version_added: 0.1.0
description:
  - Checks a backup folder without any Orthanc, the SHA-256 of every file that C(manifest.json)
    lists, the integrity of the index copy (C(PRAGMA integrity_check), unless the index is by its
    SHA-256 the one that passed it when the backup was completed), every attachment that the
    index lists present in C(storage/) with the size and the MD5 that the index records
    (compressed storage included, the MD5 is that of the bytes on disk), the counts of the
    manifest against the index, and files in C(storage/) that the index does not know (orphans,
    reported but not an error).
  - Files are read and hashed in parallel by O(workers) processes, folder by folder of C(storage/).
  - Read-only; fails with a summary of the problems by kind when anything is wrong.
options:
  path:
    description: The backup folder (for instance C(/var/backups/orthanc/latest)).
    type: path
    required: true
  md5:
    description: C(all) hashes every storage file; C(none) checks sizes only.
    type: str
    choices: [all, none]
    default: all
  workers:
    description: Processes that read and hash storage files in parallel; C(0) starts one per CPU of the host.
    type: int
    default: 0
extends_documentation_fragment:
  - pacs.orthanc.rest.READ_ONLY
  - pacs.orthanc.progress
author:
  - pacs.orthanc developers (@pacs-orthanc)
"""

EXAMPLES = r"""
- name: Verify the newest backup
  pacs.orthanc.backup_verify:
    path: /var/backups/orthanc/latest
  register: verification
"""

RETURN = r"""
ok:
  description: Whether no problem was found.
  type: bool
  returned: always
problems:
  description: Problems by kind, each with a count and up to 10 examples.
  type: dict
  returned: always
  sample: {"storage files with a wrong MD5": {"count": 1, "examples": ["0b4f..."]}}
counts:
  description: Patients, studies, series and instances in the index.
  type: dict
  returned: when the index is readable
files_checked:
  description: Storage files found with the right size.
  type: int
  returned: always
files_hashed:
  description: Storage files whose MD5 was computed.
  type: int
  returned: always
bytes_hashed:
  description: Bytes read to compute MD5s.
  type: int
  returned: always
orphans:
  description: Files in C(storage/) that the index does not list.
  type: int
  returned: always
index_check:
  description: >-
    C(integrity_check) when C(PRAGMA integrity_check) ran on the SQLite index; C(unchanged) when
    the index is, by its SHA-256, the one that passed it when the backup was completed (the
    manifest records that check, C(verification.index_integrity=integrity_check)), so it was not
    run again. A backup completed with only C(PRAGMA quick_check) (C(index_integrity=quick_check):
    M(pacs.orthanc.backup_set) with O(pacs.orthanc.backup_set#module:index_check=quick)) gets the
    full check here.
  type: str
  returned: when the backup has a SQLite index
seconds:
  description: Time the verification took.
  type: float
  returned: always
"""

import os
import time

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.pacs.orthanc.plugins.module_utils import _progress, _specs, _verify
from ansible_collections.pacs.orthanc.plugins.module_utils._common import PacsError, run_module


def verify(module):
    p = module.params
    path = os.path.realpath(p["path"])
    if not os.path.isdir(path):
        raise PacsError("verify backup", f"there is no backup folder at {p['path']}")
    start = time.monotonic()
    with _progress.from_params(p["progress"], "verification", module.check_mode) as progress:
        report = _verify.verify_backup(path, md5=p["md5"], workers=p["workers"], progress=progress)
    report.update({"changed": False, "path": path, "seconds": round(time.monotonic() - start, 3)})
    if not report["ok"]:
        raise PacsError("verify backup", f"{path} is damaged: {_verify.describe_problems(report['problems'])}",
                        **report)
    if report["orphans"]:
        module.warn(f"{report['orphans']} files in {path}/storage are not in the index (orphans)")
    return report


def main():
    module = AnsibleModule(
        argument_spec=dict(
            path=dict(type="path", required=True),
            md5=dict(type="str", choices=["all", "none"], default="all"),
            workers=dict(type="int", default=0),
            **_specs.PROGRESS,
        ),
        supports_check_mode=True,
    )
    run_module(module, verify)


if __name__ == "__main__":
    main()

#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: pacs.orthanc contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: sqlite_capture
short_description: Take a consistent copy of Orthanc's SQLite index
version_added: 0.1.0
description:
  - Orthanc holds its SQLite index with an exclusive lock while it runs, so no consistent copy can
    be taken then. This module refuses while any process holds the index (it waits up to
    O(wait_timeout) seconds for the lock to go, naming the process that holds it).
  - It copies every C(index*) file together (C(index), C(index-wal), C(index-shm)), because the
    newest data may live only in the write-ahead log, then replays the log into the copy, leaving
    one self-contained C(index) file in O(dest). The live files are only read.
  - It checks the copy's integrity and returns the schema version and the patient, study, series
    and instance counts read from the copy.
  - A standalone tool; the backup role does not call it. The role's stop window is one task,
    M(pacs.orthanc.stopped_capture), which runs this same capture (the same code) between the stop and
    the start, because each further task would add its start-up time to Orthanc's downtime. Use this
    module for a copy by hand of an index whose Orthanc is already stopped, for instance after a crash
    (the copy keeps what only the write-ahead log holds), before an upgrade, or for a cold backup
    taken by other tooling.
options:
  index_directory:
    description: The folder holding Orthanc's C(index) file (C(IndexDirectory)).
    type: path
    required: true
  dest:
    description: Folder that receives the consolidated C(index) file. Created when missing.
    type: path
    required: true
  wait_timeout:
    description: Seconds to wait for Orthanc to release the index before failing.
    type: float
    default: 60
  integrity_check:
    description:
      - C(full) runs C(PRAGMA integrity_check) on the copy, C(quick) runs C(quick_check), C(none)
        skips it (when a later step verifies the backup, to keep Orthanc's downtime short).
    type: str
    choices: [full, quick, none]
    default: full
attributes:
  check_mode:
    support: full
    description: Checks that the index is free and readable; copies nothing.
author:
  - pacs.orthanc developers (@pacs-orthanc)
"""

EXAMPLES = r"""
- name: Capture the index while Orthanc is stopped
  pacs.orthanc.sqlite_capture:
    index_directory: /var/lib/orthanc/db-v6
    dest: /var/backups/orthanc/manual/index
  register: capture

- name: Show the counts
  ansible.builtin.debug:
    msg: "{{ capture.counts.instances }} instances, schema {{ capture.schema_version }}"
"""

RETURN = r"""
path:
  description: The consolidated copy.
  type: str
  returned: success, not in check mode
  sample: /var/backups/orthanc/manual/index/index
size:
  description: Bytes of the consolidated copy.
  type: int
  returned: success, not in check mode
source_files:
  description: The C(index*) files copied and their sizes.
  type: dict
  returned: always
  sample: {"index": 110592, "index-wal": 251352}
schema_version:
  description: Orthanc's database schema version recorded in the index.
  type: str
  returned: success
  sample: "6"
counts:
  description: Resources in the index.
  type: dict
  returned: success
  sample: {"patients": 2, "studies": 2, "series": 3, "instances": 12}
index_capture:
  description: How the index files were taken, C(reflink) (cloned with C(FICLONE), where O(dest) is on the
    index's filesystem and it has reflinks, such as XFS with C(reflink=1) or btrfs) or C(copy).
  type: str
  returned: success, not in check mode
  sample: copy
integrity_check:
  description: The check that ran on the copy.
  type: str
  returned: always
waited_seconds:
  description: Seconds spent waiting for Orthanc to release the index.
  type: float
  returned: always
"""

import os

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.pacs.orthanc.plugins.module_utils import _sqlite
from ansible_collections.pacs.orthanc.plugins.module_utils._common import PacsError, run_module


def capture(module):
    p = module.params
    index_file = os.path.join(p["index_directory"], "index")
    if not os.path.isfile(index_file):
        raise PacsError("find index", f"there is no SQLite index at {index_file}")
    waited = _sqlite.wait_until_free(index_file, p["wait_timeout"])
    result = {"changed": True, "waited_seconds": round(waited, 3), "integrity_check": p["integrity_check"]}
    if module.check_mode:
        names = _sqlite.index_files(p["index_directory"])
        result["source_files"] = {n: os.path.getsize(os.path.join(p["index_directory"], n)) for n in names}
        if "index-wal" not in names:  # without a WAL the live file can be read as it is
            result.update(_sqlite.read_summary(index_file))
        return result
    copied = _sqlite.copy_index_set(p["index_directory"], p["dest"])
    problems = _sqlite.check_integrity(copied["path"], p["integrity_check"])
    if problems:
        raise PacsError("check index copy", f"the copied index fails its integrity check: {'; '.join(problems[:5])}",
                        path=copied["path"])
    result.update(copied)
    result.update(_sqlite.read_summary(copied["path"]))
    return result


def main():
    module = AnsibleModule(
        argument_spec=dict(
            index_directory=dict(type="path", required=True),
            dest=dict(type="path", required=True),
            wait_timeout=dict(type="float", default=60),
            integrity_check=dict(type="str", choices=["full", "quick", "none"], default="full"),
        ),
        supports_check_mode=True,
    )
    run_module(module, capture)


if __name__ == "__main__":
    main()

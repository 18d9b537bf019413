#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: pacs.orthanc contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: orthanc_drill
short_description: Restore a backup into a scratch Orthanc beside production and check what it serves
version_added: 0.1.0
description:
  - Copies a backup (configuration, index, storage; storage files hard-linked when the scratch
    folder is on the backup's filesystem) into a scratch folder under O(workdir), and starts a
    scratch Orthanc on it with the host's Orthanc program.
  - The scratch Orthanc keeps to itself, its own folders and a free port on the loopback
    interface, no DICOM server, no plugins, Lua scripts, peers, modalities or saved jobs (nothing it
    could send anywhere), no recycling, and a random user of its own.
  - Compares its statistics with the manifest's counts, its instances with the index, and the MD5
    of each DICOM file it serves with the one the index records, for O(sample) instances (all with
    C(0)). Then stops it and removes the scratch folder, unless O(keep).
  - Production is never stopped or touched.
options:
  backup:
    description: The backup folder (for instance C(/var/backups/orthanc/latest)).
    type: path
    required: true
  workdir:
    description: Where scratch folders are made.
    type: path
    default: /var/tmp/pacs-orthanc-drill
  sample:
    description: How many instances to fetch and hash; C(0) for all.
    type: int
    default: 20
  keep:
    description: Leave the scratch Orthanc running and its folder in place (returns its URL and PID).
    type: bool
    default: false
  orthanc_binary:
    description: The Orthanc program.
    type: str
    default: Orthanc
  start_timeout:
    description: Seconds to wait for the scratch Orthanc to answer.
    type: float
    default: 60
attributes:
  check_mode:
    support: full
    description: Does nothing in check mode and says so.
extends_documentation_fragment:
  - pacs.orthanc.progress
author:
  - pacs.orthanc developers (@pacs-orthanc)
"""

EXAMPLES = r"""
- name: Drill the newest backup, every instance
  pacs.orthanc.orthanc_drill:
    backup: /var/backups/orthanc/latest
    sample: 0
  register: drill
"""

RETURN = r"""
ok:
  description: Whether the scratch Orthanc served exactly what the backup holds.
  type: bool
  returned: success
counts:
  description: What the scratch Orthanc counts.
  type: dict
  returned: success
manifest_counts:
  description: What the manifest records.
  type: dict
  returned: success
checked_instances:
  description: Instances fetched and hashed.
  type: int
  returned: success
orthanc_version:
  description: Version of the scratch Orthanc.
  type: str
  returned: success
url:
  description: The scratch Orthanc's URL (loopback).
  type: str
  returned: always
scratch:
  description: The scratch folder (removed unless O(keep)).
  type: str
  returned: always
pid:
  description: PID of the scratch Orthanc.
  type: int
  returned: when it was started
"""

import os

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.pacs.orthanc.plugins.module_utils import _drill, _progress, _specs
from ansible_collections.pacs.orthanc.plugins.module_utils._common import PacsError, run_module


def drill(module):
    p = module.params
    if module.check_mode:
        return {"changed": False, "msg": "check mode: no scratch Orthanc was started"}
    binary = p["orthanc_binary"] if "/" in p["orthanc_binary"] else module.get_bin_path(p["orthanc_binary"])
    if not binary or not os.path.exists(binary):
        raise PacsError("start scratch Orthanc", f"the Orthanc program {p['orthanc_binary']} is not installed on this host")
    with _progress.from_params(p["progress"], "drill copy", module.check_mode) as progress:
        result = _drill.run_drill(p["backup"], p["workdir"], binary, p["sample"], p["keep"], p["start_timeout"],
                                  progress=progress)
    result["changed"] = p["keep"]
    return result


def main():
    module = AnsibleModule(
        argument_spec=dict(
            backup=dict(type="path", required=True),
            workdir=dict(type="path", default="/var/tmp/pacs-orthanc-drill"),
            sample=dict(type="int", default=20),
            keep=dict(type="bool", default=False),
            orthanc_binary=dict(type="str", default="Orthanc"),
            start_timeout=dict(type="float", default=60),
            **_specs.PROGRESS,
        ),
        supports_check_mode=True,
    )
    run_module(module, drill)


if __name__ == "__main__":
    main()

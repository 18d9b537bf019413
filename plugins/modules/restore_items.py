#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: pacs.orthanc contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: restore_items
short_description: Put selected patients, studies or series of a backup back into a running Orthanc
version_added: 0.3.0
description:
  - Serves the backup from a scratch Orthanc beside production, as M(pacs.orthanc.orthanc_drill) does
    (its own folder under O(workdir), a free loopback port, a random user, no DICOM server, no
    plugins, modalities or peers), finds there every instance of the selection, and sends the ones
    that production lacks to production over its REST API (C(POST /instances) with the DICOM bytes).
    Production is never stopped.
  - Selection by PatientID, StudyInstanceUID, AccessionNumber, SeriesInstanceUID or Orthanc id
    (of a patient, study, series or instance); values match exactly (no wildcards). Every value must
    be found in the backup, or nothing is sent.
  - An instance that production already holds (same Orthanc id, the hash of its DICOM UIDs) is
    skipped and counted, so a second run changes nothing. One that production holds with another MD5
    is counted in RV(differing) and left as it is.
  - Each file is checked against the MD5 the backup's index records before it is sent, and each
    restored instance's MD5 over production's REST API (C(/instances/<id>/attachments/dicom/md5))
    must equal the backup's.
  - When a step fails while instances are being sent, the instances this run added are deleted
    again, so that a failed run leaves production as it was.
  - Each selection option takes a list; a string is split at commas and at line ends (an AWX
    survey's textarea gives one value a line).
  - SQLite backups only (the scratch Orthanc runs on a copy of the backup's index).
options:
  backup:
    description: The backup folder (for instance C(/var/backups/orthanc/latest)).
    type: path
    required: true
  patient_ids:
    description: PatientIDs whose studies are restored (all of each patient's studies in the backup).
    type: list
    elements: str
    default: []
  study_uids:
    description: StudyInstanceUIDs of studies to restore.
    type: list
    elements: str
    default: []
  accession_numbers:
    description: AccessionNumbers of studies to restore.
    type: list
    elements: str
    default: []
  series_uids:
    description: SeriesInstanceUIDs of series to restore.
    type: list
    elements: str
    default: []
  orthanc_ids:
    description: Orthanc ids of patients, studies, series or instances to restore.
    type: list
    elements: str
    default: []
  workdir:
    description: Where the scratch folder is made (removed at the end).
    type: path
    default: /var/tmp/pacs-orthanc-restore-items
  orthanc_binary:
    description: The Orthanc program that serves the backup.
    type: str
    default: Orthanc
  start_timeout:
    description: Seconds to wait for the scratch Orthanc to answer.
    type: float
    default: 60
  timeout:
    description: Seconds to wait for one answer of production's REST API.
    type: float
    default: 60
extends_documentation_fragment:
  - pacs.orthanc.rest
attributes:
  check_mode:
    support: full
    description: Serves the backup and compares with production, and lists what would be restored; sends nothing.
  idempotent:
    support: full
    description: Instances that production holds are skipped; a second run changes nothing.
author:
  - pacs.orthanc developers (@pacs-orthanc)
"""

EXAMPLES = r"""
- name: Put back one study deleted by mistake, from last night's backup
  pacs.orthanc.restore_items:
    backup: /var/backups/orthanc/latest
    study_uids:
      - 1.2.826.0.1.3680043.8.498.10293847561
    url: http://127.0.0.1:8042
    username: admin
    password: "{{ orthanc_password }}"
  register: restored

- name: What would come back for two patients (nothing is sent)
  pacs.orthanc.restore_items:
    backup: /var/backups/orthanc/20261129T070000Z
    patient_ids: [P-0042, P-0043]
  check_mode: true
"""

RETURN = r"""
backup:
  description: The backup served.
  type: str
  returned: success
items:
  description:
    - One entry per requested value, with C(selector), C(value), C(level), C(resources) (Orthanc id
      and main tags of what it matched), C(instance_count), C(already_present) and C(to_restore).
  type: list
  elements: dict
  returned: success
instances:
  description: Instances of the selection in the backup.
  type: int
  returned: success
to_restore:
  description: Instances production lacks (restored, or in check mode, what would be).
  type: int
  returned: success
restored:
  description: Instances sent to production and stored by it (0 in check mode).
  type: int
  returned: success
verified:
  description: Restored instances whose MD5 over production's REST API equals the backup's.
  type: int
  returned: success
already_present:
  description: Instances of the selection that production already held (skipped).
  type: int
  returned: success
differing:
  description: Instances that production holds with another MD5 than the backup's (left as they are).
  type: int
  returned: success
restored_instances:
  description: Orthanc ids of the restored instances.
  type: list
  elements: str
  returned: success
"""

import os

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.pacs.orthanc.plugins.module_utils import _items, _rest
from ansible_collections.pacs.orthanc.plugins.module_utils._common import PacsError, run_module

SELECTION = ("patient_ids", "study_uids", "accession_numbers", "series_uids", "orthanc_ids")


def act(module):
    p = module.params
    # one value a line in an element is several values (an AWX survey's textarea)
    selection = {key: [v.strip() for item in p[key] for v in item.splitlines() if v.strip()] for key in SELECTION}
    if not any(selection.values()):
        raise PacsError("read the selection", "nothing selected: give patient_ids, study_uids, accession_numbers, "
                        "series_uids or orthanc_ids")
    binary = p["orthanc_binary"] if "/" in p["orthanc_binary"] else module.get_bin_path(p["orthanc_binary"])
    if not binary or not os.path.exists(binary):
        raise PacsError("start scratch Orthanc", f"the Orthanc program {p['orthanc_binary']} is not installed on this host")
    if not os.path.isdir(p["backup"]):
        raise PacsError("read backup", f"there is no backup {p['backup']}")
    production = _items.Production(p["url"], p["username"], p["password"], p["timeout"])
    return _items.restore_items(p["backup"], selection, production, p["workdir"], binary, module.check_mode,
                                p["start_timeout"])


def main():
    module = AnsibleModule(
        argument_spec=dict(
            backup=dict(type="path", required=True),
            **{key: dict(type="list", elements="str", default=[]) for key in SELECTION},
            workdir=dict(type="path", default="/var/tmp/pacs-orthanc-restore-items"),
            orthanc_binary=dict(type="str", default="Orthanc"),
            start_timeout=dict(type="float", default=60),
            timeout=dict(type="float", default=60),
            **_rest.ARGUMENT_SPEC,
        ),
        supports_check_mode=True,
    )
    run_module(module, act)


if __name__ == "__main__":
    main()

#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: pacs.orthanc contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: orthanc_reconcile
short_description: After a restore, find what the modalities hold and Orthanc lacks, and pull it back
version_added: 0.3.0
description:
  - Asks each DICOM modality configured in Orthanc (C(DicomModalities); O(modalities) to choose)
    for its studies since a date, with a C-FIND at study level through Orthanc's REST API
    (C(POST /modalities/<name>/query), C(StudyDate) from O(since) on), and reports, per modality,
    the studies the Orthanc lacks (C(missing)) or holds with fewer instances than the modality
    reports in C(NumberOfStudyRelatedInstances) (C(incomplete)), with the study UID, date, PatientID,
    AccessionNumber and the instance counts on both sides.
  - A modality that does not answer C(NumberOfStudyRelatedInstances) can only show missing
    studies, not incomplete ones (C(instances_modality) is then null).
  - With O(retrieve), pulls the lacking studies back with C-MOVE (C(POST /queries/<id>/answers/<n>/retrieve),
    synchronous), to Orthanc's own AET. The modality must know Orthanc as a move destination (in its
    own configuration, with its AET, host and DICOM port). Then compares again and reports what still differs.
  - The C-FINDs change nothing and run in check mode too.
options:
  modalities:
    description: Names of modalities in Orthanc's C(DicomModalities) to ask; all of them when empty.
    type: list
    elements: str
    default: []
  since:
    description:
      - First day of the window (C(StudyDate) is the modality's date, without a time); a DICOM date
        C(YYYYMMDD), an ISO date or an ISO time (its UTC date). When not given, the start time of
        O(backup) (the restored backup).
    type: str
  backup:
    description: The restored backup, whose start time (manifest C(started_at)) is O(since) when that is not given.
    type: path
  retrieve:
    description: Pull the lacking studies back (C-MOVE), then compare again.
    type: bool
    default: false
  timeout:
    description: Seconds to wait for one answer of Orthanc's REST API (a C-FIND or a C-MOVE included).
    type: float
    default: 600
extends_documentation_fragment:
  - pacs.orthanc.rest
attributes:
  check_mode:
    support: full
    description: Asks the modalities and reports; retrieves nothing.
  idempotent:
    support: full
    description: Once nothing lacks, a retrieve changes nothing.
author:
  - pacs.orthanc developers (@pacs-orthanc)
"""

EXAMPLES = r"""
- name: What did the modalities send since the restored backup, that Orthanc lacks?
  pacs.orthanc.orthanc_reconcile:
    backup: /var/backups/orthanc/latest
  register: reconciliation

- name: Pull it back from the CT, and say what still differs
  pacs.orthanc.orthanc_reconcile:
    modalities: [ct1]
    since: "20261129"
    retrieve: true
"""

RETURN = r"""
since:
  description: The first day asked (DICOM date).
  type: str
  returned: always
  sample: "20261129"
modalities:
  description:
    - One report per modality, after the retrieve when there was one - C(modality), C(studies)
      (how many it answered), C(lacking) (each with C(study_uid), C(study_date), C(patient_id),
      C(accession_number), C(instances_modality), C(instances_orthanc), C(state) missing or
      incomplete), C(error) (why it could not be asked, or null).
  type: list
  elements: dict
  returned: always
lacking:
  description: Studies still lacking, all modalities together.
  type: int
  returned: always
before_retrieve:
  description: The reports before the retrieve (with O(retrieve)).
  type: list
  elements: dict
  returned: with O(retrieve), not in check mode
retrieved:
  description: Studies retrieved (C-MOVE answered success), with C(modality) and C(study_uid).
  type: list
  elements: dict
  returned: always
retrieve_failures:
  description: Studies whose C-MOVE failed, with C(modality), C(study_uid) and C(cause).
  type: list
  elements: dict
  returned: always
"""

import os

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.pacs.orthanc.plugins.module_utils import _items, _layout, _reconcile, _rest
from ansible_collections.pacs.orthanc.plugins.module_utils._common import PacsError, run_module


def act(module):
    p = module.params
    since = p["since"]
    if not since:
        if not p["backup"]:
            raise PacsError("read the time window", "give since, or the restored backup (backup) whose start time it is")
        try:
            since = _layout.read_manifest(os.path.realpath(p["backup"])).get("started_at")
        except (OSError, ValueError) as exc:
            raise PacsError("read the time window", f"cannot read the manifest of {p['backup']}: {exc}")
        if not since:
            raise PacsError("read the time window", f"the manifest of {p['backup']} has no started_at: give since")
    production = _items.Production(p["url"], p["username"], p["password"], p["timeout"])
    return _reconcile.reconcile(production, p["modalities"], since, p["retrieve"], module.check_mode)


def main():
    module = AnsibleModule(
        argument_spec=dict(
            modalities=dict(type="list", elements="str", default=[]),
            since=dict(type="str"),
            backup=dict(type="path"),
            retrieve=dict(type="bool", default=False),
            timeout=dict(type="float", default=600),
            **_rest.ARGUMENT_SPEC,
        ),
        supports_check_mode=True,
    )
    run_module(module, act)


if __name__ == "__main__":
    main()

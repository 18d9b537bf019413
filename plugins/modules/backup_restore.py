#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: pacs.orthanc contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: backup_restore
short_description: Put an Orthanc backup in place, keeping the current data aside
version_added: 0.1.0
description:
  - C(planned) reads the backup's manifest and configuration and says where its configuration,
    index and storage go on this host (the paths of the backup's configuration, relative paths
    taken from O(config_path)). It refuses a backup written by a newer Orthanc, or with a newer
    index schema, than this host's, unless O(force).
  - C(restored) does the same checks, then moves the current configuration, index and storage
    aside (renamed with C(.pre-restore-<restore_id>), never deleted) and restores the backup's
    with their modes and owners. Each move is written to O(journal) before it happens. Orthanc
    must be stopped; the module refuses while a process holds the index.
  - C(rolled_back) undoes a restore from its journal, even one whose process was killed, removing
    what it created and moving the data it set aside back. Data never moved is left alone.
  - The backup is only read. Verify it first with M(pacs.orthanc.backup_verify).
options:
  state:
    description: What to do.
    type: str
    choices: [planned, restored, rolled_back]
    default: planned
  backup:
    description: The backup folder (for instance C(/var/backups/orthanc/latest)).
    type: path
  config_path:
    description: Where Orthanc's configuration (file or folder) is restored.
    type: path
    default: /etc/orthanc
  orthanc_version:
    description: Version of this host's Orthanc (from M(pacs.orthanc.orthanc_info)).
    type: str
  database_version:
    description: Database schema version of this host's Orthanc.
    type: str
  force:
    description: Restore even a backup from a newer Orthanc or schema.
    type: bool
    default: false
  restore_id:
    description: Names the set-aside data and the journal; letters, digits, C(.), C(_) and C(-).
    type: str
  journal:
    description: The journal of the restore. Defaults to C(/var/tmp/pacs-orthanc-restore-<restore_id>.json).
    type: path
  link:
    description:
      - Hard-link storage files from the backup instead of copying them (same filesystem only).
        Fast, but the restored files then share their inodes, and their owner, with the backup.
    type: bool
    default: false
  owner:
    description: Owner of the restored index and storage. Defaults to the owner recorded in the manifest.
    type: str
  group:
    description: Group of the restored index and storage. Defaults to the group recorded in the manifest.
    type: str
  workers:
    description: Parallel copies.
    type: int
    default: 4
  environment:
    description:
      - Variables that Orthanc's service sees, used for C(${VAR}) substitution when the backup's
        configuration is read to learn where the index and storage go. Without it, the module's
        own environment is used.
    type: dict
    version_added: 0.2.0
  container:
    description:
      - The target is the Orthanc in a container - M(pacs.orthanc.orthanc_info)'s RV(pacs.orthanc.orthanc_info#module:container)
        for that container. The index and storage go into the host folders behind its volumes; a
        volume's own folder (its C(_data), a bind-mounted folder) is never moved - its contents are
        moved aside into C(<folder>.pre-restore-<restore_id>) beside it, and moved back on a rollback.
        The configuration is not restored (the image, entrypoint and compose files make it; the
        backup's C(config/) keeps it); O(config_path) is then ignored.
    type: dict
attributes:
  check_mode:
    support: full
    description: Plans only.
extends_documentation_fragment:
  - pacs.orthanc.progress
author:
  - pacs.orthanc developers (@pacs-orthanc)
"""

EXAMPLES = r"""
- name: Plan
  pacs.orthanc.backup_restore:
    state: planned
    backup: /var/backups/orthanc/latest
    orthanc_version: "{{ orthanc.version }}"
    database_version: "{{ orthanc.database_version }}"
  register: plan

- name: Restore (Orthanc stopped)
  pacs.orthanc.backup_restore:
    state: restored
    backup: /var/backups/orthanc/latest
    orthanc_version: "{{ orthanc.version }}"
    database_version: "{{ orthanc.database_version }}"
    restore_id: "20261129T120000Z"

- name: Go back
  pacs.orthanc.backup_restore:
    state: rolled_back
    restore_id: "20261129T120000Z"
"""

RETURN = r"""
targets:
  description: Where the configuration, index and storage go.
  type: dict
  returned: planned, restored
  sample: {"config": "/etc/orthanc", "index": "/var/lib/orthanc/db-v6", "storage": "/var/lib/orthanc/db-v6"}
database:
  description:
    - For a backup of a PostgreSQL or MySQL index, its dump (C(engine), C(format), C(dump)) and whether the
      files are in the database (C(storage_in_database)); restore it with M(pacs.orthanc.db_restore).
      None for a SQLite index.
  type: dict
  returned: planned, restored
deleted_during_capture:
  description: Files the backup's index lists that Orthanc deleted while the database was dumped; the restored Orthanc cannot serve them.
  type: list
  elements: str
  returned: planned, restored
counts:
  description: Counts recorded in the backup's manifest, to compare with the restored Orthanc.
  type: dict
  returned: planned, restored
refusals_overridden:
  description: Version refusals that O(force) overrode.
  type: list
  elements: str
  returned: planned, restored
moved_aside:
  description: The data set aside, each C(path) and its C(aside) name.
  type: list
  elements: dict
  returned: restored
storage_files:
  description: Storage files restored.
  type: int
  returned: restored
moved_back:
  description: Paths whose set-aside data was moved back.
  type: list
  elements: str
  returned: rolled_back
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.pacs.orthanc.plugins.module_utils import _progress, _restore, _specs
from ansible_collections.pacs.orthanc.plugins.module_utils._common import PacsError, run_module


def act(module):
    p = module.params
    journal = p["journal"] or (f"/var/tmp/pacs-orthanc-restore-{p['restore_id']}.json" if p["restore_id"] else None)
    if p["state"] == "rolled_back":
        if not journal:
            raise PacsError("roll back restore", "state=rolled_back needs restore_id or journal")
        if module.check_mode:
            return {"changed": False, "journal": journal}
        return _restore.rollback(journal)
    if not p["backup"]:
        raise PacsError("plan restore", f"state={p['state']} needs 'backup'")
    planned = _restore.plan(p["backup"], p["config_path"], p["orthanc_version"], p["database_version"], p["force"],
                            p["environment"], p["container"])
    result = {"changed": False, "backup": planned["backup"], "targets": planned["targets"],
              "counts": planned["counts"], "refusals_overridden": planned["refusals_overridden"],
              "backup_orthanc_version": planned["manifest"].get("orthanc", {}).get("version"),
              "database": planned["database"], "deleted_during_capture": planned["deleted_during_capture"]}
    if p["state"] == "planned":
        return result
    if not p["restore_id"]:
        raise PacsError("restore", "state=restored needs restore_id")
    result["changed"] = True
    if module.check_mode:
        return result
    with _progress.from_params(p["progress"], "restore copy", module.check_mode) as progress:
        result.update(_restore.apply(planned, p["restore_id"], journal, p["link"], p["owner"], p["group"],
                                     p["workers"], progress=progress))
    return result


def main():
    module = AnsibleModule(
        argument_spec=dict(
            state=dict(type="str", choices=["planned", "restored", "rolled_back"], default="planned"),
            backup=dict(type="path"),
            config_path=dict(type="path", default="/etc/orthanc"),
            orthanc_version=dict(type="str"),
            database_version=dict(type="str"),
            force=dict(type="bool", default=False),
            restore_id=dict(type="str"),
            journal=dict(type="path"),
            link=dict(type="bool", default=False),
            owner=dict(type="str"),
            group=dict(type="str"),
            workers=dict(type="int", default=4),
            environment=dict(type="dict"),
            container=dict(type="dict"),
            **_specs.PROGRESS,
        ),
        supports_check_mode=True,
    )
    run_module(module, act)


if __name__ == "__main__":
    main()

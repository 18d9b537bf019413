#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: pacs.orthanc contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: snapshot_capture
short_description: Capture a running Orthanc's SQLite index and storage from a filesystem snapshot
version_added: 0.2.0
description:
  - The capture of the backup role's C(snapshot) strategy. Orthanc is never stopped.
  - Checks the preconditions first, the index and storage folders are in one btrfs subvolume
    (O(volume) when given), the C(btrfs) program is on the PATH, the module runs as root, the
    filesystem is writable and has O(min_free_bytes) free.
  - Then takes an atomic read-only snapshot of that subvolume, named
    C(.pacs-orthanc-snapshot.<name>) in its root. Such a snapshot is what a sudden kill of Orthanc
    would leave on disk, from which SQLite in WAL mode recovers to its last committed transaction.
  - Captures the index from the snapshot (every C(index*) file together, the WAL replayed into
    one self-contained copy, then checked with O(integrity_check)), copies the storage from the
    snapshot (a hot pass of M(pacs.orthanc.storage_copy) with no settle time), and drops the
    files that the captured index does not list (written by Orthanc but not yet committed, they
    are orphans). A file that the index lists but the snapshot lacks, or holds with another size,
    fails the capture.
  - The snapshot is always deleted at the end, also when the capture failed. A snapshot left by
    a run that was killed is recognised by its name (while a capture runs it holds an C(flock) on
    C(.pacs-orthanc-snapshot.lock) in the subvolume's root) and deleted by the next run.
  - With O(poll), Orthanc's REST API is polled during the whole capture; the downtime is
    returned as 0 only when every poll answered.
  - Only C(btrfs) is implemented. C(lvm) and C(zfs) are refused with a message saying so (they
    could not be tested where this collection is developed).
  - A failure before the snapshot exists returns C(precondition_failed=true), so that the role
    may fall back to stopping Orthanc when C(orthanc_backup_snapshot_fallback=stop).
extends_documentation_fragment:
  - pacs.orthanc.rest
  - pacs.orthanc.capture
options:
  kind:
    description: The snapshot technology.
    type: str
    choices: [btrfs, lvm, zfs]
    required: true
  volume:
    description:
      - The root of the btrfs subvolume that holds the index and the storage. When omitted, the
        subvolume holding the index folder is used, and the storage folder must be in it too.
    type: path
  name:
    description: The backup's name (a UTC timestamp); the snapshot is called C(.pacs-orthanc-snapshot.<name>).
    type: str
    required: true
  index_directory:
    description: Orthanc's index folder (C(IndexDirectory)).
    type: path
    required: true
  storage_directory:
    description: Orthanc's storage folder (C(StorageDirectory)).
    type: path
    required: true
  link_mode:
    description:
      - As in M(pacs.orthanc.storage_copy). Files of a snapshot are never hard-linked (another
        subvolume, released at the end), so C(auto) copies what is not in O(previous) and
        C(hardlink) is refused.
    type: str
    choices: [auto, hardlink, copy]
    default: auto
  integrity_check:
    description:
      - Check of the index copy before the snapshot is released. C(quick) is enough here, the
        backup's completion runs the full C(integrity_check) anyway, with Orthanc running.
    type: str
    choices: [quick, full, none]
    default: quick
  min_free_bytes:
    description: Room that must be free on the snapshotted filesystem before the snapshot is taken.
    type: int
    default: 67108864
  poll:
    description: Poll Orthanc's REST API during the capture, to show it answered throughout. False when it is not running.
    type: bool
    default: true
  poll_interval:
    description: Seconds between two polls.
    type: float
    default: 0.05
attributes:
  check_mode:
    support: full
    description: Checks the preconditions and lists leftover snapshots (removed by a real run unless one runs now); creates nothing.
author:
  - pacs.orthanc developers (@pacs-orthanc)
"""

EXAMPLES = r"""
- name: Capture Orthanc from a btrfs snapshot, without stopping it
  pacs.orthanc.snapshot_capture:
    kind: btrfs
    volume: /var/lib/orthanc
    name: 20261129T070000Z
    index_directory: /var/lib/orthanc/db-v6
    storage_directory: /var/lib/orthanc/db-v6
    index_dest: /var/backups/orthanc/20261129T070000Z.incomplete/index
    storage_dest: /var/backups/orthanc/20261129T070000Z.incomplete/storage
    state_file: /var/backups/orthanc/20261129T070000Z.incomplete/.work/storage.db
  register: snapshot
"""

RETURN = r"""
downtime_seconds:
  description: 0 when Orthanc answered every poll during the capture, else null (with a warning).
  type: float
  returned: success
snapshot:
  description: The snapshot, kind, subvolume, path, device, times of creation and release, leftovers removed.
  type: dict
  returned: success, and failures after the preconditions were checked
  sample: {"kind": "btrfs", "volume": "/srv/orthanc", "path": "/srv/orthanc/.pacs-orthanc-snapshot.20261129T070000Z"}
released:
  description: Whether no snapshot of this run is left (also returned on failure).
  type: bool
  returned: always
precondition_failed:
  description: On failure, true when it happened before any snapshot was created (a fallback is possible).
  type: bool
  returned: failure
polls:
  description: Polls of the REST API during the capture, count, failures, longest gap between two answers.
  type: dict
  returned: success
capture:
  description: The index copy, its path, size, schema version, counts, source files.
  type: dict
  returned: success
hot:
  description: The copy of the storage from the snapshot, as M(pacs.orthanc.storage_copy) returns it.
  type: dict
  returned: success
delta:
  description: The pass against the captured index that dropped the orphans.
  type: dict
  returned: success
orphans_dropped:
  description: Files in the snapshot that the captured index does not list (not yet committed), left out.
  type: int
  returned: success
details:
  description: What the manifest records under C(capture).
  type: dict
  returned: success
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.pacs.orthanc.plugins.module_utils import _backupset, _record, _rest, _snapshot, _specs
from ansible_collections.pacs.orthanc.plugins.module_utils._common import PacsError, run_module


def snapshot_capture(module):
    p = module.params
    poll = None
    if p["poll"]:
        poll = {"url": p["url"], "username": p["username"], "password": p["password"],
                "interval": p["poll_interval"]}
    try:
        with _backupset.Heartbeat(p["storage_dest"]):
            result = _snapshot.capture(
                p["kind"], p["index_directory"], p["storage_directory"], p["name"], p["index_dest"],
                p["storage_dest"], p["state_file"], previous=p["previous"], link_mode=p["link_mode"],
                workers=p["workers"], volume=p["volume"], integrity=p["integrity_check"],
                min_free_bytes=p["min_free_bytes"], poll=poll, check_mode=module.check_mode)
    except PacsError as exc:
        if exc.details.get("precondition_failed"):
            # the role may fall back to stopping Orthanc: the manifest says why
            _record.record_beside(p["storage_dest"], "snapshot", {
                "precondition_failed": True, "kind": p["kind"], "cause": exc.cause}, module.check_mode)
        raise
    _record.record_beside(p["storage_dest"], "snapshot", {
        "downtime_seconds": result.get("downtime_seconds"), "details": result.get("details") or {}},
        module.check_mode)
    for warning in result.pop("warnings"):
        module.warn(warning)
    return result


def main():
    module = AnsibleModule(
        argument_spec=dict(
            kind=dict(type="str", choices=["btrfs", "lvm", "zfs"], required=True),
            volume=dict(type="path"),
            name=dict(type="str", required=True),
            index_directory=dict(type="path", required=True),
            storage_directory=dict(type="path", required=True),
            **_specs.CAPTURE,
            integrity_check=dict(type="str", choices=["quick", "full", "none"], default="quick"),
            min_free_bytes=dict(type="int", default=64 * 1024 * 1024),
            poll=dict(type="bool", default=True),
            poll_interval=dict(type="float", default=0.05),
            **_rest.ARGUMENT_SPEC,
        ),
        supports_check_mode=True,
    )
    run_module(module, snapshot_capture)


if __name__ == "__main__":
    main()

#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: pacs.orthanc contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: backup_set
short_description: Prepare, complete or discard one backup folder of an Orthanc host
version_added: 0.1.0
description:
  - C(prepare) takes the backup root's lock C(<root>/.lock), removes folders that an interrupted run left
    incomplete, checks that the root is writable and has room, creates
    C(<root>/<UTC timestamp>.incomplete/) and copies the Orthanc configuration (file or whole
    folder) into its C(config/).
  - C(complete) checks the incomplete backup (index integrity, every file the index lists present in
    C(storage/) with its size, and the MD5 that the index records for O(md5) files; with O(md5=new)
    or O(md5=none) and a SQLite index, the index is compared with the storage state in SQL and only
    the files placed new are read on disk, see O(md5)), writes
    C(manifest.json) with a SHA-256 of every file outside C(storage/), renames the folder to its
    final name, points C(latest) at it, applies retention and releases the lock. When a check
    fails the folder stays incomplete and the module fails.
  - C(discard) removes an incomplete backup (never a complete one) and releases the lock.
  - The lock is held by a small detached process, the keeper (C(pacs-orthanc-lock-keeper) in
    C(ps)), which holds an C(flock) on the lock file for the life of the run; the file records
    the host, its boot id, the keeper's PID and start time. A lock of this host whose holder is
    provably gone (the C(flock) is free, and the PID is gone or now another program, or the lock
    is older than the host's last boot) is taken over at once, and the result
    (C(lock_taken_over)) and the manifest say so. A live keeper is refused, naming it. A lock
    written on another host (a shared backup root) is taken over once nobody touched it for
    O(stale_lock_seconds).
  - The keeper ends when the lock is released (C(complete), C(discard)) or replaced, when a step of
    the run that it watches dies without finishing (a killed module), or when, between steps,
    nobody touched the lock for O(stale_lock_seconds).
options:
  state:
    description:
      - What to do. The same words as M(pacs.orthanc.backup_server) on the backup server.
      - C(open) and C(close) are the names of C(prepare) and C(complete) up to version 0.2.0; they are
        still accepted and do the same.
    type: str
    choices: [prepare, complete, discard, open, close]
    required: true
  root:
    description: The backup root of this host.
    type: path
    required: true
  name:
    description: The backup's name (its UTC timestamp), as returned by C(prepare). Required for C(complete) and C(discard).
    type: str
  index_check:
    description:
      - How C(complete) checks a captured SQLite index when the check follows what changed (O(md5=new) or
        O(md5=none), see O(md5)). C(full) runs C(PRAGMA integrity_check), which also compares every table's
        indexes with its rows (manifest C(verification.index_integrity=integrity_check); a later
        M(pacs.orthanc.backup_verify) of the same index skips it). C(quick) runs C(PRAGMA quick_check), about a third
        of the CPU (pages and records, not the indexes against the rows), recorded as
        C(index_integrity=quick_check), and the next M(pacs.orthanc.backup_verify) of that backup (a restore, a drill)
        and the backup server's check run the full check instead.
      - With O(md5=all), or a database dump, the full check runs whatever this says.
    type: str
    choices: [full, quick]
    default: full
  config_path:
    description:
      - Orthanc's configuration file or folder, copied by C(prepare).
      - Not used for an Orthanc in a container (O(orthanc) holds M(pacs.orthanc.orthanc_info)'s
        C(container)); C(config/) then receives the configuration Orthanc runs with
        (C(effective/<path in the container>)), the container's C(/etc/orthanc) (C(etc-orthanc/))
        and C(/run/secrets) (C(secrets/)), the compose file(s) and C(.env) (C(compose/)), and
        C(container/inspect.json), C(container/environment) and C(container/image.json) (reference
        and digest), every file 0600.
    type: path
  index_directory:
    description: Orthanc's SQLite index folder, for the free space estimate of C(prepare). Omit for a database index.
    type: path
  storage_directory:
    description: Orthanc's storage folder, for the free space estimate of C(prepare). Omit when the files are in a database.
    type: path
  expected_dump_bytes:
    description: Bytes a database dump is expected to take, for the free space estimate of C(prepare).
    type: int
    default: 0
  expected_storage_bytes:
    description: Bytes of the live storage (Orthanc's C(TotalDiskSize)), for the free space estimate.
    type: int
    default: 0
  min_free_bytes:
    description: Room that must stay free on the backup root beyond what the backup needs.
    type: int
    default: 67108864
  space_check:
    description: Refuse to start when the backup root lacks the room the backup needs (estimated).
    type: bool
    default: true
  stale_lock_seconds:
    description:
      - A lock written on another host (or by an older version of the collection) that nobody
        touched for this long is taken to belong to an interrupted run and is taken over. The
        collection's long steps touch the lock every minute while they run.
      - On this host a dead run's lock is taken over at once; a run's keeper ends by itself
        when, between two steps, nobody touched the lock for this long.
    type: int
    default: 900
  host:
    description: Name of the host, recorded in the manifest.
    type: str
  orthanc:
    description:
      - The result of M(pacs.orthanc.orthanc_info) for this Orthanc. C(prepare) keeps in the backup what
        the manifest records of it (version, name, backend, storage, storage_compression,
        config_path, config_is_folder, storage_owner, storage_directory, index_directory).
    type: dict
  dump_format:
    description:
      - The format of M(pacs.orthanc.db_dump) for PostgreSQL (C(custom) or C(directory)), so that C(prepare)
        returns RV(dump_path), the dump's path inside the backup, when O(orthanc) names a database backend.
    type: str
    choices: [custom, directory]
    default: custom
  pre_upgrade:
    description:
      - C(prepare) marks this backup as taken before an upgrade. C(complete) then writes the manifest
        key C(pre_upgrade), an object with the versions of Orthanc (C(orthanc_version)), of every
        plugin it has loaded (C(plugins)), the database schema (C(database_version), as Orthanc
        reports it, and C(index_schema_version) and C(index_schema_patch_level), read from the backup's index or dump), the index
        plugin (C(index_plugin)) and C(keep_until).
      - Retention (here, on the backup server and off site) keeps such a backup until C(keep_until),
        whatever O(keep) says; it does not count among the O(keep) newest.
      - The versions come from O(orthanc) (M(pacs.orthanc.orthanc_info) run while Orthanc answers).
    type: bool
    default: false
  pre_upgrade_keep_days:
    description: Days a pre-upgrade backup is kept from its start (O(pre_upgrade)).
    type: int
    default: 90
  facts:
    description:
      - Kept for compatibility. Each capture step (this module's C(prepare), M(pacs.orthanc.storage_copy),
        M(pacs.orthanc.stopped_capture), M(pacs.orthanc.snapshot_capture), M(pacs.orthanc.db_dump))
        writes its own record into the incomplete backup, and C(complete) builds the manifest from
        those records. Keys given here (orthanc_version, orthanc_name, backend,
        storage_compression, config_path, config_is_folder, storage_directory, storage_owner,
        index_directory, started_at, stopped_at, restarted_at, downtime_seconds, downtime_phases,
        previous, strategy, capture, dump) only fill what no record says.
    type: dict
    default: {}
  keep:
    description: Complete backups to keep (at least 1; the newest is never deleted).
    type: int
    default: 7
extends_documentation_fragment:
  - pacs.orthanc.completion
attributes:
  check_mode:
    support: full
    description: Reports what would be done; writes nothing.
author:
  - pacs.orthanc developers (@pacs-orthanc)
"""

EXAMPLES = r"""
- name: Prepare a backup
  pacs.orthanc.backup_set:
    state: prepare
    root: /var/backups/orthanc
    config_path: /etc/orthanc
    index_directory: /var/lib/orthanc/db-v6
    storage_directory: /var/lib/orthanc/db-v6
  register: backup

- name: Prepare a backup before an upgrade, kept 30 days whatever retention says
  pacs.orthanc.backup_set:
    state: prepare
    root: /var/backups/orthanc
    config_path: /etc/orthanc
    orthanc: "{{ orthanc_info_result }}"
    pre_upgrade: true
    pre_upgrade_keep_days: 30

- name: Complete it, keeping 7 backups
  pacs.orthanc.backup_set:
    state: complete
    root: /var/backups/orthanc
    name: "{{ backup.name }}"
    host: "{{ inventory_hostname }}"
    keep: 7
"""

RETURN = r"""
name:
  description: The backup's name, its UTC start time.
  type: str
  returned: always
  sample: 20261129T070000Z
path:
  description: The backup folder (ending in C(.incomplete) after C(prepare)).
  type: str
  returned: prepare, complete
previous:
  description: The newest complete backup before this one, or null.
  type: str
  returned: prepare
previous_storage:
  description: The storage folder of RV(previous) (where unchanged files are linked from), or null.
  type: str
  returned: prepare
previous_work:
  description:
    - What the manifest of RV(previous) says of its work, or null - C(steps) (the long steps' C(seconds),
      C(files), C(bytes)), C(storage_bytes), C(storage_files). The role estimates from it whether a
      long step is short enough to run without its progress loop.
  type: dict
  returned: prepare
dump_path:
  description: Where the database dump goes in this backup, or null for a SQLite index (needs O(orthanc)).
  type: str
  returned: prepare
removed_incomplete:
  description: Folders of interrupted runs that C(prepare) removed.
  type: list
  elements: str
  returned: prepare
lock_taken_over:
  description:
    - The lock of an earlier run that C(prepare) took over (null when the lock was free), with
      C(host), C(pid) (its keeper), C(started), C(name) (its backup), C(age_seconds), C(reason),
      and C(provable) (true when the holder was seen to be gone on this host, false when another
      host's lock was taken over for being stale). C(complete) records it in the manifest.
  type: dict
  returned: prepare
  sample: {host: pacs-1, pid: 4711, started: "2026-11-29T07:00:00.000000Z", name: 20261129T070000Z,
           age_seconds: 12, provable: true, reason: "its keeper process 4711 on pacs-1 is gone"}
pre_upgrade:
  description: What C(prepare) recorded of a pre-upgrade backup (O(pre_upgrade)); the manifest keeps it.
  type: dict
  returned: prepare with O(pre_upgrade)
  sample: {orthanc_version: 1.10.1, plugins: {}, database_version: "6", backend: sqlite, index_plugin: null,
           keep_days: 90, keep_until: "2027-02-28T07:00:00Z"}
manifest:
  description: The manifest written by C(complete).
  type: dict
  returned: complete
verification:
  description:
    - The check C(complete) ran, counts of problems by kind, files checked (statted on disk) and hashed,
      orphans; C(storage_check) (C(changed) or C(all), see O(md5)) and, for C(changed),
      C(files_compared), the index's attachments compared with the storage state; for a dump backup,
      C(dump_listing), C(recorded) (the listing the delta pass read into the storage state) or C(read)
      (the dump read again).
  type: dict
  returned: complete
deleted_by_retention:
  description: Complete backups that retention deleted.
  type: list
  elements: str
  returned: complete
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.pacs.orthanc.plugins.module_utils import _backupset, _specs
from ansible_collections.pacs.orthanc.plugins.module_utils._common import PacsError, run_module


# the names of 'prepare' and 'complete' up to 0.2.0, still accepted
STATE_ALIASES = {"open": "prepare", "close": "complete"}


def act(module):
    p = module.params
    state = STATE_ALIASES.get(p["state"], p["state"])
    if state == "prepare":
        if not p["config_path"] and not (p["orthanc"] or {}).get("container"):
            raise PacsError("prepare backup folder", f"state={p['state']} needs 'config_path'")
        return _backupset.open_backup(p["root"], p["config_path"], p["index_directory"], p["storage_directory"],
                                      p["expected_storage_bytes"], p["min_free_bytes"], p["stale_lock_seconds"],
                                      p["space_check"], module.check_mode, p["expected_dump_bytes"], p["orthanc"],
                                      p["dump_format"],
                                      p["pre_upgrade_keep_days"] if p["pre_upgrade"] else None)
    if not p["name"]:
        raise PacsError("complete backup", f"state={p['state']} needs 'name'")
    if state == "discard":
        return dict(_backupset.discard_backup(p["root"], p["name"], module.check_mode), name=p["name"])
    result = _backupset.close_backup(p["root"], p["name"], p["host"] or "", p["facts"], p["keep"], p["md5"],
                                     p["workers"], module.check_mode, p["index_check"])
    result["name"] = p["name"]
    return result


def main():
    module = AnsibleModule(
        argument_spec=dict(
            state=dict(type="str", choices=["prepare", "complete", "discard", *STATE_ALIASES], required=True),
            root=dict(type="path", required=True),
            name=dict(type="str"),
            config_path=dict(type="path"),
            index_directory=dict(type="path"),
            storage_directory=dict(type="path"),
            expected_storage_bytes=dict(type="int", default=0),
            expected_dump_bytes=dict(type="int", default=0),
            min_free_bytes=dict(type="int", default=64 * 1024 * 1024),
            stale_lock_seconds=dict(type="int", default=900),
            space_check=dict(type="bool", default=True),
            host=dict(type="str"),
            orthanc=dict(type="dict"),
            dump_format=dict(type="str", choices=["custom", "directory"], default="custom"),
            pre_upgrade=dict(type="bool", default=False),
            pre_upgrade_keep_days=dict(type="int", default=90),
            facts=dict(type="dict", default={}),
            keep=dict(type="int", default=7),
            index_check=dict(type="str", choices=["full", "quick"], default="full"),
            **_specs.COMPLETION,
        ),
        supports_check_mode=True,
    )
    run_module(module, act)


if __name__ == "__main__":
    main()

#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: pacs.orthanc contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: storage_copy
short_description: Incremental copy of Orthanc's storage folder into a backup
version_added: 0.1.0
description:
  - An incremental copy, not a filesystem snapshot (that is M(pacs.orthanc.snapshot_capture)). Up to
    version 0.2.0 this module was called C(pacs.orthanc.storage_snapshot); that name still works,
    routed here by C(meta/runtime.yml), and is deprecated (removed in 1.0.0).
  - Orthanc writes each stored file once under C(xx/yy/uuid) and never changes it. This module
    places each file into O(dest) with the same layout, choosing the cheapest safe way, per file,
    a hard link to the previous backup's file of the same name and size, a hard link to the live
    file when O(dest) is on the storage's filesystem, or a copy.
  - The C(hot) phase runs while Orthanc runs. It walks the storage tree, leaves files modified in
    the last O(settle_seconds) to the delta phase, and records what it placed in O(state_file).
    Before it walks, it reads Orthanc's change position (C(GET /changes?last)) at O(url) and
    records it with the files it left, so that M(pacs.orthanc.stopped_capture) examines only what
    Orthanc's change log names since then while Orthanc is stopped (it compares every attachment
    when the position is missing or cannot be trusted). Orthanc not answering is not an error.
  - The C(delta) phase runs while Orthanc is stopped, after M(pacs.orthanc.sqlite_capture). It does
    not walk the live tree, the captured O(index) lists every attachment and its size. It fetches
    what the hot phase did not place (or placed while it was still being written) and removes what
    Orthanc deleted in between, so the backup's storage matches its index exactly.
options:
  source:
    description: Orthanc's storage folder (C(StorageDirectory)).
    type: path
    required: true
  dest:
    description: The backup's storage folder. Created when missing.
    type: path
    required: true
  phase:
    description: C(hot) while Orthanc runs, C(delta) while it is stopped.
    type: str
    choices: [hot, delta]
    required: true
  index:
    description: The captured SQLite index file; the C(delta) phase needs it or O(dump).
    type: path
  dump:
    description:
      - A database dump (C(.pgdump), C(.pgdir), C(.sql)) made by M(pacs.orthanc.db_dump) while Orthanc
        ran; the C(delta) phase takes the list of files from it instead of O(index).
      - Then Orthanc keeps running, and a file that the dump lists but that Orthanc deleted before
        the delta phase cannot be copied. Such files are not hidden; they are written, one per line,
        returned in RV(deleted_during_capture) and, when O(dest) is inside an incomplete backup, written
        to its record of this step, from which M(pacs.orthanc.backup_set) records them in the manifest.
    type: path
  dump_container:
    description:
      - The database container whose C(pg_dump) made O(dump) (C(db_dump)'s RV(pacs.orthanc.db_dump#module:container)).
        Its own C(pg_restore) reads the dump when it runs on this host, so that the host needs no
        C(postgresql-client) and the versions match; otherwise the host's C(pg_restore) does.
    type: str
  previous:
    description: The previous backup's storage folder; files of the same name and size are linked from it.
    type: path
  state_file:
    description: Where the hot phase records what it placed; read by the delta phase.
    type: path
  link_mode:
    description:
      - C(auto) hard-links live files when O(dest) is on the storage's filesystem and copies
        otherwise; C(hardlink) requires that; C(copy) always copies files that are not in O(previous).
    type: str
    choices: [auto, hardlink, copy]
    default: auto
  settle_seconds:
    description: The hot phase leaves files younger than this to the delta phase.
    type: float
    default: 5
  workers:
    description: Parallel copies.
    type: int
    default: 4
  expected_files:
    description:
      - Hot phase, the number of files expected (Orthanc's C(CountInstances)), the total of the
        progress reports until the walk has counted them. Default, the previous backup's count.
    type: int
  expected_bytes:
    description: Hot phase, the bytes expected (Orthanc's C(TotalDiskSize)); default, the previous backup's.
    type: int
  limit_rate:
    description:
      - Hot phase, at most this many KiB per second copied or linked anew (files linked from the
        previous backup do not count), to spare the disk that Orthanc serves from; 0, no limit.
    type: int
    default: 0
  missing_ok:
    description:
      - In the delta phase, files that the index lists but the storage folder lacks fail the
        module (the live archive is already damaged). Set to true to back up the rest anyway and
        report them.
    type: bool
    default: false
extends_documentation_fragment:
  - pacs.orthanc.progress
  - pacs.orthanc.rest
attributes:
  check_mode:
    support: full
    description: Computes what would be linked, copied and removed; writes nothing.
author:
  - pacs.orthanc developers (@pacs-orthanc)
"""

EXAMPLES = r"""
- name: Hot pass while Orthanc runs
  pacs.orthanc.storage_copy:
    phase: hot
    source: /var/lib/orthanc/db-v6
    dest: /var/backups/orthanc/20261129T070000Z.incomplete/storage
    previous: /var/backups/orthanc/latest/storage

- name: Delta pass once Orthanc is stopped and its index captured
  pacs.orthanc.storage_copy:
    phase: delta
    source: /var/lib/orthanc/db-v6
    dest: /var/backups/orthanc/20261129T070000Z.incomplete/storage
    index: /var/backups/orthanc/20261129T070000Z.incomplete/index/index
    previous: /var/backups/orthanc/latest/storage
"""

RETURN = r"""
files:
  description: Files in the backup's storage after this phase.
  type: int
  returned: always
bytes:
  description: Their bytes.
  type: int
  returned: always
new_files:
  description: Files not taken from the previous backup (copied, or linked from the live storage).
  type: int
  returned: always
new_bytes:
  description: Their bytes.
  type: int
  returned: always
linked_files:
  description: Files hard-linked from the previous backup.
  type: int
  returned: always
linked_bytes:
  description: Their bytes.
  type: int
  returned: always
copied_files:
  description: Files whose bytes were copied.
  type: int
  returned: always
copied_bytes:
  description: Bytes copied.
  type: int
  returned: always
deferred_files:
  description: Hot phase, files left to the delta phase because they were too recent.
  type: int
  returned: phase is hot
fetched_files:
  description: Delta phase, files placed in this phase.
  type: int
  returned: phase is delta
removed_files:
  description: Delta phase, files removed because the index no longer lists them.
  type: int
  returned: phase is delta
deleted_during_capture:
  description: Delta phase from a dump, files the dump lists that were deleted from the storage meanwhile.
  type: list
  elements: str
  returned: phase is delta and dump is given
missing_files:
  description: Delta phase, files the index lists that the storage folder lacks.
  type: int
  returned: phase is delta
hardlink_from_source:
  description: Whether live files were hard-linked (same filesystem) rather than copied.
  type: bool
  returned: always
change_position:
  description:
    - Hot phase, Orthanc's change position read before the walk (the C(seq) of its last change), or
      null when Orthanc did not give it (then RV(change_position_error) says why).
  type: int
  returned: phase is hot
change_position_error:
  description: Hot phase, why the change position could not be read.
  type: str
  returned: phase is hot and the change position could not be read
seconds:
  description: Hot phase, how long it took.
  type: float
  returned: phase is hot
last_time:
  description:
    - Hot phase, what the previous backup's hot pass took (C(seconds), C(files), C(bytes)), from its
      manifest; older manifests give the whole backup's C(seconds) only (C(whole_backup) true).
  type: dict
  returned: phase is hot and the previous backup has a manifest
"""

import os

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.pacs.orthanc.plugins.module_utils import (
    _backupset, _layout, _progress, _record, _rest, _specs, _storage, _verify)
from ansible_collections.pacs.orthanc.plugins.module_utils._common import PacsError, run_module


def snapshot(module):
    p = module.params
    state_file = p["state_file"] or _layout.state_file(os.path.dirname(p["dest"].rstrip("/")))
    if not module.check_mode:
        os.makedirs(os.path.dirname(state_file), mode=0o700, exist_ok=True)
    common = dict(previous=p["previous"], link_mode=p["link_mode"], workers=p["workers"],
                  check_mode=module.check_mode)
    with _backupset.Heartbeat(p["dest"]):
        return _snapshot_phase(module, p, state_file, common)


def _snapshot_phase(module, p, state_file, common):
    if p["phase"] == "hot":
        last = _record.last_time(p["previous"], "hot pass")
        files, nbytes = p["expected_files"], p["expected_bytes"]
        if files is None and nbytes is None and last:
            files, nbytes = last.get("files"), last.get("bytes")
        position, position_error = change_position(p)  # before the walk begins
        with _progress.from_params(p["progress"], "hot pass", module.check_mode, files_total=files,
                                   bytes_total=nbytes, estimated=True) as progress:
            result = _storage.hot_pass(p["source"], p["dest"], state_file, settle=p["settle_seconds"],
                                       progress=progress, limit_rate=max(0, p["limit_rate"]) * 1024,
                                       change_position=position, **common)
        if position_error:
            result["change_position_error"] = position_error
        if last:
            result["last_time"] = last
        changed = result["files"] > 0
        _record.record_beside(p["dest"], "hot", result, module.check_mode)
    else:
        if p["dump"]:
            engine = _layout.dump_engine(p["dump"])
            # streamed from the dump into the state file (no dict of every file, issue 15), where
            # the completion check finds it again instead of reading the dump once more
            wanted = _verify.RecordedDump(engine, p["dump"], p["dump_container"])
        elif p["index"]:
            wanted = None  # SQLite compares the captured index with the state itself
        else:
            raise PacsError("copy storage (delta pass)", "the delta phase needs 'index' (the captured index file) "
                            "or 'dump' (a database dump)")
        missing: list = []
        result = _storage.delta_pass(p["source"], p["dest"], state_file, wanted, missing_out=missing,
                                     index=None if p["dump"] else p["index"], **common)
        changed = result["fetched_files"] > 0 or result["removed_files"] > 0
        if p["dump"]:
            # Orthanc ran on: what the dump lists and the storage lacks was deleted meanwhile
            result["deleted_during_capture"] = missing
            if missing:
                module.warn(f"{len(missing)} files that the dump lists were deleted from {p['source']} while it "
                            f"ran (e.g. {missing[0]}); the manifest names them")
        else:
            if result["missing_files"]:
                message = (f"{result['missing_files']} files that the index lists are missing from {p['source']} "
                           f"(e.g. {result['missing_examples'][0]}): the live archive is already damaged")
                if not p["missing_ok"]:
                    raise PacsError("copy storage (delta pass)", message, **result)
                module.warn(message)
        _record.record_beside(p["dest"], "delta", {
            "deleted_during_capture": result.get("deleted_during_capture") or [],
            "fetched_files": result.get("fetched_files"), "removed_files": result.get("removed_files")},
            module.check_mode)
    result.update({"changed": changed, "state_file": state_file})
    return result


def change_position(p) -> tuple:
    """(Orthanc's change position, None) or (None, why not): the ``Last`` of ``GET /changes?last``,
    the seq of the last change (Orthanc gives its sequence's value when the log is empty)."""
    try:
        answer = _rest.get(p["url"], "/changes?last", p["username"], p["password"], timeout=10)
        last = answer.get("Last") if isinstance(answer, dict) else None
        if isinstance(last, bool) or not isinstance(last, int):
            return None, f"{p['url']}/changes?last gave no position: {str(answer)[:200]}"
        return last, None
    except _rest.REQUEST_ERRORS as exc:  # any failure: the window compares everything
        return None, f"{p['url']}/changes?last: {_rest.failure(exc)}"


def main():
    module = AnsibleModule(
        argument_spec=dict(
            source=dict(type="path", required=True),
            dest=dict(type="path", required=True),
            phase=dict(type="str", choices=["hot", "delta"], required=True),
            index=dict(type="path"),
            dump=dict(type="path"),
            dump_container=dict(type="str"),
            previous=dict(type="path"),
            state_file=dict(type="path"),
            link_mode=dict(type="str", choices=["auto", "hardlink", "copy"], default="auto"),
            settle_seconds=dict(type="float", default=5),
            workers=dict(type="int", default=4),
            missing_ok=dict(type="bool", default=False),
            limit_rate=dict(type="int", default=0),
            expected_files=dict(type="int"),
            expected_bytes=dict(type="int"),
            **_rest.ARGUMENT_SPEC,
            **_specs.PROGRESS,
        ),
        required_if=[("phase", "delta", ("index", "dump"), True)],
        mutually_exclusive=[("index", "dump")],
        supports_check_mode=True,
    )
    run_module(module, snapshot)


if __name__ == "__main__":
    main()

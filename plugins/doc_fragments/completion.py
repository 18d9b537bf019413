# -*- coding: utf-8 -*-
# Copyright: pacs.orthanc contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations


class ModuleDocFragment:
    """How C(complete) checks a backup's storage against its index, on the managed host
    (backup_set) and on the backup server (backup_server); their argument spec is _specs.COMPLETION."""

    DOCUMENTATION = r"""
options:
  md5:
    description:
      - Storage files that C(complete) hashes against the MD5 in the index. C(new), files that are
        not hard links to the previous (already checked) backup; C(all), every file; C(none), sizes only.
      - On the managed host (M(pacs.orthanc.backup_set)), with C(new) or C(none) and a SQLite index,
        the check follows what changed. The index is compared with the backup's storage state in
        SQL (every attachment placed with its size; orphans) and only the files placed new are
        statted and hashed on disk (manifest C(verification.storage_check=changed)). C(all), a
        database dump and a backup without a state database check every file the index lists on
        disk (C(storage_check=all)). The backup server always checks every file.
      - The index copy gets C(PRAGMA quick_check) in the check of what changed (a third of the CPU
        of the full C(PRAGMA integrity_check), which also compares every table's indexes with its
        rows), recorded as manifest C(verification.index_integrity=quick_check), and the next
        M(pacs.orthanc.backup_verify) of that backup (restore, drill) and the backup server's
        check then run the full C(integrity_check). With C(all) (and everywhere else) the full
        C(integrity_check) runs at once (C(index_integrity=integrity_check)), and a later
        verification of the same index (its SHA-256 unchanged) skips it.
    type: str
    choices: [new, all, none]
    default: new
  workers:
    description: Parallel readers for hashing.
    type: int
    default: 2
"""

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
      - The index copy gets the full C(PRAGMA integrity_check) (manifest
        C(verification.index_integrity=integrity_check)), and a later verification of the same
        index (its SHA-256 unchanged) skips it. On the managed host, M(pacs.orthanc.backup_set)'s
        O(pacs.orthanc.backup_set#module:index_check=quick) runs only C(PRAGMA quick_check) in the
        check of what changed (recorded as C(index_integrity=quick_check)), and the next
        M(pacs.orthanc.backup_verify) of that backup and the backup server's check then run the
        full check.
    type: str
    choices: [new, all, none]
    default: new
  workers:
    description: Parallel readers for hashing.
    type: int
    default: 2
"""

# -*- coding: utf-8 -*-
# Copyright: pacs.orthanc contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The name of one restore: its journal and its set-aside folders are named by it."""

from __future__ import annotations

DOCUMENTATION = r"""
name: restore_id
short_description: A name for one restore, unique on its host
version_added: 0.3.0
description:
  - Returns C(<UTC second>-<key>-<random>), for instance C(20261130T054100Z-3f2a9c1e-7b04d2). The
    restore's journal C(/var/tmp/pacs-orthanc-restore-<id>.json) and its set-aside folders
    C(<path>.pre-restore-<id>) are named by it.
  - The second alone (the name up to version 0.2.0) is not unique, the journal folder is shared by
    every Orthanc of a host, and two restores started in the same second shared one journal. C(key)
    is the first 8 hex digits of the SHA-256 of the input (the Orthanc's identity, for instance its
    configuration path and URL), and six random hex digits tell apart two restores of the same Orthanc
    in the same second.
  - Journals named by the second alone stay readable, M(pacs.orthanc.backup_restore) takes any
    restore id.
positional: _input
options:
  _input:
    description: What tells this Orthanc from the others of its host (any text, or a list of them).
    type: raw
    required: true
"""

EXAMPLES = r"""
- name: Name this restore
  ansible.builtin.set_fact:
    restore_id: "{{ [inventory_hostname, orthanc_config_path, orthanc_url] | pacs.orthanc.restore_id }}"
"""

RETURN = r"""
_value:
  description: The restore id, letters, digits and C(-).
  type: str
"""

import datetime
import hashlib
import secrets


def restore_id(identity, now=None) -> str:
    parts = identity if isinstance(identity, (list, tuple)) else [identity]
    key = hashlib.sha256("\0".join(str(part) for part in parts).encode("utf-8")).hexdigest()[:8]
    second = (now or datetime.datetime.now(datetime.timezone.utc)).strftime("%Y%m%dT%H%M%SZ")
    return f"{second}-{key}-{secrets.token_hex(3)}"


class FilterModule:
    def filters(self):
        return {"restore_id": restore_id}

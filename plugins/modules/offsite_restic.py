#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: pacs.orthanc contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: offsite_restic
short_description: Ship a complete Orthanc backup to a restic repository as one snapshot
version_added: 0.2.0
description:
  - Runs on the managed host. Makes one restic snapshot of the complete local backup O(source),
    run from inside that folder (C(restic backup .)), with the stable host name O(host), the tags
    C(pacs.orthanc), C(host:<host>), C(orthanc:<Orthanc's name>), C(backup:<timestamp>) and
    C(strategy:<strategy>), C(--ignore-ctime) (hard links change a file's ctime) and this host's
    newest snapshot as C(--parent), so that a nightly run reads and uploads only what changed.
  - When this host already has a snapshot tagged with this backup's timestamp that holds every file
    of the backup with its size, nothing is done.
  - The repository reaches restic through C(RESTIC_REPOSITORY) and the password through
    C(RESTIC_PASSWORD_FILE), naming O(password_file) or a private 0600 temporary file holding
    O(password), removed at the end. Neither is ever on a command line. O(environment) (back-end credentials)
    is passed in restic's environment; values of secret-looking names are masked in the result.
  - A repository is initialised only with O(init). A wrong password, a repository that does not
    exist, or one that cannot be reached each give their own message; restic's exit codes decide.
  - The local backup is only read.
options:
  source:
    description: The complete local backup to ship (a timestamp folder holding C(manifest.json)).
    type: path
    required: true
  host:
    description: The host name the snapshot carries (C(--host)), the inventory name.
    type: str
    required: true
  repository:
    description: The restic repository, a local path or C(rest:), C(sftp:), C(s3:) ... location.
    type: str
    required: true
  password_file:
    description: A file on the managed host holding the repository's password. One of this and O(password).
    type: path
  password:
    description: The repository's password (from AWX). One of this and O(password_file).
    type: str
  environment:
    description: Environment variables for restic, such as a back end's credentials (C(AWS_ACCESS_KEY_ID), ...).
    type: dict
    default: {}
  init:
    description: Initialise the repository when there is none at O(repository).
    type: bool
    default: false
  limit_upload:
    description: Upload limit in KiB/s (restic C(--limit-upload)); 0 is none.
    type: int
    default: 0
  restic:
    description: The restic program.
    type: str
    default: restic
attributes:
  check_mode:
    support: full
    description: Opens the repository and lists its snapshots; uploads nothing, initialises nothing.
extends_documentation_fragment:
  - pacs.orthanc.progress
author:
  - pacs.orthanc developers (@pacs-orthanc)
"""

EXAMPLES = r"""
- name: Ship the newest backup off site
  pacs.orthanc.offsite_restic:
    source: /var/backups/orthanc/20261129T070000Z
    host: "{{ inventory_hostname }}"
    repository: rest:https://backup.example.org:8000/pacs-1/
    password_file: /etc/orthanc-backup/restic-password
    limit_upload: 20000
  register: offsite
"""

RETURN = r"""
snapshot_id:
  description: The snapshot of this backup (null in check mode when it would be made).
  type: str
  returned: always
parent:
  description: The snapshot used as parent, or null for the host's first.
  type: str
  returned: always
already_shipped:
  description: Whether the repository already held a snapshot of this backup (nothing was done).
  type: bool
  returned: always
initialised:
  description: Whether the repository was initialised by this run.
  type: bool
  returned: always
repository:
  description: The repository, without a password in its URL.
  type: str
  returned: always
tags:
  description: The snapshot's tags.
  type: list
  elements: str
  returned: always
data_added:
  description: Bytes restic added to the repository (after deduplication and compression).
  type: int
  returned: when a snapshot was made
files_new:
  description: Files new since the parent.
  type: int
  returned: when a snapshot was made
files_changed:
  description: Files changed since the parent.
  type: int
  returned: when a snapshot was made
files_unmodified:
  description: Files unchanged since the parent (not read again).
  type: int
  returned: when a snapshot was made
seconds:
  description: Time the backup took.
  type: float
  returned: when a snapshot was made
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.pacs.orthanc.plugins.module_utils import _progress, _restic, _specs
from ansible_collections.pacs.orthanc.plugins.module_utils._common import PacsError, run_module


def act(module):
    p = module.params
    secret = _restic.url_secret(p["repository"] or "")
    if secret:
        module.no_log_values.add(secret)
    if not module.get_bin_path(p["restic"]):
        raise PacsError("find restic", f"{p['restic']} is not installed on this host (Debian package restic)")
    repo = _restic.Repository(p["repository"], p["password_file"], p["password"], p["environment"],
                              restic=p["restic"], limit_upload=p["limit_upload"])
    with repo, _progress.from_params(p["progress"], "off-site upload", module.check_mode) as progress:
        return _restic.ship(p["source"], p["host"], repo, init=p["init"], check_mode=module.check_mode,
                            progress=progress)


def main():
    module = AnsibleModule(
        argument_spec=dict(
            source=dict(type="path", required=True),
            host=dict(type="str", required=True),
            repository=dict(type="str", required=True),
            password_file=dict(type="path", no_log=False),
            password=dict(type="str", no_log=True),
            environment=dict(type="dict", default={}),
            init=dict(type="bool", default=False),
            limit_upload=dict(type="int", default=0),
            restic=dict(type="str", default="restic"),
            **_specs.PROGRESS,
        ),
        mutually_exclusive=[["password_file", "password"]],
        required_one_of=[["password_file", "password"]],
        supports_check_mode=True,
    )
    run_module(module, act)


if __name__ == "__main__":
    main()

#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: pacs.orthanc contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: offsite_restic
short_description: Ship Orthanc backups to a restic repository, fetch them back, and maintain the repository
version_added: 0.2.0
description:
  - Runs on the managed host (or, for maintenance, on the maintenance host). Every restic command gets
    the repository through C(RESTIC_REPOSITORY) and the password through C(RESTIC_PASSWORD_FILE), naming
    O(password_file) or a private 0600 temporary file holding O(password), removed at the end. Neither is
    ever on a command line. O(environment) (back-end credentials) is passed in restic's environment;
    values of secret-looking names are masked in the result. A wrong password, a repository that does
    not exist, or one that cannot be reached each give their own message; restic's exit codes decide.
  - C(state=shipped) makes one restic snapshot of the complete local backup O(source), run from inside
    that folder (C(restic backup .)), with the stable host name O(host), the tags C(pacs.orthanc),
    C(host:<host>), C(orthanc:<Orthanc's name>), C(backup:<timestamp>), C(strategy:<strategy>), and
    C(pre-upgrade) when the manifest has the key C(pre_upgrade), C(--ignore-ctime) (hard links change a
    file's ctime) and this host's newest snapshot as C(--parent), so that a nightly run reads and uploads
    only what changed. When this host already has a snapshot tagged with this backup's timestamp that
    holds every file of the backup with its size, nothing is done. A repository is initialised only
    with O(init). The local backup is only read.
  - C(state=fetched) restores the snapshot O(backup) names (C(latest), the newest of O(host); a backup
    timestamp, O(host)'s snapshot of it; or a snapshot id of any host) into
    C(<dest>/<snapshot's host>/<timestamp>/), a private folder, through C(<timestamp>.fetching/) renamed
    only once every file of the snapshot is there with its size. This is the one place a restore, a
    drill or a point restore gets an off-site backup from. A folder already holding the snapshot is kept.
  - C(state=listed) lists the pacs.orthanc snapshots of O(host) (of every host without it) and the
    newest one's age.
  - C(state=forgotten) applies retention to every host's snapshots (grouped by host, C(--keep-last) at
    least 1, C(--keep-tag) O(keep_tags)) and prunes, after C(restic unlock) of stale locks. It needs the
    administrator's credentials (an append-only back end refuses it).
  - C(state=checked) runs C(restic check --read-data-subset=n/N) with N = O(read_days), reading the
    slices due since the last run (one per day, continuing where the last run stopped, so every byte is read once
    per O(read_days) days), the position kept in a state file in O(state_dir).
options:
  state:
    description: What to do.
    type: str
    choices: [shipped, fetched, listed, forgotten, checked]
    default: shipped
  source:
    description: C(shipped) only, the complete local backup to ship (a timestamp folder holding C(manifest.json)).
    type: path
  host:
    description:
      - The host name the snapshots carry (C(--host)), the inventory name. Required for C(shipped) and C(fetched).
    type: str
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
    description: C(shipped) only, initialise the repository when there is none at O(repository).
    type: bool
    default: false
  limit_upload:
    description: C(shipped) only, upload limit in KiB/s (restic C(--limit-upload)); 0 is none.
    type: int
    default: 0
  backup:
    description: C(fetched) only, which snapshot, C(latest), a backup timestamp or a snapshot id (or a prefix of it).
    type: str
    default: latest
  dest:
    description: C(fetched) only, the folder the snapshot is restored under (made private, mode 0700).
    type: path
    default: /var/tmp/pacs-orthanc-fetch
  keep_last:
    description: C(forgotten) only, the newest snapshots kept per host (at least 1).
    type: int
    default: 3
  keep_daily:
    description: C(forgotten) only, days kept per host (the newest snapshot of each); 0 for none.
    type: int
    default: 7
  keep_weekly:
    description: C(forgotten) only, weeks kept per host; 0 for none.
    type: int
    default: 4
  keep_monthly:
    description: C(forgotten) only, months kept per host; 0 for none.
    type: int
    default: 6
  keep_tags:
    description: C(forgotten) only, snapshots with any of these tags are always kept.
    type: list
    elements: str
    default: [pre-upgrade]
  prune:
    description: C(forgotten) only, remove the data no snapshot uses any more (C(--prune)).
    type: bool
    default: true
  read_days:
    description: C(checked) only, every byte of the repository is read once in this many daily runs.
    type: int
    default: 30
  state_dir:
    description: C(checked) only, where the rotation's position is kept (one file per repository).
    type: path
    default: /var/lib/pacs-orthanc
  restic:
    description: The restic program.
    type: str
    default: restic
attributes:
  check_mode:
    support: full
    description:
      - C(shipped) opens the repository and lists its snapshots; uploads nothing, initialises nothing.
        C(fetched) finds the snapshot and lists its files; restores nothing. C(forgotten) runs
        C(restic forget --dry-run) (no prune). C(checked) says which slices it would read.
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

- name: Fetch the newest off-site snapshot of this host into a staging folder
  pacs.orthanc.offsite_restic:
    state: fetched
    host: "{{ inventory_hostname }}"
    backup: latest
    dest: /var/tmp/pacs-orthanc-fetch
    repository: rest:https://backup.example.org:8000/pacs-1/
    password_file: /etc/orthanc-backup/restic-password
  register: fetched  # fetched.path is the backup folder

- name: Apply retention with the administrator's credentials (maintenance host)
  pacs.orthanc.offsite_restic:
    state: forgotten
    repository: /srv/restic/pacs
    password_file: /root/restic-password
"""

RETURN = r"""
snapshot_id:
  description: The snapshot of this backup (null in check mode when it would be made), or the one fetched.
  type: str
  returned: when state is shipped or fetched
parent:
  description: The snapshot used as parent, or null for the host's first.
  type: str
  returned: when state is shipped
already_shipped:
  description: Whether the repository already held a snapshot of this backup (nothing was done).
  type: bool
  returned: when state is shipped
initialised:
  description: Whether the repository was initialised by this run.
  type: bool
  returned: when state is shipped
path:
  description: The fetched backup folder (C(<dest>/<host>/<timestamp>)).
  type: str
  returned: when state is fetched
name:
  description: The timestamp of the backup the snapshot holds.
  type: str
  returned: when state is shipped or fetched
snapshot_time:
  description: When the fetched snapshot was made (restic's time).
  type: str
  returned: when state is fetched
already_fetched:
  description: Whether the folder already held the snapshot (nothing was restored).
  type: bool
  returned: when state is fetched
snapshots:
  description: The snapshots, oldest first (id, short_id, time, hostname, tags).
  type: list
  elements: dict
  returned: when state is listed
newest:
  description: The newest snapshot (id, short_id, time, age_seconds, backup, hostname), or an empty dict.
  type: dict
  returned: when state is listed
hosts:
  description: Per host, the short ids kept and removed.
  type: dict
  returned: when state is forgotten
removed:
  description: Snapshots removed (or, in check mode, that would be).
  type: int
  returned: when state is forgotten
slices:
  description: The data slices read (n of N, N = read_days), or due in check mode.
  type: list
  elements: int
  returned: when state is checked
state_file:
  description: The file keeping the rotation's position.
  type: str
  returned: when state is checked
repository:
  description: The repository, without a password in its URL.
  type: str
  returned: always
tags:
  description: The snapshot's tags.
  type: list
  elements: str
  returned: when state is shipped or fetched
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
    state = p["state"]
    if not module.get_bin_path(p["restic"]):
        raise PacsError("find restic", f"{p['restic']} is not installed on this host (Debian package restic)")
    repo = _restic.Repository(p["repository"], p["password_file"], p["password"], p["environment"],
                              restic=p["restic"], limit_upload=p["limit_upload"])
    with repo:
        if state == "shipped":
            with _progress.from_params(p["progress"], "off-site upload", module.check_mode) as progress:
                return _restic.ship(p["source"], p["host"], repo, init=p["init"], check_mode=module.check_mode,
                                    progress=progress)
        if state == "fetched":
            return _restic.fetch(repo, p["host"], p["backup"], p["dest"], check_mode=module.check_mode)
        if state == "forgotten":
            return _restic.forget(repo, p["keep_last"], p["keep_daily"], p["keep_weekly"], p["keep_monthly"],
                                  p["keep_tags"], p["prune"], check_mode=module.check_mode)
        if state == "checked":
            return _restic.check(repo, p["state_dir"], p["read_days"], check_mode=module.check_mode)
        found = repo.snapshots(p["host"] or None)
        return {"changed": False, "repository": repo.shown(), "newest": _restic.newest(found),
                "snapshots": [{"id": s.get("id"), "short_id": s.get("short_id"), "time": s.get("time"),
                               "hostname": s.get("hostname"), "tags": s.get("tags") or []} for s in found]}


def main():
    module = AnsibleModule(
        argument_spec=dict(
            state=dict(type="str", choices=["shipped", "fetched", "listed", "forgotten", "checked"],
                       default="shipped"),
            source=dict(type="path"),
            host=dict(type="str"),
            repository=dict(type="str", required=True),
            password_file=dict(type="path", no_log=False),
            password=dict(type="str", no_log=True),
            environment=dict(type="dict", default={}),
            init=dict(type="bool", default=False),
            limit_upload=dict(type="int", default=0),
            backup=dict(type="str", default="latest"),
            dest=dict(type="path", default="/var/tmp/pacs-orthanc-fetch"),
            keep_last=dict(type="int", default=3),
            keep_daily=dict(type="int", default=7),
            keep_weekly=dict(type="int", default=4),
            keep_monthly=dict(type="int", default=6),
            keep_tags=dict(type="list", elements="str", default=["pre-upgrade"]),
            prune=dict(type="bool", default=True),
            read_days=dict(type="int", default=30),
            state_dir=dict(type="path", default="/var/lib/pacs-orthanc"),
            restic=dict(type="str", default="restic"),
            **_specs.PROGRESS,
        ),
        mutually_exclusive=[["password_file", "password"]],
        required_if=[("state", "shipped", ["source", "host"]), ("state", "fetched", ["host"])],
        required_one_of=[["password_file", "password"]],
        supports_check_mode=True,
    )
    run_module(module, act)


if __name__ == "__main__":
    main()

#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: pacs.orthanc contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: backup_ship
short_description: Push a complete Orthanc backup to a backup server with rsync over SSH
version_added: 0.1.0
description:
  - C(transfer) runs on the managed host and pushes the complete local backup O(source) into
    O(dest), a C(.incomplete) folder on the backup server made by M(pacs.orthanc.backup_server)
    (C(state=prepare)). Unchanged files become hard links to the host's previous backup on the
    server (rsync C(--link-dest)).
  - Storage files are compared by name and size only (Orthanc never changes a stored file), so a
    file copied anew locally still becomes a hard link on the server; the configuration, the
    index and the manifest are compared by size and time, the manifest going last.
  - The bytes actually sent are counted from C(rsync --stats).
  - SSH runs with C(BatchMode=yes) (no prompt, no password) and the given key; nothing secret is
    put on a command line.
  - C(fetched) pulls the complete backup O(remote) (a path on the server, as
    M(pacs.orthanc.backup_server) C(state=found) names it) back into C(<dest>/<name>/) on the managed
    host, a private folder, through C(<name>.fetching/) renamed only once the copy holds its manifest
    (the restore role verifies it next, as any backup). The server is only read.
  - C(remove_local) removes the local backup O(name) from O(root) once it is on the server (the
    role C(pacs.orthanc.ship) does it when C(orthanc_backup_keep) is 0); C(latest) goes too when
    it names it, so the next local backup is a full one.
options:
  state:
    description: What to do.
    type: str
    choices: [transfer, fetched, remove_local]
    default: transfer
  source:
    description: The complete local backup to send (a folder holding C(manifest.json)). Required for C(transfer).
    type: path
  server:
    description: Address of the backup server, as SSH reaches it from the managed host. Required for C(transfer) and C(fetched).
    type: str
  dest:
    description:
      - C(transfer), the C(.incomplete) folder on the server to write into. C(fetched), the local folder the
        backup is fetched under (made private). Required for both.
    type: str
  remote:
    description: C(fetched), the complete backup's folder on the server.
    type: str
  previous:
    description: Name of the host's newest complete backup on the server, beside O(dest), to link unchanged files to.
    type: str
  port:
    description: SSH port of the backup server.
    type: int
    default: 22
  user:
    description: SSH user on the backup server.
    type: str
    default: root
  ssh_key:
    description: Private key file on the managed host for the transfer (without passphrase, or held by an agent).
    type: path
  known_hosts:
    description: Known hosts file that holds the server's host key (default, the user's own).
    type: path
  strict_host_key_checking:
    description: SSH's C(StrictHostKeyChecking) for the transfer.
    type: str
    choices: ['yes', accept-new, 'no']
    default: 'yes'
  bwlimit:
    description: Bandwidth limit of the transfer in KiB/s (rsync C(--bwlimit)); 0 is none.
    type: int
    default: 0
  io_timeout:
    description: Seconds without any data moving after which rsync gives up (rsync C(--timeout)).
    type: int
    default: 300
  connect_timeout:
    description: Seconds to wait for the SSH connection.
    type: int
    default: 30
  root:
    description: The local backup root. Required for C(remove_local).
    type: path
  name:
    description: The backup's name. Required for C(remove_local) and C(fetched).
    type: str
  max_parallel:
    description:
      - C(transfer), at most this many transfers into the server at once, from any host, play or
        controller. Before rsync starts, the transfer takes one of that many slots on the server
        (an C(flock) on a file of C(<server root>/.slots/), the server root being the parent of the
        host's folder above O(dest)), through its own SSH connection (C(python3) on the server,
        as the SSH user). The slot is held until the module and its rsync processes have ended,
        however they end. While every slot is taken it waits, saying who holds them (O(progress)).
      - C(0) takes no slot (no bound).
    type: int
    default: 0
  slot_timeout:
    description: C(transfer), seconds to wait for a free slot before failing, naming who holds them.
    type: int
    default: 86400
attributes:
  check_mode:
    support: full
    description: Sends and removes nothing; says it would.
extends_documentation_fragment:
  - pacs.orthanc.progress
author:
  - pacs.orthanc developers (@pacs-orthanc)
"""

EXAMPLES = r"""
- name: Send the newest backup
  pacs.orthanc.backup_ship:
    source: /var/backups/orthanc/20261129T070000Z
    server: backup.example.org
    dest: /srv/orthanc-backups/pacs-1/20261129T070000Z.incomplete
    previous: 20261128T070000Z
    user: orthanc-backup
    ssh_key: /root/.ssh/orthanc_backup
    bwlimit: 20000
  register: shipped
"""

RETURN = r"""
bytes_sent:
  description: Bytes rsync sent over the network (both passes), from C(rsync --stats).
  type: int
  returned: transfer
  sample: 1048576
stats:
  description:
    - Totals of C(rsync --stats) over both passes, bytes_sent, bytes_received, literal_bytes,
      matched_bytes, file_bytes, transferred_file_bytes, files_transferred, files.
  type: dict
  returned: transfer
remote:
  description: Where the backup was sent, C(server:dest).
  type: str
  returned: transfer
slot:
  description: The slot the transfer held on the server (from 0), or null without O(max_parallel).
  type: int
  returned: transfer
slot_wait_seconds:
  description: Time spent waiting for a free slot on the server.
  type: float
  returned: transfer
seconds:
  description: Time the transfer took (after its slot was taken).
  type: float
  returned: transfer
started_at:
  description: When the transfer started, once its slot was taken (UTC, measured on the managed host).
  type: str
  returned: transfer
ended_at:
  description: When the transfer ended, before its slot was released (UTC, measured on the managed host).
  type: str
  returned: transfer
removed:
  description: The local backup folder removed, or null.
  type: str
  returned: remove_local
"""

import os

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.pacs.orthanc.plugins.module_utils import _progress, _ship, _specs
from ansible_collections.pacs.orthanc.plugins.module_utils._common import PacsError, run_module


def act(module):
    p = module.params
    if p["state"] == "remove_local":
        if not (p["root"] and p["name"]):
            raise PacsError("remove the local copy", "state=remove_local needs 'root' and 'name'")
        return _ship.remove_local(p["root"], p["name"], module.check_mode)
    if p["state"] == "fetched":
        missing = [key for key in ("server", "remote", "name", "dest") if not p[key]]
        if missing:
            raise PacsError("fetch the backup from the server", f"state=fetched needs '{missing[0]}'")
        if not module.check_mode:
            module.get_bin_path("rsync", required=True)
            module.get_bin_path("ssh", required=True)
        return _ship.fetch(p["server"], p["remote"], p["name"], p["dest"], p["port"], p["user"], p["ssh_key"],
                           p["known_hosts"], p["strict_host_key_checking"], p["bwlimit"], p["io_timeout"],
                           p["connect_timeout"], check_mode=module.check_mode)
    for key in ("source", "server", "dest"):
        if not p[key]:
            raise PacsError("send the backup to the server", f"state=transfer needs '{key}'")
    if module.check_mode:
        return {"changed": True, "bytes_sent": 0, "stats": {}, "remote": f"{p['server']}:{p['dest']}", "seconds": 0.0}
    module.get_bin_path("rsync", required=True)
    module.get_bin_path("ssh", required=True)
    who = {"host": (p["progress"] or {}).get("host") or os.uname().nodename,
           "backup": os.path.basename(os.path.normpath(p["source"]))}
    with _progress.from_params(p["progress"], "shipping") as progress:
        return _ship.transfer(p["source"], p["server"], p["dest"], p["previous"], p["port"], p["user"],
                              p["ssh_key"], p["known_hosts"], p["strict_host_key_checking"], p["bwlimit"],
                              p["io_timeout"], p["connect_timeout"], progress=progress if p["progress"] else None,
                              max_parallel=p["max_parallel"], slot_timeout=p["slot_timeout"], who=who)


def main():
    module = AnsibleModule(
        argument_spec=dict(
            state=dict(type="str", choices=["transfer", "fetched", "remove_local"], default="transfer"),
            source=dict(type="path"),
            server=dict(type="str"),
            dest=dict(type="str"),
            remote=dict(type="str"),
            previous=dict(type="str"),
            port=dict(type="int", default=22),
            user=dict(type="str", default="root"),
            ssh_key=dict(type="path", no_log=False),
            known_hosts=dict(type="path"),
            strict_host_key_checking=dict(type="str", choices=["yes", "accept-new", "no"], default="yes"),
            bwlimit=dict(type="int", default=0),
            io_timeout=dict(type="int", default=300),
            connect_timeout=dict(type="int", default=30),
            root=dict(type="path"),
            name=dict(type="str"),
            max_parallel=dict(type="int", default=0),
            slot_timeout=dict(type="int", default=86400),
            **_specs.PROGRESS,
        ),
        supports_check_mode=True,
    )
    run_module(module, act)


if __name__ == "__main__":
    main()

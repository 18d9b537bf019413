#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: pacs.orthanc contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: db_dump
short_description: Dump Orthanc's PostgreSQL or MySQL/MariaDB database hot, with the engine's own tool
version_added: 0.2.0
description:
  - Dumps the database that Orthanc's configuration names (its C(PostgreSQL) or C(MySQL) section,
    C(ConnectionUri) included), while Orthanc keeps running. Options given here override the
    configuration's values.
  - "PostgreSQL: C(pg_dump), custom format by default (one file, compressed), or the directory format
    with O(jobs) parallel jobs. Large objects (Orthanc's files when C(EnableStorage) is true) are included."
  - "MySQL/MariaDB: C(mysqldump --single-transaction --routines --triggers --hex-blob): one consistent
    snapshot, with the stored procedures and triggers without which Orthanc's MySQL index cannot
    store anything."
  - The password reaches the tool only through a private 0600 file (C(PGPASSFILE), or MySQL's
    C(--defaults-extra-file)) that is removed afterwards; it is never on a command line, in the
    result or in a log.
  - With O(container) (or O(compose_project)), the database container's own C(pg_dump) or C(mysqldump)
    dumps it (C(exec -i)), so the tool's version is the server's; the dump comes back on its standard
    output (PostgreSQL custom format only).
  - The dump is written as O(dest)C(.part) and renamed to O(dest) only when the tool succeeded and
    the dump reads back (C(pg_restore --list) reads it and it holds Orthanc's tables; a MySQL dump
    ends with C(-- Dump completed)). A failed dump leaves nothing behind.
options:
  dest:
    description: The dump to write (a file; a folder for the PostgreSQL directory format). Must not exist.
    type: path
    required: true
  format:
    description: PostgreSQL dump format. MySQL dumps are always SQL text.
    type: str
    choices: [custom, directory]
    default: custom
  jobs:
    description: Parallel jobs of C(pg_dump) with the directory format.
    type: int
    default: 1
  compression:
    description:
      - "PostgreSQL: C(pg_dump)'s compression level (C(-Z)), V(0) (none) to V(9). The default V(1)
        is about three times faster than C(pg_dump)'s own default (6) on Orthanc's index, for a dump
        about 7% larger (at 1,000,000 instances: 7.1 s and 185 MB against 21.4 s and 173 MB)."
      - MySQL/MariaDB dumps are plain SQL; this option does not apply to them.
    type: int
    default: 1
  expected_bytes:
    description: The size the dump is expected to reach (an estimate), the total of the progress reports.
    type: int
attributes:
  check_mode:
    support: full
    description: Connects and reports the server's version; writes nothing.
extends_documentation_fragment:
  - pacs.orthanc.database
  - pacs.orthanc.progress
author:
  - pacs.orthanc developers (@pacs-orthanc)
"""

EXAMPLES = r"""
- name: Dump the database that Orthanc uses
  pacs.orthanc.db_dump:
    config_path: /etc/orthanc
    dest: /var/backups/orthanc-db/orthanc.pgdump
  register: dump

- name: A large PostgreSQL database, in parallel
  pacs.orthanc.db_dump:
    config_path: /etc/orthanc
    format: directory
    jobs: 4
    dest: /var/backups/orthanc-db/orthanc.pgdir

- name: The smallest custom-format dump, at the cost of compression time
  pacs.orthanc.db_dump:
    config_path: /etc/orthanc
    compression: 9
    dest: /var/backups/orthanc-db/orthanc.pgdump

- name: Another database than the configuration's, password from a vault
  pacs.orthanc.db_dump:
    engine: mysql
    database: orthanc_db
    username: backup
    password: "{{ vault_orthanc_db_backup_password }}"
    dest: /var/backups/orthanc-db/orthanc.sql
- name: PostgreSQL in its own container, dumped with that container's pg_dump
  pacs.orthanc.db_dump:
    config_path: /srv/pacs/orthanc.json
    container: pacs-db-1
    dest: /var/backups/orthanc-db/orthanc.pgdump
- name: The database service that the configuration's host names, in a compose project
  pacs.orthanc.db_dump:
    config_path: /srv/pacs/orthanc.json
    compose_project: pacs
    container_engine: podman
    dest: /var/backups/orthanc-db/orthanc.pgdump
"""

RETURN = r"""
path:
  description: The dump.
  type: str
  returned: success, not in check mode
engine:
  description: C(postgresql) or C(mysql).
  type: str
  returned: always
format:
  description: C(custom), C(directory) or C(sql).
  type: str
  returned: success, not in check mode
bytes:
  description: Size of the dump (all files of a directory dump).
  type: int
  returned: success, not in check mode
sha256:
  description: SHA-256 of the dump file (of its file list with their SHA-256s for a directory dump).
  type: str
  returned: success, not in check mode
duration_seconds:
  description: Seconds from connecting to the dump being in place, its check included.
  type: float
  returned: success, not in check mode
dump_seconds:
  description: Seconds the dump tool itself ran.
  type: float
  returned: success, not in check mode
server_version:
  description: The database server's version.
  type: str
  returned: always
  sample: 15.18 (Debian 15.18-0+deb12u1)
tool_version:
  description: The dump tool's version.
  type: str
  returned: success, not in check mode
connection:
  description: The connection used, without the password.
  type: dict
  returned: always
  sample: {"engine": "postgresql", "host": "db1", "port": 5432, "database": "orthanc", "username": "orthanc", "password_set": true}
check:
  description: What the read-back found (tables and large objects; or that the MySQL dump is complete).
  type: dict
  returned: success, not in check mode
container:
  description: The database container whose tool made the dump, or null (the host's tool).
  type: str
  returned: success, not in check mode
files:
  description: Directory format, each file of the dump and its SHA-256.
  type: dict
  returned: format is directory
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.pacs.orthanc.plugins.module_utils import _backupset, _progress, _record, _specs
from ansible_collections.pacs.orthanc.plugins.module_utils._db import (
    client as db_client, connection as db_connection, container as db_container, dump as db_dump)
from ansible_collections.pacs.orthanc.plugins.module_utils._common import run_module


def run(module):
    p = module.params
    db_dump.check_compression(p["compression"])  # in check mode too
    conn = db_connection.from_config(p["config_path"], p["environment"], p["engine"],
                                     {k: p[k] for k in db_connection.CONNECTION_KEYS})
    conn, where = db_container.from_params(conn, p)
    if module.check_mode:
        with db_client.Client(conn, p["bin_dir"], "dump the database", container=where) as client:
            client.tool("pg_dump" if conn["engine"] == "postgresql" else "mysqldump")
            version = client.server_version()
        return {"changed": True, "engine": conn["engine"], "server_version": version,
                "connection": db_connection.public(conn)}
    with _backupset.Heartbeat(p["dest"]), _progress.from_params(
            p["progress"], "dump", bytes_total=p["expected_bytes"] or None, estimated=True) as progress:
        with _progress.Watch(progress, p["dest"] + db_dump.PART, p["dest"]):  # the bytes written so far
            result = db_dump.dump(conn, p["dest"], p["format"], p["jobs"], p["bin_dir"], p["timeout"], container=where,
                                  compression=p["compression"])
    _record.record_beside(p["dest"], "dump", result)
    result["changed"] = True
    return result


def main():
    module = AnsibleModule(
        argument_spec=dict(
            **db_connection.CONNECTION_SPEC,
            dest=dict(type="path", required=True),
            format=dict(type="str", choices=["custom", "directory"], default="custom"),
            jobs=dict(type="int", default=1),
            compression=dict(type="int", default=db_dump.DEFAULT_COMPRESSION),
            expected_bytes=dict(type="int"),
            **_specs.PROGRESS,
        ),
        required_one_of=[("config_path", "engine")],
        supports_check_mode=True,
    )
    run_module(module, run)


if __name__ == "__main__":
    main()

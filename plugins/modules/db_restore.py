#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: pacs.orthanc contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: db_restore
short_description: Restore a dump of Orthanc's PostgreSQL or MySQL/MariaDB database so that Orthanc can write to it
version_added: 0.2.0
description:
  - Restores a dump made by M(pacs.orthanc.db_dump) into the database that Orthanc's configuration
    names (or the one given here), creating it when it does not exist.
  - "MySQL/MariaDB: the database is created with C(utf8mb4) and C(utf8mb4_unicode_ci), without which
    Orthanc's stored procedures fail with C(Illegal mix of collations); the owner is granted all
    privileges on it. PostgreSQL: the database is created owned by O(owner), and the dump is
    restored with C(--no-owner --role=OWNER) in one transaction, so everything belongs to the user
    that Orthanc connects as."
  - A database that holds tables is refused unless O(replace) is true; then it is dropped and
    created again. Stop Orthanc first.
  - Returns the patient, study, series and instance counts read from the restored database.
  - Passwords reach the tools only through private 0600 files, never a command line, a result or a log.
options:
  dump:
    description: The dump (a C(.pgdump) file, a C(.pgdir) folder or a C(.sql) file), or a backup folder holding C(database/).
    type: path
    required: true
  owner:
    description: Role (PostgreSQL) or user (MySQL) that owns the restored database. Default, the connection's user.
    type: str
  admin_username:
    description:
      - User that creates, drops and fills the database. Default, the connection's user; with
        O(admin_unix_socket) alone (MySQL), the account this module runs as.
      - "PostgreSQL: C(CREATEDB) for a missing database. A member of O(owner)'s role (or a superuser)
        creates it C(OWNER) O(owner) and restores with C(--role); a C(CREATEDB) role that is not a member
        creates it as its own, grants it to O(owner) (C(ALL ON DATABASE), C(ALL ON SCHEMA public)), and
        O(owner) restores the dump itself with the connection's credentials, so every object is the
        owner's. Dropping (O(replace)) needs membership in the database owner's role. An existing empty
        database needs C(CONNECT, CREATE) on it and C(USAGE, CREATE) on C(public) for O(owner)."
      - "MySQL/MariaDB: on the database C(SELECT, INSERT, CREATE, DROP, ALTER, INDEX, REFERENCES,
        LOCK TABLES, TRIGGER, CREATE ROUTINE, ALTER ROUTINE, EXECUTE); when it is not O(owner), all of the
        database's privileges C(WITH GRANT OPTION) and C(SELECT) on C(mysql.user); C(SET USER) (or C(SUPER))
        when the dump's triggers and procedures have another definer; C(SUPER) when binary logging is on
        and C(log_bin_trust_function_creators) is off."
      - Every one of these is checked first, in check mode too; a missing one fails before anything
        changes, with the C(GRANT) or C(ALTER) statement to run.
      - With O(container) (or O(compose_project)), the default is the server's superuser as the container's
        environment names it (C(POSTGRES_USER), default C(postgres), with C(POSTGRES_PASSWORD); C(root) with
        C(MARIADB_ROOT_PASSWORD) or C(MYSQL_ROOT_PASSWORD)), else the connection's user.
    type: str
  admin_password:
    description: Password of O(admin_username). Never logged nor returned.
    type: str
  admin_host:
    description: Host for the admin connection. Default, the connection's.
    type: str
  admin_port:
    description: Port for the admin connection. Default, the connection's.
    type: int
  admin_unix_socket:
    description:
      - MySQL only, socket for the admin connection.
      - Without O(admin_username), the admin is the account this module runs as (C(root) with C(become)),
        authenticated by the socket (C(unix_socket), Debian's default for C(root)), without a password.
    type: str
  maintenance_db:
    description: PostgreSQL database to connect to for creating and dropping the target.
    type: str
    default: postgres
  replace:
    description: Drop and recreate a target database that holds tables. Without it such a target is refused.
    type: bool
    default: false
  jobs:
    description: Parallel jobs of C(pg_restore) for a directory-format dump.
    type: int
    default: 1
attributes:
  check_mode:
    support: full
    description: Connects, says whether the target exists and is empty, and checks every privilege the restore needs
      (see O(admin_username)); changes nothing. The restore role runs it before stopping Orthanc.
extends_documentation_fragment:
  - pacs.orthanc.database
author:
  - pacs.orthanc developers (@pacs-orthanc)
"""

EXAMPLES = r"""
- name: Restore the latest backup's dump into the database Orthanc's configuration names
  pacs.orthanc.db_restore:
    dump: /var/backups/orthanc/latest
    config_path: /etc/orthanc
    admin_username: postgres
    admin_password: "{{ vault_postgres_password }}"

- name: Into a fresh MariaDB database, as root through the socket (the module runs as root)
  become: true
  pacs.orthanc.db_restore:
    dump: /var/backups/orthanc/20261129T080000Z/database/orthanc.sql
    config_path: /etc/orthanc
    admin_unix_socket: /run/mysqld/mysqld.sock

- name: Into the PostgreSQL container of a compose project (its own pg_restore; admin from its environment)
  pacs.orthanc.db_restore:
    dump: /var/backups/orthanc/latest
    config_path: /var/backups/orthanc/latest/config
    container: pacs-db-1
"""

RETURN = r"""
database:
  description: The database restored into.
  type: str
  returned: always
owner:
  description: Its owner.
  type: str
  returned: always
before:
  description: The target before the restore (exists, tables, large objects).
  type: dict
  returned: always
created:
  description: Whether the database was created.
  type: bool
  returned: always
replaced:
  description: Whether a non-empty database was dropped first.
  type: bool
  returned: always
plan:
  description:
    - Who does what, decided before anything changes. C(admin) (the admin's name as the server says it),
      C(create), C(drop) (PostgreSQL), C(grant_to_owner), C(database_owner), C(filled_by) and C(role)
      (PostgreSQL, who runs C(pg_restore) and its C(--role)), C(extensions) the dump creates (PostgreSQL),
      C(definers) of the dump's triggers and procedures and C(owner_hosts) (MySQL).
  type: dict
  returned: always
counts:
  description: Patients, studies, series and instances in the restored database.
  type: dict
  returned: success, not in check mode
duration_seconds:
  description: Seconds the restore took.
  type: float
  returned: success, not in check mode
connection:
  description: The connection of the target, without the password.
  type: dict
  returned: always
container:
  description: The database container whose tools restored the dump, or null (the host's tools).
  type: str
  returned: always
dump:
  description: The dump restored.
  type: str
  returned: always
"""

import os
import pwd

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.pacs.orthanc.plugins.module_utils import _layout
from ansible_collections.pacs.orthanc.plugins.module_utils._db import (
    connection as db_connection, container as db_container, dump as db_dump, restore as db_restore)
from ansible_collections.pacs.orthanc.plugins.module_utils._common import PacsError, run_module


def locate(path: str):
    if os.path.isdir(path) and not path.rstrip("/").endswith(".pgdir"):
        found = db_dump.find_dump(path)
        if not found:
            raise PacsError("find the dump", f"{path} holds no database dump (database/orthanc.pgdump, .pgdir or .sql)")
        return found
    kind = _layout.dump_kind(path)
    if kind:
        return kind[0], kind[1], path
    raise PacsError("find the dump", f"{path}: not a .pgdump, .pgdir or .sql dump")


def run(module):
    p = module.params
    dump_engine, fmt, path = locate(p["dump"])
    conn = db_connection.from_config(p["config_path"], p["environment"], p["engine"] or dump_engine,
                                     {k: p[k] for k in db_connection.CONNECTION_KEYS}, step="read the target database")
    if conn["engine"] != dump_engine:
        raise PacsError("read the target database", f"the dump is a {dump_engine} dump but the target is {conn['engine']}")
    conn, where = db_container.from_params(conn, p)
    admin = dict(conn)
    if where is not None and not p["admin_username"]:
        admin = db_container.admin_inside(conn, where)
    if p["admin_username"]:
        admin.update({"username": p["admin_username"], "password": p["admin_password"]})
    elif p["admin_unix_socket"] and conn["engine"] == "mysql" and where is None:
        # the socket alone: the account this module runs as (root with become), which MariaDB
        # authenticates by the socket (unix_socket), without a password
        admin.update({"username": pwd.getpwuid(os.geteuid()).pw_name, "password": None})
    for key in ("host", "port"):
        if p[f"admin_{key}"]:
            admin[key] = p[f"admin_{key}"]
    if p["admin_unix_socket"] and where is None:
        admin.update({"unix_socket": p["admin_unix_socket"], "host": "localhost"})
    admin["maintenance_db"] = p["maintenance_db"]
    result = db_restore.restore(conn, admin, path, fmt, owner=p["owner"], replace=p["replace"], jobs=p["jobs"],
                                bin_dir=p["bin_dir"], check_mode=module.check_mode, timeout=p["timeout"],
                                container=where)
    result["dump"] = path
    return result


def main():
    module = AnsibleModule(
        argument_spec=dict(
            **db_connection.CONNECTION_SPEC,
            dump=dict(type="path", required=True),
            owner=dict(type="str"),
            admin_username=dict(type="str"),
            admin_password=dict(type="str", no_log=True),
            admin_host=dict(type="str"),
            admin_port=dict(type="int"),
            admin_unix_socket=dict(type="str"),
            maintenance_db=dict(type="str", default="postgres"),
            replace=dict(type="bool", default=False),
            jobs=dict(type="int", default=1),
        ),
        supports_check_mode=True,
    )
    run_module(module, run)


if __name__ == "__main__":
    main()

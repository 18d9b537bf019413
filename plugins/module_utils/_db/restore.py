# -*- coding: utf-8 -*-
# Copyright: pacs.orthanc contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Restore of a dump into a database that Orthanc can write to. Everything the restore needs
is decided first (who drops, creates and fills the database) and every privilege checked, in
check mode too, so that the restore role refuses before Orthanc is stopped, with the statement
that grants what is missing."""

from __future__ import annotations

import contextlib
import os
import re
import time

from ansible_collections.pacs.orthanc.plugins.module_utils._common import PacsError
from ansible_collections.pacs.orthanc.plugins.module_utils._db.client import Client, ident, literal
from ansible_collections.pacs.orthanc.plugins.module_utils._db.connection import public, where
from ansible_collections.pacs.orthanc.plugins.module_utils._db.listing import PLUGIN_RESOURCE_TYPES

__metaclass__ = type


def database_state(admin: Client, name: str) -> dict:
    """Whether a database exists, and how many tables (and large objects) it holds."""
    engine = admin.conn["engine"]
    if engine == "postgresql":
        rows = admin.query(f"SELECT 1 FROM pg_database WHERE datname = {literal(name)}",
                           database=admin.conn.get("maintenance_db") or "postgres", step="look at the target database")
        if not rows:
            return {"exists": False, "tables": 0}
        rows = admin.query("SELECT (SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                           "WHERE c.relkind = 'r' AND n.nspname NOT IN ('pg_catalog', 'information_schema') "
                           "AND n.nspname NOT LIKE 'pg_toast%'), (SELECT count(*) FROM pg_largeobject_metadata)",
                           database=name, step="look at the target database")
        return {"exists": True, "tables": int(rows[0][0]), "large_objects": int(rows[0][1])}
    rows = admin.query(f"SELECT COUNT(*) FROM information_schema.schemata WHERE schema_name = {literal(name)}",
                       database="information_schema", step="look at the target database")
    if int(rows[0][0]) == 0:
        return {"exists": False, "tables": 0}
    rows = admin.query(f"SELECT COUNT(*) FROM information_schema.tables WHERE table_schema = {literal(name)}",
                       database="information_schema", step="look at the target database")
    return {"exists": True, "tables": int(rows[0][0])}


class Refused(PacsError):
    """The target cannot be restored by these users: said before anything is changed (before
    Orthanc is stopped, when the role runs the module in check mode first)."""


def _pg_membership(version_num: int) -> str:
    # PostgreSQL 16 separated membership from the right to SET ROLE, which CREATE DATABASE ... OWNER
    # and pg_restore --role need; before 16 any membership gives it
    return "SET" if version_num >= 160000 else "MEMBER"


def _pg_dump_extensions(path: str, client: Client) -> list:
    """Extensions that the dump creates (Orthanc's PostgreSQL plugin 4 creates pg_trgm)."""
    rc, out, err = client.run("pg_restore", ["--list"], "check the target database", source=path, auth=False,
                              timeout=600)
    if rc != 0:
        raise PacsError("check the target database",
                        f"pg_restore cannot read {path}: {' '.join(err.strip().splitlines()[-2:])}")
    return sorted(set(re.findall(r"^\d+; \d+ \d+ EXTENSION - (\S+)", out, re.M)))


def _pg_plan(admin: Client, conn: dict, owner: str, state: dict, replace: bool, path: str) -> dict:
    """Decide, before anything changes, who drops, creates and fills the database, and refuse
    with the exact statement to run when a privilege is missing."""
    step = "check the target database"
    maintenance = admin.conn.get("maintenance_db") or "postgres"
    name = conn["database"]
    rows = admin.query(
        "SELECT current_user, r.rolsuper, r.rolcreatedb, current_setting('server_version_num')::int, "
        f"(SELECT oid FROM pg_roles WHERE rolname = {literal(owner)}) IS NOT NULL, "
        f"(SELECT o.rolname FROM pg_database d JOIN pg_roles o ON o.oid = d.datdba WHERE d.datname = {literal(name)}) "
        "FROM pg_roles r WHERE r.rolname = current_user", database=maintenance, step=step)
    current, superuser, createdb, version_num, owner_exists, db_owner = rows[0]
    superuser, createdb, owner_exists = superuser == "t", createdb == "t", owner_exists == "t"
    how = _pg_membership(int(version_num))

    def member_of(role: str) -> bool:
        found = admin.query(f"SELECT pg_has_role(current_user, {literal(role)}, {literal(how)})",
                            database=maintenance, step=step)
        return found[0][0] == "t"

    if not owner_exists:
        raise Refused(step, f"the role {owner!r} that Orthanc connects as does not exist on {where(admin.conn)}: "
                      f"create it first, as a superuser: CREATE ROLE {ident('postgresql', owner)} LOGIN PASSWORD '...';")
    grant_owner = (f"GRANT {ident('postgresql', owner)} TO {ident('postgresql', current)};")
    plan = {"admin": current, "superuser": superuser, "drop": False, "create": False, "database_owner": owner,
            "filled_by": current, "role": owner, "grant_to_owner": False}
    can_be_owner = superuser or member_of(owner)
    needs_create = not state["exists"]
    if state["exists"] and (state["tables"] or state.get("large_objects")):
        # refused earlier unless replace
        if not (superuser or member_of(db_owner)):
            raise Refused(step, f"{current!r} cannot drop the database {name!r}, which belongs to {db_owner!r}: "
                          f"run as a superuser: GRANT {ident('postgresql', db_owner)} TO {ident('postgresql', current)}; "
                          f"(or drop it yourself)")
        plan["drop"] = True
        needs_create = True
    if needs_create:
        if not (superuser or createdb):
            raise Refused(step, f"{current!r} may not create databases (the database {name!r} "
                          f"{'is to be replaced' if plan['drop'] else 'does not exist'}): run as a superuser: "
                          f"ALTER ROLE {ident('postgresql', current)} CREATEDB;")
        plan["create"] = True
        if not can_be_owner:
            # CREATE DATABASE ... OWNER and pg_restore --role both need membership in the owner's
            # role. Without it the admin creates the database as its own, grants it to the owner,
            # and the owner restores the dump itself with its own credentials from the
            # configuration: every table, sequence, function and large object is then the owner's.
            if owner != conn["username"]:
                raise Refused(step, f"{current!r} is not a member of {owner!r}, and the owner is not the user of the "
                              f"connection: run as a superuser: {grant_owner}")
            plan.update({"database_owner": current, "filled_by": owner, "role": None, "grant_to_owner": True})
    else:
        # an existing, empty database: the one who fills it (the owner, directly or through
        # --role) needs to connect, to create in the public schema, and to create the dump's
        # extensions (a trusted extension needs CREATE on the database)
        if not can_be_owner:
            if owner != conn["username"]:
                raise Refused(step, f"{current!r} is not a member of {owner!r}, and the owner is not the user of the "
                              f"connection: run as a superuser: {grant_owner}")
            plan.update({"filled_by": owner, "role": None})
        plan["database_owner"] = db_owner
        role = literal(owner)
        rows = admin.query(f"SELECT has_database_privilege({role}, current_database(), 'CONNECT'), "
                           f"has_database_privilege({role}, current_database(), 'CREATE'), "
                           f"has_schema_privilege({role}, 'public', 'CREATE'), "
                           f"has_schema_privilege({role}, 'public', 'USAGE')", database=name, step=step)
        connect, create_db, create_schema, usage = (v == "t" for v in rows[0])
        grants = []
        if not connect or not create_db:
            grants.append(f"GRANT CONNECT, CREATE ON DATABASE {ident('postgresql', name)} TO {ident('postgresql', owner)};")
        if not create_schema or not usage:
            grants.append(f"GRANT USAGE, CREATE ON SCHEMA public TO {ident('postgresql', owner)};")
        if grants:
            raise Refused(step, f"{owner!r} cannot fill the existing database {name!r}: run as its owner "
                          f"({db_owner!r}), connected to {name!r}: {' '.join(grants)}")
    # the dump is restored as the owner (pg_restore --role, or its own connection): a trusted
    # extension needs CREATE on the database (given above), any other one a superuser owner
    owner_super = admin.query(f"SELECT rolsuper FROM pg_roles WHERE rolname = {literal(owner)}",
                              database=maintenance, step=step)[0][0] == "t"
    extensions = _pg_dump_extensions(path, admin)
    for extension in extensions:
        found = admin.query("SELECT coalesce(bool_or(v.trusted), false) FROM pg_available_extension_versions v "
                            f"WHERE v.name = {literal(extension)}", database=maintenance, step=step)
        available = admin.query(f"SELECT count(*) FROM pg_available_extensions WHERE name = {literal(extension)}",
                                database=maintenance, step=step)
        if int(available[0][0]) == 0:
            raise Refused(step, f"the dump needs the extension {extension!r}, which is not installed on "
                          f"{where(admin.conn)}: install it (Debian: postgresql-contrib) first")
        if found[0][0] != "t" and not owner_super:
            raise Refused(step, f"the dump creates the extension {extension!r}, which only a superuser may create: "
                          f"as a superuser, create the database and in it: CREATE EXTENSION {extension}; "
                          "then restore into that empty database")
    plan["extensions"] = extensions
    if plan["filled_by"] != current:
        # the owner's own connection must work (checked with its credentials, as Orthanc will)
        with Client(conn, admin.bin_dir, step, container=admin.container) as own:
            try:
                own.query("SELECT 1", database=name if state["exists"] and not plan["drop"] else maintenance, step=step)
            except PacsError as exc:
                raise Refused(step, f"{current!r} is not a member of {owner!r}, so {owner!r} must restore the dump "
                              f"itself, and it cannot connect: {exc.cause}. Or let {current!r} do it: run as a "
                              f"superuser: {grant_owner}")
    return plan


def _mysql_pattern_matches(pattern: str, name: str) -> bool:
    """Whether a database name matches a grant's pattern (MySQL LIKE: _ and %, \\ escapes)."""
    regex, i = "", 0
    while i < len(pattern):
        char = pattern[i]
        if char == "\\" and i + 1 < len(pattern):
            regex += re.escape(pattern[i + 1])
            i += 2
            continue
        regex += "." if char == "_" else ".*" if char == "%" else re.escape(char)
        i += 1
    return re.fullmatch(regex, name, re.S) is not None


# What restoring a mysqldump of Orthanc's index needs on the database (CREATE TABLE, LOCK TABLES,
# the DISABLE KEYS ALTERs, triggers, procedures and the DROP ... IF EXISTS before each).
MYSQL_RESTORE_PRIVILEGES = ("SELECT", "INSERT", "CREATE", "DROP", "ALTER", "INDEX", "REFERENCES", "LOCK TABLES",
                            "TRIGGER", "CREATE ROUTINE", "ALTER ROUTINE", "EXECUTE")
# GRANT ALL PRIVILEGES ON db.* needs the granter to hold every one of them, with GRANT OPTION
MYSQL_DB_PRIVILEGES = ("SELECT", "INSERT", "UPDATE", "DELETE", "CREATE", "DROP", "REFERENCES", "INDEX", "ALTER",
                       "CREATE TEMPORARY TABLES", "LOCK TABLES", "EXECUTE", "CREATE VIEW", "SHOW VIEW",
                       "CREATE ROUTINE", "ALTER ROUTINE", "EVENT", "TRIGGER", "DELETE HISTORY")


def _mysql_dump_definers(path: str) -> set:
    """The DEFINERs of the dump's triggers and procedures ('user@host', as CURRENT_USER() says)."""
    found = set()
    with open(path, "rb") as handle:
        for line in handle:
            if b"DEFINER=" in line:
                for user, host in re.findall(rb"DEFINER=`((?:[^`]|``)*)`@`((?:[^`]|``)*)`", line):
                    found.add(f"{user.decode().replace('``', '`')}@{host.decode().replace('``', '`')}")
    return found


def _mysql_plan(admin: Client, conn: dict, owner: str, state: dict, path: str) -> dict:
    step = "check the target database"
    name = conn["database"]
    rows = admin.query("SELECT CURRENT_USER(), @@log_bin, @@log_bin_trust_function_creators, VERSION()",
                       database="information_schema", step=step)
    current, log_bin, trust, version = rows[0]
    user, _at, host = current.rpartition("@")
    grantees = [f"'{user}'@'{host}'"]
    grantees += [f"'{r[0]}'" for r in admin.query("SELECT ROLE_NAME FROM information_schema.ENABLED_ROLES",
                                                  database="information_schema", step=step) if r[0] != "NULL"]
    quoted = ", ".join(literal(g) for g in grantees)
    global_privs, db_privs = set(), set()
    for privilege, grantable in admin.query("SELECT PRIVILEGE_TYPE, IS_GRANTABLE FROM information_schema.USER_PRIVILEGES "
                                            f"WHERE GRANTEE IN ({quoted})", database="information_schema", step=step):
        global_privs.add(privilege)
        if grantable == "YES":
            global_privs.add("GRANT OPTION")
    for schema, privilege, grantable in admin.query(
            "SELECT TABLE_SCHEMA, PRIVILEGE_TYPE, IS_GRANTABLE FROM information_schema.SCHEMA_PRIVILEGES "
            f"WHERE GRANTEE IN ({quoted})", database="information_schema", step=step):
        if _mysql_pattern_matches(schema, name):
            db_privs.add(privilege)
            if grantable == "YES":
                db_privs.add("GRANT OPTION")
    have = global_privs | db_privs
    account = f"'{user}'@'{host}'"
    plan = {"admin": current, "grant_to_owner": owner != user, "create": not state["exists"] or bool(state["tables"])}
    needed = list(MYSQL_RESTORE_PRIVILEGES)
    if plan["grant_to_owner"]:
        needed = [p for p in MYSQL_DB_PRIVILEGES if p != "DELETE HISTORY" or "mariadb" in version.lower()]
        needed.append("GRANT OPTION")
    missing = [p for p in needed if p not in have]
    if missing:
        with_grant = " WITH GRANT OPTION" if "GRANT OPTION" in missing else ""
        privs = ", ".join(p for p in missing if p != "GRANT OPTION") or "USAGE"
        why = " (it grants all privileges on the database to the owner)" if plan["grant_to_owner"] else ""
        raise Refused(step, f"{current!r} lacks {', '.join(missing)} on the database {name!r}{why}: run as root: "
                      f"GRANT {privs} ON {ident('mysql', name)}.* TO {account}{with_grant};")
    super_ = "SUPER" in global_privs
    definers = _mysql_dump_definers(path)
    foreign = sorted(d for d in definers if d != current)
    if foreign and not (super_ or "SET USER" in global_privs):
        raise Refused(step, f"the dump's triggers and procedures are defined by {', '.join(foreign)}, and only a user "
                      f"with SUPER or SET USER may create them for another user: run as root: "
                      f"GRANT SET USER ON *.* TO {account};")
    if log_bin == "1" and trust == "0" and not super_:
        raise Refused(step, "binary logging is on, so creating the dump's triggers needs SUPER or "
                      "log_bin_trust_function_creators: run as root: "
                      f"GRANT SUPER ON *.* TO {account}; (or SET GLOBAL log_bin_trust_function_creators = 1;)")
    if plan["grant_to_owner"]:
        try:
            hosts = [r[0] for r in admin.query(f"SELECT Host FROM mysql.user WHERE User = {literal(owner)}",
                                               database="information_schema", step=step)]
        except PacsError as exc:
            raise Refused(step, f"{current!r} cannot read mysql.user to find the hosts of {owner!r} ({exc.cause}): "
                          f"run as root: GRANT SELECT ON mysql.user TO {account};")
        if not hosts:
            raise Refused(step, f"the user {owner!r} that Orthanc connects as does not exist on {where(admin.conn)}: "
                          f"create it first: CREATE USER '{owner}'@'localhost' IDENTIFIED BY '...';")
        plan["owner_hosts"] = hosts
    plan["definers"] = sorted(definers)
    return plan


def restore(conn: dict, admin_conn: dict, path: str, fmt: str, owner: str | None = None, replace: bool = False,
            jobs: int = 1, bin_dir: str | None = None, check_mode: bool = False, timeout: float | None = None,
            container=None) -> dict:
    """Restore a dump into conn's database, created when missing (MySQL: utf8mb4 with
    utf8mb4_unicode_ci), refused when it holds tables unless ``replace``. The tables belong to
    ``owner`` (default: the connection's user). Every privilege the restore needs is checked
    first, in check mode too, and a missing one is refused with the statement that grants it.
    ``container`` (a ``_db.container.InContainer``): the tools are those of the database's
    container, the dump streamed to them."""
    step = "restore the database"
    engine = conn["engine"]
    name = conn["database"]
    owner = owner or conn["username"]
    if not os.path.exists(path):
        raise PacsError(step, f"there is no dump at {path}")
    if container is not None and fmt == "directory":
        raise Refused("check the target database", f"{path} is a directory-format dump, which pg_restore inside the "
                      f"container {container.name} cannot read from this host: restore it with the host's pg_restore "
                      "(without orthanc_db_container), or dump again in the custom format")
    if engine == "postgresql" and (admin_conn.get("maintenance_db") or "postgres") == name:
        # Orthanc's database is the maintenance database itself (the postgres image's default):
        # drop and create it from another one
        admin_conn = dict(admin_conn, maintenance_db="template1")
    with Client(admin_conn, bin_dir, step, container=container) as admin:
        admin.tool("pg_restore" if engine == "postgresql" else "mysql")
        state = database_state(admin, name)
        result = {"changed": False, "database": name, "owner": owner, "before": state,
                  "connection": public(conn), "created": False, "replaced": False,
                  "container": container.name if container is not None else None}
        if state["exists"] and (state["tables"] or state.get("large_objects")) and not replace:
            raise PacsError(step, f"the database {name!r} is not empty ({state['tables']} tables): "
                            "refusing to restore over it; set replace to drop and recreate it")
        if engine == "postgresql":
            plan = _pg_plan(admin, conn, owner, state, replace, path)
        else:
            plan = _mysql_plan(admin, conn, owner, state, path)
        result["plan"] = plan
        result["changed"] = True
        if check_mode:
            return result
        started = time.monotonic()
        maintenance = admin_conn.get("maintenance_db") or "postgres"
        if state["exists"] and (state["tables"] or state.get("large_objects")):
            if engine == "postgresql":
                admin.query(f"DROP DATABASE {ident(engine, name)} WITH (FORCE)", database=maintenance,
                            step="drop the database to replace")
            else:
                admin.query(f"DROP DATABASE {ident(engine, name)}", database="information_schema",
                            step="drop the database to replace")
            result["replaced"] = True
            state = {"exists": False, "tables": 0}
        if not state["exists"]:
            if engine == "postgresql":
                owned_by = "" if plan["grant_to_owner"] else f" OWNER {ident(engine, owner)}"
                admin.query(f"CREATE DATABASE {ident(engine, name)}{owned_by}", database=maintenance,
                            step="create the database")
                if plan["grant_to_owner"]:
                    admin.query(f"GRANT ALL ON DATABASE {ident(engine, name)} TO {ident(engine, owner)}",
                                database=maintenance, step="grant the database to its owner")
                    admin.query(f"GRANT ALL ON SCHEMA public TO {ident(engine, owner)}", database=name,
                                step="grant the database to its owner")
            else:
                admin.query(f"CREATE DATABASE {ident(engine, name)} CHARACTER SET utf8mb4 "
                            "COLLATE utf8mb4_unicode_ci", database="information_schema", step="create the database")
            result["created"] = True
        if engine == "mysql" and plan["grant_to_owner"]:
            for grantee_host in plan["owner_hosts"]:
                admin.query(f"GRANT ALL PRIVILEGES ON {ident(engine, name)}.* TO {literal(owner)}@"
                            f"{literal(grantee_host)}", database="information_schema",
                            step="grant the database to its owner")
        if engine == "postgresql":
            with contextlib.ExitStack() as stack:
                filler = admin
                if plan["filled_by"] != plan["admin"]:
                    filler = stack.enter_context(Client(conn, bin_dir, step, container=container))
                args = ["-d", name, "--no-owner", "--exit-on-error"]
                if plan["role"]:
                    args.append(f"--role={plan['role']}")
                args += ["-j", str(jobs)] if fmt == "directory" and jobs > 1 else ["--single-transaction"]
                rc, out, err = filler.run("pg_restore", args, step, source=path, timeout=timeout)
                if rc != 0:
                    raise PacsError(step, f"pg_restore exited with {rc}: {filler.explain(err or out)}")
                result["duration_seconds"] = round(time.monotonic() - started, 3)
                result["counts"] = _count_resources(filler, name)
        else:
            rc, _out, err = admin.run("mysql", ["--default-character-set=utf8mb4", name], step, source=path,
                                      timeout=timeout, timeout_hint=f"; the database {name!r} is partly "
                                      "restored: run again with replace")
            if rc != 0:
                raise PacsError(step, f"mysql exited with {rc}: {admin.explain(err)}")
            result["duration_seconds"] = round(time.monotonic() - started, 3)
            result["counts"] = _count_resources(admin, name)
    return result


def _count_resources(client: Client, name: str) -> dict:
    """Patients, studies, series and instances in a restored database."""
    engine = client.conn["engine"]
    counts = {label: 0 for label in PLUGIN_RESOURCE_TYPES.values()}
    table = "resources" if engine == "postgresql" else "Resources"
    column = "resourcetype" if engine == "postgresql" else "resourceType"
    for kind, count in client.query(f"SELECT {column}, COUNT(*) FROM {table} GROUP BY {column}", database=name,
                                    step="count what was restored"):
        label = PLUGIN_RESOURCE_TYPES.get(int(kind))
        if label:
            counts[label] = int(count)
    return counts

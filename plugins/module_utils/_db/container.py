# -*- coding: utf-8 -*-
# Copyright: pacs.orthanc contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""A PostgreSQL or MySQL/MariaDB server in its own container (beside a containerised Orthanc, or
an Orthanc on the host whose plugin connects to it): which container it is (named, or the compose
service that the configuration's database host names), how its own client programs are reached
from inside it (``exec -i`` of the engine library ``_container``), and which credentials its
environment offers (``POSTGRES_USER``/``POSTGRES_PASSWORD``, ``MARIADB_ROOT_PASSWORD``,
``MYSQL_PASSWORD``..., their ``*_FILE`` variants read inside the container).

The tools run inside the database container, so their version is the server's. The password
travels on the tools' standard input (the first line, read by a tiny ``sh`` script inside the
container), never on a command line of the host, the engine's own ``exec`` argv included, nor in
the host client's environment."""

from __future__ import annotations

import ipaddress

from ansible_collections.pacs.orthanc.plugins.module_utils import _container
from ansible_collections.pacs.orthanc.plugins.module_utils._common import PacsError

__metaclass__ = type

STEP = "find the database container"
# Inside the container, the script reads the password from the first line of its standard input,
# puts it where the tool looks for it, and replaces itself with the tool (which then reads the rest
# of standard input: a dump to restore). "$1" is the tool.
PG_SCRIPT = ('IFS= read -r p || :\n'
             'if [ -n "$p" ]; then PGPASSWORD=$p; export PGPASSWORD; fi\n'
             'unset p\n'
             'PGCONNECT_TIMEOUT=10 PGAPPNAME=pacs.orthanc; export PGCONNECT_TIMEOUT PGAPPNAME\n'
             'exec "$@"\n')
# MySQL/MariaDB: the first line is an option-file line (password="..."), handed to the tool as
# --defaults-extra-file=/dev/fd/3, a here-document that never touches the container's disk.
MYSQL_SCRIPT = ('IFS= read -r p || :\n'
                't=$1; shift\n'
                'exec "$t" --defaults-extra-file=/dev/fd/3 "$@" 3<<PACS_ORTHANC_EOF\n'
                '[client]\n'
                '$p\n'
                'PACS_ORTHANC_EOF\n')
FIND_SCRIPT = 'for c; do command -v "$c" >/dev/null 2>&1 && { echo "$c"; exit 0; }; done; exit 127'
SCRIPT_NAME = "pacs-orthanc-db"

# Credentials that the official images read from their environment: (user variable, its default,
# password variable). The first whose user matches (or the admin's) is used.
ACCOUNTS = {
    "postgresql": [("POSTGRES_USER", "postgres", "POSTGRES_PASSWORD")],
    "mysql": [("MARIADB_USER", None, "MARIADB_PASSWORD"), ("MYSQL_USER", None, "MYSQL_PASSWORD"),
              (None, "root", "MARIADB_ROOT_PASSWORD"), (None, "root", "MYSQL_ROOT_PASSWORD")],
}
ADMINS = {
    "postgresql": [("POSTGRES_USER", "postgres", "POSTGRES_PASSWORD")],
    "mysql": [(None, "root", "MARIADB_ROOT_PASSWORD"), (None, "root", "MYSQL_ROOT_PASSWORD")],
}


class InContainer:
    """One database container: runs the engine's client tools inside it."""

    def __init__(self, container: _container.Container):
        self.container = container
        self.engine = container.engine
        self.name = container.name
        self.found: dict = {}

    def tool(self, candidates: list, step: str) -> str | None:
        """The first of ``candidates`` that the container's PATH has (asked once), or None."""
        key = tuple(candidates)
        if key not in self.found:
            rc, out, err = self.engine.exec(self.container, ["sh", "-c", FIND_SCRIPT, SCRIPT_NAME, *candidates], step,
                                            check=False, timeout=60)
            if rc not in (0, 127):
                raise PacsError(step, self.explain(err) or f"cannot run sh in the database container {self.name} "
                                f"({self.engine.name} exec exited with {rc})")
            self.found[key] = out.strip() if rc == 0 and out.strip() else None
        return self.found[key]

    def argv(self, engine: str, tool: str, args: list) -> list:
        """The host's argv that runs ``tool args`` inside the container through the script that
        takes the password from the first line of standard input."""
        script = PG_SCRIPT if engine == "postgresql" else MYSQL_SCRIPT
        return self.engine.exec_argv(self.container, ["sh", "-c", script, SCRIPT_NAME, tool, *args], interactive=True)

    @property
    def env(self) -> dict:
        return dict(self.engine.env)

    def explain(self, text: str) -> str | None:
        """The engine's own error (container gone or stopped), or None when it is the tool's."""
        lowered = text.lower()
        if "no such container" in lowered or "no container with name or id" in lowered:
            return f"the database container {self.name} no longer exists ({self.engine.name})"
        if "is not running" in lowered or "container state improper" in lowered:
            return f"the database container {self.name} is not running ({self.engine.name})"
        return None

    def env_value(self, name: str, step: str = STEP) -> str | None:
        """A variable of the container's environment, or the content of the file that NAME_FILE
        names (Docker secrets), read inside the container; None when neither is set."""
        env = self.container.env
        if env.get(name):
            return env[name]
        path = env.get(f"{name}_FILE")
        if path:
            try:
                return self.container.read_file(path).decode("utf-8").rstrip("\r\n")
            except (PacsError, UnicodeDecodeError) as exc:
                cause = exc.cause if isinstance(exc, PacsError) else "not UTF-8 text"
                raise PacsError(step, f"cannot read {name}_FILE ({path}) in the database container {self.name}: {cause}")
        return None

    def account(self, engine: str, username: str | None, admin: bool = False) -> tuple:
        """(user, password) that the container's environment gives for ``username`` (any user when
        None); (None, None) when it gives none. ``admin``: the server's superuser."""
        for user_var, default, password_var in (ADMINS if admin else ACCOUNTS)[engine]:
            user = (self.container.env.get(user_var) if user_var else None) or default
            if not user or (username and user != username):
                continue
            password = self.env_value(password_var)
            if password is not None:
                return user, password
        return None, None

    def port_inside(self, port: int) -> int:
        """The port the server listens on inside the container: ``port`` itself, unless the engine
        publishes a container port on that host port (``-p 5433:5432``)."""
        ports = ((self.container.data.get("NetworkSettings") or {}).get("Ports") or {})
        for inner, bindings in ports.items():
            for binding in bindings or []:
                if str(binding.get("HostPort") or "") == str(port):
                    try:
                        return int(str(inner).split("/", maxsplit=1)[0])
                    except ValueError:
                        continue
        return port


def _is_address(host) -> bool:
    if host in (None, "", "localhost"):
        return True
    try:
        ipaddress.ip_address(str(host))
        return True
    except ValueError:
        return "/" in str(host)  # a socket folder


def find(conn: dict, container: str | None = None, engine: str = "auto", compose_project: str | None = None,
         compose_file: str | None = None, env: dict | None = None) -> InContainer:
    """The database container: ``container`` (name or id), or the compose service of
    ``compose_project`` / ``compose_file`` that the configuration's database host names (as the
    plugin reaches it on the project's network). It must run."""
    if container:
        found = _container.find_container(engine, container=container, env=env, step=STEP)
    else:
        host = conn.get("host")
        if _is_address(host):
            raise PacsError(STEP, f"the configuration's {'PostgreSQL' if conn['engine'] == 'postgresql' else 'MySQL'} "
                            f"host is {host!r}, not a compose service name: name the database container with "
                            "orthanc_db_container")
        found = _container.find_container(engine, compose_project=compose_project, compose_file=compose_file,
                                          compose_service=str(host), env=env, step=STEP)
    if not found.running:
        raise PacsError(STEP, f"the database container {found.name} is not running ({found.status or 'no state'}): "
                        f"start it ({found.engine.name} start {found.name})")
    return InContainer(found)


def connection_inside(conn: dict, where: InContainer, host: str | None = None, port: int | None = None) -> dict:
    """The connection as the tools see it inside the database container: the server on
    127.0.0.1 (or ``host``) at its port inside the container, over TCP; the password from the
    configuration, else from the container's environment for that user."""
    inside = dict(conn)
    inside["container"] = where.name
    inside["host"] = host or "127.0.0.1"
    inside["port"] = int(port) if port else where.port_inside(int(conn["port"]))
    inside["unix_socket"] = None
    if not inside.get("password"):
        _user, password = where.account(conn["engine"], conn.get("username"))
        inside["password"] = password
    return inside


def admin_inside(conn: dict, where: InContainer) -> dict:
    """The server's superuser as the container's environment names it (POSTGRES_USER and
    POSTGRES_PASSWORD; root and MARIADB_ROOT_PASSWORD or MYSQL_ROOT_PASSWORD), else ``conn``."""
    user, password = where.account(conn["engine"], None, admin=True)
    admin = dict(conn)
    if user:
        admin.update({"username": user, "password": password})
    return admin


def from_params(conn: dict, params: dict) -> tuple:
    """(connection, InContainer or None) for a module's parameters (see CONNECTION_SPEC): the
    database container when one is named, or when a compose project is given and the
    configuration's database host is a plain name (a service of that project); else the host's
    tools."""
    if not (params.get("container") or params.get("compose_project") or params.get("compose_file")):
        return conn, None
    if not params.get("container") and (_is_address(conn.get("host")) or "." in str(conn.get("host"))):
        # a compose project whose Orthanc reaches a database outside it (an address, a host name
        # with a domain): the host's own tools, as without a project
        return conn, None
    where = find(conn, params.get("container"), params.get("container_engine") or "auto",
                 params.get("compose_project"), params.get("compose_file"))
    return connection_inside(conn, where, host=params.get("host"), port=params.get("port")), where


def reader(container_name: str | None, bin_dir: str | None, step: str):
    """A Client that reads a PostgreSQL dump offline (pg_restore, no server): inside the database
    container that made the dump when it is named and runs here (its pg_restore matches its
    pg_dump), else the host's. Use as a context manager."""
    # pylint: disable=import-outside-toplevel
    from ansible_collections.pacs.orthanc.plugins.module_utils._db.client import Client
    bare = {"engine": "postgresql", "host": "127.0.0.1", "port": 5432, "username": "-", "database": "-",
            "password": None}
    if container_name:
        try:
            found = _container.find_container("auto", container=container_name, step=step)
        except PacsError:
            found = None
        if found is not None and found.running:
            return Client(dict(bare, container=found.name), bin_dir, step, container=InContainer(found))
    return Client(bare, bin_dir, step)

# -*- coding: utf-8 -*-
# Copyright: pacs.orthanc contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Where Orthanc's PostgreSQL or MySQL/MariaDB database is: read from Orthanc's configuration (its
ConnectionUri too) with the modules' overrides, and shown without its password."""

from __future__ import annotations

import urllib.parse

from ansible_collections.pacs.orthanc.plugins.module_utils._common import PacsError

__metaclass__ = type

ENGINES = {"postgresql": "PostgreSQL", "mysql": "MySQL"}
# The options of plugins/doc_fragments/database.py
CONNECTION_SPEC = dict(
    config_path=dict(type="path"),
    environment=dict(type="dict"),
    engine=dict(type="str", choices=["postgresql", "mysql"]),
    host=dict(type="str"),
    port=dict(type="int"),
    database=dict(type="str"),
    username=dict(type="str"),
    password=dict(type="str", no_log=True),
    unix_socket=dict(type="str"),
    bin_dir=dict(type="path"),
    timeout=dict(type="float"),
    container=dict(type="str"),
    container_engine=dict(type="str", choices=["auto", "docker", "podman"], default="auto"),
    compose_project=dict(type="str"),
    compose_file=dict(type="path"),
)
CONNECTION_KEYS = ("host", "port", "database", "username", "password", "unix_socket")


def _parse_uri(uri: str, step: str) -> dict:
    try:
        parts = urllib.parse.urlsplit(uri)
        port = parts.port
    except ValueError:
        raise PacsError(step, "PostgreSQL.ConnectionUri is not a valid URI")
    if parts.scheme not in ("postgres", "postgresql"):
        raise PacsError(step, "PostgreSQL.ConnectionUri must start with postgresql://")
    query = urllib.parse.parse_qs(parts.query)
    result = {
        "host": urllib.parse.unquote(parts.hostname) if parts.hostname else None,
        "port": port,
        "database": urllib.parse.unquote(parts.path.lstrip("/")) or None,
        "username": urllib.parse.unquote(parts.username) if parts.username else None,
        "password": urllib.parse.unquote(parts.password) if parts.password else None,
    }
    if "host" in query:
        result["host"] = query["host"][0]
    if query.get("sslmode"):
        result["sslmode"] = query["sslmode"][0]
    return result


def connection(engine: str, section: dict | None, overrides: dict | None = None,
               step: str = "read database connection") -> dict:
    """Connection settings from the configuration's PostgreSQL/MySQL section (its ConnectionUri
    wins over the separate keys, as in Orthanc), then non-empty ``overrides``."""
    if engine not in ENGINES:
        raise PacsError(step, f"unknown database engine {engine!r}")
    section = section or {}
    conn = {"engine": engine, "host": section.get("Host", "localhost"),
            "port": section.get("Port", 5432 if engine == "postgresql" else 3306),
            "database": section.get("Database", "orthanc" if engine == "postgresql" else "orthanc"),
            "username": section.get("Username", "postgres" if engine == "postgresql" else "root"),
            "password": section.get("Password") or None,
            "unix_socket": section.get("UnixSocket") if engine == "mysql" else None,
            "ssl": bool(section.get("EnableSsl", False)), "sslmode": None}
    if engine == "mysql" and conn["unix_socket"] is None and conn["host"] in ("localhost", None):
        conn["unix_socket"] = "/var/run/mysqld/mysqld.sock"  # the plugin's default
    if engine == "postgresql" and section.get("ConnectionUri"):
        for key, value in _parse_uri(str(section["ConnectionUri"]), step).items():
            if value is not None:
                conn[key] = value
    for key, value in (overrides or {}).items():
        if value not in (None, ""):
            conn[key] = value
    try:
        conn["port"] = int(conn["port"])
    except (TypeError, ValueError):
        raise PacsError(step, f"the database port {conn['port']!r} is not a number")
    if not conn["database"]:
        raise PacsError(step, "no database name")
    return conn


def public(conn: dict) -> dict:
    """What may be shown of a connection: everything but the password."""
    shown = {k: v for k, v in conn.items() if k != "password"}
    shown["password_set"] = bool(conn.get("password"))
    return shown


def where(conn: dict) -> str:
    if conn["engine"] == "mysql" and conn.get("unix_socket") and conn.get("host") in ("localhost", None):
        place = conn["unix_socket"]
    else:
        place = f"{conn['host']}:{conn['port']}"
    if conn.get("container"):
        place += f" in the container {conn['container']}"
    return f"{ENGINES[conn['engine']]} database {conn['database']!r} as {conn['username']!r} at {place}"


def from_config(config_path: str | None, environ: dict | None, engine: str | None, overrides: dict,
                step: str = "read database connection") -> dict:
    """The connection of the database that Orthanc's configuration enables (its PostgreSQL or
    MySQL section with EnableIndex or EnableStorage true), with non-empty ``overrides``."""
    from ansible_collections.pacs.orthanc.plugins.module_utils import _config  # pylint: disable=import-outside-toplevel
    section = None
    if config_path:
        values = _config.load_configuration(config_path, environ)["values"]
        enabled = [kind for kind, name in ENGINES.items() if isinstance(values.get(name), dict)
                   and (_config._enabled(values[name], "EnableIndex") or _config._enabled(values[name], "EnableStorage"))]
        if engine is None:
            if not enabled:
                raise PacsError(step, f"the configuration {config_path} enables no PostgreSQL or MySQL database "
                                "(EnableIndex or EnableStorage)")
            engine = enabled[0]
        section = values.get(ENGINES.get(engine, ""), None) if engine in ENGINES else None
        if engine in ENGINES and section is None and not overrides.get("database"):
            raise PacsError(step, f"the configuration {config_path} has no {ENGINES[engine]} section")
    elif engine is None:
        raise PacsError(step, "give config_path, or engine with the connection")
    return connection(engine, section if isinstance(section, dict) else {}, overrides, step)

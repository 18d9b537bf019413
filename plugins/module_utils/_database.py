# -*- coding: utf-8 -*-
# Copyright: pacs.orthanc contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Hot dumps and restores of Orthanc's PostgreSQL and MySQL/MariaDB databases, with the engines'
own tools, and an offline reader of those dumps (what the index lists, and the files stored in
the database) for verification.

Passwords reach the tools only through a 0600 file in a private 0700 folder (PGPASSFILE, or
MySQL's --defaults-extra-file), never through a command line, a result or a log. A dump is
written beside its final name and moved into place only once the tool succeeded and the dump
reads back."""

from __future__ import annotations

import concurrent.futures
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
import time
import urllib.parse

from ansible_collections.pacs.orthanc.plugins.module_utils import _layout
from ansible_collections.pacs.orthanc.plugins.module_utils._common import (
    PacsError, fsync_dir, os_error_cause, run_command, sha256_file)

__metaclass__ = type

ENGINES = {"postgresql": "PostgreSQL", "mysql": "MySQL"}
PART = ".part"
CHUNK = 1024 * 1024
MYSQL_TRAILER = b"-- Dump completed"
# Orthanc's resource types in the database plugins' schema (0-based, unlike the SQLite index)
PLUGIN_RESOURCE_TYPES = {0: "patients", 1: "studies", 2: "series", 3: "instances"}
SCHEMA_VERSION_PROPERTY = "1"
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
)
CONNECTION_KEYS = ("host", "port", "database", "username", "password", "unix_socket")
DUMP_NAMES = _layout.DUMP_NAMES


# ---------------------------------------------------------------------------------------------
# Connection
# ---------------------------------------------------------------------------------------------

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
    return f"{ENGINES[conn['engine']]} database {conn['database']!r} as {conn['username']!r} at {place}"


class Client:
    """Runs one engine's command-line tools for one connection, the password in a private file.
    Use as a context manager: the file and its folder are removed at the end."""

    def __init__(self, conn: dict, bin_dir: str | None = None, step: str = "database"):
        self.conn = conn
        self.bin_dir = bin_dir
        self.step = step
        self.tmp = None
        self.env: dict = {}
        self.auth_args: list = []

    def __enter__(self):
        self.tmp = tempfile.mkdtemp(prefix="pacs-orthanc-db-")  # mode 0700
        conn = self.conn
        if conn["engine"] == "postgresql":
            passfile = os.path.join(self.tmp, "pgpass")
            self._write_private(passfile, self._pgpass_line())
            self.env = {"PGPASSFILE": passfile, "PGCONNECT_TIMEOUT": "10", "PGAPPNAME": "pacs.orthanc"}
            if conn.get("sslmode") or conn.get("ssl"):
                self.env["PGSSLMODE"] = conn.get("sslmode") or "require"
            self.auth_args = ["-h", str(conn["host"]), "-p", str(conn["port"]), "-U", str(conn["username"]),
                              "--no-password"]
        else:
            defaults = os.path.join(self.tmp, "my.cnf")
            lines = ["[client]", f"user={self._mysql_value(conn['username'])}"]
            if conn.get("password"):
                lines.append(f"password={self._mysql_value(conn['password'])}")
            if conn.get("unix_socket") and conn.get("host") in ("localhost", None):
                lines.append(f"socket={self._mysql_value(conn['unix_socket'])}")
            else:
                lines += [f"host={self._mysql_value(str(conn['host']))}", f"port={conn['port']}", "protocol=tcp"]
            if conn.get("ssl"):
                lines.append("ssl")
            self._write_private(defaults, "\n".join(lines) + "\n")
            self.auth_args = [f"--defaults-extra-file={defaults}"]  # must come first
        return self

    def __exit__(self, *exc):
        shutil.rmtree(self.tmp, ignore_errors=True)
        return False

    @staticmethod
    def _write_private(path: str, text: str) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)

    def _pgpass_line(self) -> str:
        def esc(value):
            return str(value).replace("\\", "\\\\").replace(":", "\\:")
        conn = self.conn
        return f"*:*:*:{esc(conn['username'])}:{esc(conn.get('password') or '')}\n"

    @staticmethod
    def _mysql_value(value: str) -> str:
        escaped = str(value).replace("\\", "\\\\").replace('"', '\\"')
        return f'"{escaped}"'

    def tool(self, name: str) -> str:
        """Full path of one of the engine's programs; a clear error when it is missing."""
        names = [name]
        if name == "mysqldump":
            names.append("mariadb-dump")
        elif name == "mysql":
            names.append("mariadb")
        for candidate in names:
            if self.bin_dir:
                path = os.path.join(self.bin_dir, candidate)
                if os.access(path, os.X_OK):
                    return path
            else:
                found = shutil.which(candidate)
                if found:
                    return found
        package = {"pg_dump": "postgresql-client", "pg_restore": "postgresql-client", "psql": "postgresql-client",
                   "mysqldump": "mariadb-client (or mysql-client)", "mysql": "mariadb-client (or mysql-client)"}[name]
        place = f"in {self.bin_dir}" if self.bin_dir else "on the PATH"
        raise PacsError(self.step, f"{name} was not found {place}: install {package} on this host")

    def argv(self, tool: str, *args) -> list:
        """The tool's argument list with the connection (MySQL's --defaults-extra-file comes first)."""
        return [self.tool(tool), *self.auth_args, *args]

    def explain(self, text: str) -> str:
        """A tool's error output turned into a cause an administrator can act on."""
        lowered = text.lower()
        if "access denied" in lowered and "to database" in lowered:
            return f"{self.conn['username']!r} may not use the database {self.conn['database']!r} ({where(self.conn)})"
        if "password authentication failed" in lowered or "access denied" in lowered:
            return f"the server refused the credentials for {where(self.conn)}"
        if ("could not connect" in lowered or "connection refused" in lowered or "can't connect" in lowered
                or "could not translate host name" in lowered or "unknown mysql server host" in lowered
                or "timeout expired" in lowered):
            return f"cannot connect to {where(self.conn)}: {text.strip().splitlines()[-1] if text.strip() else ''}"
        if "does not exist" in lowered and "database" in lowered or "unknown database" in lowered:
            return f"the database {self.conn['database']!r} does not exist ({where(self.conn)})"
        lines = text.strip().splitlines()
        return " ".join(lines[-3:]) if lines else "no error output"

    def query(self, sql: str, database: str | None = None, step: str | None = None) -> list:
        """Rows (lists of strings) of one query, through psql or mysql."""
        step = step or self.step
        db = database or self.conn["database"]
        if self.conn["engine"] == "postgresql":
            argv = self.argv("psql", "-d", db, "-X", "-q", "-A", "-t", "-F", "\t", "-v", "ON_ERROR_STOP=1",
                             "-c", sql)
        else:
            argv = self.argv("mysql", "-N", "-B", "--default-character-set=utf8mb4", "-e", sql, db)
        rc, out, err = run_command(argv, step, env=self.env, check=False, timeout=120)
        if rc != 0:
            raise PacsError(step, self.explain(err or out))
        return [line.split("\t") for line in out.splitlines() if line != ""]

    def server_version(self) -> str:
        sql = "SHOW server_version" if self.conn["engine"] == "postgresql" else "SELECT VERSION()"
        rows = self.query(sql, step="connect to the database")
        return rows[0][0] if rows else "unknown"

    def tool_version(self, tool: str) -> str:
        rc, out, _err = run_command([self.tool(tool), "--version"], self.step, check=False, timeout=30)
        return out.strip().splitlines()[0] if rc == 0 and out.strip() else "unknown"


# ---------------------------------------------------------------------------------------------
# Dump
# ---------------------------------------------------------------------------------------------

def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        os.unlink(path)


def _write_and_follow(argv: list, env: dict, part: str, step: str, client: Client, timeout: float | None) -> dict:
    """Run a dump tool that writes ``part`` itself, front to back (mysqldump --result-file), and
    hash the file as it grows: no copy through this process, and the hash keeps pace with the
    tool on the other core. Returns bytes, sha256 and the last bytes (for the MySQL trailer)."""
    full_env = dict(os.environ)
    full_env.update({"LC_ALL": "C", "LANG": "C"})
    full_env.update(env)
    digest = hashlib.sha256()
    size = 0
    deadline = time.monotonic() + timeout if timeout else None
    os.close(os.open(part, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))  # the tool keeps the mode
    with tempfile.TemporaryFile() as err_file:
        try:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err_file,
                                    env=full_env)
        except FileNotFoundError:
            raise PacsError(step, f"program not found: {argv[0]}")
        try:
            with open(part, "rb") as handle:
                while True:
                    chunk = handle.read(CHUNK)
                    if chunk:
                        digest.update(chunk)
                        size += len(chunk)
                        continue
                    if proc.poll() is not None:
                        rest = handle.read()
                        if not rest:
                            break
                        digest.update(rest)
                        size += len(rest)
                        continue
                    if deadline and time.monotonic() > deadline:
                        raise PacsError(step, f"{os.path.basename(argv[0])} did not finish within {timeout} s")
                    time.sleep(0.005)
                os.fsync(handle.fileno())
                handle.seek(max(0, size - 4096))
                tail = handle.read()
        except (OSError, PacsError) as exc:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            if isinstance(exc, PacsError):
                raise
            raise PacsError(step, f"cannot read the dump back: {os_error_cause(exc)}")
        rc = proc.wait()
        err_file.seek(0)
        err = err_file.read().decode("utf-8", "replace")
    if rc != 0:
        tool = os.path.basename(argv[0])
        cause = f"{tool} was killed by signal {-rc}. " if rc < 0 else f"{tool} exited with {rc}: "
        raise PacsError(step, cause + client.explain(err))
    return {"bytes": size, "sha256": digest.hexdigest(), "tail": tail, "stderr": err}


def _tree_stats(path: str) -> dict:
    total, files = 0, {}
    for directory, _subdirs, names in os.walk(path):
        for name in names:
            full = os.path.join(directory, name)
            total += os.path.getsize(full)
            files[os.path.relpath(full, path)] = sha256_file(full)
    return {"bytes": total, "files": files}


def dump(conn: dict, dest: str, fmt: str = "custom", jobs: int = 1, bin_dir: str | None = None,
         timeout: float | None = None) -> dict:
    """Dump the database into ``dest`` (a file, or a folder for the directory format)."""
    step = "dump the database"
    engine = conn["engine"]
    if engine == "mysql":
        fmt = "sql"
    elif fmt not in ("custom", "directory"):
        raise PacsError(step, f"unknown PostgreSQL dump format {fmt!r}: use custom or directory")
    if os.path.lexists(dest):
        raise PacsError(step, f"{dest} exists already; a dump never overwrites a file")
    parent = os.path.dirname(dest) or "."
    try:
        os.makedirs(parent, mode=0o700, exist_ok=True)
    except OSError as exc:
        raise PacsError(step, f"cannot create the folder for the dump: {os_error_cause(exc)}")
    part = dest + PART
    _remove(part)  # a leftover of an interrupted run
    started = time.monotonic()
    with Client(conn, bin_dir, step) as client:
        tool_name = "pg_dump" if engine == "postgresql" else "mysqldump"
        client.tool(tool_name)  # a clear message when it is missing, before anything else
        if engine == "postgresql":
            client.tool("pg_restore")
        # The versions are asked beside the dump (they cost two client start-ups, ~0.1 s each);
        # a connection problem then shows in the dump tool's own error, explained the same way.
        side = concurrent.futures.ThreadPoolExecutor(max_workers=1)

        def ask_versions():
            try:
                return client.server_version(), client.tool_version(tool_name)
            except PacsError:
                return "unknown", client.tool_version(tool_name)

        versions = side.submit(ask_versions)
        try:
            if engine == "postgresql" and fmt == "custom":
                # written by pg_dump itself (-f): a seekable archive records where each table's
                # data starts, which selective and parallel restores need
                os.close(os.open(part, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))  # pg_dump keeps the mode
                argv = client.argv("pg_dump", "-d", conn["database"], "-Fc", "-f", part)
                rc, out, err = run_command(argv, step, env=client.env, check=False, timeout=timeout)
                if rc != 0:
                    raise PacsError(step, f"pg_dump exited with {rc}: {client.explain(err or out)}")
                with concurrent.futures.ThreadPoolExecutor(max_workers=1) as side:
                    hashed = side.submit(sha256_file, part)  # beside the read-back check below
                    info = {"bytes": os.path.getsize(part), "hashed": hashed}
                    with open(part, "rb") as handle:
                        os.fsync(handle.fileno())
                    check = check_dump(engine, part, fmt, client=client)
                    info["sha256"] = hashed.result()
            elif engine == "postgresql":
                argv = client.argv("pg_dump", "-d", conn["database"], "-Fd", "-j", str(max(1, jobs)), "-f", part)
                rc, out, err = run_command(argv, step, env=client.env, check=False, timeout=timeout)
                if rc != 0:
                    raise PacsError(step, f"pg_dump exited with {rc}: {client.explain(err or out)}")
                info = _tree_stats(part)
                info["sha256"] = hashlib.sha256("".join(f"{k}  {v}\n" for k, v in sorted(info["files"].items()))
                                                .encode()).hexdigest()
            else:
                argv = client.argv("mysqldump", "--single-transaction", "--routines", "--triggers", "--hex-blob",
                                   "--no-tablespaces", "--default-character-set=utf8mb4", "--quick",
                                   "--skip-dump-date", f"--result-file={part}", conn["database"])
                info = _write_and_follow(argv, client.env, part, step, client, timeout)
            dumped = time.monotonic()
            if "hashed" not in info:
                check = check_dump(engine, part, fmt, client=client, tail=info.get("tail"))
            os.rename(part, dest)
            fsync_dir(parent)
        except BaseException:
            _remove(part)
            side.shutdown(wait=True)
            raise
        version, tool_version = versions.result()
        side.shutdown(wait=True)
        result = {"path": dest, "engine": engine, "format": fmt, "bytes": info["bytes"], "sha256": info["sha256"],
                  "duration_seconds": round(time.monotonic() - started, 3),
                  "dump_seconds": round(dumped - started, 3),
                  "server_version": version, "tool": os.path.basename(client.tool(tool_name)),
                  "tool_version": tool_version, "connection": public(conn),
                  "check": check}
        if fmt == "directory":
            result["files"] = info["files"]
    return result


def check_dump(engine: str, path: str, fmt: str, client: Client | None = None, tail: bytes | None = None,
               bin_dir: str | None = None) -> dict:
    """A dump reads back: pg_restore lists it and it holds Orthanc's tables; a MySQL dump ends
    with mysqldump's completion line and holds Orthanc's tables and procedures."""
    step = "check the dump"
    if engine == "postgresql":
        client = client or Client({"engine": "postgresql", "host": "", "port": 0, "username": "", "database": "-"},
                                  bin_dir, step)
        argv = [client.tool("pg_restore"), "--list", path]
        rc, out, err = run_command(argv, step, check=False, timeout=600)
        if rc != 0:
            raise PacsError(step, f"pg_restore cannot read {path}: {' '.join(err.strip().splitlines()[-2:])}")
        tables = set(re.findall(r"TABLE DATA \S+ (\w+) ", out))
        blobs = len(re.findall(r" BLOB ", out))
        if not {"resources", "attachedfiles"} <= tables:
            raise PacsError(step, f"{path} does not hold Orthanc's index (no resources/attachedfiles table data)")
        return {"tables": len(tables), "large_objects": blobs}
    if tail is None:
        with open(path, "rb") as handle:
            handle.seek(max(0, os.path.getsize(path) - 4096))
            tail = handle.read()
    if MYSQL_TRAILER not in tail[-200:]:
        raise PacsError(step, f"{path} does not end with mysqldump's '-- Dump completed' line: it is truncated")
    return {"complete": True}


# ---------------------------------------------------------------------------------------------
# Offline reading of a dump
# ---------------------------------------------------------------------------------------------

class _Listing:
    def __init__(self):
        self.counts = {name: 0 for name in PLUGIN_RESOURCE_TYPES.values()}
        self.attachments: dict = {}   # uuid -> (compressed size, compressed md5)
        self.stored: dict = {}        # uuid -> (size, md5) of files kept in the database
        self.schema_version = None

    def as_dict(self) -> dict:
        return {"counts": self.counts, "attachments": self.attachments, "stored": self.stored,
                "schema_version": self.schema_version}

    def resource(self, kind) -> None:
        name = PLUGIN_RESOURCE_TYPES.get(int(kind))
        if name:
            self.counts[name] += 1

    def attachment(self, uuid, size, md5) -> None:
        self.attachments[uuid] = (int(size) if size is not None else 0, md5 or None)

    def global_property(self, prop, value) -> None:
        if str(prop) == SCHEMA_VERSION_PROPERTY:
            self.schema_version = str(value)


def _pg_copy_field(value: str):
    if value == "\\N":
        return None
    if "\\" in value:
        value = value.encode("latin-1", "backslashreplace").decode("unicode_escape")
    return value


def read_pg_dump(path: str, with_contents: bool = True, bin_dir: str | None = None) -> dict:
    """What a pg_dump archive holds, read with pg_restore (no server needed): resource counts,
    attachments, and the size and MD5 of every file stored as a large object."""
    step = "read the dump"
    client = Client({"engine": "postgresql"}, bin_dir, step)
    pg_restore = client.tool("pg_restore")
    rc, out, err = run_command([pg_restore, "--list", path], step, check=False, timeout=600)
    if rc != 0:
        raise PacsError(step, f"pg_restore cannot read {path}: {' '.join(err.strip().splitlines()[-2:])}")
    wanted = []
    for line in out.splitlines():
        if re.search(r" TABLE DATA \S+ (resources|attachedfiles|globalproperties|storagearea) ", line):
            wanted.append(line)
        elif with_contents and " BLOBS " in line:
            wanted.append(line)
    listing = _Listing()
    blob_of: dict = {}  # oid -> uuid
    blobs: dict = {}    # oid -> [size, md5]
    with tempfile.NamedTemporaryFile("w", prefix="pacs-orthanc-list-", delete=False) as handle:
        handle.write("\n".join(wanted) + "\n")
        list_file = handle.name
    try:
        proc = subprocess.Popen([pg_restore, "-L", list_file, "-f", "-", path], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, env={**os.environ, "LC_ALL": "C"})
        table = None
        columns: list = []
        current = None
        for raw in proc.stdout:
            if table is not None:
                if raw.startswith(b"\\.\n"):
                    table = None
                    continue
                fields = [_pg_copy_field(v) for v in raw.rstrip(b"\n").decode("utf-8").split("\t")]
                row = dict(zip(columns, fields))
                if table == "resources":
                    listing.resource(row["resourcetype"])
                elif table == "attachedfiles":
                    listing.attachment(row["uuid"], row.get("compressedsize"), row.get("compressedhash"))
                elif table == "globalproperties":
                    listing.global_property(row["property"], row["value"])
                elif table == "storagearea":
                    blob_of[row["content"]] = row["uuid"]
                continue
            if raw.startswith(b"COPY "):
                match = re.match(rb"COPY \S+?\.?(\w+) \(([^)]*)\) FROM stdin;", raw)
                if match:
                    table = match.group(1).decode()
                    columns = [c.strip().strip('"') for c in match.group(2).decode().split(",")]
                continue
            if raw.startswith(b"SELECT pg_catalog.lo_open('"):
                oid = raw.split(b"'")[1].decode()
                current = blobs.setdefault(oid, [0, hashlib.md5()])
            elif raw.startswith(b"SELECT pg_catalog.lowrite(0, '\\x") and current is not None:
                data = bytes.fromhex(raw[len(b"SELECT pg_catalog.lowrite(0, '\\x"):].split(b"'")[0].decode())
                current[0] += len(data)
                current[1].update(data)
            elif raw.startswith(b"SELECT pg_catalog.lo_close("):
                current = None
        err = proc.stderr.read().decode("utf-8", "replace")
        if proc.wait() != 0:
            raise PacsError(step, f"pg_restore cannot read {path}: {' '.join(err.strip().splitlines()[-2:])}")
    finally:
        os.unlink(list_file)
    for oid, uuid in blob_of.items():
        if oid in blobs:
            listing.stored[uuid] = (blobs[oid][0], blobs[oid][1].hexdigest())
        elif with_contents:
            listing.stored[uuid] = (None, None)  # listed in StorageArea, its large object is missing
    return listing.as_dict()


_MYSQL_TOKEN = re.compile(rb"'(?:[^'\\]|\\.)*'|0x[0-9A-Fa-f]*|NULL|-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?|[(),;]")
_MYSQL_ESCAPES = {b"0": b"\0", b"n": b"\n", b"r": b"\r", b"t": b"\t", b"Z": b"\x1a", b"b": b"\b"}


def _mysql_value(token: bytes):
    if token == b"NULL":
        return None
    if token.startswith(b"'"):
        body = re.sub(rb"\\(.)", lambda m: _MYSQL_ESCAPES.get(m.group(1), m.group(1)), token[1:-1])
        return body
    if token.startswith(b"0x"):
        return bytes.fromhex(token[2:].decode())
    return token.decode()


def read_mysql_dump(path: str, with_contents: bool = True) -> dict:
    """What a mysqldump file holds, parsed offline: resource counts, attachments, and the size
    and MD5 of every file stored in the StorageArea table."""
    step = "read the dump"
    listing = _Listing()
    tables = {"Resources", "AttachedFiles", "GlobalProperties"}
    if with_contents:
        tables.add("StorageArea")
    try:
        handle = open(path, "rb")
    except OSError as exc:
        raise PacsError(step, os_error_cause(exc))
    with handle:
        table = None
        row: list = []
        depth = 0
        for line in handle:
            if table is None:
                match = re.match(rb"INSERT INTO `(\w+)` VALUES", line)
                if not match or match.group(1).decode() not in tables:
                    continue
                table = match.group(1).decode()
                line = line[match.end():]
            for token in _MYSQL_TOKEN.findall(line):
                if token == b"(":
                    depth += 1
                    row = []
                elif token == b")":
                    depth -= 1
                    _mysql_row(listing, table, row)
                elif token == b";" and depth == 0:
                    table = None
                    break
                elif token != b",":
                    row.append(_mysql_value(token))
    return listing.as_dict()


def _mysql_row(listing: _Listing, table: str, row: list) -> None:
    text = [v.decode("utf-8") if isinstance(v, bytes) and table != "StorageArea" else v for v in row]
    if table == "Resources":
        listing.resource(text[1])
    elif table == "AttachedFiles":
        listing.attachment(text[2], text[3], text[7] if len(text) > 7 else None)
    elif table == "GlobalProperties":
        listing.global_property(text[0], text[1])
    elif table == "StorageArea":
        uuid = row[0].decode("utf-8") if isinstance(row[0], bytes) else row[0]
        content = row[1] if isinstance(row[1], bytes) else b""
        listing.stored[uuid] = (len(content), hashlib.md5(content).hexdigest())


def read_dump(engine: str, path: str, with_contents: bool = True, bin_dir: str | None = None) -> dict:
    if engine == "postgresql":
        return read_pg_dump(path, with_contents, bin_dir)
    return read_mysql_dump(path, with_contents)


find_dump = _layout.find_dump


# ---------------------------------------------------------------------------------------------
# Restore
# ---------------------------------------------------------------------------------------------

def _ident(engine: str, name: str) -> str:
    if engine == "postgresql":
        return '"' + name.replace('"', '""') + '"'
    return "`" + name.replace("`", "``") + "`"


def _literal(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "''") + "'"


def database_state(admin: Client, name: str) -> dict:
    """Whether a database exists, and how many tables (and large objects) it holds."""
    engine = admin.conn["engine"]
    if engine == "postgresql":
        rows = admin.query(f"SELECT 1 FROM pg_database WHERE datname = {_literal(name)}",
                           database=admin.conn.get("maintenance_db") or "postgres", step="look at the target database")
        if not rows:
            return {"exists": False, "tables": 0}
        rows = admin.query("SELECT (SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                           "WHERE c.relkind = 'r' AND n.nspname NOT IN ('pg_catalog', 'information_schema') "
                           "AND n.nspname NOT LIKE 'pg_toast%'), (SELECT count(*) FROM pg_largeobject_metadata)",
                           database=name, step="look at the target database")
        return {"exists": True, "tables": int(rows[0][0]), "large_objects": int(rows[0][1])}
    rows = admin.query(f"SELECT COUNT(*) FROM information_schema.schemata WHERE schema_name = {_literal(name)}",
                       database="information_schema", step="look at the target database")
    if int(rows[0][0]) == 0:
        return {"exists": False, "tables": 0}
    rows = admin.query(f"SELECT COUNT(*) FROM information_schema.tables WHERE table_schema = {_literal(name)}",
                       database="information_schema", step="look at the target database")
    return {"exists": True, "tables": int(rows[0][0])}


def restore(conn: dict, admin_conn: dict, path: str, fmt: str, owner: str | None = None, replace: bool = False,
            jobs: int = 1, bin_dir: str | None = None, check_mode: bool = False, timeout: float | None = None) -> dict:
    """Restore a dump into conn's database, created when missing (MySQL: utf8mb4 with
    utf8mb4_unicode_ci), refused when it holds tables unless ``replace``. The tables belong to
    ``owner`` (default: the connection's user)."""
    step = "restore the database"
    engine = conn["engine"]
    name = conn["database"]
    owner = owner or conn["username"]
    if not os.path.exists(path):
        raise PacsError(step, f"there is no dump at {path}")
    with Client(admin_conn, bin_dir, step) as admin:
        admin.tool("pg_restore" if engine == "postgresql" else "mysql")
        state = database_state(admin, name)
        result = {"changed": False, "database": name, "owner": owner, "before": state,
                  "connection": public(conn), "created": False, "replaced": False}
        if state["exists"] and (state["tables"] or state.get("large_objects")) and not replace:
            raise PacsError(step, f"the database {name!r} is not empty ({state['tables']} tables): "
                            "refusing to restore over it; set replace to drop and recreate it")
        result["changed"] = True
        if check_mode:
            return result
        started = time.monotonic()
        if state["exists"] and (state["tables"] or state.get("large_objects")):
            if engine == "postgresql":
                admin.query(f"DROP DATABASE {_ident(engine, name)} WITH (FORCE)",
                            database=admin_conn.get("maintenance_db") or "postgres", step="drop the database to replace")
            else:
                admin.query(f"DROP DATABASE {_ident(engine, name)}", database="information_schema",
                            step="drop the database to replace")
            result["replaced"] = True
            state = {"exists": False, "tables": 0}
        if not state["exists"]:
            if engine == "postgresql":
                admin.query(f"CREATE DATABASE {_ident(engine, name)} OWNER {_ident(engine, owner)}",
                            database=admin_conn.get("maintenance_db") or "postgres", step="create the database")
            else:
                admin.query(f"CREATE DATABASE {_ident(engine, name)} CHARACTER SET utf8mb4 "
                            "COLLATE utf8mb4_unicode_ci", database="information_schema", step="create the database")
            result["created"] = True
        if engine == "mysql" and owner and owner != admin_conn["username"]:
            rows = admin.query(f"SELECT Host FROM mysql.user WHERE User = {_literal(owner)}", database="mysql",
                               step="grant the database to its owner")
            hosts = [r[0] for r in rows] or ["%"]
            for grantee_host in hosts:
                admin.query(f"GRANT ALL PRIVILEGES ON {_ident(engine, name)}.* TO {_literal(owner)}@"
                            f"{_literal(grantee_host)}", database="information_schema",
                            step="grant the database to its owner")
        if engine == "postgresql":
            args = ["-d", name, "--no-owner", f"--role={owner}", "--exit-on-error", "--single-transaction"]
            if fmt == "directory" and jobs > 1:
                args = ["-d", name, "--no-owner", f"--role={owner}", "--exit-on-error", "-j", str(jobs)]
            rc, out, err = run_command(admin.argv("pg_restore", *args, path), step, env=admin.env, check=False,
                                       timeout=timeout)
            if rc != 0:
                raise PacsError(step, f"pg_restore exited with {rc}: {admin.explain(err or out)}")
        else:
            with open(path, "rb") as dump_file:
                argv = admin.argv("mysql", "--default-character-set=utf8mb4", name)
                full_env = {**os.environ, "LC_ALL": "C"}
                with tempfile.TemporaryFile() as err_file:
                    try:
                        proc = subprocess.run(argv, stdin=dump_file, stdout=subprocess.DEVNULL, stderr=err_file,
                                              env=full_env, timeout=timeout, check=False)
                    except subprocess.TimeoutExpired:
                        raise PacsError(step, f"mysql did not finish within {timeout} s; the database {name!r} "
                                        "is partly restored: run again with replace")
                    err_file.seek(0)
                    err = err_file.read().decode("utf-8", "replace")
            if proc.returncode != 0:
                raise PacsError(step, f"mysql exited with {proc.returncode}: {admin.explain(err)}")
        result["duration_seconds"] = round(time.monotonic() - started, 3)
        counts = {name_: 0 for name_ in PLUGIN_RESOURCE_TYPES.values()}
        table = "resources" if engine == "postgresql" else "Resources"
        column = "resourcetype" if engine == "postgresql" else "resourceType"
        for kind, count in admin.query(f"SELECT {column}, COUNT(*) FROM {table} GROUP BY {column}", database=name,
                                       step="count what was restored"):
            label = PLUGIN_RESOURCE_TYPES.get(int(kind))
            if label:
                counts[label] = int(count)
        result["counts"] = counts
    return result


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

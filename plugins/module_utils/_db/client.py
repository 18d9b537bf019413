# -*- coding: utf-8 -*-
# Copyright: pacs.orthanc contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The engines' command-line clients for one connection (psql, mysql and the dump tools), the
password in a private 0600 file in a 0700 folder (PGPASSFILE, or MySQL's --defaults-extra-file),
never a command line, a result or a log; and what their error output means, in words an
administrator can act on."""

from __future__ import annotations

import os
import re
import shutil
import tempfile

from ansible_collections.pacs.orthanc.plugins.module_utils._common import PacsError, run_command
from ansible_collections.pacs.orthanc.plugins.module_utils._db.connection import where

__metaclass__ = type


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
        if "permission denied for database" in lowered:
            db = re.search(r'permission denied for database "?([^"\s]+)', text, re.I)
            target = db.group(1) if db else self.conn["database"]
            return (f"{self.conn['username']!r} may not connect to the database {target!r} ({where(self.conn)}): "
                    f'run as its owner: GRANT CONNECT ON DATABASE "{target}" TO "{self.conn["username"]}";')
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


def ident(engine: str, name: str) -> str:
    if engine == "postgresql":
        return '"' + name.replace('"', '""') + '"'
    return "`" + name.replace("`", "``") + "`"


def literal(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "''") + "'"

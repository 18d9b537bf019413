# -*- coding: utf-8 -*-
# Copyright: pacs.orthanc contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The engines' command-line clients for one connection (psql, mysql and the dump tools), the
password in a private 0600 file in a 0700 folder (PGPASSFILE, or MySQL's --defaults-extra-file),
never a command line, a result or a log; and what their error output means, in words an
administrator can act on.

With ``container`` (a ``_db.container.InContainer``) the tools are the database container's own,
run through the engine's ``exec -i``: the password is then the first line of their standard input
(see ``_db.container``), a dump they read follows it, and what they write comes back on their
standard output."""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import threading

from ansible_collections.pacs.orthanc.plugins.module_utils._common import PIPE, PacsError, Program, os_error_cause
from ansible_collections.pacs.orthanc.plugins.module_utils._db.connection import where

__metaclass__ = type


class Client:
    """Runs one engine's command-line tools for one connection, the password in a private file.
    Use as a context manager: the file and its folder are removed at the end."""

    def __init__(self, conn: dict, bin_dir: str | None = None, step: str = "database", container=None):
        self.conn = conn
        self.bin_dir = bin_dir
        self.step = step
        self.container = container
        self.tmp = None
        self.env: dict = {}
        self.auth_args: list = []
        self.secret_line = b""

    def __enter__(self):
        conn = self.conn
        if self.container is not None:
            return self._enter_container()
        self.tmp = tempfile.mkdtemp(prefix="pacs-orthanc-db-")  # mode 0700
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

    def _enter_container(self):
        """Inside the database container: the server over TCP, the password as the first line of
        the tool's standard input (a line break cannot be part of it)."""
        conn = self.conn
        password = str(conn.get("password") or "")
        if "\n" in password or "\r" in password:
            raise PacsError(self.step, "the database password holds a line break, which cannot be handed to the "
                            f"tools inside the container {self.container.name}")
        self.env = self.container.env
        if conn["engine"] == "postgresql":
            self.auth_args = ["-h", str(conn["host"]), "-p", str(conn["port"]), "-U", str(conn["username"]),
                              "--no-password"]
            line = password
        else:
            self.auth_args = [f"--user={conn['username']}", f"--host={conn['host']}", f"--port={conn['port']}",
                              "--protocol=tcp"]
            line = f"password={self._mysql_value(password)}" if password else ""
        self.secret_line = (line + "\n").encode("utf-8")
        return self

    def __exit__(self, *exc):
        if self.tmp:
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
        """Full path of one of the engine's programs (inside the container: its name there); a
        clear error when it is missing."""
        names = [name]
        if name == "mysqldump":
            names.append("mariadb-dump")
        elif name == "mysql":
            names.append("mariadb")
        if self.container is not None:
            # MariaDB 11's images have only the mariadb* names
            found = self.container.tool(names[::-1] if len(names) > 1 else names, self.step)
            if found:
                return found
            raise PacsError(self.step, f"{name} was not found in the database container {self.container.name}: "
                            "its image has no client tools (the official postgres, mariadb and mysql images have them)")
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

    def argv(self, tool: str, *args, auth: bool = True) -> list:
        """The tool's argument list with the connection (MySQL's --defaults-extra-file comes first);
        inside the container, the engine's exec of it."""
        auth_args = self.auth_args if auth else []
        if self.container is not None:
            return self.container.argv(self.conn["engine"], self.tool(tool), [*auth_args, *args])
        return [self.tool(tool), *auth_args, *args]

    def start(self, tool: str, args: list, step: str | None = None, source: str | None = None,
              output: str | None = None, auth: bool = True, pipe: bool = False) -> "Running":
        """Start one of the tools (see ``run``); the caller waits for it. ``pipe``: its standard
        output is ``Running.stdout``, to read as it comes."""
        step = step or self.step
        engine = self.conn["engine"]
        args = list(args)
        if self.container is None:
            stdin_path = None
            if source is not None:
                if tool == "mysql":
                    stdin_path = source
                else:
                    args.append(source)
            if output is not None:
                args += ["-f", output] if tool == "pg_dump" else [f"--result-file={output}"]
            return Running(self.argv(tool, *args, auth=auth), step, self.env, stdin_path=stdin_path, name=tool,
                           pipe=pipe)
        if engine == "mysql" or auth:
            prefix = self.secret_line
        else:
            prefix = b"\n"
        return Running(self.argv(tool, *args, auth=auth), step, self.env, prefix=prefix, stdin_path=source,
                       output=output, name=tool, pipe=pipe)

    def run(self, tool: str, args: list, step: str | None = None, source: str | None = None,
            output: str | None = None, auth: bool = True, timeout: float | None = None, timeout_hint: str = ""):
        """Run one of the tools to its end: (rc, stdout, stderr). ``source``: a dump file it reads
        (pg_restore's file argument, mysql's standard input; inside the container, its standard
        input after the password). ``output``: a file it writes (pg_dump -f, mysqldump
        --result-file; inside the container, its standard output). ``auth``: with the connection."""
        with self.start(tool, args, step, source, output, auth) as running:
            rc = running.wait(timeout, timeout_hint)
            return rc, running.output(), running.errors()

    def explain(self, text: str) -> str:
        """A tool's error output turned into a cause an administrator can act on."""
        lowered = text.lower()
        if self.container is not None:
            found = self.container.explain(text)
            if found:
                return found
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
            tool, args = "psql", ["-d", db, "-X", "-q", "-A", "-t", "-F", "\t", "-v", "ON_ERROR_STOP=1", "-c", sql]
        else:
            tool, args = "mysql", ["-N", "-B", "--default-character-set=utf8mb4", "-e", sql, db]
        rc, out, err = self.run(tool, args, step, timeout=120)
        if rc != 0:
            raise PacsError(step, self.explain(err or out))
        return [line.split("\t") for line in out.splitlines() if line != ""]

    def server_version(self) -> str:
        sql = "SHOW server_version" if self.conn["engine"] == "postgresql" else "SELECT VERSION()"
        rows = self.query(sql, step="connect to the database")
        return rows[0][0] if rows else "unknown"

    def tool_version(self, tool: str) -> str:
        rc, out, _err = self.run(tool, ["--version"], auth=False, timeout=30)
        return out.strip().splitlines()[0] if rc == 0 and out.strip() else "unknown"


def ident(engine: str, name: str) -> str:
    if engine == "postgresql":
        return '"' + name.replace('"', '""') + '"'
    return "`" + name.replace("`", "``") + "`"


def literal(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "''") + "'"


class Running:
    """One client tool started by ``Client.start``: on the host, or inside the database container
    (``prefix``, the password line, then the ``stdin_path`` file fed to its standard input by a
    thread; its standard output into ``output``). Without ``output`` its standard output is kept
    in a temporary file for ``output()``. As a context manager: killed if still running."""

    def __init__(self, argv: list, step: str, env: dict, prefix: bytes | None = None, stdin_path: str | None = None,
                 output: str | None = None, name: str | None = None, pipe: bool = False):
        self.step = step
        self.files: list = []
        self.feeder = None
        self.out_file = None
        try:
            source = open(stdin_path, "rb") if stdin_path else None  # pylint: disable=consider-using-with
            if source is not None:
                self.files.append(source)
            if pipe:
                out = PIPE
            elif output is not None:
                # created by the caller (0600); the tool writes it through this process's descriptor
                out = os.fdopen(os.open(output, os.O_WRONLY | os.O_TRUNC), "wb")
                self.files.append(out)
            else:
                out = self.out_file = tempfile.TemporaryFile()  # pylint: disable=consider-using-with
        except OSError as exc:
            self.close_files()
            raise PacsError(step, os_error_cause(exc))
        try:
            if prefix is None:
                self.program = Program(argv, step, env=env, stdin=source, stdout=out)
            else:
                self.program = Program(argv, step, env=env, data=True, stdout=out)
                self.feeder = threading.Thread(target=self._feed, args=(self.program.proc.stdin, prefix, source))
                self.feeder.daemon = True
                self.feeder.start()
        except BaseException:
            self.close_files()
            raise
        if name:
            self.program.name = name  # in messages: pg_dump, not the engine's client
        self.name = self.program.name

    @staticmethod
    def _feed(pipe, prefix: bytes, source) -> None:
        try:
            pipe.write(prefix)
            pipe.flush()
            if source is not None:
                while True:
                    chunk = source.read(1024 * 1024)
                    if not chunk:
                        break
                    pipe.write(chunk)
        except (OSError, ValueError):
            pass  # the tool stopped reading: its exit status and error output say why
        finally:
            try:
                pipe.close()
            except OSError:
                pass

    @property
    def stdout(self):
        return self.program.stdout

    def poll(self):
        return self.program.poll()

    def wait(self, timeout: float | None = None, hint: str = "") -> int:
        rc = self.program.wait(timeout=timeout, hint=hint)
        if self.feeder is not None:
            self.feeder.join()
        return rc

    def output(self) -> str:
        if self.out_file is None:
            return ""
        self.out_file.seek(0)
        return self.out_file.read().decode("utf-8", "replace")

    def errors(self) -> str:
        return self.program.errors()

    def close_files(self) -> None:
        for handle in self.files + ([self.out_file] if self.out_file else []):
            handle.close()
        self.files, self.out_file = [], None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.program.close()
        if self.feeder is not None:
            self.feeder.join(timeout=10)
        self.close_files()
        return False

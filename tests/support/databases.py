"""Real PostgreSQL and MariaDB servers for tests: per-test databases and users with random
passwords, dropped at the end. The servers themselves are Debian's, installed and started by
scripts/databases.sh (which .ci/run calls)."""

from __future__ import annotations

import secrets
import subprocess

PG_PLUGINS = ["/usr/share/orthanc/plugins/libOrthancPostgreSQLIndex.so",
              "/usr/share/orthanc/plugins/libOrthancPostgreSQLStorage.so"]
MY_PLUGINS = ["/usr/share/orthanc/plugins/libOrthancMySQLIndex.so",
              "/usr/share/orthanc/plugins/libOrthancMySQLStorage.so"]
MY_SOCKET = "/run/mysqld/mysqld.sock"


def _run(argv, sql, check=True):
    proc = subprocess.run(argv, input=sql, text=True, capture_output=True, timeout=60, check=False)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{argv[0]}: {proc.stderr.strip()}")
    return proc.stdout


def pg_sql(sql: str, database: str = "postgres", check: bool = True) -> str:
    """Run SQL as the postgres superuser (peer authentication over the socket)."""
    return _run(["runuser", "-u", "postgres", "--", "psql", "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1",
                 "-d", database], sql, check)


def my_sql(sql: str, database: str = "", check: bool = True) -> str:
    """Run SQL as MariaDB's root (unix socket authentication)."""
    return _run(["mysql", "-N", "-B"] + ([database] if database else []), sql, check)


def pg_available() -> bool:
    try:
        return pg_sql("SELECT 1").strip() == "1"
    except (RuntimeError, OSError):
        return False


def my_available() -> bool:
    try:
        return my_sql("SELECT 1").strip() == "1"
    except (RuntimeError, OSError):
        return False


class Database:
    """One database and its owner, with a random password; ``admin`` is a superuser made for the
    test (PostgreSQL) or root through the socket (MariaDB)."""

    def __init__(self, engine: str, name: str):
        self.engine = engine
        self.name = name
        self.user = f"{name}_u"
        self.password = "pw-" + secrets.token_hex(12)
        self.admin_user = f"{name}_admin"
        self.admin_password = "adm-" + secrets.token_hex(12)
        self.extra: list = []

    def create(self, with_database: bool = True) -> "Database":
        if self.engine == "postgresql":
            pg_sql(f"CREATE ROLE {self.user} LOGIN PASSWORD '{self.password}';"
                   f"CREATE ROLE {self.admin_user} LOGIN SUPERUSER PASSWORD '{self.admin_password}';")
            if with_database:
                pg_sql(f"CREATE DATABASE {self.name} OWNER {self.user};")
        else:
            my_sql(f"CREATE USER '{self.user}'@'localhost' IDENTIFIED BY '{self.password}';")
            if with_database:
                self.create_database()
        return self

    def create_database(self, name: str | None = None) -> None:
        name = name or self.name
        if self.engine == "postgresql":
            pg_sql(f"CREATE DATABASE {name} OWNER {self.user};")
        else:
            my_sql(f"CREATE DATABASE {name} CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci;"
                   f"GRANT ALL ON {name}.* TO '{self.user}'@'localhost';")
        if name != self.name:
            self.extra.append(name)

    def drop_database(self) -> None:
        """Drop the database only (its users stay), as a lost server would leave things."""
        if self.engine == "postgresql":
            pg_sql(f"DROP DATABASE IF EXISTS {self.name} WITH (FORCE);")
        else:
            my_sql(f"DROP DATABASE IF EXISTS {self.name};")

    def drop(self) -> None:
        for name in [self.name] + self.extra:
            if self.engine == "postgresql":
                pg_sql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE);", check=False)
            else:
                my_sql(f"DROP DATABASE IF EXISTS {name};", check=False)
        if self.engine == "postgresql":
            pg_sql(f"DROP ROLE IF EXISTS {self.user}; DROP ROLE IF EXISTS {self.admin_user};", check=False)
        else:
            my_sql(f"DROP USER IF EXISTS '{self.user}'@'localhost';", check=False)

    def orthanc_config(self, storage_in_database: bool, database: str | None = None) -> dict:
        """Orthanc configuration keys for this database (index always; files too when asked)."""
        section = {"EnableIndex": True, "EnableStorage": storage_in_database, "Database": database or self.name,
                   "Username": self.user, "Password": self.password, "Lock": True}
        if self.engine == "postgresql":
            section.update({"Host": "127.0.0.1", "Port": 5432})
            return {"Plugins": PG_PLUGINS, "PostgreSQL": section}
        section.update({"Host": "localhost", "UnixSocket": MY_SOCKET})
        return {"Plugins": MY_PLUGINS, "MySQL": section}

    def count(self, table: str, database: str | None = None) -> int:
        if self.engine == "postgresql":
            return int(pg_sql(f"SELECT count(*) FROM {table.lower()}", database or self.name).strip())
        return int(my_sql(f"SELECT COUNT(*) FROM {table}", database or self.name).strip())

    def dicom_uuids(self) -> dict:
        """{instance public id: uuid of its DICOM attachment}, read from the database itself."""
        sql = ("SELECT r.publicId, a.uuid FROM Resources r JOIN AttachedFiles a ON a.id = r.internalId "
               "WHERE r.resourceType = 3 AND a.fileType = 1")
        if self.engine == "postgresql":
            out = pg_sql(sql.replace("publicId", "publicid").replace("internalId", "internalid")
                         .replace("resourceType", "resourcetype").replace("fileType", "filetype"), self.name)
            rows = [line.split("|") for line in out.splitlines() if line]
        else:
            rows = [line.split("\t") for line in my_sql(sql, self.name).splitlines() if line]
        return dict(rows)

    def restore_vars(self) -> dict:
        """Role variables that let the restore create and fill the database."""
        if self.engine == "postgresql":
            return {"orthanc_restore_db_admin_username": self.admin_user,
                    "orthanc_restore_db_admin_password": self.admin_password}
        return {"orthanc_restore_db_admin_unix_socket": MY_SOCKET}  # alone, as docs/database.md says

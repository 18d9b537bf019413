"""The scripts that hand the password to the database tools inside a database container
(``_db.container``), run here by the real ``sh`` (dash) with a stand-in tool: the password comes
from the first line of standard input, reaches the tool (PGPASSWORD, or MySQL's option file on
/dev/fd/3) unchanged whatever its characters, and the rest of standard input (a dump to restore)
follows untouched. Also the Client's argv in a container: no password anywhere in it."""

from __future__ import annotations

import subprocess

import pytest

from ansible_collections.pacs.orthanc.plugins.module_utils._db import client as db_client, container as db_container

pytestmark = pytest.mark.quick

TRICKY = "a$b`c\"d'e\\f g;$(id)%"
DUMP = b"line one\n\x00\xff binary\nlast"


def run_script(script: str, tool: str, stdin: bytes) -> bytes:
    return subprocess.run(["sh", "-c", script, db_container.SCRIPT_NAME, "sh", "-c", tool, "tool"], input=stdin,
                          stdout=subprocess.PIPE, check=True, timeout=30).stdout


def test_postgresql_script_sets_pgpassword_and_passes_the_rest_of_stdin():
    out = run_script(db_container.PG_SCRIPT, 'printf "%s|%s|" "$PGPASSWORD" "$PGAPPNAME"; cat',
                     TRICKY.encode() + b"\n" + DUMP)
    assert out == TRICKY.encode() + b"|pacs.orthanc|" + DUMP


def test_postgresql_script_without_password_leaves_pgpassword_unset():
    out = run_script(db_container.PG_SCRIPT, 'printf "%s" "${PGPASSWORD-unset}"', b"\n")
    assert out == b"unset"


def test_mysql_script_hands_an_option_file_on_fd_3(tmp_path):
    # the stand-in for mysql: prints its first argument, the option file it names, then stdin
    tool = tmp_path / "tool"
    tool.write_text('#!/bin/sh\nprintf "%s\\n" "$1"; cat "${1#--defaults-extra-file=}"; cat\n')
    tool.chmod(0o755)
    line = f"password={db_client.Client._mysql_value(TRICKY)}\n".encode()
    out = subprocess.run(["sh", "-c", db_container.MYSQL_SCRIPT, db_container.SCRIPT_NAME, str(tool), "--user=root"],
                         input=line + DUMP, stdout=subprocess.PIPE, check=True, timeout=30).stdout
    assert out == b"--defaults-extra-file=/dev/fd/3\n[client]\n" + line + DUMP


class FakeEngine:
    name = "podman"
    env = {"CONTAINER_HOST": "unix:///x"}

    def exec_argv(self, container, argv, interactive=False):
        return ["podman", "exec"] + (["-i"] if interactive else []) + [container.name] + list(argv)


class FakeContainer:
    name = "db1"
    engine = FakeEngine()
    env: dict = {}
    data = {"NetworkSettings": {"Ports": {"5432/tcp": [{"HostIp": "", "HostPort": "5433"}]}}}


@pytest.mark.parametrize("engine", ["postgresql", "mysql"])
def test_client_in_a_container_keeps_the_password_off_argv_and_environment(engine):
    where = db_container.InContainer(FakeContainer())
    where.found = {("pg_dump",): "pg_dump", ("mariadb-dump", "mysqldump"): "mariadb-dump"}
    conn = db_container.connection_inside({"engine": engine, "host": "db", "port": 5433, "database": "orthanc",
                                           "username": "orthanc", "password": TRICKY, "unix_socket": "/x"}, where)
    assert conn["port"] == 5432 and conn["host"] == "127.0.0.1" and conn["unix_socket"] is None  # published port
    with db_client.Client(conn, container=where) as client:
        argv = client.argv("pg_dump" if engine == "postgresql" else "mysqldump", "orthanc")
        assert argv[:4] == ["podman", "exec", "-i", "db1"]
        assert TRICKY not in " ".join(argv) and TRICKY not in str(client.env)
        assert TRICKY.encode() in client.secret_line.replace(b"\\\\", b"\\").replace(b'\\"', b'"')
        assert client.tmp is None  # no password file on the host


def test_a_password_with_a_line_break_is_refused():
    where = db_container.InContainer(FakeContainer())
    conn = {"engine": "postgresql", "host": "127.0.0.1", "port": 5432, "database": "d", "username": "u",
            "password": "a\nb", "container": "db1"}
    with pytest.raises(db_client.PacsError, match="line break"):
        with db_client.Client(conn, container=where):
            pass


@pytest.mark.parametrize("host,used", [("db", True), ("127.0.0.1", False), ("localhost", False),
                                       ("db.example.org", False), ("::1", False)])
def test_a_compose_project_uses_the_container_only_for_a_service_name(monkeypatch, host, used):
    monkeypatch.setattr(db_container, "find", lambda conn, *args: db_container.InContainer(FakeContainer()))
    conn = {"engine": "postgresql", "host": host, "port": 5432, "database": "d", "username": "u", "password": "p"}
    _conn, where = db_container.from_params(conn, {"compose_project": "pacs", "container": None})
    assert (where is not None) is used

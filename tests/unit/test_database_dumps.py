"""The offline readers of database dumps, on small dumps made by Debian's real pg_dump 15 and
mysqldump (MariaDB 10.11) of databases that Orthanc's own plugins filled (files in the database
and on disk). tests/unit/fixtures/make_dumps.py made them, and wrote in expected.json what
Orthanc's REST API and the database server said; the readers must find exactly that, without a
server. Also the one process runner with files for standard input and output."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess

import pytest

from ansible_collections.pacs.orthanc.plugins.module_utils._common import (
    DEVNULL, PacsError, Program, run_command)
from ansible_collections.pacs.orthanc.plugins.module_utils._db import dump as db_dump, listing, restore

FIXTURES = pathlib.Path(__file__).resolve().parent / "fixtures"
EXPECTED = json.loads((FIXTURES / "expected.json").read_text())
DUMPS = sorted(EXPECTED)

needs_pg_restore = pytest.mark.skipif(shutil.which("pg_restore") is None, reason="postgresql-client is not installed")


def engine_of(name: str) -> str:
    return "postgresql" if name.endswith(".pgdump") else "mysql"


def params(names):
    return [pytest.param(n, marks=needs_pg_restore) if engine_of(n) == "postgresql" else n for n in names]


@pytest.mark.parametrize("name", params(DUMPS))
def test_reader_finds_what_orthanc_and_the_server_said(name):
    expected = EXPECTED[name]
    found = listing.read_dump(engine_of(name), str(FIXTURES / name), with_contents=True)
    assert found["counts"] == expected["counts"] == {"patients": 1, "studies": 1, "series": 1, "instances": 2}
    assert found["attachments"] == {uuid: (a["size"], a["md5"]) for uuid, a in expected["attachments"].items()}
    assert len(found["attachments"]) == 2
    assert found["stored"] == {uuid: (a["size"], a["md5"]) for uuid, a in expected["stored"].items()}
    assert bool(found["stored"]) is expected["storage_in_database"]
    assert found["schema_version"] == "6"


@pytest.mark.parametrize("name", params(DUMPS))
def test_without_contents_the_files_are_not_read(name):
    found = listing.read_dump(engine_of(name), str(FIXTURES / name), with_contents=False)
    assert found["stored"] == {}
    assert len(found["attachments"]) == 2


@pytest.mark.parametrize("name", params(DUMPS))
def test_stream_dump_hands_on_what_the_reader_finds(name):
    """The delta pass and the verification of a dump get the attachments one by one (no dict of
    every file), and the summary without them."""
    attachments, stored = {}, {}
    summary = listing.stream_dump(engine_of(name), str(FIXTURES / name),
                                  lambda uuid, size, md5: attachments.setdefault(uuid, (size, md5)),
                                  lambda uuid, size, md5: stored.setdefault(uuid, (size, md5)))
    expected = EXPECTED[name]
    assert attachments == {uuid: (a["size"], a["md5"]) for uuid, a in expected["attachments"].items()}
    assert stored == {uuid: (a["size"], a["md5"]) for uuid, a in expected["stored"].items()}
    assert summary["attachments"] == {} and summary["stored"] == {} and summary["counts"] == expected["counts"]


@needs_pg_restore
def test_a_large_object_missing_from_the_sql_is_named():
    """storagearea lists a file whose large object the SQL does not hold: (None, None), so that
    verification reports it rather than passing it over."""
    name = "postgresql-files-in-db.pgdump"
    sql = subprocess.run(["pg_restore", "-f", "-", str(FIXTURES / name)], capture_output=True, check=True).stdout
    lines = sql.splitlines(keepends=True)
    first_open = next(i for i, line in enumerate(lines) if line.startswith(b"SELECT pg_catalog.lo_open('"))
    first_close = next(i for i in range(first_open, len(lines)) if lines[i].startswith(b"SELECT pg_catalog.lo_close("))
    whole = listing.parse_pg_sql(lines)
    cut = listing.parse_pg_sql(lines[:first_open] + lines[first_close + 1:])
    assert len(whole["stored"]) == 2 and None not in [v[0] for v in whole["stored"].values()]
    missing = [uuid for uuid, value in cut["stored"].items() if value == (None, None)]
    assert len(missing) == 1 and whole["stored"][missing[0]] != (None, None)
    assert listing.parse_pg_sql(lines[:first_open] + lines[first_close + 1:], with_contents=False)["stored"] == {
        uuid: v for uuid, v in whole["stored"].items() if uuid != missing[0]}


@pytest.mark.parametrize("name", params(DUMPS))
def test_check_dump_accepts_the_whole_dump(name):
    engine = engine_of(name)
    fmt = "custom" if engine == "postgresql" else "sql"
    check = db_dump.check_dump(engine, str(FIXTURES / name), fmt)
    if engine == "postgresql":
        assert check["tables"] >= 10
        assert check["large_objects"] == (2 if EXPECTED[name]["storage_in_database"] else 0)
    else:
        assert check == {"complete": True}


@pytest.mark.parametrize("name", params(["mysql-files-in-db.sql", "postgresql-files-in-db.pgdump"]))
def test_a_truncated_dump_is_refused(name, tmp_path):
    engine = engine_of(name)
    data = (FIXTURES / name).read_bytes()
    cut = tmp_path / name
    cut.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(PacsError) as caught:
        db_dump.check_dump(engine, str(cut), "custom" if engine == "postgresql" else "sql")
    assert ("truncated" if engine == "mysql" else "pg_restore cannot read") in caught.value.cause
    if engine == "postgresql":
        with pytest.raises(PacsError):
            listing.read_dump(engine, str(cut))


def test_find_dump_names_engine_format_and_path(tmp_path):
    assert db_dump.find_dump(str(tmp_path)) is None
    (tmp_path / "database").mkdir()
    shutil.copy(FIXTURES / "mysql-files-on-disk.sql", tmp_path / "database" / "orthanc.sql")
    assert db_dump.find_dump(str(tmp_path)) == ("mysql", "sql", str(tmp_path / "database" / "orthanc.sql"))


def test_the_mysql_dump_definers_are_orthanc_s_user():
    definers = restore._mysql_dump_definers(str(FIXTURES / "mysql-files-in-db.sql"))
    assert len(definers) == 1 and next(iter(definers)).endswith("_u@localhost")


@needs_pg_restore
def test_the_postgresql_dump_creates_pg_trgm():
    assert restore._pg_dump_extensions(str(FIXTURES / "postgresql-files-in-db.pgdump"),
                                       listing.Client({"engine": "postgresql"})) == ["pg_trgm"]


@pytest.mark.parametrize("pattern, name, matches", [
    ("orthanc", "orthanc", True), ("orthanc", "orthanc2", False), ("orth_nc", "orthanc", True),
    ("orth\\_nc", "orthanc", False), ("orth\\_nc", "orth_nc", True), ("pacs%", "pacs_x", True), ("%", "any", True),
    ("Orthanc", "orthanc", False)])
def test_mysql_grant_patterns(pattern, name, matches):
    assert restore._mysql_pattern_matches(pattern, name) is matches


def test_run_command_reads_and_writes_files(tmp_path):
    source, target = tmp_path / "in", tmp_path / "out"
    source.write_bytes(b"line one\nline two\n" * 1000)
    with open(source, "rb") as stdin, open(target, "wb") as stdout:
        rc, out, err = run_command(["cat"], "copy", stdin=stdin, stdout=stdout)
    assert (rc, out, err) == (0, "", "")
    assert target.read_bytes() == source.read_bytes()
    rc, out, _err = run_command(["cat"], "copy", data=b"secret on stdin")
    assert (rc, out) == (0, "secret on stdin")
    with open(source, "rb") as stdin:
        assert run_command(["wc", "-l"], "count", stdin=stdin)[1].strip() == "2000"
    assert run_command(["true"], "nothing", stdout=DEVNULL) == (0, "", "")


def test_run_command_failures_are_clear(tmp_path):
    with pytest.raises(PacsError) as caught:
        run_command(["sh", "-c", "echo oops >&2; exit 3"], "the step")
    assert caught.value.step == "the step" and caught.value.cause == "sh exited with 3: oops"
    with pytest.raises(PacsError) as caught:
        run_command(["sleep", "30"], "wait", timeout=0.5, timeout_hint="; what it left")
    assert caught.value.cause == "sleep did not finish within 0.5 s; what it left"
    with pytest.raises(PacsError) as caught:
        run_command([str(tmp_path / "missing")], "run")
    assert "program not found" in caught.value.cause


def test_program_kills_what_still_runs_at_the_end():
    with Program(["sleep", "30"], "wait") as program:
        pid = program.pid
        assert program.poll() is None
    assert program.poll() is not None
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_copy_rows_are_read_by_their_columns_positions():
    """The SQL pg_restore writes: the rows of resources and attachedfiles read by the positions
    their COPY line names (any order), NULL read as None, escapes undone, resources counted by
    type (0-based in the plugins' schema)."""
    lines = [b"COPY public.resources (internalid, resourcetype, publicid, parentid) FROM stdin;\n",
             b"1\t0\tp\t\\N\n", b"2\t1\ts\t1\n", b"3\t3\ti\t2\n", b"4\t3\tj\t2\n", b"\\.\n",
             b"COPY public.attachedfiles (id, filetype, compressedhash, uuid, compressedsize, uncompressedsize) "
             b"FROM stdin;\n",
             b"3\t1\th1\tu1\t10\t10\n", b"4\t1\t\\N\tu2\t20\t20\n", b"\\.\n",
             b"COPY public.globalproperties (property, value) FROM stdin;\n", b"1\t6\n", b"4\tx\\ty\n", b"\\.\n"]
    found = listing.parse_pg_sql(lines)
    assert found["counts"] == {"patients": 1, "studies": 1, "series": 0, "instances": 2}
    assert found["attachments"] == {"u1": (10, "h1"), "u2": (20, None)}
    assert (found["schema_version"], found["patch_level"]) == ("6", "x\ty")

"""The storage check of a verification on real files and a real SQLite index (or a real dump's
listing): it streams the attachments sorted by uuid, checks them in bounded batches (in worker
processes) and finds orphans in the same listings of the storage folders, exactly also when the
index lists a uuid twice."""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import shutil
import sqlite3

import pytest

from ansible_collections.pacs.orthanc.plugins.module_utils import _verify
from ansible_collections.pacs.orthanc.plugins.module_utils._db import listing as db_listing
from tests.support.storage_tree import at, put

pytestmark = pytest.mark.quick
FIXTURES = pathlib.Path(__file__).resolve().parent / "fixtures"


def backup_with(tmp_path, files: int):
    """A backup folder: storage/ with ``files`` files, index/index listing each with size and MD5."""
    storage = tmp_path / "backup" / "storage"
    storage.mkdir(parents=True)
    (tmp_path / "backup" / "index").mkdir()
    index = tmp_path / "backup" / "index" / "index"
    conn = sqlite3.connect(index)
    conn.execute("CREATE TABLE AttachedFiles (id INTEGER, fileType INTEGER, uuid TEXT, compressedSize INTEGER, "
                 "uncompressedSize INTEGER, compressionType INTEGER, uncompressedMD5 TEXT, compressedMD5 TEXT)")
    for number in range(files):
        data = os.urandom(50 + number)
        name = put(storage, data)
        md5 = hashlib.md5(data).hexdigest()
        conn.execute("INSERT INTO AttachedFiles VALUES (?, 1, ?, ?, ?, 1, ?, ?)", (number, name, len(data), len(data), md5, md5))
    conn.commit()
    return storage, index, conn


def check(storage, index, **kwargs) -> dict:
    report = _verify.Report()
    _verify.check_storage(str(storage.parent), str(index), report, **kwargs)
    return report.as_dict()


def test_every_file_hashed_across_windows_and_a_wrong_md5_found(tmp_path, monkeypatch):
    monkeypatch.setattr(_verify, "HASH_WINDOW", 4)  # 11 files: three windows
    storage, index, conn = backup_with(tmp_path, 11)
    victim = conn.execute("SELECT uuid FROM AttachedFiles LIMIT 1 OFFSET 6").fetchone()[0]
    conn.close()
    data = bytearray(at(storage, victim).read_bytes())
    data[0] ^= 1
    at(storage, victim).write_bytes(bytes(data))
    result = check(storage, index)
    assert result["files_hashed"] == result["files_checked"] == 11 and result["orphans"] == 0
    assert result["problems"] == {"storage files with a wrong MD5": {"count": 1, "examples": [victim]}}
    asked = []
    result = check(storage, index, hash_filter=lambda u: asked.append(u) or False, workers=1)
    assert result["files_hashed"] == 0 and len(asked) == 11  # the filter is asked about every file


def test_orphans_found_when_counts_differ_and_when_a_uuid_is_listed_twice(tmp_path):
    storage, index, conn = backup_with(tmp_path, 5)
    orphan = put(storage, b"not in the index")
    assert check(storage, index)["orphan_examples"] == [orphan]  # 6 stored, 5 listed and present
    # the index lists one uuid twice: 6 stored and 6 "present" by count, yet one is an orphan
    dup, size, md5 = conn.execute("SELECT uuid, compressedSize, compressedMD5 FROM AttachedFiles LIMIT 1").fetchone()
    conn.execute("INSERT INTO AttachedFiles VALUES (99, 1, ?, ?, ?, 1, ?, ?)", (dup, size, size, md5, md5))
    conn.commit()
    conn.close()
    result = check(storage, index)
    assert result["files_checked"] == 6 and result["orphans"] == 1 and result["orphan_examples"] == [orphan]


DUMPS = json.loads((FIXTURES / "expected.json").read_text())


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.skipif(
    n.endswith(".pgdump") and shutil.which("pg_restore") is None, reason="no pg_restore")) for n in sorted(DUMPS)])
def test_a_dump_s_listing_streams_into_sqlite_in_batches(name, tmp_path, monkeypatch):
    """A real dump (tests/unit/fixtures, made by pg_dump and mysqldump of Orthanc's databases) is
    verified without its listing gathered into dicts: the readers that gather are out of reach,
    the listing goes to SQLite one row per batch, and the check still finds what is wrong."""
    def gathered(*_args, **_kwargs):
        raise AssertionError("the dump's listing was gathered into a dict")
    for reader in ("read_dump", "read_pg_dump", "read_mysql_dump"):
        monkeypatch.setattr(db_listing, reader, gathered)
    monkeypatch.setattr(_verify, "HASH_WINDOW", 1)
    expected = DUMPS[name]
    backup = tmp_path / "backup"
    (backup / "database").mkdir(parents=True)
    shutil.copy(FIXTURES / name, backup / "database" / ("orthanc.pgdump" if name.endswith(".pgdump") else "orthanc.sql"))
    result = _verify.verify_backup(str(backup), md5="all", workers=2)
    assert result["counts"] == expected["counts"] and result["schema_version"] == "6"
    if expected["storage_in_database"]:
        assert result["ok"] and result["storage_in_database"]
        assert result["files_checked"] == result["files_hashed"] == len(expected["attachments"]) == 2
        return
    # files on disk: one with the right size and wrong bytes, one missing, one orphan
    first, second = sorted(expected["attachments"])
    target = at(backup / "storage", first)
    target.parent.mkdir(parents=True)
    target.write_bytes(b"x" * expected["attachments"][first]["size"])
    orphan = put(backup / "storage", b"not listed")
    result = _verify.verify_backup(str(backup), md5="all", workers=2)
    assert result["problems"] == {"storage files with a wrong MD5": {"count": 1, "examples": [first]},
                                  "missing storage files": {"count": 1, "examples": [second]}}
    assert result["files_hashed"] == 1 and result["orphan_examples"] == [orphan]


def test_the_integrity_check_is_skipped_only_for_the_index_that_passed_it(tmp_path, monkeypatch):
    """A complete backup's manifest records that its index passed PRAGMA integrity_check; an
    index with that SHA-256 is not checked again, any other one is."""
    storage, index, conn = backup_with(tmp_path, 3)
    conn.executescript("CREATE TABLE GlobalProperties(property INTEGER PRIMARY KEY, value TEXT);"
                       "CREATE TABLE Resources(internalId INTEGER PRIMARY KEY, resourceType INTEGER);")
    conn.close()
    backup = storage.parent
    manifest = {"files": {"index/index": hashlib.sha256(index.read_bytes()).hexdigest()},
                "verification": {"md5": "new", "index_integrity": "integrity_check"}}
    (backup / "manifest.json").write_text(json.dumps(manifest))
    ran = []
    real = _verify._sqlite.check_integrity
    monkeypatch.setattr(_verify._sqlite, "check_integrity", lambda path, level: ran.append(level) or real(path, level))
    result = _verify.verify_backup(str(backup), workers=1)
    assert result["ok"] and result["index_check"] == "unchanged" and ran == ["none"]
    del manifest["verification"]["index_integrity"]  # a backup completed before the manifest said so
    (backup / "manifest.json").write_text(json.dumps(manifest))
    result = _verify.verify_backup(str(backup), workers=1)
    assert result["ok"] and result["index_check"] == "integrity_check" and ran[-1] == "full"
    manifest["verification"]["index_integrity"] = "integrity_check"
    manifest["files"]["index/index"] = "0" * 64  # another index than the one checked
    (backup / "manifest.json").write_text(json.dumps(manifest))
    result = _verify.verify_backup(str(backup), workers=1)
    assert not result["ok"] and result["index_check"] == "integrity_check" and ran[-1] == "full"


# The check of every file against an index file (backup_verify's md5 all and none): the workers
# read their rows themselves, each a range of uuids sorted by SQLite, and check them folder by
# folder (check_batch).

def damaged_backup(tmp_path):
    """A backup of 12 files with one of each fault: (storage, index, {kind: uuid})."""
    storage, index, conn = backup_with(tmp_path, 12)
    rows = [r[0] for r in conn.execute("SELECT uuid FROM AttachedFiles ORDER BY id")]
    faults = {"missing storage files": rows[1], "storage files with a wrong size": rows[4],
              "storage files with a wrong MD5": rows[7], "unreadable storage files": rows[10]}
    at(storage, rows[1]).unlink()
    with open(at(storage, rows[4]), "ab") as handle:
        handle.write(b"!")
    data = bytearray(at(storage, rows[7]).read_bytes())
    data[-1] ^= 1
    at(storage, rows[7]).write_bytes(bytes(data))
    at(storage, rows[10]).unlink()
    at(storage, rows[10]).mkdir()  # unreadable even for root: a folder where the file should be
    conn.execute("DELETE FROM AttachedFiles WHERE id IN (2, 3)")  # gaps in the rowids
    conn.commit()
    conn.close()
    for name in rows[2:4]:
        at(storage, name).unlink()
    return storage, index, faults


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("window", [1, 3, 2048])
def test_every_kind_of_fault_found_by_the_workers_that_read_the_index(tmp_path, monkeypatch, workers, window):
    monkeypatch.setattr(_verify, "HASH_WINDOW", window)
    storage, index, faults = damaged_backup(tmp_path)
    orphan = put(storage, b"not in the index")
    result = check(storage, index, workers=workers)
    assert {kind: [e.split()[0] for e in entry["examples"]] for kind, entry in result["problems"].items()} == {
        kind: [uuid] for kind, uuid in faults.items()}
    assert result["files_checked"] == 8 and result["files_hashed"] == 7  # 10 rows: 1 missing, 1 unreadable
    assert result["orphans"] == 1 and result["orphan_examples"] == [orphan]
    # md5 none: sizes only (the folder in place of a file is statted: a wrong size, as before)
    result = check(storage, index, workers=workers, hash_filter=_verify._hash_none)
    assert {kind: entry["count"] for kind, entry in result["problems"].items()} == {
        "missing storage files": 1, "storage files with a wrong size": 2}
    assert result["files_hashed"] == 0 and result["files_checked"] == 9 and result["orphans"] == 1
    # a file the manifest records as deleted while the dump ran is not missing
    result = check(storage, index, workers=workers, known_missing={faults["missing storage files"]})
    assert "missing storage files" not in result["problems"] and result["known_missing"] == 1


def traced(monkeypatch) -> list:
    """The SQL statements of the connections that _verify opens (in this process)."""
    statements: list = []
    real = _verify._sqlite.connect

    def connect(path, readonly=True):
        conn = real(path, readonly)
        conn.set_trace_callback(statements.append)
        return conn
    monkeypatch.setattr(_verify._sqlite, "connect", connect)
    return statements


def test_each_worker_reads_its_own_range_and_the_ranges_cover_every_uuid(tmp_path, monkeypatch):
    """The caller sorts nothing: the rows are read by the workers, each a range of uuids sorted
    (3 per worker); the ranges split the xx folders and together cover every uuid, one before
    '0' and one after 'f' included (rows no storage folder can hold: missing)."""
    monkeypatch.setattr(_verify, "HASH_WINDOW", 2)
    statements = traced(monkeypatch)
    storage, index, conn = backup_with(tmp_path, 12)
    for number, uuid in enumerate(["!before", "~after"]):
        conn.execute("INSERT INTO AttachedFiles VALUES (?, 1, ?, 15, 15, 1, '', '')", (50 + number, uuid))
    conn.commit()
    conn.close()
    orphan = put(storage, b"not in the index")
    result = check(storage, index, workers=1)
    assert result["problems"] == {"missing storage files": {"count": 2, "examples": ["!before", "~after"]}}
    assert result["files_hashed"] == 12 and result["orphan_examples"] == [orphan]
    parts = [s for s in statements if "ORDER BY uuid" in s]
    assert len(parts) == 3 and all("WHERE" in s for s in parts), statements


def test_a_uuid_that_names_a_path_outside_its_folder_is_missing(tmp_path):
    """A uuid with a '/' (or a dot name) would lead out of storage/xx/yy, to a file that is not
    the storage file it names: it is in no folder's listing, so missing."""
    storage, index, conn = backup_with(tmp_path, 2)
    outside = tmp_path / "backup" / "secret"
    outside.write_bytes(b"outside storage")
    for number, uuid in enumerate(["../../secret", "..", "ab/../../../secret"]):
        conn.execute("INSERT INTO AttachedFiles VALUES (?, 1, ?, 15, 15, 1, '', '')", (10 + number, uuid))
    conn.commit()
    conn.close()
    result = check(storage, index, workers=1)
    assert result["problems"] == {"missing storage files": {"count": 3, "examples": [
        "..", "../../secret", "ab/../../../secret"]}}
    assert result["files_checked"] == 2


def test_an_unreadable_storage_folder_is_reported_once_and_its_files_not_each(tmp_path):
    storage, index, conn = backup_with(tmp_path, 3)
    victim = conn.execute("SELECT uuid FROM AttachedFiles LIMIT 1").fetchone()[0]
    conn.close()
    folder = at(storage, victim).parent
    shutil.rmtree(folder)
    folder.write_bytes(b"a file where the folder xx/yy should be")
    result = check(storage, index, workers=1)
    assert set(result["problems"]) == {"unreadable storage folders"}
    assert result["problems"]["unreadable storage folders"]["count"] == 1
    assert result["files_checked"] == 2


def test_o_noatime_refused_falls_back_to_a_plain_open_and_checks_every_file(tmp_path, monkeypatch):
    """O_NOATIME (no atime written on the first read of a freshly linked file) is allowed only to
    the file's owner or root: when open refuses it (EPERM), the file is opened without it, every
    later file too, and the check finds what it finds with a plain open."""
    if not _verify._NOATIME:
        pytest.skip("no O_NOATIME on this platform")
    storage, index, conn = backup_with(tmp_path, 6)
    victim, size = conn.execute("SELECT uuid, compressedSize FROM AttachedFiles LIMIT 1 OFFSET 2").fetchone()
    conn.close()
    at(storage, victim).write_bytes(b"changed")
    monkeypatch.setattr(_verify, "_OPEN_FLAGS", [_verify._OPEN_FLAGS[0]])
    real_open, asked = os.open, []

    def refuse_noatime(path, flags, *args, **kwargs):
        if flags & os.O_DIRECTORY:  # a storage folder, opened to list it and open its files relative to it
            return real_open(path, flags, *args, **kwargs)
        asked.append(bool(flags & _verify._NOATIME))
        if flags & _verify._NOATIME:
            raise PermissionError(1, "Operation not permitted", path)
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", refuse_noatime)
    result = check(storage, index, workers=1)
    assert result["files_hashed"] == 5 and result["files_checked"] == 6
    assert result["problems"] == {"storage files with a wrong size": {
        "count": 1, "examples": [f"{victim} (7 bytes, index says {size})"]}}
    assert asked[:2] == [True, False] and not any(asked[2:])  # refused once, then plain opens only
    assert _verify._OPEN_FLAGS[0] == _verify._READ_FLAGS


def test_o_noatime_used_when_allowed_and_an_unreadable_file_still_reported(tmp_path, monkeypatch):
    if not _verify._NOATIME:
        pytest.skip("no O_NOATIME on this platform")
    storage, index, conn = backup_with(tmp_path, 3)
    victim = conn.execute("SELECT uuid FROM AttachedFiles LIMIT 1").fetchone()[0]
    conn.close()
    monkeypatch.setattr(_verify, "_OPEN_FLAGS", [_verify._OPEN_FLAGS[0]])
    real_open, flags_seen = os.open, []

    def fake_open(path, flags, *args, **kwargs):
        if not flags & os.O_DIRECTORY:
            flags_seen.append((path == victim, bool(flags & _verify._NOATIME)))
        if path.endswith(victim):
            raise PermissionError(13, "Permission denied", path)
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", fake_open)
    result = check(storage, index, workers=1)
    assert result["files_hashed"] == 2 and list(result["problems"]) == ["unreadable storage files"]
    assert result["problems"]["unreadable storage files"]["examples"][0].startswith(victim)
    # the victim tried with O_NOATIME, then without (EACCES may be the missing O_NOATIME right);
    # the others with it
    assert sorted(flags_seen) == [(False, True), (False, True), (True, False), (True, True)]
    assert _verify._OPEN_FLAGS[0] & _verify._NOATIME  # EACCES of one file: the others keep O_NOATIME


def test_rows_of_one_folder_apart_are_checked_against_its_one_listing(tmp_path):
    """check_batch opens each folder once per run of rows and lists it once: rows of a folder
    that come back after another folder's (a caller's batch not sorted by uuid) are still found,
    and the folder's names count once for the orphans."""
    storage = tmp_path / "storage"
    first, second = b"first file", b"second file!"
    a1 = "aa00" + "1" * 32
    a2 = "aa00" + "2" * 32
    b1 = "bb00" + "1" * 32
    for uuid, data in ((a1, first), (a2, second), (b1, first)):
        (storage / uuid[0:2] / uuid[2:4]).mkdir(parents=True, exist_ok=True)
        (storage / uuid[0:2] / uuid[2:4] / uuid).write_bytes(data)
    md5 = {len(first): hashlib.md5(first).hexdigest(), len(second): hashlib.md5(second).hexdigest()}
    rows = [(a1, len(first), md5[len(first)]), (b1, len(first), "0" * 32), (a2, len(second), md5[len(second)])]
    result = _verify.check_batch(rows, None, [("aa", "00"), ("bb", "00")], str(storage), frozenset())
    assert (result["files_checked"], result["files_hashed"], result["orphans"]) == (3, 3, 0)
    assert result["problems"] == [("storage files with a wrong MD5", b1)]
    (storage / "aa" / "00" / a2).unlink()
    result = _verify.check_batch(rows, False, [("aa", "00"), ("bb", "00")], str(storage), frozenset())
    assert result["problems"] == [("missing storage files", a2)] and result["files_hashed"] == 0

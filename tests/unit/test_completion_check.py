"""The completion check of what changed (issue 15): the captured index compared with the storage
state in SQL (every attachment placed with its size, orphans, counts), and only the files placed
new read on disk; md5=all keeps the check of every file. Real files, a real SQLite index with
Orthanc's AttachedFiles columns, the state written by the collection's own hot pass."""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import shutil
import sqlite3
import time

import pytest

from ansible_collections.pacs.orthanc.plugins.module_utils import _backupset, _storage, _verify
from ansible_collections.pacs.orthanc.plugins.module_utils._common import PacsError
from tests.support.storage_tree import at, put
from tests.unit.test_backupset import make_orthanc, take_backup

pytestmark = pytest.mark.quick


def backup_and_state(tmp_path, files: int = 6):
    """A backup folder whose storage/ the hot pass filled (copies: every file new), its index
    listing each file with size and MD5, and the state the hot pass wrote."""
    live = tmp_path / "live"
    live.mkdir()
    backup = tmp_path / "backup"
    (backup / "index").mkdir(parents=True)
    conn = sqlite3.connect(backup / "index" / "index")
    conn.execute("CREATE TABLE AttachedFiles (id INTEGER, fileType INTEGER, uuid TEXT, compressedSize INTEGER, "
                 "uncompressedSize INTEGER, compressionType INTEGER, uncompressedMD5 TEXT, compressedMD5 TEXT)")
    names = []
    for number in range(files):
        data = os.urandom(60 + number)
        name = put(live, data)
        md5 = hashlib.md5(data).hexdigest()
        conn.execute("INSERT INTO AttachedFiles VALUES (?, 1, ?, ?, ?, 1, ?, ?)", (number, name, len(data), len(data), md5, md5))
        names.append(name)
    conn.commit()
    conn.close()
    state_file = tmp_path / "state"
    _storage.hot_pass(str(live), str(backup / "storage"), str(state_file), link_mode="copy", settle=0)
    return backup, state_file, sorted(names)


def changed_check(backup, state_file, md5: bool = True, started=None) -> dict:
    report = _verify.Report()
    with _storage.State(str(state_file), readonly=True) as state:
        _verify.check_storage(str(backup), str(backup / "index" / "index"), report,
                              None if md5 else _verify._hash_none, state=state,
                              started=(lambda: started(state)) if started else None)
    return report.as_dict()


def index_sql(backup, statement: str, args=()) -> None:
    conn = sqlite3.connect(backup / "index" / "index")
    conn.execute(statement, args)
    conn.commit()
    conn.close()


@pytest.mark.parametrize("window", [2048, 2])  # one batch in this process; three in two worker processes
def test_a_state_that_matches_the_index_checks_the_new_files_on_disk(tmp_path, monkeypatch, window):
    monkeypatch.setattr(_verify, "HASH_WINDOW", window)
    backup, state_file, names = backup_and_state(tmp_path)
    before_comparison = []

    def started(state):  # the caller's thread (the integrity check) starts before the comparison in SQL
        before_comparison.append(state.listing is None)

    result = changed_check(backup, state_file, started=started)
    assert before_comparison == [True]
    assert result["ok"] and result["problems"] == {}
    assert result["files_compared"] == result["files_checked"] == result["files_hashed"] == 6
    assert result["orphans"] == 0
    # a new file damaged on disk (same size, one byte flipped) is found: its MD5
    victim = at(backup / "storage", names[2])
    data = bytearray(victim.read_bytes())
    data[5] ^= 0xFF
    victim.write_bytes(bytes(data))
    result = changed_check(backup, state_file)
    assert result["problems"] == {"storage files with a wrong MD5": {"count": 1, "examples": [names[2]]}}
    # truncated on disk: its size; gone from disk: missing (the state still says it was placed)
    victim.write_bytes(bytes(data[:10]))
    at(backup / "storage", names[4]).unlink()
    result = changed_check(backup, state_file, md5=False)
    assert set(result["problems"]) == {"storage files with a wrong size", "missing storage files"}
    assert result["problems"]["missing storage files"]["examples"] == [names[4]]
    assert result["files_hashed"] == 0 and result["files_checked"] == 5


def test_the_sql_comparison_finds_missing_wrong_size_and_orphans(tmp_path):
    backup, state_file, names = backup_and_state(tmp_path)
    with _storage.State(str(state_file)) as state:
        state.remove([names[0]])                                    # listed, never placed
        size = next(s for u, s, _o in state.rows() if u == names[1])
        state.put([(names[1], size + 3, _storage.ORIGIN_COPY)])     # placed with another size
        state.put([("ffffffff-0000-4000-8000-000000000001", 9, _storage.ORIGIN_PREVIOUS)])  # placed, not listed
    result = changed_check(backup, state_file)
    assert result["problems"]["missing storage files"] == {"count": 1, "examples": [names[0]]}
    assert result["problems"]["storage files with a wrong size"] == {
        "count": 1, "examples": [f"{names[1]} ({size + 3} bytes as placed, index says {size})"]}
    assert len(result["problems"]) == 2
    assert result["orphans"] == 1 and result["orphan_examples"] == ["ffffffff-0000-4000-8000-000000000001"]
    assert result["files_compared"] == 6 and result["files_checked"] == 4  # the two above are not read on disk


def test_equal_counts_with_a_uuid_listed_twice_still_find_the_orphan(tmp_path):
    """Every listed uuid placed and as many rows listed as files placed is not enough: the index
    lists one uuid twice, so one file placed is listed by no row."""
    backup, state_file, names = backup_and_state(tmp_path)
    index_sql(backup, "INSERT INTO AttachedFiles SELECT 99, 2, uuid, compressedSize, uncompressedSize, compressionType, "
              "uncompressedMD5, compressedMD5 FROM AttachedFiles WHERE uuid = ?", (names[3],))
    with _storage.State(str(state_file)) as state:
        state.put([("ffffffff-0000-4000-8000-000000000002", 9, _storage.ORIGIN_PREVIOUS)])
    result = changed_check(backup, state_file)
    assert result["ok"] and result["files_compared"] == 7
    assert result["orphans"] == 1 and result["orphan_examples"] == ["ffffffff-0000-4000-8000-000000000002"]
    # and the counts alone, as the state reports them
    with _storage.State(str(state_file), readonly=True) as state:
        state.attach_index(str(backup / "index" / "index"))
        assert state.counts() == (7, 6, 7)


def test_an_incremental_reads_only_its_new_files_and_md5_all_reads_every_one(tmp_path):
    config, storage, index_dir = make_orthanc(tmp_path, files=4)
    root = tmp_path / "backups"
    take_backup(tmp_path, root, config, storage, index_dir)
    time.sleep(1.1)  # backups are named by the second
    conn = sqlite3.connect(index_dir / "index")  # one new instance, as Orthanc would store it
    data = os.urandom(321)
    digest = hashlib.md5(data).hexdigest()
    name = put(storage, data)
    conn.execute("INSERT INTO Resources VALUES (99, 4, 'i99', 3)")
    conn.execute("INSERT INTO AttachedFiles VALUES (99, 1, ?, ?, ?, 1, ?, ?)", (name, len(data), len(data), digest, digest))
    conn.commit()
    conn.close()
    opened, closed = take_backup(tmp_path, root, config, storage, index_dir)
    verification = closed["manifest"]["verification"]
    assert verification["storage_check"] == "changed"
    assert verification["files_compared"] == 5 and verification["files_checked"] == verification["files_hashed"] == 1
    assert closed["manifest"]["storage"]["linked_files"] == 4 and closed["manifest"]["steps"]["check"]["files"] == 1

    # the same with md5=all: every file statted and hashed, storage/'s folders listed
    time.sleep(1.1)
    opened = _backupset.open_backup(str(root), str(config), str(index_dir), str(storage))
    _storage.hot_pass(str(storage), opened["storage_path"], opened["state_file"], settle=0, link_mode="copy",
                      previous=os.path.join(opened["previous"], "storage"))
    os.makedirs(opened["index_path"])
    shutil.copy(index_dir / "index", opened["index_path"])
    # a file linked from the previous backup, then lost from this one: only the check of every file sees it
    linked = at(root / (opened["name"] + ".incomplete") / "storage", name)
    linked.unlink()
    with pytest.raises(PacsError, match="failed its check: 1 missing storage files") as failed:
        _backupset.close_backup(str(root), opened["name"], "h", {}, 7, md5="all")
    assert failed.value.details["verification"]["storage_check"] == "all"
    shutil.copy(storage / name[0:2] / name[2:4] / name, linked)
    closed = _backupset.close_backup(str(root), opened["name"], "h", {}, 7, md5="all")
    verification = closed["manifest"]["verification"]
    assert verification["storage_check"] == "all" and verification["files_compared"] is None
    assert verification["files_checked"] == verification["files_hashed"] == 5
    assert json.loads((root / opened["name"] / "manifest.json").read_text())["verification"] == verification


def test_without_a_state_database_every_file_is_checked(tmp_path):
    """A backup whose state is missing (or a text file of older versions) is checked in full."""
    config, storage, index_dir = make_orthanc(tmp_path, files=3)
    root = tmp_path / "backups"
    opened = _backupset.open_backup(str(root), str(config), str(index_dir), str(storage))
    _storage.hot_pass(str(storage), opened["storage_path"], opened["state_file"], link_mode="copy", settle=0)
    os.makedirs(opened["index_path"])
    shutil.copy(index_dir / "index", opened["index_path"])
    os.unlink(opened["state_file"])
    closed = _backupset.close_backup(str(root), opened["name"], "h", {}, 7, md5="new")
    verification = closed["manifest"]["verification"]
    assert verification["storage_check"] == "all" and verification["files_checked"] == 3


def open_next(root, config, storage, index_dir, index_bytes=None) -> dict:
    """The next backup of the same Orthanc, opened and filled (hot pass by copy, the index copied
    or ``index_bytes`` written in its place), ready for close_backup."""
    time.sleep(1.1)  # backups are named by the second
    opened = _backupset.open_backup(str(root), str(config), str(index_dir), str(storage))
    previous = os.path.join(opened["previous"], "storage") if opened.get("previous") else None
    _storage.hot_pass(str(storage), opened["storage_path"], opened["state_file"], link_mode="copy", settle=0,
                      previous=previous)
    os.makedirs(opened["index_path"])
    target = pathlib.Path(opened["index_path"]) / "index"
    if index_bytes is None:
        shutil.copyfile(index_dir / "index", target)
    else:
        target.write_bytes(index_bytes)
    return opened


def test_the_completion_checks_the_index_in_full_or_quick_and_a_quick_one_is_checked_in_full_later(tmp_path, monkeypatch):
    """By default the check of what changed runs the full PRAGMA integrity_check, recorded, and a
    later verification of that very index skips it; with index_check=quick it runs quick_check and
    says so in the manifest, and a later verification of that backup, the index unchanged, runs
    the full integrity_check (it is not taken as done); md5=all at the completion runs the full
    check whatever index_check says."""
    ran = []
    real = _verify._sqlite.check_integrity
    monkeypatch.setattr(_verify._sqlite, "check_integrity", lambda path, level: ran.append(level) or real(path, level))
    config, storage, index_dir = make_orthanc(tmp_path, files=3)
    root = tmp_path / "backups"
    opened, closed = take_backup(tmp_path, root, config, storage, index_dir)
    assert ran == ["full"] and closed["verification"]["index_check"] == "integrity_check"
    assert closed["manifest"]["verification"]["index_integrity"] == "integrity_check"
    report = _verify.verify_backup(str(root / opened["name"]), md5="none", workers=1)
    assert report["ok"] and report["index_check"] == "unchanged" and ran[-1] == "none"
    # index_check=quick
    opened = open_next(root, config, storage, index_dir)
    closed = _backupset.close_backup(str(root), opened["name"], "unit-host", {"backend": "sqlite"}, 7,
                                     index_check="quick")
    assert ran[-1] == "quick" and closed["verification"]["index_check"] == "quick_check"
    assert closed["manifest"]["verification"]["index_integrity"] == "quick_check"
    report = _verify.verify_backup(str(root / opened["name"]), md5="none", workers=1)
    assert report["ok"] and report["index_check"] == "integrity_check" and ran[-1] == "full"
    # a damaged index is refused by the quick check at the completion
    conn = sqlite3.connect(index_dir / "index")
    root_page = conn.execute("SELECT rootpage FROM sqlite_master WHERE name = 'Resources'").fetchone()[0]
    conn.close()
    damaged = bytearray((index_dir / "index").read_bytes())
    page_size = int.from_bytes(damaged[16:18], "big")
    start = (root_page - 1) * page_size
    damaged[start + 3:start + 5] = (900).to_bytes(2, "big")  # the table's root page claims 900 cells
    reopened = open_next(root, config, storage, index_dir, bytes(damaged))
    with pytest.raises(PacsError) as failed:
        _backupset.close_backup(str(root), reopened["name"], "unit-host", {"backend": "sqlite"}, 7, index_check="quick")
    assert "index integrity errors" in str(failed.value) and ran[-1] == "quick"
    _backupset.discard_backup(str(root), reopened["name"])
    # md5=all at the completion: the full check, recorded as such
    reopened = open_next(root, config, storage, index_dir)
    closed = _backupset.close_backup(str(root), reopened["name"], "unit-host", {"backend": "sqlite"}, 7, md5="all",
                                     index_check="quick")
    assert ran[-1] == "full" and closed["manifest"]["verification"]["index_integrity"] == "integrity_check"


def test_the_completion_uses_the_dump_listing_that_the_delta_pass_recorded(tmp_path, monkeypatch):
    """A dump backup's delta pass reads the dump (a real mysqldump of Orthanc's database, files on
    disk) into the state file; the completion check then compares that recorded listing with the
    state without reading the dump again (dump_listing: recorded), and reads it again once the
    file is no longer the one the delta pass read (another modification time)."""
    fixture = pathlib.Path(__file__).resolve().parent / "fixtures" / "mysql-files-on-disk.sql"
    expected = json.loads((fixture.parent / "expected.json").read_text())[fixture.name]
    live, backup = tmp_path / "live", tmp_path / "backup"
    live.mkdir()
    for uuid, attachment in expected["attachments"].items():  # right sizes; md5 none checks sizes only
        at(live, uuid).parent.mkdir(parents=True, exist_ok=True)
        at(live, uuid).write_bytes(b"x" * attachment["size"])
    (backup / "database").mkdir(parents=True)
    dump = backup / "database" / "orthanc.sql"
    shutil.copy(fixture, dump)
    state_file = tmp_path / "state"
    _storage.hot_pass(str(live), str(backup / "storage"), str(state_file), link_mode="copy", settle=0)
    delta = _storage.delta_pass(str(live), str(backup / "storage"), str(state_file),
                                _verify.RecordedDump("mysql", str(dump)), link_mode="copy")
    assert delta["fetched_files"] == 0 and delta["missing_files"] == 0 and delta["removed_files"] == 0
    real_stream = _verify.db_listing.stream_dump
    reads = []
    monkeypatch.setattr(_verify.db_listing, "stream_dump", lambda *a, **k: reads.append(a) or real_stream(*a, **k))

    def complete() -> dict:
        with _storage.State(str(state_file), readonly=True) as state:
            return _verify.verify_backup(str(backup), md5="none", state=state)

    result = complete()
    assert result["ok"], result
    assert result["dump_listing"] == "recorded" and result["storage_check"] == "changed" and reads == []
    assert result["counts"] == expected["counts"] and result["files_compared"] == len(expected["attachments"])
    os.utime(dump, ns=(time.time_ns(), time.time_ns() - 10**9))  # the dump is not the file that was read
    result = complete()
    assert result["ok"] and result["dump_listing"] == "read" and len(reads) == 1
    assert result["counts"] == expected["counts"]
    # a file the recorded listing names with a wrong size is found from the recording too
    os.utime(dump, ns=(time.time_ns(), time.time_ns()))
    with _storage.State(str(state_file)) as state:
        state.record_dump(str(dump), {"counts": expected["counts"], "schema_version": "6"})
        victim = sorted(expected["attachments"])[0]
        state.conn.execute(f"UPDATE {_storage.RECORDED_DUMP_LISTING} SET size = size + 1 WHERE uuid = ?", (victim,))
    result = complete()
    assert result["dump_listing"] == "recorded" and len(reads) == 1
    assert list(result["problems"]) == ["storage files with a wrong size"], result["problems"]


def test_a_dump_listing_is_keyed_by_uuid_the_last_row_of_a_uuid_winning():
    """A dump's rows come in its table's order (random uuids): staged as they come, then moved into
    the table keyed by uuid sorted; of two rows for one uuid the later one is kept, as in a dict."""
    listed = _verify.DumpListing()
    try:
        for number in range(5000, 0, -1):  # more than one batch, in reverse order
            listed.attachment(f"{number:08x}", number, "m")
        listed.attachment(f"{1:08x}", 99, "later")
        listed.finish()
        rows = listed.conn.execute("SELECT uuid, size, md5 FROM listing").fetchall()
        assert len(rows) == 5000 and rows[0] == ("00000001", 99, "later") and rows[-1] == (f"{5000:08x}", 5000, "m")
        assert not listed.conn.execute("SELECT name FROM temp.sqlite_master WHERE name LIKE 'staged_%'").fetchall()
    finally:
        listed.close()


def test_a_dump_listing_is_compared_with_the_state_as_an_index_is(tmp_path):
    """A dump backup's completion: the attachments the dump lists (streamed into the state's
    connection, _verify.DumpListing) compared with the state in SQL; what is not placed, placed
    with another size, or placed and not listed (an orphan) is found; only the files placed new
    are read on disk, a damaged one found by its MD5."""
    backup, state_file, names = backup_and_state(tmp_path, files=5)
    conn = sqlite3.connect(backup / "index" / "index")
    rows = {uuid: (size, md5) for uuid, size, md5 in conn.execute("SELECT uuid, compressedSize, compressedMD5 FROM AttachedFiles")}
    conn.close()
    shutil.rmtree(backup / "index")  # a dump backup has no SQLite index

    def check(listing: dict) -> dict:
        report = _verify.Report()
        with _storage.State(str(state_file), readonly=True) as state:
            listed = _verify.DumpListing(state.conn)
            try:
                for uuid, (size, md5) in listing.items():
                    listed.attachment(uuid, size, md5)
                listed.finish()
                state.use_dump_listing()
                _verify.check_storage(str(backup), None, report, None, state=state)
            finally:
                listed.close()
            # the temporary tables are gone with the listing: the next check makes them again
            assert not state.conn.execute("SELECT name FROM temp.sqlite_master WHERE name LIKE '%dump_%'").fetchall()
        return report.as_dict()

    result = check(rows)
    assert result["ok"] and result["files_compared"] == 5 and result["files_checked"] == result["files_hashed"] == 5

    wrong = dict(rows)
    wrong[names[0]] = (rows[names[0]][0] + 1, rows[names[0]][1])  # the dump says another size
    del wrong[names[1]]  # placed, not listed: an orphan
    wrong["ffffffff-0000-4000-8000-000000000009"] = (10, "0" * 32)  # listed, never placed
    result = check(wrong)
    assert not result["ok"]
    assert result["problems"]["storage files with a wrong size"]["count"] == 1
    assert result["problems"]["missing storage files"]["examples"] == ["ffffffff-0000-4000-8000-000000000009"]
    assert result["orphans"] == 1 and result["orphan_examples"] == [names[1]]

    victim = at(backup / "storage", names[2])
    victim.write_bytes(b"x" * victim.stat().st_size)  # same size, other bytes: only the MD5 tells
    result = check(rows)
    assert result["problems"]["storage files with a wrong MD5"]["examples"] == [names[2]]

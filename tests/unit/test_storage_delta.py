"""The delta pass against a captured SQLite index (issue 15): SQLite compares the index's
AttachedFiles with the hot pass's state; only the files that the hot pass lacks (or placed with
another size) are fetched while Orthanc is stopped, the files deleted since then are removed after
(``tidy``). Real files, a real SQLite index with Orthanc's schema for AttachedFiles."""

from __future__ import annotations

import os
import sqlite3

import pytest

from ansible_collections.pacs.orthanc.plugins.module_utils import _storage
from tests.support.storage_tree import put, at
from ansible_collections.pacs.orthanc.plugins.module_utils._common import PacsError

# as Orthanc 1.10 (Debian) creates it: PrepareDatabase.sql of the SQLite index, schema 6
ATTACHED_FILES = """CREATE TABLE AttachedFiles(
       id INTEGER REFERENCES Resources(internalId) ON DELETE CASCADE,
       fileType INTEGER,
       uuid TEXT,
       compressedSize INTEGER,
       uncompressedSize INTEGER,
       compressionType INTEGER,
       uncompressedMD5 TEXT,
       compressedMD5 TEXT,
       PRIMARY KEY(id, fileType)
       )"""


def write_index(path, listed: dict) -> str:
    """A captured index listing {uuid: size}, one instance attachment each."""
    conn = sqlite3.connect(path)
    conn.execute(ATTACHED_FILES)
    conn.executemany("INSERT INTO AttachedFiles VALUES (?, 1, ?, ?, ?, 1, '', '')",
                     [(rid, u, size, size) for rid, (u, size) in enumerate(sorted(listed.items()), start=1)])
    conn.commit()
    conn.close()
    return str(path)


@pytest.fixture(name="world")
def fixture_world(tmp_path):
    """A live storage of 6 files, hot-passed into a backup: (tmp_path, src, dest, state, names)."""
    src, dest = tmp_path / "live", tmp_path / "backup" / "storage"
    src.mkdir()
    names = [put(src, os.urandom(100 + i)) for i in range(6)]
    state = str(tmp_path / "backup" / ".work" / "storage.db")
    hot = _storage.hot_pass(str(src), str(dest), state, link_mode="copy", settle=5)
    assert hot["files"] == 6 and hot["copied_files"] == 6
    return tmp_path, src, dest, state, names


def listed_now(src, names):
    return {n: os.path.getsize(at(src, n)) for n in names}


def test_nothing_changed_nothing_to_fetch(world):
    tmp_path, src, dest, state, names = world
    index = write_index(tmp_path / "index", listed_now(src, names))
    with _storage.Delta(str(src), str(dest), state, index=index, link_mode="copy") as delta:
        assert delta.differences() == []
        fetched = delta.fetch()
        assert fetched["fetched_files"] == 0 and fetched["missing_files"] == 0
        tidied = delta.tidy()
    assert tidied["removed_files"] == 0 and tidied["files"] == 6


def test_new_files_are_the_only_ones_fetched(world):
    tmp_path, src, dest, state, names = world
    new = [put(src, b"stored after the hot pass %d" % i, age=0) for i in range(3)]
    index = write_index(tmp_path / "index", listed_now(src, names + new))
    with _storage.Delta(str(src), str(dest), state, index=index, link_mode="copy") as delta:
        assert sorted(u for u, _size, _placed in delta.differences()) == sorted(new)
        assert all(placed is None for _u, _size, placed in delta.differences())
        fetched = delta.fetch()
        assert delta.differences() == []  # the state knows them now
    assert fetched["fetched_files"] == 3 and fetched["missing_files"] == 0 and fetched["lost_in_live_storage"] == []
    for name in new:
        assert at(dest, name).read_bytes() == at(src, name).read_bytes()
    assert _storage.read_state(state)[new[0]] == (os.path.getsize(at(src, new[0])), _storage.ORIGIN_COPY)


def test_deleted_files_are_removed_after_the_window_not_in_it(world):
    tmp_path, src, dest, state, names = world
    gone = names[:2]
    for name in gone:
        os.unlink(at(src, name))
    index = write_index(tmp_path / "index", listed_now(src, names[2:]))
    with _storage.Delta(str(src), str(dest), state, index=index, link_mode="copy") as delta:
        assert delta.differences() == []  # deleted files cost nothing while Orthanc is stopped
        assert delta.fetch()["fetched_files"] == 0
        assert all(at(dest, name).exists() for name in gone)  # still there: tidy removes them
        tidied = delta.tidy()
    assert tidied["removed_files"] == 2 and tidied["files"] == 4
    assert not any(at(dest, name).exists() for name in gone)
    assert set(_storage.read_state(state)) == set(names[2:])
    assert {e[0] for e in _storage.walk_storage(str(dest))} == set(names[2:])


def test_a_file_with_another_size_is_fetched_again(world):
    tmp_path, src, dest, state, names = world
    grown = names[3]
    with open(at(src, grown), "ab") as handle:  # still being written during the hot pass
        handle.write(b"the rest")
    index = write_index(tmp_path / "index", listed_now(src, names))
    with _storage.Delta(str(src), str(dest), state, index=index, link_mode="copy") as delta:
        assert delta.differences() == [(grown, 103 + 8, 103)]
        fetched = delta.fetch()
    assert fetched["fetched_files"] == 1
    assert at(dest, grown).read_bytes() == at(src, grown).read_bytes()
    assert _storage.read_state(state)[grown][0] == 111


def test_a_file_gone_from_the_live_storage(world):
    """Listed by the index, never placed by the hot pass, absent live: missing, unless the
    previous backup holds it (then it is kept from there, and reported as lost live)."""
    tmp_path, src, dest, state, names = world
    lost = put(src, b"in the previous backup only")
    previous = tmp_path / "previous" / "storage"
    at(previous, lost).parent.mkdir(parents=True)
    os.link(at(src, lost), at(previous, lost))
    os.unlink(at(src, lost))
    never = "ffffffff-0000-4000-8000-000000000000"
    listed = listed_now(src, names)
    listed.update({lost: len(b"in the previous backup only"), never: 10})
    index = write_index(tmp_path / "index", listed)
    missing: list = []
    with _storage.Delta(str(src), str(dest), state, index=index, previous=str(previous), link_mode="copy") as delta:
        fetched = delta.fetch(missing)
    assert fetched["missing_files"] == 1 and fetched["missing_examples"] == [never] and missing == [never]
    assert fetched["lost_in_live_storage"] == [lost] and fetched["fetched_files"] == 1
    assert os.stat(at(dest, lost)).st_ino == os.stat(at(previous, lost)).st_ino
    assert never not in _storage.read_state(state)


def test_the_whole_pass_against_an_index_or_a_dump_list(world):
    """delta_pass (Orthanc runs on: fetch then tidy) gives the same answer from an index file
    and from a dump's {uuid: size}."""
    tmp_path, src, dest, state, names = world
    os.unlink(at(src, names[0]))
    new = put(src, b"new", age=0)
    listed = listed_now(src, names[1:] + [new])
    saved = open(state, "rb").read()
    by_index = _storage.delta_pass(str(src), str(dest), state, index=write_index(tmp_path / "index", listed),
                                   link_mode="copy", check_mode=True)
    assert open(state, "rb").read() == saved  # check mode changes nothing
    by_dump = _storage.delta_pass(str(src), str(dest), state, listed, link_mode="copy")
    for result in (by_index, by_dump):
        assert (result["fetched_files"], result["removed_files"], result["files"]) == (1, 1, 6)
    assert set(_storage.read_state(state)) == set(listed)


def test_a_text_state_file_is_read_as_before(tmp_path):
    """A state file written by an older version of the collection (tab-separated text)."""
    src, dest = tmp_path / "live", tmp_path / "storage"
    src.mkdir()
    name = put(src, b"12345")
    state = tmp_path / "storage.tsv"
    state.write_text(f"{name}\t5\tcopy\n")
    index = write_index(tmp_path / "index", {name: 5})
    result = _storage.delta_pass(str(src), str(dest), str(state), index=index, link_mode="copy")
    assert result["fetched_files"] == 0 and result["files"] == 1 and result["copied_files"] == 1


def test_an_index_without_attachments_is_refused(world):
    tmp_path, src, dest, state, _names = world
    other = tmp_path / "other"
    sqlite3.connect(other).execute("CREATE TABLE t(x)").connection.close()
    with pytest.raises(PacsError, match="cannot list the attachments"):
        _storage.Delta(str(src), str(dest), state, index=str(other), link_mode="copy")


def test_one_deleted_and_one_new_are_both_handled(world):
    """As many files listed as the hot pass placed, yet one is new and one is gone."""
    tmp_path, src, dest, state, names = world
    os.unlink(at(src, names[5]))
    new = put(src, b"replaces it in number", age=0)
    index = write_index(tmp_path / "index", listed_now(src, names[:5] + [new]))
    with _storage.Delta(str(src), str(dest), state, index=index, link_mode="copy") as delta:
        assert delta.fetch()["fetched_files"] == 1
        tidied = delta.tidy()
    assert tidied["removed_files"] == 1 and tidied["files"] == 6
    assert {e[0] for e in _storage.walk_storage(str(dest))} == set(names[:5] + [new])

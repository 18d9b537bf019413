"""The stop window's delta pass by Orthanc's change log (issue 15.2): the hot pass records the
change position it began at and the files it skipped; in the window only the attachments of the
resources named by later changes, and those skipped files, are examined. The full comparison runs
when the position cannot be trusted, and once Orthanc runs again as a safety net. Real files, a
real SQLite index with Orthanc 1.10's AttachedFiles and Changes tables."""

from __future__ import annotations

import os
import sqlite3

import pytest

from ansible_collections.pacs.orthanc.plugins.module_utils import _storage
from tests.support.storage_tree import at, put
from tests.unit.test_storage_delta import ATTACHED_FILES

# Orthanc 1.10's PrepareDatabase.sql: AUTOINCREMENT, so sqlite_sequence keeps the last seq
CHANGES = """CREATE TABLE Changes(
       seq INTEGER PRIMARY KEY AUTOINCREMENT,
       changeType INTEGER,
       internalId INTEGER REFERENCES Resources(internalId) ON DELETE CASCADE,
       resourceType INTEGER,
       date TEXT
       )"""
CHANGES_INDEX = "CREATE INDEX ChangesIndex ON Changes(internalId)"
NEW_INSTANCE, UPDATED_METADATA, STABLE_SERIES = 2, 16, 14


class Index:
    """A captured index under construction: one instance resource per attachment."""

    def __init__(self, path):
        self.path = str(path)
        self.conn = sqlite3.connect(self.path, isolation_level=None)
        self.conn.execute(ATTACHED_FILES)
        self.conn.execute(CHANGES)
        self.conn.execute(CHANGES_INDEX)
        self.next_id = 1

    def instance(self, uuid: str, size: int, logged: bool = True) -> int:
        rid, self.next_id = self.next_id, self.next_id + 1
        self.conn.execute("INSERT INTO AttachedFiles VALUES (?, 1, ?, ?, ?, 1, '', '')", (rid, uuid, size, size))
        if logged:
            self.change(rid, NEW_INSTANCE)
        return rid

    def attach(self, rid: int, file_type: int, uuid: str, size: int) -> None:
        """An attachment added to an existing resource without a change (as Orthanc does for its
        own content types: compress/uncompress over REST, dicom-until-pixel-data)."""
        self.conn.execute("INSERT INTO AttachedFiles VALUES (?, ?, ?, ?, ?, 1, '', '')", (rid, file_type, uuid, size, size))

    def change(self, rid: int, kind: int = NEW_INSTANCE) -> int:
        return self.conn.execute("INSERT INTO Changes (changeType, internalId, resourceType, date) "
                                 "VALUES (?, ?, 4, '')", (kind, rid)).lastrowid

    def last(self) -> int:
        return self.conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'Changes'").fetchone()[0]

    def close(self) -> str:
        self.conn.close()
        return self.path


@pytest.fixture(name="world")
def fixture_world(tmp_path):
    """Six archived files listed and logged, hot-passed from change position P:
    (tmp_path, src, dest, state, index, names, P)."""
    src, dest = tmp_path / "live", tmp_path / "backup" / "storage"
    src.mkdir()
    index = Index(tmp_path / "index")
    names = [put(src, os.urandom(100 + i)) for i in range(6)]
    for name in names:
        index.instance(name, os.path.getsize(at(src, name)))
    position = index.last()
    state = str(tmp_path / "backup" / ".work" / "storage.db")
    hot = _storage.hot_pass(str(src), str(dest), state, link_mode="copy", settle=5, change_position=position)
    assert hot["files"] == 6 and hot["change_position"] == position
    return tmp_path, src, dest, state, index, names, position


def test_only_what_the_change_log_names_is_examined(world):
    tmp_path, src, dest, state, index, names, position = world
    new = [put(src, b"stored after the hot pass %d" % i, age=0) for i in range(3)]
    ids = [index.instance(n, os.path.getsize(at(src, n))) for n in new]
    index.change(ids[0], UPDATED_METADATA)  # a resource named twice is examined once
    index.change(1, STABLE_SERIES)  # an archived resource named again: its file is placed already
    path = index.close()
    with _storage.Delta(str(src), str(dest), state, index=path, link_mode="copy") as delta:
        plan = delta.window_plan()
        assert plan == {"mode": "changes", "reason": None, "change_position": position, "changes": 5}
        assert sorted(u for u, _s, _p in delta.state.changed_since(position)) == sorted(new)
        fetched = delta.fetch(changes_since=position)
        assert fetched["fetched_files"] == 3 and fetched["missing_files"] == 0
        assert not delta.fetched_all  # the window examined candidates only: tidy counts nothing on it
        late = delta.fetch()  # the safety net after the start: nothing left
        assert late["fetched_files"] == 0 and late["missing_files"] == 0
        assert delta.tidy()["files"] == 9
    for name in new:
        assert at(dest, name).read_bytes() == at(src, name).read_bytes()


def test_files_the_hot_pass_skipped_are_placed_whatever_their_change(tmp_path):
    """A file written just before the hot pass began (its change at or before the position) but
    too recent to be taken (not settled): the window places it from the list of skipped files."""
    src, dest = tmp_path / "live", tmp_path / "backup" / "storage"
    src.mkdir()
    index = Index(tmp_path / "index")
    old = put(src, b"archived")
    fresh = put(src, b"just written", age=0)
    gone = put(src, b"written, then deleted by Orthanc", age=0)
    for name in (old, fresh):
        index.instance(name, os.path.getsize(at(src, name)))
    position = index.last()
    state = str(tmp_path / "backup" / ".work" / "storage.db")
    hot = _storage.hot_pass(str(src), str(dest), state, link_mode="copy", settle=60, change_position=position)
    assert hot["files"] == 1 and hot["deferred_files"] == 2
    os.unlink(at(src, gone))
    with _storage.Delta(str(src), str(dest), state, index=index.close(), link_mode="copy") as delta:
        assert delta.window_plan()["mode"] == "changes"
        fetched = delta.fetch(changes_since=position)
        assert fetched["fetched_files"] == 1 and fetched["missing_files"] == 0  # the deleted one is no error
        assert delta.fetch()["fetched_files"] == 0
        assert delta.tidy()["files"] == 2
    assert at(dest, fresh).read_bytes() == b"just written"


def test_a_file_placed_while_it_was_written_is_placed_again(world):
    tmp_path, src, dest, state, index, names, position = world
    growing = put(src, b"half", age=3600)  # an old mtime: the hot pass takes it (a stalled writer)
    _storage.hot_pass(str(src), str(dest), state, link_mode="copy", settle=5, change_position=position + 99)
    at(src, growing).write_bytes(b"half and the rest")
    index.instance(growing, len(b"half and the rest"))  # committed once written: after the position
    with _storage.Delta(str(src), str(dest), state, index=index.close(), link_mode="copy") as delta:
        assert delta.window_plan()["change_position"] == position  # the second hot pass kept the first
        assert delta.fetch(changes_since=position)["fetched_files"] == 1
    assert at(dest, growing).read_bytes() == b"half and the rest"


def test_an_attachment_added_without_a_change_is_placed_by_the_safety_net(world):
    """Orthanc logs no change when it adds one of its own attachments to an instance (compression
    changed over REST, dicom-until-pixel-data): the window misses it, the full comparison after
    the start places it; a listed file that is then nowhere fails, naming itself."""
    tmp_path, src, dest, state, index, names, position = world
    extra = put(src, b"compressed anew", age=0)
    lost = put(src, b"added silently, deleted before the safety net", age=0)
    index.attach(1, 3, extra, len(b"compressed anew"))
    index.attach(2, 3, lost, len(b"added silently, deleted before the safety net"))
    with _storage.Delta(str(src), str(dest), state, index=index.close(), link_mode="copy") as delta:
        assert delta.fetch(changes_since=position)["fetched_files"] == 0
        os.unlink(at(src, lost))
        late = delta.fetch()
    assert late["fetched_files"] == 1 and late["fetched_examples"] == [extra]
    assert late["missing_files"] == 1 and late["missing_examples"] == [lost]
    assert at(dest, extra).read_bytes() == b"compressed anew"


def test_a_cleared_change_log_is_not_trusted(world):
    """DELETE /changes empties the table; AUTOINCREMENT goes on past the position, so the rows
    after it look complete: no row at or before the position is what betrays the clearing."""
    tmp_path, src, dest, state, index, names, position = world
    index.conn.execute("DELETE FROM Changes")
    new = put(src, b"after the clearing", age=0)
    index.instance(new, len(b"after the clearing"))
    with _storage.Delta(str(src), str(dest), state, index=index.close(), link_mode="copy") as delta:
        plan = delta.window_plan()
        assert plan["mode"] == "full" and "cleared" in plan["reason"] and str(position) in plan["reason"]
        assert delta.fetch()["fetched_files"] == 1


@pytest.mark.parametrize("case", ["no position", "empty log", "another index", "no change log", "older state"])
def test_an_untrusted_position_falls_back_to_the_full_comparison(tmp_path, case):
    src, dest = tmp_path / "live", tmp_path / "backup" / "storage"
    src.mkdir()
    index = Index(tmp_path / "index")
    name = put(src, b"archived")
    index.instance(name, 8)
    state = str(tmp_path / "backup" / ".work" / "storage.db")
    position = {"no position": None, "empty log": 0, "another index": index.last() + 10}.get(case, index.last())
    _storage.hot_pass(str(src), str(dest), state, link_mode="copy", settle=5, change_position=position)
    if case == "no change log":
        index.conn.execute("DROP TABLE Changes")
    if case == "older state":  # a state file written before the change position existed
        conn = sqlite3.connect(state)
        conn.execute("DROP TABLE facts")
        conn.execute("DROP TABLE skipped")
        conn.commit()
        conn.close()
    new = put(src, b"new", age=0)
    if case != "no change log":
        index.instance(new, 3)
    else:
        index.conn.execute("INSERT INTO AttachedFiles VALUES (99, 1, ?, 3, 3, 1, '', '')", (new,))
    with _storage.Delta(str(src), str(dest), state, index=index.close(), link_mode="copy") as delta:
        plan = delta.window_plan()
        assert plan["mode"] == "full" and plan["reason"], plan
        assert delta.fetch()["fetched_files"] == 1
        assert delta.tidy()["files"] == 2
    expected = {"no position": "no change position", "older state": "no change position",
                "empty log": "empty", "another index": "ends before", "no change log": "cannot be read"}
    assert expected[case] in plan["reason"]


def test_a_dump_listing_is_compared_in_full(world):
    tmp_path, src, dest, state, index, names, position = world
    with _storage.Delta(str(src), str(dest), state, wanted={n: os.path.getsize(at(src, n)) for n in names},
                        link_mode="copy") as delta:
        plan = delta.window_plan()
    assert plan["mode"] == "full" and "dump" in plan["reason"]


def test_the_window_reads_only_the_changes_past_the_position(world):
    """The query reads Changes by its rowid range past the position, never every change logged
    (Orthanc's ChangesIndex on internalId would otherwise be scanned whole: millions of rows in
    the stop window of a large archive). SQLite's own query plan says which."""
    tmp_path, _src, dest, state, index, _names, position = world
    for rid in range(1, 2000):  # a long change log: SQLite's planner weighs the table's size
        index.change(rid % 6 + 1, STABLE_SERIES)
    path = index.close()
    with _storage.Delta(str(tmp_path / "live"), str(dest), state, index=path, link_mode="copy") as delta:
        plan = [row[3] for row in delta.state.conn.execute("EXPLAIN QUERY PLAN " + _storage.CHANGED_SINCE, (position,))]
    changes = [step for step in plan if "idx.Changes" in step or " Changes" in step]
    assert changes == ["SEARCH idx.Changes USING INTEGER PRIMARY KEY (rowid>?)"], plan

"""The capture of a SQLite index set (every index* file, WAL included): by reflink where the
filesystem can (tests/integration/test_reflink.py), by copy elsewhere (here: ext4 or tmpfs)."""

from __future__ import annotations

import os
import sqlite3

import pytest

from ansible_collections.pacs.orthanc.plugins.module_utils import _sqlite

pytestmark = pytest.mark.quick


def live_index_with_wal(folder) -> sqlite3.Connection:
    """An index whose newest rows are only in index-wal (as Orthanc leaves it when killed)."""
    folder.mkdir()
    conn = sqlite3.connect(folder / "index", isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA wal_autocheckpoint=0")
    conn.execute("CREATE TABLE AttachedFiles (uuid TEXT, compressedSize INTEGER)")
    conn.executemany("INSERT INTO AttachedFiles VALUES (?, ?)", [(f"u{i}", i) for i in range(100)])
    return conn


def test_capture_without_reflinks_copies_and_reads_before_it_is_finished(tmp_path):
    live = live_index_with_wal(tmp_path / "live")
    assert (tmp_path / "live" / "index-wal").stat().st_size > 0
    try:
        captured = _sqlite.capture_index_set(str(tmp_path / "live"), str(tmp_path / "copy"))
    finally:
        live.close()
    expected = "reflink" if _sqlite.clone_file(str(tmp_path / "live" / "index"), str(tmp_path / "probe")) else "copy"
    assert captured["index_capture"] == expected
    assert set(captured["source_files"]) >= {"index", "index-wal"}
    # readable as it is (the delta pass reads it inside the window), the WAL's rows included
    reader = sqlite3.connect(f"file:{captured['path']}?mode=ro", uri=True)
    assert reader.execute("SELECT COUNT(*) FROM AttachedFiles").fetchone()[0] == 100
    reader.close()
    _sqlite.finish_capture(captured)
    assert sorted(os.listdir(tmp_path / "copy")) == ["index"]
    assert os.stat(captured["path"]).st_mode & 0o777 == 0o600 and captured["size"] > 0
    reader = sqlite3.connect(f"file:{captured['path']}?mode=ro", uri=True)
    assert reader.execute("SELECT COUNT(*) FROM AttachedFiles").fetchone()[0] == 100
    assert reader.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
    reader.close()


def test_a_clone_across_filesystems_is_refused_and_leaves_nothing(tmp_path):
    """/dev/shm (tmpfs) is another filesystem than tmp_path: FICLONE answers EXDEV."""
    if os.stat("/dev/shm").st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("/dev/shm is not another filesystem here")
    (tmp_path / "index").write_bytes(b"x" * 10)
    dest = os.path.join("/dev/shm", f"pacs-orthanc-clone-{os.getpid()}")
    try:
        assert _sqlite.clone_file(str(tmp_path / "index"), dest) is False
        assert not os.path.exists(dest)
    finally:
        if os.path.exists(dest):
            os.unlink(dest)


def test_a_stale_wal_of_an_earlier_attempt_is_not_replayed_into_the_capture(tmp_path):
    live = live_index_with_wal(tmp_path / "live")
    live.close()  # a clean close: one file, no WAL
    assert sorted(os.listdir(tmp_path / "live")) == ["index"]
    (tmp_path / "copy").mkdir()
    (tmp_path / "copy" / "index-wal").write_bytes(b"left by an earlier attempt")
    (tmp_path / "copy" / "index-notes.txt").write_text("the administrator's, not SQLite's")
    captured = _sqlite.capture_index_set(str(tmp_path / "live"), str(tmp_path / "copy"))
    assert sorted(os.listdir(tmp_path / "copy")) == ["index", "index-notes.txt"]
    reader = sqlite3.connect(f"file:{captured['path']}?mode=ro", uri=True)
    assert reader.execute("SELECT COUNT(*) FROM AttachedFiles").fetchone()[0] == 100
    reader.close()
    assert os.stat(captured["path"]).st_mode & 0o777 == 0o600

"""The life of a backup folder on real files: lock, leftovers, checks, manifest, latest, retention.

The index here is a small SQLite file with the tables and columns of Orthanc's schema 6 that
the collection reads; the tests against real Orthanc servers are in tests/integration."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import sqlite3
import time

import pytest

from ansible_collections.pacs.orthanc.plugins.module_utils import _backupset, _lock, _storage
from ansible_collections.pacs.orthanc.plugins.module_utils._common import PacsError


def make_orthanc(tmp_path, files: int = 3):
    """A configuration, a storage tree and an index that lists exactly those files."""
    config, storage, index_dir = tmp_path / "etc", tmp_path / "storage", tmp_path / "index"
    for folder in (config, storage, index_dir):
        folder.mkdir()
    (config / "orthanc.json").write_text('{"Name": "unit"}')
    conn = sqlite3.connect(index_dir / "index")
    conn.executescript("""
        CREATE TABLE GlobalProperties(property INTEGER PRIMARY KEY, value TEXT);
        CREATE TABLE Resources(internalId INTEGER PRIMARY KEY, resourceType INTEGER, publicId TEXT, parentId INTEGER);
        CREATE TABLE AttachedFiles(id INTEGER, fileType INTEGER, uuid TEXT, compressedSize INTEGER,
            uncompressedSize INTEGER, compressionType INTEGER, uncompressedMD5 TEXT, compressedMD5 TEXT);
        INSERT INTO GlobalProperties VALUES (1, '6');
        INSERT INTO Resources VALUES (1, 1, 'p', NULL), (2, 2, 's', 1), (3, 3, 'se', 2);
    """)
    for number in range(files):
        data = os.urandom(100 + number)
        uuid = hashlib.md5(data).hexdigest()
        uuid = f"{uuid[:8]}-{uuid[8:12]}-{uuid[12:16]}-{uuid[16:20]}-{uuid[20:]}"
        path = storage / _storage.relpath(uuid)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        digest = hashlib.md5(data).hexdigest()
        conn.execute("INSERT INTO Resources VALUES (?, 4, ?, 3)", (10 + number, f"i{number}"))
        conn.execute("INSERT INTO AttachedFiles VALUES (?, 1, ?, ?, ?, 1, ?, ?)",
                     (10 + number, uuid, len(data), len(data), digest, digest))
    conn.commit()
    conn.close()
    return config, storage, index_dir


def take_backup(tmp_path, root, config, storage, index_dir, keep=7):
    opened = _backupset.open_backup(str(root), str(config), str(index_dir), str(storage))
    _storage.hot_pass(str(storage), opened["storage_path"], opened["state_file"], previous=(
        os.path.join(opened["previous"], "storage") if opened["previous"] else None), link_mode="copy", settle=0)
    os.makedirs(opened["index_path"])
    with open(index_dir / "index", "rb") as src, open(os.path.join(opened["index_path"], "index"), "wb") as dst:
        dst.write(src.read())
    return opened, _backupset.close_backup(str(root), opened["name"], "unit-host", {"backend": "sqlite"}, keep)


def test_a_backup_is_complete_only_after_its_checks(tmp_path):
    config, storage, index_dir = make_orthanc(tmp_path)
    root = tmp_path / "backups"
    opened, closed = take_backup(tmp_path, root, config, storage, index_dir)
    final = root / opened["name"]
    assert os.readlink(root / "latest") == opened["name"]
    assert not (root / ".lock").exists() and not (final / ".work").exists()
    manifest = json.loads((final / "manifest.json").read_text())
    assert manifest["counts"] == {"patients": 1, "studies": 1, "series": 1, "instances": 3}
    assert manifest["storage"]["files"] == 3 and manifest["verification"]["files_hashed"] == 3
    assert set(manifest["files"]) == {"config/orthanc.json", "index/index"}
    assert oct(os.stat(root).st_mode & 0o777) == "0o700"


def test_a_damaged_file_keeps_the_backup_incomplete(tmp_path):
    config, storage, index_dir = make_orthanc(tmp_path)
    root = tmp_path / "backups"
    opened = _backupset.open_backup(str(root), str(config), str(index_dir), str(storage))
    _storage.hot_pass(str(storage), opened["storage_path"], opened["state_file"], link_mode="copy", settle=0)
    os.makedirs(opened["index_path"])
    (tmp_path / "index" / "index").replace(os.path.join(opened["index_path"], "index"))
    victim = next(p for p in (root / (opened["name"] + ".incomplete") / "storage").rglob("*") if p.is_file())
    data = bytearray(victim.read_bytes())
    data[10] ^= 0xFF
    victim.write_bytes(bytes(data))  # same size, one flipped byte
    with pytest.raises(PacsError, match="1 storage files with a wrong MD5"):
        _backupset.close_backup(str(root), opened["name"], "h", {}, 7)
    assert (root / (opened["name"] + ".incomplete")).is_dir()
    assert _backupset.complete_backups(str(root)) == [] and not (root / "latest").exists()


def test_a_second_backup_is_refused_while_one_runs_and_leftovers_are_removed(tmp_path):
    config, storage, index_dir = make_orthanc(tmp_path)
    root = tmp_path / "backups"
    first = _backupset.open_backup(str(root), str(config), str(index_dir), str(storage))
    assert first["lock_taken_over"] is None
    keeper = json.loads((root / ".lock").read_text())["pid"]
    with pytest.raises(PacsError, match=rf"another backup .* holds the lock .*\.lock: its keeper process {keeper} "):
        _backupset.open_backup(str(root), str(config), str(index_dir), str(storage))
    # the first run dies with its keeper (kill -9): the next run takes over at once, without
    # waiting for the lock to grow stale, removes its folder and records the takeover
    os.kill(keeper, signal.SIGKILL)
    assert wait_for(lambda: _lock.process_start(keeper) is None)
    time.sleep(1.1)  # backups are named by the second
    second = _backupset.open_backup(str(root), str(config), str(index_dir), str(storage))
    assert second["removed_incomplete"] == [first["name"] + ".incomplete"]
    taken = second["lock_taken_over"]
    assert taken["pid"] == keeper and taken["name"] == first["name"] and taken["provable"]
    assert taken["started"] == first["started_at"] and taken["host"] == os.uname().nodename
    assert "is gone" in taken["reason"]
    _storage.hot_pass(str(storage), second["storage_path"], second["state_file"], link_mode="copy", settle=0)
    os.makedirs(second["index_path"])
    shutil.copy(index_dir / "index", second["index_path"])
    closed = _backupset.close_backup(str(root), second["name"], "unit-host", {"backend": "sqlite"}, 7)
    assert closed["manifest"]["lock_taken_over"] == taken
    assert json.loads((root / second["name"] / "manifest.json").read_text())["lock_taken_over"] == taken
    assert sorted(os.listdir(root)) == [second["name"], "latest"]
    # a backup that took over nothing says so too
    time.sleep(1.1)
    _opened, closed = take_backup(tmp_path, root, config, storage, index_dir)
    assert closed["manifest"]["lock_taken_over"] is None


def test_discard_and_close_end_the_keeper(tmp_path):
    config, storage, index_dir = make_orthanc(tmp_path)
    root = tmp_path / "backups"
    opened = _backupset.open_backup(str(root), str(config), str(index_dir), str(storage))
    keeper = json.loads((root / ".lock").read_text())["pid"]
    assert _lock.KEEPER_TAG in _lock.process_command(keeper)
    _backupset.discard_backup(str(root), opened["name"])
    assert _lock.process_start(keeper) is None and os.listdir(root) == []
    time.sleep(1.1)
    opened, _closed = take_backup(tmp_path, root, config, storage, index_dir)
    assert not (root / ".lock").exists() and not (root / ".lock.step").exists()
    assert not [pid for pid in os.listdir("/proc") if pid.isdigit()
                and _lock.KEEPER_TAG in _lock.process_command(pid) and str(root) in _lock.process_command(pid)]


def wait_for(predicate, timeout=10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def test_retention_keeps_the_newest_and_links_unchanged_files(tmp_path):
    config, storage, index_dir = make_orthanc(tmp_path)
    root = tmp_path / "backups"
    names = []
    for _round in range(3):
        opened, closed = take_backup(tmp_path, root, config, storage, index_dir, keep=2)
        names.append(opened["name"])
        time.sleep(1.1)
    assert _backupset.complete_backups(str(root)) == names[1:]
    assert closed["deleted_by_retention"] == [names[0]]
    manifest = closed["manifest"]
    assert manifest["storage"]["linked_files"] == 3 and manifest["storage"]["copied_files"] == 0
    # keep=0 still keeps the newest
    opened, closed = take_backup(tmp_path, root, config, storage, index_dir, keep=0)
    assert _backupset.complete_backups(str(root)) == [opened["name"]]


def test_no_room_is_refused_with_the_figures(tmp_path):
    config, storage, index_dir = make_orthanc(tmp_path)
    with pytest.raises(PacsError, match=r"not enough free space in .*: about \d+ bytes are needed"):
        _backupset.open_backup(str(tmp_path / "backups"), str(config), str(index_dir), str(storage),
                               min_free_bytes=1 << 60)
    assert not (tmp_path / "backups" / ".lock").exists()


def test_a_failed_open_leaves_no_lock_and_no_folder(tmp_path):
    config, storage, index_dir = make_orthanc(tmp_path)
    root = tmp_path / "backups"
    with pytest.raises(PacsError, match="prepare backup folder: .*No such file"):
        _backupset.open_backup(str(root), str(tmp_path / "no-config"), str(index_dir), str(storage))
    assert os.listdir(root) == []  # the next run is not blocked by a lock of a dead run
    opened = _backupset.open_backup(str(root), str(config), str(index_dir), str(storage))
    assert opened["removed_incomplete"] == []


def test_a_running_step_keeps_its_lock_fresh(tmp_path):
    config, storage, index_dir = make_orthanc(tmp_path)
    root = tmp_path / "backups"
    opened = _backupset.open_backup(str(root), str(config), str(index_dir), str(storage))
    old = time.time() - 1000
    os.utime(root / ".lock", (old, old))
    # a step working inside the incomplete folder touches the lock while it runs...
    with _backupset.Heartbeat(os.path.join(opened["storage_path"], "ab"), interval=0.05) as beat:
        assert beat.lock_path == str(root / ".lock")
        os.utime(root / ".lock", (old, old))
        time.sleep(0.3)
        assert time.time() - os.stat(root / ".lock").st_mtime < 5
        # ...and registers itself with the keeper, which then knows the run is alive
        assert json.loads((root / ".lock.step").read_text())["pid"] == os.getpid()
    assert not (root / ".lock.step").exists()
    # ...so a second run started meanwhile still finds it held, even with a short staleness
    with pytest.raises(PacsError, match="holds the lock"):
        _backupset.open_backup(str(root), str(config), str(index_dir), str(storage), stale_lock_seconds=60)
    # outside a backup folder, or for another run's folder, it touches nothing
    assert _backupset.Heartbeat(str(tmp_path)).lock_path is None
    assert _backupset.Heartbeat(str(root / "20000101T000000Z.incomplete" / "x")).lock_path is None
    _backupset.discard_backup(str(root), opened["name"])


def test_a_retention_that_fails_leaves_the_backup_complete_and_releases_the_lock(tmp_path, monkeypatch):
    """The new backup is complete and checked before retention runs: a retention that fails is a
    warning, never a failed backup (whose rescue would say that no backup was completed)."""
    config, storage, index_dir = make_orthanc(tmp_path)
    root = tmp_path / "backups"
    first, _closed = take_backup(tmp_path, root, config, storage, index_dir)
    time.sleep(1.1)

    def refuse(*_args, **_kwargs):
        raise PermissionError(13, "Permission denied", str(root / first["name"]))

    monkeypatch.setattr(_backupset._layout, "remove_backup", refuse)
    second, closed = take_backup(tmp_path, root, config, storage, index_dir, keep=1)
    assert closed["deleted_by_retention"] == []
    assert "is complete, but retention could not remove" in closed["warnings"][0]
    assert "Permission denied" in closed["warnings"][0]
    assert _backupset.complete_backups(str(root)) == sorted([first["name"], second["name"]])
    assert os.readlink(root / "latest") == second["name"]
    assert not (root / ".lock").exists()
    keeper_gone = not [pid for pid in os.listdir("/proc") if pid.isdigit()
                       and _lock.KEEPER_TAG in _lock.process_command(pid) and str(root) in _lock.process_command(pid)]
    assert keeper_gone


def test_a_discard_that_cannot_remove_the_folder_still_releases_the_lock(tmp_path, monkeypatch):
    config, storage, index_dir = make_orthanc(tmp_path)
    root = tmp_path / "backups"
    opened = _backupset.open_backup(str(root), str(config), str(index_dir), str(storage))
    keeper = json.loads((root / ".lock").read_text())["pid"]

    def refuse(path, *_args, **_kwargs):
        raise PermissionError(13, "Permission denied", path)

    monkeypatch.setattr(_backupset.shutil, "rmtree", refuse)
    with pytest.raises(PermissionError):
        _backupset.discard_backup(str(root), opened["name"])
    assert not (root / ".lock").exists() and wait_for(lambda: _lock.process_start(keeper) is None)
    assert os.path.isdir(opened["path"])  # still named .incomplete: the next run removes it
    monkeypatch.undo()
    time.sleep(1.1)
    again = _backupset.open_backup(str(root), str(config), str(index_dir), str(storage))
    assert again["removed_incomplete"] == [opened["name"] + ".incomplete"] and again["lock_taken_over"] is None
    _backupset.discard_backup(str(root), again["name"])

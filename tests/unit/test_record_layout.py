"""One record flow and one layout: each capture step's record lands in the incomplete backup and
close builds the manifest from the records; the layout's shared operations on real files."""

from __future__ import annotations

import json
import os

import pytest

from ansible_collections.pacs.orthanc.plugins.module_utils import _backupset, _layout, _record, _storage
from tests.support.storage_tree import put
from tests.unit.test_backupset import make_orthanc

INFO = {"version": "1.10.1", "name": "unit-orthanc", "backend": "sqlite", "storage": "filesystem",
        "storage_compression": False, "config_path": "/etc/orthanc", "config_is_folder": True,
        "storage_owner": {"owner": "orthanc", "group": "orthanc", "mode": "0o700"},
        "storage_directory": "/var/lib/orthanc/db", "index_directory": "/var/lib/orthanc/db",
        "statistics": {"TotalDiskSize": 1}, "changed": False}


def open_with_records(tmp_path, orthanc=None):
    orthanc = INFO if orthanc is None else orthanc
    config, storage, index_dir = make_orthanc(tmp_path)
    root = tmp_path / "backups"
    opened = _backupset.open_backup(str(root), str(config), str(index_dir), str(storage), orthanc=orthanc)
    _storage.hot_pass(str(storage), opened["storage_path"], opened["state_file"], link_mode="copy", settle=0)
    os.makedirs(opened["index_path"])
    with open(index_dir / "index", "rb") as src, open(os.path.join(opened["index_path"], "index"), "wb") as dst:
        dst.write(src.read())
    return root, opened


def test_open_records_what_orthanc_info_found_and_close_builds_the_manifest_from_the_records(tmp_path):
    root, opened = open_with_records(tmp_path)
    records = _record.read_records(opened["path"])
    assert set(records) == {"orthanc", "open"}
    assert "statistics" not in records["orthanc"] and records["orthanc"]["version"] == "1.10.1"
    assert records["open"] == {"started_at": opened["started_at"], "previous": None}
    # what stopped_capture records, found beside its destination
    written = _record.record_beside(opened["storage_path"], "stopped", {
        "stopped_at": "2026-11-30T05:00:00.000000Z", "restarted_at": "2026-11-30T05:00:02.500000Z",
        "downtime_seconds": 2.5, "phases": {"stop": 1.0, "capture": 0.5, "delta": 0.2, "start": 0.8},
        "index_capture": "reflink", "lost_in_live_storage": ["b-lost", "a-lost"]})
    assert written == os.path.join(opened["path"], ".work", "records", "stopped.json")
    closed = _backupset.close_backup(str(root), opened["name"], "unit-host", None, 7)
    manifest = json.loads((root / opened["name"] / "manifest.json").read_text())
    assert manifest == json.loads(json.dumps(closed["manifest"]))
    assert manifest["orthanc"]["version"] == "1.10.1" and manifest["orthanc"]["name"] == "unit-orthanc"
    assert manifest["strategy"] == "stop" and manifest["capture"] is None and manifest["dump"] is None
    assert manifest["downtime_seconds"] == 2.5 and manifest["downtime_phases"]["start"] == 0.8
    assert manifest["index_capture"] == "reflink"
    assert manifest["stopped_at"] == "2026-11-30T05:00:00.000000Z"
    assert manifest["started_at"] == opened["started_at"]
    assert manifest["source"]["storage_owner"] == INFO["storage_owner"]
    assert manifest["source"]["config_is_folder"] is True
    assert manifest["storage"]["lost_in_live_storage"] == ["a-lost", "b-lost"]
    assert manifest["storage"]["deleted_during_capture"] == []
    assert not any(name.startswith(".work") for name in manifest["files"])  # records never listed


def test_a_snapshot_that_fell_back_to_stopping_is_named_in_the_manifest(tmp_path):
    root, opened = open_with_records(tmp_path)
    _record.record_beside(opened["storage_path"], "snapshot",
                          {"precondition_failed": True, "kind": "btrfs", "cause": "no btrfs here"})
    _record.record_beside(opened["storage_path"], "stopped", {"downtime_seconds": 1.0, "phases": {}})
    manifest = _backupset.close_backup(str(root), opened["name"], "h", {}, 7)["manifest"]
    assert manifest["strategy"] == "stop"
    assert manifest["capture"] == {
        "fallback_from": "snapshot", "snapshot_kind": "btrfs",
        "warning": "no btrfs snapshot: no btrfs here; Orthanc was stopped instead (orthanc_backup_snapshot_fallback=stop)"}


def test_a_dump_record_gives_the_dump_strategy_and_a_relative_dump_path(tmp_path):
    root, opened = open_with_records(tmp_path, dict(INFO, backend="postgresql"))
    assert opened["dump_path"] == os.path.join(opened["path"], "database", "orthanc.pgdump")
    _record.record_beside(opened["dump_path"], "dump", {
        "path": opened["dump_path"], "engine": "postgresql", "format": "custom", "bytes": 10, "sha256": "00",
        "dump_seconds": 0.25, "server_version": "15", "tool": "pg_dump", "tool_version": "15",
        "connection": {"host": "/run/postgresql", "database": "orthanc", "username": "u", "password_set": True}})
    _record.record_beside(opened["storage_path"], "delta", {"deleted_during_capture": []})
    facts = _record.facts_from(_record.read_records(opened["path"]))
    assert facts["strategy"] == "dump" and facts["downtime_seconds"] == 0
    assert facts["capture"] == {"orthanc_stopped": False, "storage_in_database": False, "dump_seconds": 0.25,
                                "deleted_during_capture": 0}
    record = _backupset._dump_record(facts["dump"], opened["path"])
    assert record["path"] == "database/orthanc.pgdump" and "password" not in json.dumps(record)


def test_records_go_nowhere_outside_an_incomplete_backup_and_in_check_mode(tmp_path):
    assert _record.record_beside(str(tmp_path / "storage"), "hot", {"files": 1}) is None
    inside = tmp_path / "x.incomplete"
    inside.mkdir()
    assert _record.record_beside(str(inside / "storage"), "hot", {"files": 1}, check_mode=True) is None
    assert not (inside / ".work").exists()
    with pytest.raises(ValueError):
        _record.write_record(str(inside), "../escape", {})


def test_latest_switches_and_a_removed_backup_never_looks_complete(tmp_path, monkeypatch):
    for name in ("20261129T010000Z", "20261130T010000Z"):
        (tmp_path / name).mkdir()
        _layout.write_json_atomic(str(tmp_path / name / _layout.MANIFEST), {"name": name}, sync_dir=True)
    _layout.point_latest(str(tmp_path), "20261129T010000Z")
    _layout.point_latest(str(tmp_path), "20261130T010000Z")
    assert os.readlink(tmp_path / "latest") == "20261130T010000Z" and not (tmp_path / ".latest.new").exists()
    seen = []
    real_rmtree = _layout.shutil.rmtree
    monkeypatch.setattr(_layout.shutil, "rmtree", lambda path, **kw: (
        seen.append(_layout.complete_backups(str(tmp_path))), real_rmtree(path, **kw)))
    _layout.remove_backup(str(tmp_path), "20261129T010000Z")
    assert seen == [["20261130T010000Z"]]  # while it was being deleted it was no complete backup
    assert sorted(os.listdir(tmp_path)) == ["20261130T010000Z", "latest"]


def test_a_backup_s_storage_is_removed_by_worker_processes_and_an_error_names_its_file(tmp_path, monkeypatch):
    """remove_backup hands storage/'s top-level folders to worker processes: all of it goes, and
    while it goes the backup is no complete backup. A file none can remove fails with its name;
    the backup stays renamed '.deleting.incomplete' (never complete) for the next run."""
    names = ("20261129T010000Z", "20261130T010000Z")
    files = {}
    for name in names:
        (tmp_path / name).mkdir()
        for number in range(40):
            files[name] = put(tmp_path / name / "storage", os.urandom(number + 1))
        _layout.write_json_atomic(str(tmp_path / name / _layout.MANIFEST), {"name": name})
    assert len(os.listdir(tmp_path / names[0] / "storage")) > 2
    pids = tmp_path.parent / f"{tmp_path.name}-pids"
    pids.mkdir()
    real_rmtree = _layout.shutil.rmtree

    def rmtree(path, **kwargs):
        (pids / str(os.getpid())).touch()  # the workers are forked: they run this too
        return real_rmtree(path, **kwargs)

    monkeypatch.setattr(_layout.shutil, "rmtree", rmtree)
    _layout.remove_backup(str(tmp_path), names[0])
    assert sorted(os.listdir(tmp_path)) == [names[1]]
    assert len(set(os.listdir(pids)) - {str(os.getpid())}) >= 1  # the storage went through worker processes
    monkeypatch.setattr(_layout.shutil, "rmtree", real_rmtree)
    real_rmtree(pids)

    stuck = files[names[1]]
    real_unlink = os.unlink

    def unlink(path, *args, **kwargs):
        if os.path.basename(path) == stuck:
            raise PermissionError(13, "Permission denied", path)
        return real_unlink(path, *args, **kwargs)

    monkeypatch.setattr(_layout.os, "unlink", unlink)
    with pytest.raises(PermissionError, match=stuck):
        _layout.remove_backup(str(tmp_path), names[1])
    assert os.listdir(tmp_path) == [names[1] + _layout.DELETING] and _layout.complete_backups(str(tmp_path)) == []
    left = [p for p in (tmp_path / (names[1] + _layout.DELETING)).rglob("*") if p.is_file()]
    assert [p.name for p in left] == [stuck]  # everything else went
    monkeypatch.setattr(_layout.os, "unlink", real_unlink)
    _layout.remove_tree(str(tmp_path / (names[1] + _layout.DELETING)))
    assert os.listdir(tmp_path) == []


def test_an_atomic_write_that_fails_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "state.tsv"
    target.write_text("old\n")
    with pytest.raises(RuntimeError):
        with _layout.atomic_writer(str(target), encoding="ascii") as handle:
            handle.write("half")
            raise RuntimeError("killed")
    assert target.read_text() == "old\n" and os.listdir(tmp_path) == ["state.tsv"]


def test_manifest_reading_and_dump_names(tmp_path):
    with pytest.raises(FileNotFoundError):
        _layout.read_manifest(str(tmp_path))
    (tmp_path / "manifest.json").write_text("[1, 2]")
    with pytest.raises(_layout.ManifestError, match="is not a manifest"):
        _layout.read_manifest(str(tmp_path))
    (tmp_path / "manifest.json").write_text("{broken")
    with pytest.raises(_layout.ManifestError, match="cannot read"):
        _layout.read_manifest(str(tmp_path))
    assert _layout.dump_name("mysql", "directory") == "orthanc.sql"
    assert _layout.dump_name("postgresql", "directory") == "orthanc.pgdir"
    assert _layout.dump_kind("/b/database/orthanc.pgdir/") == ("postgresql", "directory")
    assert _layout.dump_kind("/b/x.tar") is None
    (tmp_path / "database").mkdir()
    (tmp_path / "database" / "orthanc.sql").write_text("-- dump")
    assert _layout.find_dump(str(tmp_path)) == ("mysql", "sql", str(tmp_path / "database" / "orthanc.sql"))


def test_a_snapshot_record_gives_the_snapshot_strategy_and_its_details():
    details = {"kind": "btrfs", "snapshot": {"volume": "/srv"}, "polls": {"polls": 3, "failures": 0}}
    facts = _record.facts_from({"snapshot": {"downtime_seconds": 0.0, "details": details}})
    assert facts["strategy"] == "snapshot" and facts["capture"] == details and facts["downtime_seconds"] == 0.0
    assert facts["stopped_at"] is None and facts["downtime_phases"] == {} and facts["dump"] is None
    # a failed precondition alone (no fallback ran) says nothing about the strategy
    assert "strategy" not in _record.facts_from({"snapshot": {"precondition_failed": True, "kind": "btrfs"}})


def test_removing_a_backup_whose_storage_is_a_link_leaves_the_linked_folder_whole(tmp_path):
    live = tmp_path / "live"
    for shard in ("ab", "cd"):
        (live / shard / "01").mkdir(parents=True)
        (live / shard / "01" / f"{shard}01-file").write_bytes(b"DICM")
    backup = tmp_path / "root" / "20261130T000000Z"
    backup.mkdir(parents=True)
    (backup / "manifest.json").write_text("{}")
    (backup / _layout.STORAGE).symlink_to(live)
    _layout.remove_tree(str(backup))
    assert not backup.exists()
    assert sorted(p.name for p in live.rglob("*-file")) == ["ab01-file", "cd01-file"]

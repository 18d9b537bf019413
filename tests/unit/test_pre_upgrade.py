"""Pre-upgrade backups: retention keeps them until keep_until (on the host and on the backup
server), and the restore's version guard names the newest one that fits the running Orthanc.
Backup folders here are real folders holding only a manifest: retention and the guard read
nothing else."""

from __future__ import annotations

import datetime
import json

import pytest

from ansible_collections.pacs.orthanc.plugins.module_utils import _backupset, _layout, _record, _restore, _ship
from ansible_collections.pacs.orthanc.plugins.module_utils._common import PacsError

NOW = datetime.datetime.now(datetime.timezone.utc)


def backup(root, name, version="1.10.1", keep_until=None):
    folder = root / name
    folder.mkdir(parents=True)
    manifest = {"name": name, "orthanc": {"version": version}, "database_schema_version": "6",
                "started_at": name}
    if keep_until is not None:
        manifest["pre_upgrade"] = {"orthanc_version": version, "keep_until": keep_until}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def stamp(days: float) -> str:
    return (NOW + datetime.timedelta(days=days)).strftime("%Y-%m-%dT%H:%M:%SZ")


def test_retention_skips_a_held_pre_upgrade_backup_and_not_an_expired_one(tmp_path):
    backup(tmp_path, "20261101T000000Z")
    backup(tmp_path, "20261102T000000Z", keep_until=stamp(10))   # held
    backup(tmp_path, "20261103T000000Z", keep_until=stamp(-1))   # expired: ordinary again
    backup(tmp_path, "20261104T000000Z")
    backup(tmp_path, "20261105T000000Z")
    doomed = _backupset.retention(str(tmp_path), 1, protect="20261105T000000Z")
    assert doomed == ["20261101T000000Z", "20261103T000000Z", "20261104T000000Z"]
    assert _layout.complete_backups(str(tmp_path)) == ["20261102T000000Z", "20261105T000000Z"]


def test_the_backup_server_keeps_a_held_pre_upgrade_backup_outside_its_retention(tmp_path):
    for day in range(1, 6):
        backup(tmp_path, f"202611{day:02d}T000000Z", keep_until=stamp(10) if day == 2 else None)
    result = _ship.retention(str(tmp_path), "20261105T000000Z", 1, 0, 0, 0)
    assert result["kept_for_upgrade"] == ["20261102T000000Z"] and result["kept"] == ["20261105T000000Z"]
    assert _layout.complete_backups(str(tmp_path)) == ["20261102T000000Z", "20261105T000000Z"]


def test_a_marker_without_a_readable_keep_until_is_kept(tmp_path):
    folder = backup(tmp_path, "20261101T000000Z", keep_until="soon")
    assert _layout.held_for_upgrade(str(folder))
    assert not _layout.held_for_upgrade(str(backup(tmp_path, "20261102T000000Z")))


def test_the_record_of_a_pre_upgrade_backup():
    info = {"version": "1.10.1", "backend": "postgresql", "database_version": "6",
            "plugin_versions": {"postgresql-index": "4.0", "postgresql-storage": "4.0", "dicom-web": "1.13"}}
    record = _record.pre_upgrade_record(info, "2026-11-30T07:00:00.000000Z", 30)
    assert record["keep_until"] == "2026-12-30T07:00:00Z"
    assert record["index_plugin"] == {"id": "postgresql-index", "version": "4.0"}
    assert record["plugins"] == info["plugin_versions"] and record["database_version"] == "6"


def test_the_guard_names_the_newest_pre_upgrade_backup_that_fits(tmp_path):
    backup(tmp_path, "20261101T000000Z", "1.10.1", keep_until=stamp(10))
    backup(tmp_path, "20261102T000000Z", "1.10.1", keep_until=stamp(10))
    backup(tmp_path, "20261103T000000Z", "1.12.9", keep_until=stamp(10))  # itself too new
    backup(tmp_path, "20261104T000000Z", "1.10.1")                        # ordinary
    newer = backup(tmp_path, "20261105T000000Z", "1.12.9")
    found = _restore.fitting_pre_upgrade(str(tmp_path), "1.10.1", "6")
    assert found[0] == str(tmp_path / "20261102T000000Z")
    assert _restore.fitting_pre_upgrade(str(tmp_path), "1.9.0") is None
    hint = _restore._pre_upgrade_hint(str(newer), "1.10.1", "6")
    assert "orthanc_restore_backup=20261102T000000Z" in hint
    assert "no pre-upgrade backup" in _restore._pre_upgrade_hint(str(newer), "1.9.0", "6")


def test_prepare_refuses_a_keep_of_less_than_a_day(tmp_path):
    with pytest.raises(PacsError, match="pre_upgrade_keep_days must be at least 1"):
        _backupset.open_backup(str(tmp_path / "root"), str(tmp_path), None, None, pre_upgrade_keep_days=0)

"""Pure logic of shipping, retention, status and the fleet summary (no server, no Orthanc)."""

from __future__ import annotations

import datetime
import json
import os
import time

import pytest

from ansible_collections.pacs.orthanc.plugins.filter import backup_summary
from ansible_collections.pacs.orthanc.plugins.module_utils import _lock, _ship, _status
from ansible_collections.pacs.orthanc.plugins.module_utils._common import PacsError


def names(*stamps):
    return [s.replace("-", "").replace(":", "").replace(" ", "T") + "Z" for s in stamps]


def test_keep_last_only():
    backups = names("2026-03-01 02:00:00", "2026-03-02 02:00:00", "2026-03-03 02:00:00")
    assert _ship.select_kept(backups, 2, 0, 0, 0) == backups[::-1][:2]


def test_the_newest_is_kept_whatever_the_counts():
    backups = names("2026-03-01 02:00:00", "2026-03-02 02:00:00")
    assert _ship.select_kept(backups, 0, 0, 0, 0) == [backups[1]]
    assert _ship.select_kept([], 3, 3, 3, 3) == []


def test_daily_keeps_the_newest_of_each_day():
    backups = names("2026-03-01 02:00:00", "2026-03-01 14:00:00", "2026-03-02 02:00:00", "2026-03-02 23:59:59",
                    "2026-03-03 01:00:00")
    assert _ship.select_kept(backups, 1, 2, 0, 0) == names("2026-03-03 01:00:00", "2026-03-02 23:59:59")
    assert _ship.select_kept(backups, 0, 3, 0, 0) == names("2026-03-03 01:00:00", "2026-03-02 23:59:59",
                                                           "2026-03-01 14:00:00")


def test_weekly_uses_iso_weeks():
    # 2026-01-04 is a Sunday (ISO week 2026-W01); 2026-01-05 a Monday (W02); 2025-12-29 Monday of W01
    backups = names("2025-12-28 10:00:00", "2025-12-29 10:00:00", "2026-01-04 10:00:00", "2026-01-05 10:00:00")
    assert _ship.select_kept(backups, 0, 0, 2, 0) == names("2026-01-05 10:00:00", "2026-01-04 10:00:00")
    assert _ship.select_kept(backups, 0, 0, 3, 0) == names("2026-01-05 10:00:00", "2026-01-04 10:00:00",
                                                           "2025-12-28 10:00:00")


def test_monthly_and_the_union():
    backups = names("2025-11-30 23:00:00", "2025-12-01 00:30:00", "2025-12-31 23:00:00", "2026-01-01 00:00:01",
                    "2026-01-15 12:00:00")
    assert _ship.select_kept(backups, 0, 0, 0, 3) == names("2026-01-15 12:00:00", "2025-12-31 23:00:00",
                                                           "2025-11-30 23:00:00")
    # union: last 1 + 2 days (01-15, 01-01) + 3 months (01-15, 12-31, 11-30)
    assert _ship.select_kept(backups, 1, 2, 0, 3) == names("2026-01-15 12:00:00", "2026-01-01 00:00:01",
                                                           "2025-12-31 23:00:00", "2025-11-30 23:00:00")


def test_a_year_of_daily_backups():
    start = datetime.datetime(2025, 1, 1, 3, tzinfo=datetime.timezone.utc)
    backups = [(start + datetime.timedelta(days=d)).strftime("%Y%m%dT%H%M%SZ") for d in range(365)]
    kept = _ship.select_kept(backups, 3, 7, 4, 6)
    assert kept[0] == backups[-1]
    assert len(kept) == len(set(kept))
    # 7 daily (covering the 3 last), 4 weekly (newest of each week: Sundays, but the newest
    # counts for its own week), 6 monthly (last day of each month, the newest for its month)
    months = {name[:6] for name in kept}
    assert len(months) == 6
    assert 7 + 3 <= len(kept) <= 7 + 4 + 6


def test_names_with_microseconds():
    assert _ship.parse_name("20261129T073335.123456Z") == datetime.datetime(2026, 11, 29, 7, 33, 35,
                                                                            tzinfo=datetime.timezone.utc)


def test_rsync_stats_are_parsed():
    text = """
Number of files: 20 (reg: 12, dir: 8)
Number of created files: 20 (reg: 12, dir: 8)
Number of regular files transferred: 12
Total file size: 1,720,311 bytes
Total transferred file size: 1,720,311 bytes
Literal data: 1,720,311 bytes
Matched data: 0 bytes
File list size: 0
Total bytes sent: 1,722,156
Total bytes received: 270
"""
    assert _ship.parse_stats(text) == {"files": 20, "files_transferred": 12, "file_bytes": 1720311,
                                       "transferred_file_bytes": 1720311, "literal_bytes": 1720311,
                                       "matched_bytes": 0, "bytes_sent": 1722156, "bytes_received": 270}


def test_the_transfer_commands(tmp_path):
    source = tmp_path / "20261129T070000Z"
    (source / "storage").mkdir(parents=True)
    (source / "manifest.json").write_text("{}")
    key = tmp_path / "id key"
    key.write_text("not a real key")
    calls = []

    def runner(argv, step, check=True, **_kw):
        calls.append(argv)
        return 0, "Total bytes sent: 1,000\nLiteral data: 900 bytes\n", ""

    result = _ship.transfer(str(source), "backup.example", "/srv/b/h/20261129T070000Z.incomplete",
                            "20261128T070000Z", port=2222, user="ship", key=str(key),
                            known_hosts="/k h", bwlimit=500, runner=runner)
    assert result["bytes_sent"] == 2000 and result["stats"]["literal_bytes"] == 1800
    storage, rest = calls
    assert storage[-2:] == [f"{source}/storage/", "backup.example:/srv/b/h/20261129T070000Z.incomplete/storage/"]
    assert "--size-only" in storage and "--times" not in storage
    assert "--link-dest=../../20261128T070000Z/storage" in storage
    assert rest[-2:] == [f"{source}/", "backup.example:/srv/b/h/20261129T070000Z.incomplete/"]
    assert "--times" in rest and "--exclude=/storage/" in rest and "--link-dest=../20261128T070000Z" in rest
    for argv in calls:
        # no --protect-args (-s): rrsync refuses it; the remote paths need no quoting (checked)
        assert "--bwlimit=500" in argv and "--stats" in argv and "--protect-args" not in argv
        ssh = argv[argv.index("-e") + 1]
        assert "BatchMode=yes" in ssh and "-p 2222" in ssh and "-l ship" in ssh
        assert f"-i '{key}'" in ssh and "'UserKnownHostsFile=/k h'" in ssh


def test_a_failed_transfer_names_rsync_and_its_cause(tmp_path):
    source = tmp_path / "20261129T070000Z"
    source.mkdir()
    (source / "manifest.json").write_text("{}")

    def runner(argv, step, check=True, **_kw):
        return 11, "", "rsync: [receiver] write failed on \"x\": No space left on device (28)\nrsync error: ...\n"

    with pytest.raises(PacsError) as err:
        _ship.transfer(str(source), "srv", "/srv/h/n.incomplete", None, runner=runner)
    assert "rsync exited with 11 (error in file I/O)" in err.value.cause
    assert "No space left on device" in err.value.cause
    with pytest.raises(PacsError, match="into a '.incomplete' folder only"):
        _ship.transfer(str(source), "srv", "/srv/h/n", None, runner=runner)
    with pytest.raises(PacsError, match="a character that a shell would split or expand"):
        _ship.transfer(str(source), "srv", "/srv/my backups/h/n.incomplete", None, runner=runner)


def test_server_prepare_removes_leftovers_and_discard_never_touches_complete(tmp_path):
    folder = tmp_path / "host"
    (folder / "20261127T000000Z").mkdir(parents=True)
    (folder / "20261127T000000Z" / "manifest.json").write_text("{}")
    (folder / "20261128T000000Z.incomplete" / "storage").mkdir(parents=True)
    (folder / "20261128T000000Z.deleting.incomplete").mkdir()
    result = _ship.prepare(str(folder), "20261129T000000Z")
    assert result["previous"] == "20261127T000000Z"
    assert result["removed_incomplete"] == ["20261128T000000Z.deleting.incomplete", "20261128T000000Z.incomplete"]
    assert sorted(os.listdir(folder)) == [".lock", "20261127T000000Z", "20261129T000000Z.incomplete"]
    assert _ship.discard(str(folder), "20261129T000000Z")["changed"]
    assert not _ship.discard(str(folder), "20261127T000000Z")["changed"]
    assert (folder / "20261127T000000Z" / "manifest.json").exists()
    again = _ship.prepare(str(folder), "20261127T000000Z")
    assert again["already_complete"] and not again["changed"]


def test_a_second_run_on_the_same_folder_is_refused_while_one_acts(tmp_path):
    folder = tmp_path / "host"
    folder.mkdir()
    with _lock.FolderLock(str(folder), "x"):
        with pytest.raises(PacsError, match="another run is working"):
            _ship.prepare(str(folder), "20261129T000000Z")
    assert _ship.prepare(str(folder), "20261129T000000Z")["changed"]  # released with the holder


def write_manifest(backup, **extra):
    backup.mkdir(parents=True)
    (backup / "index").mkdir()
    (backup / "index" / "index").write_bytes(b"x" * 1000)
    manifest = {"name": backup.name, "started_at": "2026-11-29T07:00:00.000000Z",
                "ended_at": "2026-11-29T07:00:30.500000Z", "downtime_seconds": 2.5, "strategy": "stop",
                "storage": {"bytes": 5000, "new_bytes": 100}, "counts": {"instances": 7}}
    manifest.update(extra)
    (backup / "manifest.json").write_text(json.dumps(manifest))


def test_status_keeps_the_last_success_across_failures(tmp_path):
    backup = tmp_path / "20261129T070000Z"
    write_manifest(backup)
    status = _status.update({}, "pacs-1", "backup", "ok", str(backup))
    assert status["last_success"]["size_bytes"] == 6000 and status["last_success"]["duration_seconds"] == 30.5
    assert status["consecutive_failures"] == 0
    now = datetime.datetime(2026, 11, 30, 7, 0, 10, tzinfo=datetime.timezone.utc)
    status = _status.update(status, "pacs-1", "backup", "failed", started_at="2026-11-30T07:00:00.000000Z",
                            step="Prepare the backup folder", cause="not enough free space", now=now)
    assert status["result"] == "failed" and status["last_success"]["name"] == "20261129T070000Z"
    assert status["last_failure"]["duration_seconds"] == 10.0 and status["consecutive_failures"] == 1
    status = _status.update(status, "pacs-1", "ship", "ok", ship={"bytes_sent": 1234, "server": "b"})
    prom = _status.prom_text(status)
    assert 'pacs_orthanc_backup_last_result{host="pacs-1"} 0' in prom
    assert 'pacs_orthanc_backup_last_size_bytes{host="pacs-1"} 6000' in prom
    assert 'pacs_orthanc_backup_last_downtime_seconds{host="pacs-1"} 2.5' in prom
    assert 'pacs_orthanc_backup_last_duration_seconds{host="pacs-1"} 10.0' in prom
    assert 'pacs_orthanc_backup_consecutive_failures{host="pacs-1"} 1' in prom
    assert 'pacs_orthanc_backup_last_ship_bytes{host="pacs-1"} 1234' in prom
    success = datetime.datetime(2026, 11, 29, 7, 0, 30, 500000, tzinfo=datetime.timezone.utc).timestamp()
    assert f'pacs_orthanc_backup_last_success_timestamp_seconds{{host="pacs-1"}} {round(success, 3)}' in prom
    for line in prom.splitlines():
        assert line.startswith("# HELP pacs_orthanc_backup_") or line.startswith("# TYPE ") or \
            line.startswith("pacs_orthanc_backup_")
    path, textfile = tmp_path / "s" / "status.json", tmp_path / "t" / "x.prom"
    _status.write(str(path), status, str(textfile))
    assert json.loads(path.read_text()) == status and textfile.read_text() == prom
    assert not list((tmp_path / "s").glob(".tmp-*")) and not list((tmp_path / "t").glob(".tmp-*"))


OK = {"result": "ok", "backend": "sqlite", "path": "/b/20261129T070000Z", "counts": {"instances": 3},
      "storage": {"files": 3, "bytes": 3000, "new_files": 1, "new_bytes": 1000, "linked_files": 2},
      "downtime_seconds": 2.0}


def test_summary_with_shipping():
    ship_ok = {"result": "ok", "server": "srv", "path": "/s/a/x", "bytes_sent": 2048, "seconds": 1.5}
    shipped = backup_summary.backup_result([OK, "a", ship_ok])
    assert shipped["ok"] and shipped["record"]["shipped_bytes"] == 2048 and shipped["record"]["ship_path"] == "/s/a/x"
    assert shipped["line"].endswith("; shipped to srv:/s/a/x, 2.0 KiB sent in 1.5 s")
    ship_failed = {"result": "failed", "server": "srv", "step": "Send", "cause": "rsync exited with 11"}
    failed = backup_summary.backup_result([OK, "b", ship_failed])
    assert not failed["ok"] and failed["record"]["result"] == "ok" and failed["record"]["ship_result"] == "failed"
    assert "SHIPPING to srv FAILED at 'Send': rsync exited with 11" in failed["line"]
    pending = backup_summary.backup_result([OK, "c", {"result": "pending", "server": "srv"}])
    assert not pending["ok"] and "NOT SHIPPED" in pending["line"]
    local_only = backup_summary.backup_result([OK, "d"])
    assert local_only["ok"] and "ship_result" not in local_only["record"]
    broken = backup_summary.backup_result([{"result": "failed", "step": "Read", "cause": "bad"}, "e", None])
    never = backup_summary.backup_result([None, "f", None])
    totals = backup_summary.backup_totals([shipped, failed, pending, local_only, broken, never])
    assert totals["hosts"] == 6 and totals["backed_up"] == 4 and totals["failed"] == 1 and totals["not_run"] == 1
    assert totals["shipped"] == 1 and totals["ship_failed"] == 2 and totals["shipped_bytes"] == 2048
    assert totals["all_ok"] is False and totals["max_downtime_seconds"] == 2.0
    assert totals["line"].startswith("4 of 6 hosts backed up (1 failed, 1 not run)")


def test_the_local_copy_stays_while_a_live_backup_holds_the_root(tmp_path):
    root = tmp_path / "backups"
    (root / "20261129T000000Z").mkdir(parents=True)
    (root / "20261129T000000Z" / "manifest.json").write_text("{}")
    lock = str(root / ".lock")
    _lock.acquire(lock, "20261130T000000Z", "now", 900, "x")
    with pytest.raises(PacsError, match=r"another backup of .* is running .*the local copy .* is kept"):
        _ship.remove_local(str(root), "20261129T000000Z")
    # its run dies (kill -9 of its keeper): nothing can be linking from that copy any more
    keeper = _lock.read_record(lock)["pid"]
    os.kill(keeper, 9)
    deadline = time.monotonic() + 10
    while _lock.process_start(keeper) is not None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _ship.remove_local(str(root), "20261129T000000Z")["removed"]
    assert not (root / "20261129T000000Z").exists()

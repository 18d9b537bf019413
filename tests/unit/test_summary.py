"""The summary line of each strategy: what a person reads at the end of a run."""

from __future__ import annotations

from ansible_collections.pacs.orthanc.plugins.filter.backup_summary import backup_result


def ok(**extra):
    result = {"result": "ok", "backend": "sqlite", "path": "/b/20261129T000000Z", "counts": {"instances": 9},
              "storage": {"bytes": 2048, "files": 9, "new_files": 1, "new_bytes": 100, "linked_files": 8}}
    result.update(extra)
    return result


def test_each_strategy_says_whether_orthanc_was_stopped():
    stop = backup_result([ok(strategy="stop", downtime_seconds=1.42), "a", None])
    assert "downtime 1.4 s (stop)" in stop["line"] and stop["ok"]
    dump = backup_result([ok(backend="postgresql", strategy="dump", downtime_seconds=0, dump_bytes=123456), "b", None])
    assert "b: ok, postgresql, 9 instances, dump 120.6 KiB," in dump["line"]
    assert "Orthanc not stopped (dump)" in dump["line"] and dump["record"]["dump_bytes"] == 123456
    snapshot = backup_result([ok(strategy="snapshot", downtime_seconds=None), "c", None])
    assert "downtime not measured (snapshot)" in snapshot["line"]


def test_files_lost_live_are_a_warning_on_the_line():
    line = backup_result([ok(strategy="stop", downtime_seconds=2, lost_in_live_storage=["u1", "u2"]), "a", None])
    assert line["line"].endswith("WARNING: 2 files the index lists are gone from the live storage "
                                 "(kept in this backup from the previous one)")
    assert line["record"]["lost_in_live_storage"] == 2


def test_a_dead_runs_lock_taken_over_is_on_the_line():
    taken = {"host": "pacs-1", "pid": 4711, "started": "2026-11-29T07:00:00.000000Z", "name": "20261129T070000Z",
             "age_seconds": 12, "provable": True, "reason": "its keeper process 4711 on pacs-1 is gone"}
    line = backup_result([ok(strategy="stop", downtime_seconds=2, lock_taken_over=taken), "a", None])
    assert line["line"].endswith("; took over the lock of the run 20261129T070000Z (pacs-1, started "
                                 "2026-11-29T07:00:00.000000Z): its keeper process 4711 on pacs-1 is gone")
    assert line["record"]["lock_taken_over"] == taken and line["ok"]
    plain = backup_result([ok(strategy="stop", downtime_seconds=2, lock_taken_over=None), "a", None])
    assert "took over" not in plain["line"] and plain["record"]["lock_taken_over"] is None


def test_a_check_mode_without_storage_files_has_a_line():
    """--check of a database Orthanc whose files are in the database: the role's result has no
    storage count (no hot pass), storage is null."""
    line = backup_result([{"result": "check mode", "path": "/b/x.incomplete", "storage": None,
                           "would_stop_orthanc": False, "strategy": "dump"}, "pg"])
    assert line["line"].startswith("pg: check mode, would back up 0 files") and line["ok"]
    assert "stop Orthanc" not in line["line"]

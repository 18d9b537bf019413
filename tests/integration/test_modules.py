"""Modules on their own, against real Orthanc servers: the index lock, the WAL, what
orthanc_info reports, and a REST password that never shows."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sqlite3
import time

import pytest

from tests.support import checks, dicomgen
from tests.support.playbook import local_host, run_module, run_playbook, write_inventory

pytestmark = pytest.mark.slow


def live_hashes(folder) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def count_instances(index_file) -> int:
    conn = sqlite3.connect(f"file:{index_file}?mode=ro", uri=True)
    try:
        return conn.execute("SELECT COUNT(*) FROM Resources WHERE resourceType = 4").fetchone()[0]
    except sqlite3.OperationalError:  # right after a start, even the schema is only in the WAL
        return 0
    finally:
        conn.close()


@pytest.mark.fault
def test_sqlite_capture_refuses_while_orthanc_runs_and_keeps_the_wal(servers, tmp_path):
    server = servers("crash")
    checks.store_studies(server, tmp_path, patients=1, via="rest")
    pid = server.pid()
    refused = run_module("sqlite_capture", {"index_directory": str(server.index_dir),
                                            "dest": str(tmp_path / "copy"), "wait_timeout": 1})
    assert refused.get("failed") and f"process {pid} still holds the SQLite index" in refused["msg"]
    assert not (tmp_path / "copy").exists()

    # A crash right after a write: Orthanc leaves its write-ahead log behind, holding what the
    # index file alone does not have. Orthanc checkpoints the log now and then (a flush every few
    # seconds): when one fell between the last write and the kill, the index alone already has
    # everything and the case is not made; store another study and crash again (at most 3 times).
    naive = tmp_path / "naive"
    naive.mkdir()
    for attempt in range(3):
        dicom = tmp_path / f"crash-{attempt}"
        dicom.mkdir()
        for path in dicomgen.make_study(dicom, f"crash-{attempt}", f"Crash^{attempt}", series=1,
                                        instances_per_series=3, pixel_bytes=64 * 64 * 2):
            server.store_rest(path)
        expected = server.statistics()
        pid = server.pid()
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while server.pid() is not None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert (server.index_dir / "index-wal").stat().st_size > 0
        (naive / "index").write_bytes((server.index_dir / "index").read_bytes())
        if count_instances(naive / "index") < expected["CountInstances"]:  # the index alone loses data
            break
        server.start()
    else:
        pytest.fail("Orthanc checkpointed its write-ahead log between the last write and the kill, 3 times")

    before = live_hashes(server.index_dir)
    captured = run_module("sqlite_capture", {"index_directory": str(server.index_dir), "dest": str(tmp_path / "copy")})
    assert not captured.get("failed"), captured
    assert captured["changed"] and "index-wal" in captured["source_files"]
    assert captured["counts"] == {"patients": expected["CountPatients"], "studies": expected["CountStudies"],
                                  "series": expected["CountSeries"], "instances": expected["CountInstances"]}
    assert captured["schema_version"] == "6"
    assert sorted(os.listdir(tmp_path / "copy")) == ["index"]  # one self-contained file
    assert live_hashes(server.index_dir) == before  # the live files were only read
    server.start()
    assert server.statistics()["CountInstances"] == expected["CountInstances"]


def test_orthanc_info_running_and_stopped(servers, tmp_path):
    server = servers("info", compression=True)
    checks.store_studies(server, tmp_path, patients=1, via="cstore")
    args = {"config_path": str(server.config_path), "url": server.url}
    running = run_module("orthanc_info", args)
    assert not running.get("failed"), running
    assert running["running"] and running["version"] == "1.10.1" and running["database_version"] == "6"
    assert running["backend"] == "sqlite" and running["storage"] == "filesystem"
    assert running["storage_directory"] == str(server.storage_dir)
    assert running["index_directory"] == str(server.index_dir)
    assert running["storage_compression"] is True and running["unsupported"] == []
    assert running["index_lock_holder"] == server.pid()
    assert running["statistics"]["CountInstances"] == 3
    assert sorted(os.path.basename(f) for f in running["config_files"]) == ["extra.json", "orthanc.json"]
    server.stop()
    stopped = run_module("orthanc_info", args)
    assert not stopped["running"] and stopped["index_lock_holder"] is None
    assert stopped["version"] == "1.10.1"  # from the program
    assert stopped["database_version"] == "6"  # from the index


@pytest.mark.fault
def test_orthanc_info_reports_a_broken_configuration(tmp_path):
    (tmp_path / "a.json").write_text('{"Name": "x"}')
    (tmp_path / "b.json").write_text('{"Name": "y"}')
    result = run_module("orthanc_info", {"config_path": str(tmp_path)})
    assert result["failed"] and "read Orthanc configuration: the key 'Name' is defined both in" in result["msg"]
    assert "Traceback" not in json.dumps(result)


@pytest.mark.fault
def test_rest_password_is_never_shown(servers, tmp_path):
    password = "pw-" + hashlib.sha256(os.urandom(8)).hexdigest()[:16]
    server = servers("secure", extra_config={"AuthenticationEnabled": True,
                                             "RegisteredUsers": {"backup": password}})
    checks.store_studies(server, tmp_path, patients=1, via="rest")
    inventory = write_inventory(tmp_path / "inventory.json", {
        "secure": local_host(server, tmp_path / "backups", orthanc_username="backup", orthanc_password=password)})
    result = run_playbook(inventory, verbosity=3)
    assert result.returncode == 0, result.stdout
    assert password not in result.stdout
    backup = (tmp_path / "backups" / "latest").resolve()
    assert password not in (backup / "manifest.json").read_text()
    # the configuration copy holds it, as the original does, with the original's modes, inside
    # folders that only root can enter
    assert checks.stat_mode(tmp_path / "backups") == 0o700 and checks.stat_mode(backup) == 0o700
    for original in server.config_path.iterdir():
        assert checks.stat_mode(backup / "config" / original.name) == checks.stat_mode(original)
    wrong = run_playbook(inventory, extra_vars={"orthanc_password": "wrong-" + password})
    assert wrong.returncode != 0
    assert f"Orthanc answered HTTP 401 at {server.url}: it refused the credentials" in wrong.stdout
    assert "wrong-" + password not in wrong.stdout


def test_old_names_keep_working(tmp_path):
    """storage_snapshot (now storage_copy) and backup_set's open/close (now prepare/complete): a
    playbook written for 0.2.0 runs unchanged, told of the new name."""
    source = tmp_path / "live"
    (source / "ab" / "cd").mkdir(parents=True)
    uuid = "abcd0000-1111-2222-3333-444455556666"  # Orthanc's layout: xx/yy/<uuid starting with xxyy>
    (source / "ab" / "cd" / uuid).write_bytes(b"x" * 1000)
    args = {"phase": "hot", "source": str(source), "settle_seconds": 0, "link_mode": "copy",
            "state_file": str(tmp_path / "state.tsv")}
    copied = run_module("storage_snapshot", dict(args, dest=str(tmp_path / "old" / "storage")))
    assert not copied.get("failed"), copied
    assert "storage_snapshot has been deprecated" in copied["_stderr"] and "pacs.orthanc.storage_copy" in copied["_stderr"]
    assert copied["copied_files"] == 1 and (tmp_path / "old" / "storage" / "ab" / "cd" / uuid).read_bytes() == b"x" * 1000
    renamed = run_module("storage_copy", dict(args, dest=str(tmp_path / "new" / "storage"),
                                              state_file=str(tmp_path / "state2.tsv")))
    assert not renamed.get("failed") and renamed["copied_files"] == 1, renamed

    config = tmp_path / "orthanc.json"
    config.write_text("{}")
    results = {}
    for state in ("open", "prepare"):
        root = tmp_path / f"root-{state}"
        root.mkdir()
        results[state] = run_module("backup_set", {"state": state, "root": str(root), "config_path": str(config),
                                                   "space_check": False}, check=True)
        assert not results[state].get("failed"), results[state]
        assert results[state]["path"].endswith(".incomplete") and not list(root.iterdir())  # check mode
    missing = run_module("backup_set", {"state": "close", "root": str(tmp_path / "root-open")})
    assert missing["failed"] and "state=close needs 'name'" in missing["msg"]

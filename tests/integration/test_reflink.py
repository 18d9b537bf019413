"""Backups whose SQLite index is captured by reflink (FICLONE) while Orthanc is stopped.

A real Orthanc keeps its index and storage on a loop-mounted XFS (made with reflink=1) or btrfs,
with the backup root on the same filesystem. Two backups run with the real playbook (strategy
'stop'): the first after a clean stop, the second after a stop that kills Orthanc (SIGKILL), so
that the newest instances live only in the write-ahead log that is cloned with the index and
replayed into the copy after Orthanc runs again. Each manifest must say the index was taken by
reflink; each backup must hold what Orthanc served, byte for byte, and verify; the second must
restore, after the live data is wiped, into an Orthanc that serves every instance byte for byte.
(Everywhere else, on the ext4 of the other tests, the index is copied: test_backup_sqlite.)"""

from __future__ import annotations

import hashlib
import shlex
import shutil

import pytest

from tests.support import checks, loopfs
from tests.support.orthanc_server import OrthancServer, stop_all
from tests.support.playbook import local_host, run_playbook, write_inventory

pytestmark = pytest.mark.slow


def contents(server) -> dict:
    """{instance id: MD5 of the DICOM file Orthanc serves}."""
    return {i: hashlib.md5(server.instance_file(i)).hexdigest() for i in server.instances()}


@pytest.mark.parametrize("kind", ["xfs", "btrfs"])
def test_index_captured_by_reflink_round_trips(kind, tmp_path):
    if not loopfs.available(kind):
        pytest.skip(f"loop-mounts a {kind} image: needs root and {loopfs.MKFS[kind][0]}")
    fs = loopfs.LoopFilesystem(tmp_path, kind)
    started = []
    try:
        server = OrthancServer(fs.mount_point / "pacs", name=f"reflink-{kind}")
        server.start()
        started.append(server)
        checks.store_studies(server, tmp_path, patients=2, via="rest")
        root = fs.mount_point / "backups"
        hostvars = local_host(server, root, orthanc_backup_settle_seconds=0)
        inventory = write_inventory(tmp_path / "inventory.json", {server.name: hostvars})
        result = run_playbook(inventory)
        assert result.returncode == 0, result.stdout
        first = (root / "latest").resolve()
        manifest = checks.assert_backup_matches(server, first)
        assert manifest["strategy"] == "stop" and manifest["index_capture"] == "reflink"
        assert sorted(p.name for p in (first / "index").iterdir()) == ["index"]  # consolidated after the start
        assert checks.stat_mode(first / "index" / "index") == 0o600

        # a stop that kills Orthanc: the newest instances are only in index-wal when it is cloned
        checks.store_studies(server, tmp_path, patients=1, via="cstore")
        seen = tmp_path / "index-files-after-kill"
        hostvars["orthanc_stop_command"] = (f"kill -KILL \"$(cat {shlex.quote(str(server.pidfile))})\"; sleep 0.5; "
                                            f"ls {shlex.quote(str(server.index_dir))} > {shlex.quote(str(seen))}")
        write_inventory(tmp_path / "inventory.json", {server.name: hostvars})
        result = run_playbook(inventory)
        assert result.returncode == 0, result.stdout
        second = (root / "latest").resolve()
        assert second != first
        manifest = checks.assert_backup_matches(server, second)
        assert manifest["index_capture"] == "reflink"
        assert "index-wal" in seen.read_text().split()  # what was cloned held a write-ahead log
        assert manifest["counts"]["instances"] == 9 and manifest["storage"]["linked_files"] == 6

        stored = contents(server)
        server.stop()
        shutil.rmtree(server.storage_dir)
        shutil.rmtree(server.index_dir)
        server.start()
        assert server.statistics()["CountInstances"] == 0
        result = run_playbook(inventory, playbook="restore.yml", extra_vars={"orthanc_restore_confirm": True})
        assert result.returncode == 0, result.stdout
        assert contents(server) == stored
    finally:
        stop_all(started)
        fs.close()

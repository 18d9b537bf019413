"""The backup playbook against real Orthanc servers with SQLite indexes.

Each test starts private Orthanc instances from Debian's package, stores real DICOM into them
over REST and DICOM C-STORE, runs playbooks/backup.yml through ansible-playbook, and compares
the backups with what the servers hold, byte for byte."""

from __future__ import annotations

import pathlib
import threading
import time

import pytest

from tests.support import checks
from tests.support.playbook import local_host, run_playbook, write_inventory
from ansible_collections.pacs.orthanc.plugins.module_utils import _verify

pytestmark = pytest.mark.slow


def test_two_hosts_are_backed_up_incrementally(servers, tmp_path):
    alpha = servers("alpha")  # configuration folder, plain storage
    beta = servers("beta", compression=True, config_as_folder=False)  # one file, zlib storage
    checks.store_studies(alpha, tmp_path, patients=2, via="rest")
    checks.store_studies(alpha, tmp_path, patients=1, via="cstore")
    checks.store_studies(beta, tmp_path, patients=1, via="rest")
    checks.store_studies(beta, tmp_path, patients=2, via="cstore")
    roots = {"alpha": tmp_path / "backups-alpha", "beta": tmp_path / "backups-beta"}
    inventory = write_inventory(tmp_path / "inventory.json", {
        "alpha": local_host(alpha, roots["alpha"]),
        "beta": local_host(beta, roots["beta"], orthanc_backup_settle_seconds=0),
    })
    pids = {"alpha": alpha.pid(), "beta": beta.pid()}

    first = run_playbook(inventory)
    assert first.returncode == 0, first.stdout
    for name, server, compressed in (("alpha", alpha, False), ("beta", beta, True)):
        assert server.answers() and server.pid() != pids[name]  # stopped, captured, started again
        latest = roots[name] / "latest"
        assert latest.is_symlink()
        manifest = checks.assert_backup_matches(server, latest.resolve(), compressed=compressed)
        assert manifest["host"] == name and manifest["storage_compression"] is compressed
        assert manifest["downtime_seconds"] > 0 and manifest["storage"]["linked_files"] == 0
        assert manifest["index_capture"] == "copy"  # ext4, no reflinks (XFS and btrfs: test_reflink)
        assert f"{name}: ok, sqlite, {manifest['counts']['instances']} instances" in first.stdout
    first_alpha = (roots["alpha"] / "latest").resolve()

    # A second run only takes the new files; the first backup stays whole.
    checks.store_studies(alpha, tmp_path, patients=1, via="cstore", instances=2)
    time.sleep(1.1)  # backups are named by the second
    second = run_playbook(inventory, extra_vars={"orthanc_backup_keep": 2})
    assert second.returncode == 0, second.stdout
    latest_alpha = (roots["alpha"] / "latest").resolve()
    assert latest_alpha != first_alpha
    manifest = checks.assert_backup_matches(alpha, latest_alpha)
    assert manifest["storage"]["new_files"] == 2
    assert manifest["storage"]["linked_files"] == manifest["storage"]["files"] - 2
    assert manifest["storage"]["previous"] == str(first_alpha)
    assert _verify.verify_backup(str(first_alpha))["ok"]
    assert checks.complete_backups(roots["alpha"]) == sorted([first_alpha.name, latest_alpha.name])

    # Retention keeps the newest two; the oldest goes, the newest never does.
    time.sleep(1.1)
    third = run_playbook(inventory, extra_vars={"orthanc_backup_keep": 2})
    assert third.returncode == 0, third.stdout
    kept = checks.complete_backups(roots["alpha"])
    assert len(kept) == 2 and first_alpha.name not in kept and latest_alpha.name in kept
    assert not [p for p in roots["alpha"].iterdir() if p.name.endswith(".incomplete")]


def test_backup_while_instances_keep_arriving(servers, tmp_path):
    """Instances keep arriving from the moment the backup folder exists, through the hot pass, the
    gap between it and the stop, and after the start. The window examines only what Orthanc's
    change log names since the hot pass began (manifest window_pass), and a restore of the backup
    serves every instance it lists byte for byte as the server served it."""
    server = servers("busy")
    checks.store_studies(server, tmp_path, patients=2, via="rest")
    files = []
    for i in range(10):
        out = tmp_path / f"feed-{i}"
        out.mkdir()
        files += checks.dicomgen.make_study(out, f"feed-{i}", f"Feed^{i}", series=1, instances_per_series=10)
    stored, refused = [], []
    stop = threading.Event()
    root = tmp_path / "backups"

    def feed():
        while not stop.is_set() and not list(root.glob("*.incomplete/storage")):
            time.sleep(0.05)  # from the moment the backup folder is prepared
        for path in files:
            if stop.is_set():
                break
            try:
                server.store_rest(path)
                stored.append(path)
            except Exception:  # refused while Orthanc is stopped for the capture
                refused.append(path)
            time.sleep(0.2)

    thread = threading.Thread(target=feed)
    inventory = write_inventory(tmp_path / "inventory.json", {
        "busy": local_host(server, root, orthanc_backup_settle_seconds=1)})
    thread.start()
    try:
        result = run_playbook(inventory)
    finally:
        stop.set()
        thread.join()
    assert result.returncode == 0, result.stdout
    assert stored, "nothing was stored while the backup ran"
    backup = (root / "latest").resolve()
    report = _verify.verify_backup(str(backup), md5="all")
    assert report["ok"], report["problems"]
    assert report["orphans"] == 0
    manifest = checks.read_manifest(backup)
    assert manifest["counts"] == report["counts"]
    assert manifest["storage"]["files"] == report["files_checked"] == report["files_hashed"]
    window = manifest["window_pass"]
    assert window["mode"] == "changes" and window["reason"] is None, window
    assert window["changes"] > 0 and window["fetched_files"] > 0  # arrived after the walk passed them
    assert window["late_files"] == 0  # the change log named every one
    backed_up = checks.dicom_uuids(backup / "index" / "index")
    assert 6 < len(backed_up) <= server.statistics()["CountInstances"]
    served = {instance: server.instance_file(instance) for instance in backed_up}

    result = run_playbook(inventory, playbook="restore.yml", extra_vars={"orthanc_restore_confirm": True})
    for journal in pathlib.Path("/var/tmp").glob("pacs-orthanc-restore-*.json"):
        if str(tmp_path) in journal.read_text(errors="replace"):
            journal.unlink()  # the restore's journal, kept for an operator: this test's only
    assert result.returncode == 0, result.stdout
    assert sorted(server.instances()) == sorted(served)
    for instance, data in served.items():
        assert server.instance_file(instance) == data, instance


def test_check_mode_changes_nothing(servers, tmp_path):
    server = servers("dry")
    checks.store_studies(server, tmp_path, patients=1, via="rest")
    pid = server.pid()
    inventory = write_inventory(tmp_path / "inventory.json", {"dry": local_host(server, tmp_path / "backups")})
    result = run_playbook(inventory, check=True, extra_vars={"orthanc_backup_settle_seconds": 0})
    assert result.returncode == 0, result.stdout
    assert server.pid() == pid  # never stopped
    assert not (tmp_path / "backups").exists()
    assert "dry: check mode, would back up 3 files (3 new, 0 from the previous backup)" in result.stdout
    assert ", and stop Orthanc briefly" in result.stdout


def test_a_stopped_orthanc_is_backed_up_and_left_stopped(servers, tmp_path):
    server = servers("cold")
    checks.store_studies(server, tmp_path, patients=1, via="cstore")
    expected = server.statistics()
    server.stop()
    inventory = write_inventory(tmp_path / "inventory.json", {"cold": local_host(server, tmp_path / "backups")})
    result = run_playbook(inventory)
    assert result.returncode == 0, result.stdout
    assert server.pid() is None and not server.answers()  # left as it was: stopped
    manifest = checks.read_manifest((tmp_path / "backups" / "latest").resolve())
    assert manifest["downtime_seconds"] == 0.0 and manifest["stopped_at"] is None
    assert manifest["counts"]["instances"] == expected["CountInstances"]
    server.start()
    checks.assert_backup_matches(server, (tmp_path / "backups" / "latest").resolve())


def test_limit_backs_up_and_reports_only_the_hosts_within_it(servers, tmp_path):
    inside, outside = servers("inside"), servers("outside")
    for server in (inside, outside):
        checks.store_studies(server, tmp_path, patients=1, via="rest")
    inventory = write_inventory(tmp_path / "inventory.json", {
        server.name: local_host(server, tmp_path / f"backups-{server.name}", orthanc_backup_settle_seconds=0)
        for server in (inside, outside)})
    result = run_playbook(inventory, limit="inside")
    assert result.returncode == 0, result.stdout
    assert "inside: ok, sqlite, 3 instances" in result.stdout
    assert "outside:" not in result.stdout.split("Summarise the backups")[-1]  # not reported as "not run"
    assert checks.complete_backups(tmp_path / "backups-inside") and not (tmp_path / "backups-outside").exists()

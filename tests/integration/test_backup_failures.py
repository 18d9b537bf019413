"""Failures of a backup on real Orthanc servers and real filesystems.

After each failure: Orthanc answers, no folder looks like a complete backup, earlier backups
are untouched and still verify, and the message names the host, the step and the cause."""

from __future__ import annotations

import hashlib
import os
import pathlib
import re
import signal
import subprocess
import time

import pytest

from tests.support import checks, procs
from tests.support.playbook import local_host, run_playbook, write_inventory
from ansible_collections.pacs.orthanc.plugins.module_utils import _verify

pytestmark = [pytest.mark.slow, pytest.mark.fault,
              pytest.mark.skipif(os.geteuid() != 0, reason="mounts small filesystems: needs root")]


def fingerprint(backup: pathlib.Path) -> dict:
    """Every file of a backup with its SHA-256, to show that it was not touched."""
    return {str(p.relative_to(backup)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(backup.rglob("*")) if p.is_file()}


def assert_failed_cleanly(result, host: str, step: str, cause: str, root: pathlib.Path, earlier: dict):
    assert result.returncode != 0, result.stdout
    match = re.search(rf"Backup of {host} failed at step '([^']*)': (.*)", result.stdout)
    assert match, result.stdout
    assert step in match.group(1), match.group(0)
    assert re.search(cause, match.group(2)), match.group(0)
    assert f"{host}: FAILED at" in result.stdout  # the summary names it too
    if root.exists():
        leftovers = [p.name for p in root.iterdir() if p.name.endswith(".incomplete")]
        assert not leftovers, leftovers
        assert checks.complete_backups(root) == sorted(earlier)
        # the run's lock is released and its keeper ends (release waits for it, up to 5 s)
        assert not (root / ".lock").exists() and not (root / ".lock.step").exists()
        deadline = time.monotonic() + 15
        while procs.keepers_of(root) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not procs.keepers_of(root), [procs.cmdline(k) for k in procs.keepers_of(root)]
    for name, files in earlier.items():
        assert fingerprint(root / name) == files
        assert _verify.verify_backup(str(root / name))["ok"]


@pytest.fixture
def mounts():
    made = []

    def mount(path, size, readonly=False):
        checks.mount_tmpfs(path, size, readonly)
        made.append(path)
        return path

    yield mount
    for path in reversed(made):
        checks.umount(path)


def good_backup(inventory) -> None:
    result = run_playbook(inventory)
    assert result.returncode == 0, result.stdout


def earlier_backups(root: pathlib.Path) -> dict:
    return {name: fingerprint(root / name) for name in checks.complete_backups(root)}


def test_destination_not_writable(servers, tmp_path, mounts):
    server = servers("ro")
    checks.store_studies(server, tmp_path, patients=1, via="rest")
    root = mounts(tmp_path / "backups", "64m")
    inventory = write_inventory(tmp_path / "inventory.json", {
        "ro": local_host(server, root, orthanc_backup_min_free_bytes=0)})
    good_backup(inventory)
    earlier = earlier_backups(root)
    subprocess.run(["mount", "-o", "remount,ro", str(root)], check=True)
    pid = server.pid()
    time.sleep(1.1)
    result = run_playbook(inventory)
    assert_failed_cleanly(result, "ro", "Prepare the backup folder", "not writable|Read-only file system", root, earlier)
    assert server.answers() and server.pid() == pid  # never stopped


def test_destination_full_is_refused_before_orthanc_stops(servers, tmp_path, mounts):
    server = servers("full")
    checks.store_studies(server, tmp_path, patients=1, via="rest", instances=2, pixel_bytes=400_000)
    root = mounts(tmp_path / "backups", "2m")
    inventory = write_inventory(tmp_path / "inventory.json", {
        "full": local_host(server, root, orthanc_backup_min_free_bytes=0)})
    good_backup(inventory)
    earlier = earlier_backups(root)
    checks.store_studies(server, tmp_path, patients=1, via="rest", instances=4, pixel_bytes=400_000)
    pid = server.pid()
    time.sleep(1.1)
    result = run_playbook(inventory)
    assert_failed_cleanly(result, "full", "Prepare the backup folder", "not enough free space", root, earlier)
    assert server.answers() and server.pid() == pid


def test_disk_filling_up_during_the_copy(servers, tmp_path, mounts):
    """With the space check off, the copy itself meets a full filesystem (ENOSPC)."""
    server = servers("enospc")
    checks.store_studies(server, tmp_path, patients=1, via="rest", instances=2, pixel_bytes=400_000)
    root = mounts(tmp_path / "backups", "2m")
    inventory = write_inventory(tmp_path / "inventory.json", {
        "enospc": local_host(server, root, orthanc_backup_min_free_bytes=0, orthanc_backup_space_check=False)})
    good_backup(inventory)
    earlier = earlier_backups(root)
    checks.store_studies(server, tmp_path, patients=1, via="rest", instances=4, pixel_bytes=400_000)
    time.sleep(1.1)
    result = run_playbook(inventory, extra_vars={"orthanc_backup_settle_seconds": 0})
    assert_failed_cleanly(result, "enospc", "Copy the storage", "No space left on device", root, earlier)
    assert server.answers()


def test_orthanc_refusing_to_stop(servers, tmp_path):
    server = servers("stubborn")
    checks.store_studies(server, tmp_path, patients=1, via="rest")
    root = tmp_path / "backups"
    inventory = write_inventory(tmp_path / "inventory.json", {"stubborn": local_host(server, root)})
    good_backup(inventory)
    earlier = earlier_backups(root)
    pid = server.pid()
    time.sleep(1.1)
    result = run_playbook(inventory, extra_vars={"orthanc_stop_command": "true", "orthanc_stop_timeout": 4})
    assert_failed_cleanly(result, "stubborn", "Stop Orthanc", "still answers", root, earlier)
    assert server.answers() and server.pid() == pid  # left running as it was, not started twice
    assert "Orthanc was left as it was" in result.stdout


def test_module_killed_mid_copy_while_orthanc_is_stopped(servers, tmp_path):
    server = servers("killed")
    checks.store_studies(server, tmp_path, patients=1, via="rest", instances=1)
    root = tmp_path / "backups"
    inventory = write_inventory(tmp_path / "inventory.json", {
        "killed": local_host(server, root, orthanc_backup_link_mode="copy")})
    good_backup(inventory)
    earlier = earlier_backups(root)
    # big new files, all left to the delta pass (settle), copied while Orthanc is stopped
    checks.store_studies(server, tmp_path, patients=1, via="rest", instances=6, pixel_bytes=60_000_000)
    time.sleep(1.1)
    play = run_playbook(inventory, extra_vars={"orthanc_backup_settle_seconds": 3600}, pipelining=False, popen=True)
    killed = None
    deadline = time.monotonic() + 120
    while killed is None and play.poll() is None and time.monotonic() < deadline:
        if not server.answers():
            # the module's python process and the shell around it
            module = procs.module_processes(play.pid, "stopped_capture")
            if module and list(root.glob("*.incomplete/storage/*/*/*.part")):
                for pid in module:
                    os.kill(pid, signal.SIGKILL)
                killed = module
        time.sleep(0.005)
    output = play.communicate(timeout=300)[0]
    assert killed, "the delta pass was never caught copying:\n" + output

    class Result:
        returncode = play.returncode
        stdout = output
    assert_failed_cleanly(Result, "killed", "copy what changed since the hot pass", "killed by signal 9", root, earlier)
    assert server.answers()  # started again by the role's always
    assert "Orthanc was left as it was" in output


def test_a_broken_host_in_a_fleet(servers, tmp_path):
    broken, healthy = servers("broken"), servers("healthy")
    checks.store_studies(healthy, tmp_path, patients=1, via="rest")
    # a key defined in two files of the configuration folder (Orthanc itself would refuse it)
    (broken.config_path / "zz-duplicate.json").write_text('{"HttpPort": 1}')
    inventory = write_inventory(tmp_path / "inventory.json", {
        "broken": local_host(broken, tmp_path / "backups-broken"),
        "healthy": local_host(healthy, tmp_path / "backups-healthy")})

    # default: the canary (first host) fails, later batches are not started
    canary = run_playbook(inventory)
    assert canary.returncode != 0
    assert re.search(r"broken: FAILED at 'Read the Orthanc configuration': .*the key 'HttpPort' is defined "
                     r"both in .*orthanc.json and in .*zz-duplicate.json \(Orthanc running\)", canary.stdout), canary.stdout
    assert "healthy: NOT BACKED UP" in canary.stdout
    assert not (tmp_path / "backups-healthy").exists()

    # with failures allowed, every host is tried; the run still fails at the end and says why
    tolerant = run_playbook(inventory, extra_vars={"orthanc_backup_max_fail_percentage": 100})
    assert tolerant.returncode != 0
    assert "1 of 2 hosts were not backed up: broken: FAILED at 'Read the Orthanc configuration'" in tolerant.stdout
    assert "healthy: ok, sqlite, 3 instances" in tolerant.stdout
    assert checks.complete_backups(tmp_path / "backups-healthy")
    assert broken.answers() and healthy.answers()

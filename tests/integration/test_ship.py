"""Shipping backups to a backup server over real SSH, with real Orthanc servers.

The backup server is a separate host to Ansible: an OpenSSH server of the test's own on
127.0.0.1 (tests/support/sshd.py), reached with a generated key and checked against its generated
host key; its root is a folder (or a small tmpfs) of the test. The Orthanc hosts are private
Orthanc servers with real DICOM, reached with the local connection."""

from __future__ import annotations

import datetime
import json
import os
import pathlib
import re
import signal
import subprocess
import time

import pytest

from tests.support import checks, procs, sshd
from tests.support.playbook import local_host, run_playbook
from ansible_collections.pacs.orthanc.plugins.module_utils import _verify

RRSYNC = "/usr/bin/rrsync"  # Debian's rsync package

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not sshd.available(), reason="needs openssh-server, ssh and rsync"),
              pytest.mark.skipif(os.geteuid() != 0, reason="runs sshd and mounts a small filesystem: needs root")]


def fleet_inventory(path: pathlib.Path, hosts: dict, server: sshd.SshServer | None = None, **group_vars) -> pathlib.Path:
    inventory = {"all": {"children": {"orthanc": {"hosts": hosts, "vars": group_vars}}}}
    if server is not None:
        inventory["all"]["children"]["backup_server"] = {"hosts": {"backupsrv": server.host_vars()}}
    path.write_text(json.dumps(inventory, indent=2))
    return path


def server_backups(folder: pathlib.Path) -> list:
    return checks.complete_backups(folder) if folder.exists() else []


def incomplete(folder: pathlib.Path) -> list:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".incomplete")) if folder.exists() else []


@pytest.mark.skipif(not os.path.exists(RRSYNC), reason="needs rrsync (Debian's rsync package)")
def test_two_runs_ship_only_new_files(servers, ssh_server, tmp_path):
    """A full transfer, then (through a key confined to rsync by rrsync, with orthanc_ship_slots:
    play) one that sends only what is new and hard-links the rest on the server."""
    server = servers("alpha")
    checks.store_studies(server, tmp_path, patients=2, via="rest", instances=4, pixel_bytes=200_000)
    local_root, server_root = tmp_path / "backups", tmp_path / "server"
    status, textfiles = local_root / "status.json", tmp_path / "textfile"
    textfiles.mkdir()
    inventory = fleet_inventory(tmp_path / "inventory.json", {
        "alpha": local_host(server, local_root, orthanc_backup_textfile_dir=str(textfiles),
                            **ssh_server.ship_vars(server_root))}, ssh_server)
    first = run_playbook(inventory)
    assert first.returncode == 0, first.stdout
    host_folder = server_root / "alpha"
    [first_name] = server_backups(host_folder)
    assert re.search(r"alpha: ok, .*; shipped to backupsrv:\S+, [\d.]+ \w+ sent", first.stdout), first.stdout
    first_bytes = json.loads(status.read_text())["last_ship"]["bytes_sent"]
    checks.assert_backup_matches(server, host_folder / first_name)
    assert (host_folder / "latest").resolve() == host_folder / first_name

    # from now on a key confined to rsync by a forced command (rrsync, docs/fleet.md): the default
    # slots cannot run through it, and the failure names the remedy...
    confined = tmp_path / "confined_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(confined)], check=True,
                   stdin=subprocess.DEVNULL)
    with open(ssh_server.folder / "authorized_keys", "a", encoding="ascii") as keys:
        keys.write(f'command="{RRSYNC} -no-lock /",restrict {pathlib.Path(f"{confined}.pub").read_text()}')
    inventory = fleet_inventory(tmp_path / "confined.json", {
        "alpha": local_host(server, local_root, orthanc_backup_textfile_dir=str(textfiles),
                            **ssh_server.ship_vars(server_root, orthanc_ship_ssh_key=str(confined)))}, ssh_server)
    time.sleep(1.1)  # backups are named by the second
    refused = run_playbook(inventory)
    assert refused.returncode != 0, refused.stdout
    line = re.search(r'"alpha: ok, .*"', refused.stdout).group(0)
    assert re.search(r"SHIPPING to backupsrv FAILED at 'Send the backup to the backup server': could not take a "
                     r"transfer slot on the backup server .*rrsync.* or set orthanc_ship_slots: play", line), line
    assert server_backups(host_folder) == [first_name] and not incomplete(host_folder)

    # ...which is orthanc_ship_slots: play (throttle, at once); rsync alone then ships, incrementally
    checks.store_studies(server, tmp_path, patients=1, via="rest", instances=1, pixel_bytes=20_000)
    time.sleep(1.1)
    second = run_playbook(inventory, extra_vars={"orthanc_ship_slots": "play"})
    assert second.returncode == 0, second.stdout
    names = server_backups(host_folder)
    assert len(names) == 2 and names[0] == first_name
    second_name = names[1]
    assert (host_folder / "latest").resolve() == host_folder / second_name
    manifest = checks.assert_backup_matches(server, host_folder / second_name)
    assert manifest["storage"]["new_files"] == 1
    # both verify offline on the server; unchanged files are the same inodes
    for name in names:
        assert _verify.verify_backup(str(host_folder / name), md5="all")["ok"]
    first_files = {p.name: p.stat().st_ino for p in (host_folder / first_name / "storage").rglob("*") if p.is_file()}
    second_files = {p.name: p.stat().st_ino for p in (host_folder / second_name / "storage").rglob("*") if p.is_file()}
    assert len(second_files) == len(first_files) + 1
    assert all(second_files[name] == inode for name, inode in first_files.items())
    # the bytes: the second transfer sends the new file, the index and the manifest, not the rest
    state = json.loads(status.read_text())
    second_bytes = state["last_ship"]["bytes_sent"]
    assert state["last_ship"]["result"] == "ok" and state["last_ship"]["path"] == str(host_folder / second_name)
    storage_bytes = manifest["storage"]["bytes"]
    assert first_bytes > storage_bytes  # everything went the first time
    index_bytes = (host_folder / second_name / "index" / "index").stat().st_size
    assert second_bytes < manifest["storage"]["new_bytes"] + index_bytes + 100_000
    assert second_bytes * 5 < first_bytes
    line = re.search(r"alpha: ok, .*", second.stdout).group(0)
    assert f"shipped to backupsrv:{host_folder / second_name}" in line
    print(f"bytes sent: first run {first_bytes}, second run {second_bytes}")
    assert not incomplete(host_folder)
    # the status file and the metrics say the same
    prom = (textfiles / "pacs_orthanc_backup.prom").read_text()
    assert f'pacs_orthanc_backup_last_ship_bytes{{host="alpha"}} {second_bytes}' in prom
    assert 'pacs_orthanc_backup_last_result{host="alpha"} 1' in prom


def fingerprint(backup: pathlib.Path) -> dict:
    """Every file of a backup with its inode, size and time: shows that it was not touched."""
    return {str(p.relative_to(backup)): (p.stat().st_ino, p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(backup.rglob("*")) if p.is_file()}


@pytest.mark.fault
def test_failed_transfers_leave_nothing_complete(servers, ssh_server, tmp_path):
    """A full server disk, then a run killed in the middle of its transfer: nothing on the server
    looks complete, the earlier backup is untouched, the next run cleans up and ships. Its
    retention (keep-last, daily, weekly, monthly) then runs for real."""
    server = servers("beta")
    checks.store_studies(server, tmp_path, patients=1, via="rest", instances=2, pixel_bytes=300_000)
    local_root, server_root = tmp_path / "backups", tmp_path / "server"
    checks.mount_tmpfs(server_root, "6m")
    try:
        inventory = fleet_inventory(tmp_path / "inventory.json", {
            "beta": local_host(server, local_root, orthanc_backup_settle_seconds=0,
                               **ssh_server.ship_vars(server_root))}, ssh_server)
        good = run_playbook(inventory)
        assert good.returncode == 0, good.stdout
        host_folder = server_root / "beta"
        [first] = server_backups(host_folder)
        earlier = fingerprint(host_folder / first)

        # 1. the server's disk fills up during the transfer
        checks.store_studies(server, tmp_path, patients=1, via="rest", instances=4, pixel_bytes=2_000_000)
        time.sleep(1.1)
        full = run_playbook(inventory)
        assert full.returncode != 0, full.stdout
        line = re.search(r'"beta: ok, .*"', full.stdout).group(0)  # the backup itself succeeded
        assert re.search(r"SHIPPING to backupsrv FAILED at 'Send the backup to the backup server': "
                         r"rsync exited with \d+ \([^)]*\): .*No space left on device", line), line
        assert "1 of 1 hosts were not backed up" in full.stdout
        assert server_backups(host_folder) == [first] and not incomplete(host_folder)
        assert fingerprint(host_folder / first) == earlier
        assert (host_folder / "latest").resolve().name == first
        assert _verify.verify_backup(str(host_folder / first), md5="all")["ok"]
        status = json.loads((local_root / "status.json").read_text())
        assert status["result"] == "ok" and status["last_ship"]["result"] == "failed"
        assert "No space left on device" in status["last_ship"]["cause"]
        assert server.answers()

        # 2. the run is killed while rsync sends (slowed down to 1 MiB/s): the leftover stays...
        subprocess.run(["mount", "-o", "remount,size=64m", str(server_root)], check=True)
        time.sleep(1.1)
        play = run_playbook(inventory, extra_vars={"orthanc_ship_bwlimit": 1024}, popen=True)
        killed = False
        deadline = time.monotonic() + 120
        while not killed and play.poll() is None and time.monotonic() < deadline:
            if any(host_folder.glob("*.incomplete/storage/*/*/*")):
                for pid in sorted(procs.play_processes(play.pid), reverse=True) + [play.pid]:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                killed = True
            time.sleep(0.02)
        output = play.communicate(timeout=60)[0]
        assert killed, "the transfer was never caught:\n" + output
        leftovers = incomplete(host_folder)
        assert len(leftovers) == 1, leftovers
        assert server_backups(host_folder) == [first]  # nothing new looks complete
        assert fingerprint(host_folder / first) == earlier
        assert server.answers()

        # ...and the next run removes it and ships; retention then applies on the server
        # (fake older backups: hard-linked copies of the first, named back in time)
        old = ["20250115T020000Z", "20250301T020000Z", "20250302T020000Z", "20250303T020000Z",
               "20250310T020000Z", "20250310T220000Z"]
        for name in old:
            subprocess.run(["cp", "-al", str(host_folder / first), str(host_folder / name)], check=True)
        time.sleep(1.1)
        final = run_playbook(inventory, extra_vars={"orthanc_ship_keep_last": 1, "orthanc_ship_keep_daily": 3,
                                                    "orthanc_ship_keep_weekly": 3, "orthanc_ship_keep_monthly": 3,
                                                    "orthanc_backup_keep": 0})
        assert final.returncode == 0, final.stdout
        assert not incomplete(host_folder)
        # orthanc_backup_keep 0: once on the server and checked, the local copy is gone (latest too)
        assert checks.complete_backups(local_root) == [] and not (local_root / "latest").exists()
        assert not [p for p in local_root.iterdir() if p.name.endswith(".incomplete")]
        status = json.loads((local_root / "status.json").read_text())
        assert status["last_ship"]["result"] == "ok" and status["last_ship"]["backup"] == status["last_success"]["name"]
        kept = server_backups(host_folder)
        newest = kept[-1]
        # daily: newest, first (if another day than today it still is one of the 3 newest days),
        # weekly: one per ISO week, monthly: one per month, newest of each
        today = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d")
        assert newest.startswith(today) and first.startswith(today)
        # 3 days: today (newest), 2025-03-10 (22:00, the newer of that day), 2025-03-03;
        # 3 weeks: this week (newest), 2025-W11 (03-10 22:00), 2025-W10 (03-03); 3 months: this
        # month, 2025-03 (03-10 22:00), 2025-01 (01-15)
        assert kept == ["20250115T020000Z", "20250303T020000Z", "20250310T220000Z", newest], kept
        checks.assert_backup_matches(server, host_folder / newest)
        assert _verify.verify_backup(str(host_folder / newest), md5="all")["ok"]
        assert (host_folder / "latest").resolve().name == newest
    finally:
        checks.umount(server_root)


def test_restore_from_the_backup_server(servers, ssh_server, tmp_path):
    """orthanc_restore_source: server pulls the host's newest backup back over SSH into a private
    staging folder and restores it (verified first), after Orthanc's data and every local backup
    were wiped; a timestamp that the server does not hold is refused before anything is touched.
    Then a point restore (restore_items) from the server: a study deleted from production comes back
    with the MD5s over REST of before, through the same fetch, whose copy is removed."""
    server = servers("retour")
    checks.store_studies(server, tmp_path, patients=2, via="cstore", instances=2, pixel_bytes=50_000)
    local_root, server_root, staging = tmp_path / "backups", tmp_path / "server", tmp_path / "staging"
    inventory = fleet_inventory(tmp_path / "inventory.json", {
        "retour": local_host(server, local_root, **ssh_server.ship_vars(server_root))}, ssh_server)
    assert run_playbook(inventory).returncode == 0
    stored = {server.instance_sop_uid(i): server.instance_file(i) for i in server.instances()}
    server.stop()
    for folder in (server.storage_dir, server.index_dir, local_root):
        subprocess.run(["rm", "-rf", str(folder)], check=True)
    server.start()
    restore_vars = {"orthanc_restore_confirm": True, "orthanc_restore_source": "server",
                    "orthanc_restore_staging_dir": str(staging)}
    missing = run_playbook(inventory, playbook="restore.yml", limit="retour",
                           extra_vars=dict(restore_vars, orthanc_restore_backup="20000101T000000Z"))
    assert missing.returncode != 0
    assert re.search(r"Restore of retour failed at step 'Find the backup on the backup server': the backup server "
                     r"holds no complete backup 20000101T000000Z .*Nothing was changed", missing.stdout), missing.stdout
    result = run_playbook(inventory, playbook="restore.yml", limit="retour", extra_vars=restore_vars)
    assert result.returncode == 0, result.stdout
    assert {server.instance_sop_uid(i): server.instance_file(i) for i in server.instances()} == stored
    assert not list((staging / "retour").iterdir())  # the fetched copy is removed
    assert (staging / "retour").stat().st_mode & 0o777 == 0o700

    # point restore from the backup server (issue 16): the same fetch, then restore_items
    before = {i: server.instance_md5(i) for i in server.instances()}
    study = server.rest("GET", "/studies?expand")[0]
    server.rest("DELETE", f"/studies/{study['ID']}")
    assert len(before) - server.statistics()["CountInstances"] == 2
    items_vars = {"orthanc_restore_source": "server", "orthanc_restore_staging_dir": str(staging),
                  "orthanc_restore_items_workdir": str(tmp_path / "scratch"),
                  "orthanc_restore_study_uids": [study["MainDicomTags"]["StudyInstanceUID"]]}
    listed = run_playbook(inventory, playbook="restore_items.yml", limit="retour", extra_vars=items_vars, check=True)
    assert listed.returncode == 0, listed.stdout  # check mode fetches too, to list from the backup
    assert re.search(rf"retour: would restore 2 of 2 instances from {staging}/retour/\d{{8}}T", listed.stdout), listed.stdout
    assert server.statistics()["CountInstances"] == len(before) - 2 and not list((staging / "retour").iterdir())
    items = run_playbook(inventory, playbook="restore_items.yml", limit="retour", extra_vars=items_vars)
    assert items.returncode == 0, items.stdout
    assert re.search(rf"retour: restored 2 of 2 instances from {staging}/retour/\d{{8}}T\d{{6}}", items.stdout), items.stdout
    assert {i: server.instance_md5(i) for i in server.instances()} == before
    assert not list((staging / "retour").iterdir())

"""Faults injected for real, beyond those of test_backup_failures, test_restore,
test_backup_database, test_snapshot and test_ship/test_fleet (docs/faults.md lists them all):
an interrupted play, a killed play, Orthanc refusing to start, a corrupt index, a damaged
storage, broken configurations, two backups at once, and a manifest that names paths outside
the backup. For each: Orthanc ends as it was, no incomplete backup looks complete and the next run
cleans up, earlier backups still verify, and the message names host, step and cause."""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import signal
import stat

import pytest

from tests.support import checks, procs
from tests.support.interrupt import interrupt_during_downtime, wait_for
from tests.support.playbook import local_host, run_module, run_playbook, write_inventory
from tests.integration.test_stop_window import hot_pass, window
from tests.integration.test_backup_failures import assert_failed_cleanly, earlier_backups, fingerprint, good_backup
from ansible_collections.pacs.orthanc.plugins.module_utils import _lock, _verify

pytestmark = [pytest.mark.slow, pytest.mark.fault]

CONFIRM = {"orthanc_restore_confirm": True}


def one_host(servers, tmp_path, name="pacs", **extra):
    server = servers(name)
    checks.store_studies(server, tmp_path, patients=2, via="rest")
    root = tmp_path / "backups"
    inventory = write_inventory(tmp_path / "inventory.json", {
        name: local_host(server, root, orthanc_backup_settle_seconds=0, **extra)})
    return server, root, inventory


@pytest.mark.parametrize("how", ["sigint", "kill"])
def test_play_interrupted_while_orthanc_is_stopped(servers, tmp_path, how):
    # sigint: the stop-window module finishes, then the play stops between two tasks: the run's
    # keeper waits orthanc_backup_stale_lock_seconds (3 s here) for a next step, then takes the run
    # for gone. kill: the default (15 minutes) holds, yet the next run goes at once: the keeper
    # saw the step it watched die
    extra = {"orthanc_backup_stale_lock_seconds": 3} if how == "sigint" else {}
    server, root, inventory = one_host(servers, tmp_path, **extra)
    good_backup(inventory)
    earlier = earlier_backups(root)
    checks.store_studies(server, tmp_path, patients=1, via="rest")
    output = interrupt_during_downtime(inventory, server, how)
    dead = _lock.read_record(str(root / ".lock"))
    assert dead["name"] and dead["host"] == os.uname().nodename, output
    # Orthanc comes back by itself: the module finishes its window (SIGINT), or the guardian
    # starts Orthanc once the module is gone (SIGKILL)
    assert wait_for(server.answers, timeout=60), output
    assert server.statistics()["CountInstances"] == 9
    if how == "kill":  # the guardian says what it did, then goes
        from ansible_collections.pacs.orthanc.plugins.module_utils import _control  # pylint: disable=import-outside-toplevel
        report = _control.guardian_marker(server.url) + ".guardian"
        assert wait_for(lambda: os.path.exists(report), timeout=60)
        assert json.loads(open(report, encoding="utf-8").read())["result"] == "Orthanc answers"
    # the keeper of the interrupted run (never killed by the test) ended by itself
    assert wait_for(lambda: _lock.process_start(dead["pid"]) is None, timeout=30)
    # nothing looks complete; the earlier backup is untouched
    assert checks.complete_backups(root) == sorted(earlier)
    for name, files in earlier.items():
        assert fingerprint(root / name) == files
    # the next run takes the dead run's lock over at once, removes the incomplete folder, makes a
    # complete backup and says what it took over
    result = run_playbook(inventory)
    assert result.returncode == 0, result.stdout
    assert not [p for p in root.iterdir() if p.name.endswith(".incomplete")]
    assert len(checks.complete_backups(root)) == 2
    latest = (root / "latest").resolve()
    assert _verify.verify_backup(str(latest))["ok"]
    taken = checks.read_manifest(latest)["lock_taken_over"]
    assert taken["name"] == dead["name"] and taken["pid"] == dead["pid"] and taken["provable"], taken
    assert taken["host"] == dead["host"] and taken["started"] == dead["started_at"]
    assert f"its keeper process {dead['pid']} on {dead['host']} is gone" in taken["reason"]
    if how == "kill":
        assert "stopped_capture" in taken["reason"] and "died without finishing" in taken["reason"], taken
    assert f"took over the lock of the run {dead['name']}" in result.stdout, result.stdout
    assert not (root / ".lock").exists() and not (root / ".lock.step").exists()


def test_a_live_run_is_never_taken_over(servers, tmp_path):
    """A run that is alive but paused (SIGSTOP) keeps its lock: the second run is refused with a
    message naming the keeper; the first then completes."""
    server, root, inventory = one_host(servers, tmp_path)
    good_backup(inventory)
    first = run_playbook(inventory, popen=True)
    lock = root / ".lock"
    assert wait_for(lambda: _lock.read_record(str(lock)).get("pid"), timeout=120, step=0.005)
    paused = []
    for _round in range(3):  # the play first, then whatever it started meanwhile
        for pid in [first.pid] + sorted(procs.descendants(first.pid)):
            if pid not in paused and "pacs-orthanc-guardian" not in procs.cmdline(pid) \
                    and _lock.KEEPER_TAG not in procs.cmdline(pid):
                os.kill(pid, signal.SIGSTOP)
                paused.append(pid)
    try:
        record = _lock.read_record(str(lock))
        keeper = record["pid"]
        assert _lock.KEEPER_TAG in procs.cmdline(keeper) and keeper not in paused
        second = run_playbook(inventory)
        assert second.returncode != 0, second.stdout
        match = re.search(r"Backup of pacs failed at step '([^']*)': (.*)", second.stdout)
        assert match and "Prepare the backup folder" in match.group(1), second.stdout
        assert re.search(rf"another backup \({record['name']}, started .*\) holds the lock {re.escape(str(lock))}: "
                         rf"its keeper process {keeper} on {os.uname().nodename} holds it", match.group(2)), match.group(0)
        assert f"kill {keeper}" in match.group(2)
        assert _lock.read_record(str(lock)) == record and _lock.process_start(keeper) == record["pid_start"]
        assert server.answers()
    finally:
        for pid in paused:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
    output = first.communicate(timeout=300)[0]
    assert first.returncode == 0, output
    latest = (root / "latest").resolve()
    assert latest.name == record["name"] and checks.read_manifest(latest)["lock_taken_over"] is None
    assert "took over" not in output
    assert not lock.exists() and wait_for(lambda: _lock.process_start(keeper) is None, timeout=10)


def test_check_mode_takes_no_lock_and_starts_no_keeper(servers, tmp_path):
    """--check on a root with a complete backup and a dead run's lock: no keeper is started, the
    dead lock is neither taken over nor removed, nothing is written, Orthanc is never stopped; and
    without any lock, --check leaves none."""
    server, root, inventory = one_host(servers, tmp_path)
    good_backup(inventory)
    earlier = earlier_backups(root)
    latest = os.readlink(root / "latest")
    before = sorted(p.name for p in root.iterdir())  # the backup, latest, the status file
    status = (root / "status.json").read_bytes()
    lock = root / ".lock"
    # a dead run's lock, for real: a keeper started by the library, then killed
    _lock.acquire(str(lock), "20000101T000000Z", "2000-01-01T00:00:00.000000Z", 900, "test")
    dead = _lock.read_record(str(lock))
    os.kill(dead["pid"], signal.SIGKILL)
    assert wait_for(lambda: _lock.process_start(dead["pid"]) is None, timeout=10)
    pid = server.pid()
    for with_dead_lock in (True, False):
        result = run_playbook(inventory, check=True)
        assert result.returncode == 0, result.stdout
        assert "pacs: check mode" in result.stdout, result.stdout
        assert "took over" not in result.stdout
        assert server.pid() == pid and server.answers()
        assert not procs.keepers_of(root), [procs.cmdline(k) for k in procs.keepers_of(root)]
        assert not (root / ".lock.step").exists()
        if with_dead_lock:
            assert _lock.read_record(str(lock)) == dead  # neither taken over nor removed
            lock.unlink()
        else:
            assert not lock.exists()
        assert sorted(p.name for p in root.iterdir()) == before
        assert (root / "status.json").read_bytes() == status
        assert os.readlink(root / "latest") == latest
        assert earlier_backups(root) == earlier


def test_orthanc_refusing_to_start_again(servers, tmp_path):
    server, root, inventory = one_host(servers, tmp_path)
    good_backup(inventory)
    earlier = earlier_backups(root)
    broken = write_inventory(tmp_path / "broken.json", {"pacs": local_host(
        server, root, orthanc_backup_settle_seconds=0, orthanc_start_command="echo 'port in use' >&2; exit 3",
        orthanc_start_timeout=5)})
    try:
        result = run_playbook(broken)
        assert not server.answers()
        assert_failed_cleanly(result, "pacs", "Start Orthanc again", "exit|exited|answer", root, earlier)
        # loud: the message says Orthanc is down and how to start it
        assert "ORTHANC IS NOT RUNNING on pacs: start it with" in result.stdout
        assert "exit 3" in result.stdout
    finally:
        server.start()


def test_a_corrupt_index_is_refused_and_orthanc_restarted(servers, tmp_path):
    server, root, inventory = one_host(servers, tmp_path)
    good_backup(inventory)
    earlier = earlier_backups(root)
    server.stop()
    # damage the ChildrenIndex b-tree page: Orthanc still starts and answers on such an index
    index = server.index_dir / "index"
    import sqlite3  # pylint: disable=import-outside-toplevel
    conn = sqlite3.connect(index)
    page = conn.execute("SELECT rootpage FROM sqlite_master WHERE name = 'ChildrenIndex'").fetchone()[0]
    page_size = conn.execute("PRAGMA page_size").fetchone()[0]
    conn.close()
    with open(index, "r+b") as handle:
        handle.seek((page - 1) * page_size + page_size - 296)
        handle.write(bytes(range(256)) + bytes(range(40)))
    server.start()
    pid = server.pid()
    result = run_playbook(inventory)
    assert_failed_cleanly(result, "pacs", "Check and complete the backup", "integrity|malformed", root, earlier)
    assert server.answers() and server.pid() != pid  # stopped for the capture, and started again
    assert "Orthanc was left as it was before the backup" in result.stdout


def test_a_storage_file_missing_or_unreadable(servers, tmp_path):
    server, root, inventory = one_host(servers, tmp_path)
    good_backup(inventory)
    backed_up = sorted(p for p in server.storage_dir.rglob("*") if p.is_file() and len(p.name) == 36)
    # lost live but held by the previous backup: the backup completes with it, and says loudly
    # that the live archive is damaged
    backed_up[0].unlink()
    result = run_playbook(inventory)
    assert result.returncode == 0, result.stdout
    assert "THE LIVE ARCHIVE IS DAMAGED" in result.stdout
    latest = (root / "latest").resolve()
    assert checks.read_manifest(latest)["storage"]["lost_in_live_storage"] == [backed_up[0].name]
    assert (latest / "storage" / backed_up[0].relative_to(server.storage_dir)).is_file()
    assert _verify.verify_backup(str(latest), md5="all")["ok"]
    earlier = earlier_backups(root)
    # lost live and in no backup: refused, Orthanc started again
    checks.store_studies(server, tmp_path, patients=1, via="rest")
    fresh = sorted(set(p for p in server.storage_dir.rglob("*") if p.is_file() and len(p.name) == 36)
                   - set(backed_up))
    fresh[0].unlink()
    result = run_playbook(inventory)
    # found missing by the comparison with the whole index once Orthanc runs again (the stop
    # window examines only what Orthanc's change log names since the hot pass began)
    assert_failed_cleanly(result, "pacs", "Stop Orthanc, capture", "nor the previous backup holds them .*lost from the live archive",
                          root, earlier)
    assert server.answers()
    # unreadable (even for root): a folder where the file should be
    fresh[1].unlink()
    fresh[1].mkdir()
    result = run_playbook(inventory)
    assert result.returncode != 0
    match = re.search(r"Backup of pacs failed at step '([^']*)': (.*)", result.stdout)
    assert match and fresh[1].name in match.group(0), result.stdout
    assert server.answers()
    assert checks.complete_backups(root) == sorted(earlier)
    assert not [p for p in root.iterdir() if p.name.endswith(".incomplete")]


def test_a_damaged_new_file_fails_completion_and_md5_all_checks_every_file(servers, tmp_path):
    """The completion check follows what changed (manifest storage_check: changed): the index is
    compared with the storage state in SQL, and only the files placed new are read on disk. A new
    file damaged after the capture (same size, one byte flipped) still fails completion, by name;
    md5=all checks every file, and so finds a file linked from the previous backup gone missing."""
    server, root, inventory = one_host(servers, tmp_path)
    good_backup(inventory)
    previous = (root / "latest").resolve()
    verification = checks.read_manifest(previous)["verification"]
    files = checks.read_manifest(previous)["storage"]["files"]
    assert verification["storage_check"] == "changed", verification
    assert verification["files_compared"] == verification["files_checked"] == verification["files_hashed"] == files
    old = {p.name for p in (previous / "storage").rglob("*") if p.is_file()}
    checks.store_studies(server, tmp_path, patients=1, via="rest")
    opened = run_module("backup_set", {"state": "prepare", "root": str(root), "config_path": str(server.config_path),
                                       "space_check": False})
    assert not opened.get("failed"), opened
    backup = pathlib.Path(opened["path"])
    hot_pass(server, backup, previous)
    window(server, backup, previous)
    stored = sorted(p for p in (backup / "storage").rglob("*") if p.is_file())
    new = [p for p in stored if p.name not in old]
    assert new and len(new) < len(stored)
    good = new[0].read_bytes()
    damaged = bytearray(good)
    damaged[len(damaged) // 2] ^= 0xFF
    new[0].unlink()  # a hard link to the live file: replaced, never written through
    new[0].write_bytes(bytes(damaged))
    complete = {"state": "complete", "root": str(root), "name": opened["name"], "host": "pacs"}
    failed = run_module("backup_set", dict(complete, md5="new"))
    assert failed.get("failed") and "failed its check: 1 storage files with a wrong MD5" in failed["msg"], failed
    assert new[0].name in failed["msg"]
    assert failed["verification"]["storage_check"] == "changed"
    assert failed["verification"]["files_checked"] == failed["verification"]["files_hashed"] == len(new)
    assert failed["verification"]["files_compared"] == len(stored)
    assert checks.complete_backups(root) == [previous.name] and backup.is_dir()
    new[0].unlink()
    new[0].write_bytes(good)
    # a file linked from the previous backup, gone from this one: the check of every file finds it
    linked = next(p for p in stored if p.name in old)
    kept = linked.read_bytes()
    linked.unlink()
    failed = run_module("backup_set", dict(complete, md5="all"))
    assert failed.get("failed") and "1 missing storage files" in failed["msg"] and linked.name in failed["msg"], failed
    assert failed["verification"]["storage_check"] == "all"
    linked.write_bytes(kept)
    closed = run_module("backup_set", dict(complete, md5="all"))
    assert not closed.get("failed"), closed
    verification = closed["manifest"]["verification"]
    assert verification["storage_check"] == "all" and verification["files_compared"] is None
    assert verification["files_checked"] == verification["files_hashed"] == len(stored)
    assert _verify.verify_backup(closed["path"], md5="all")["ok"]


@pytest.mark.parametrize("fault, cause", [
    ("invalid-json", r"JSON|Expecting"),
    ("key-in-two-files", r"HttpPort.*(two|both|twice|more than one)|defined in"),
    ("unknown-storage-plugin", r"storage plugin .*cannot back them up"),
])
def test_a_broken_configuration_changes_nothing(servers, tmp_path, fault, cause):
    server, root, inventory = one_host(servers, tmp_path)
    pid = server.pid()
    config = server.config_path
    if fault == "invalid-json":
        (config / "zz-broken.json").write_text('{ "Name": "x", }  ,')
    elif fault == "key-in-two-files":
        (config / "zz-dup.json").write_text(json.dumps({"HttpPort": 9999}))
    else:
        plugin = tmp_path / "libOrthancAzureBlobStorage.so"
        plugin.write_bytes(b"\x7fELF")
        main = config / "orthanc.json"
        main.write_text(main.read_text().replace('"Plugins": []', f'"Plugins": [{json.dumps(str(plugin))}]'))
    result = run_playbook(inventory)
    assert result.returncode != 0
    match = re.search(r"Backup of pacs failed at step '([^']*)': (.*)", result.stdout)
    assert match, result.stdout
    step = "Check that this Orthanc can be backed up" if fault == "unknown-storage-plugin" else "Read the Orthanc configuration"
    assert step in match.group(1), match.group(0)
    assert re.search(cause, match.group(2)), match.group(0)
    assert server.pid() == pid and server.answers()  # never stopped
    assert not root.exists() or [p.name for p in root.iterdir() if p.name != "status.json"] == []


def test_two_backups_of_one_host_at_once(servers, tmp_path):
    server, root, inventory = one_host(servers, tmp_path)
    good_backup(inventory)
    runs = [run_playbook(inventory, popen=True), run_playbook(inventory, popen=True)]
    outputs = [run.communicate(timeout=300)[0] for run in runs]
    codes = sorted(run.returncode for run in runs)
    assert codes[0] == 0 and codes[1] != 0, outputs
    loser = outputs[[run.returncode for run in runs].index(codes[1])]
    match = re.search(r"Backup of pacs failed at step '([^']*)': (.*)", loser)
    assert match and "Prepare the backup folder" in match.group(1), loser
    assert re.search(r"another backup .*(holds|took) the lock", match.group(2)), match.group(0)
    assert server.answers()
    assert len(checks.complete_backups(root)) == 2
    assert not [p for p in root.iterdir() if p.name.endswith(".incomplete")]


def test_backups_are_private(servers, tmp_path):
    server, root, inventory = one_host(servers, tmp_path)
    good_backup(inventory)
    backup = (root / "latest").resolve()
    for path in (root, backup):
        assert stat.S_IMODE(path.stat().st_mode) == 0o700, path
    assert stat.S_IMODE((backup / "manifest.json").stat().st_mode) == 0o600
    assert stat.S_IMODE((backup / "index" / "index").stat().st_mode) & 0o077 == 0


@pytest.mark.parametrize("name", ["../../outside", "/etc/passwd-pacs-test"])
def test_restore_refuses_a_manifest_naming_paths_outside(servers, tmp_path, name):
    server, root, inventory = one_host(servers, tmp_path)
    good_backup(inventory)
    backup = (root / "latest").resolve()
    manifest = checks.read_manifest(backup)
    key = "config_files" if name.startswith("..") else "files"
    manifest[key][name] = {"owner": "root", "group": "root", "mode": "0644"} if key == "config_files" else "0" * 64
    (backup / "manifest.json").write_text(json.dumps(manifest))
    before = fingerprint(server.root)
    result = run_playbook(inventory, playbook="restore.yml", extra_vars=CONFIRM)
    assert result.returncode != 0
    assert "outside the backup" in result.stdout, result.stdout
    assert server.answers()
    assert not os.path.exists("/etc/passwd-pacs-test")
    after = fingerprint(server.root)
    changed = {k for k in set(before) | set(after) if before.get(k) != after.get(k) and not k.startswith(("log/", "index/"))}
    assert not changed, changed
    shutil.rmtree(backup)


def test_restore_onto_mount_points(tmp_path):
    """Orthanc's configuration and storage folders are mount points (volumes, an image layer):
    they cannot be renamed aside, so they are copied aside and emptied in place; the restore and
    its rollback both work, and the mounts stay."""
    from tests.support.orthanc_server import OrthancServer  # pylint: disable=import-outside-toplevel
    from ansible_collections.pacs.orthanc.plugins.module_utils import _restore  # pylint: disable=import-outside-toplevel
    server = OrthancServer(tmp_path / "mounted", name="mounted")
    mounted = []
    try:
        for folder in (server.config_path, server.storage_dir):
            keep = tmp_path / f"keep-{folder.name}"
            shutil.copytree(folder, keep)
            checks.mount_tmpfs(folder, "64M")
            mounted.append(folder)
            shutil.copytree(keep, folder, dirs_exist_ok=True)
        server.start()
        checks.store_studies(server, tmp_path, patients=2, via="rest")
        stored = {i: server.instance_md5(i) for i in server.instances()}
        root = tmp_path / "backups"
        inventory = write_inventory(tmp_path / "inventory.json", {"mounted": local_host(
            server, root, orthanc_backup_settle_seconds=0)})
        good_backup(inventory)
        checks.store_studies(server, tmp_path, patients=1, via="rest")  # diverge after the backup
        diverged = fingerprint(server.storage_dir)
        result = run_playbook(inventory, playbook="restore.yml", extra_vars=CONFIRM)
        assert result.returncode == 0, result.stdout
        assert {i: server.instance_md5(i) for i in server.instances()} == stored
        assert all(os.path.ismount(folder) for folder in mounted)
        # the previous data was copied aside (the journal says so): a rollback brings it back,
        # into the same mounts
        restore_id = re.search(r"pre-restore-(\d{8}T\d{6}Z-[0-9a-f]{8}-[0-9a-f]{6})", " ".join(os.listdir(tmp_path / "mounted"))).group(1)
        journal_path = f"/var/tmp/pacs-orthanc-restore-{restore_id}.json"
        journal = json.loads(open(journal_path, encoding="utf-8").read())
        assert {r["path"] for r in journal["roots"] if r.get("mode") == "copied"} == {str(f) for f in mounted}
        server.stop()
        _restore.rollback(journal_path)
        assert fingerprint(server.storage_dir) == diverged
        assert all(os.path.ismount(folder) for folder in mounted)
        server.start()
        assert server.statistics()["CountInstances"] == len(stored) + 3
    finally:
        server.stop()
        for folder in reversed(mounted):
            checks.umount(folder)

"""Backups from btrfs snapshots (strategy 'snapshot'), on a real loop-mounted btrfs filesystem.

A real Orthanc keeps its index and storage in a btrfs subvolume and receives instances over
C-STORE from a thread while the real backup playbook runs with orthanc_backup_snapshot=btrfs, one
backup after the other (two: each playbook run costs about 20 s). A poller GETs /system from
outside every 25 ms: Orthanc must answer every time. Each backup must verify (every indexed file,
with its MD5) and restore (restore playbook) into an Orthanc that serves every instance its index
lists, byte for byte as the live Orthanc served it.
Failures (after the snapshot, or of its preconditions) must leave no snapshot, no incomplete
backup, and Orthanc running."""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import threading
import time

import pytest

from tests.support import checks, dicomgen, loopfs
from tests.support.orthanc_server import OrthancError, OrthancServer, stop_all
from tests.support.playbook import _env, local_host, run_playbook, write_inventory
from ansible_collections.pacs.orthanc.plugins.module_utils import _verify

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not loopfs.available("btrfs"), reason="loop-mounts a btrfs image: needs root and btrfs-progs")]

SNAPSHOT_VARS = {"orthanc_backup_snapshot": "btrfs", "orthanc_backup_md5": "all"}
PREFIX = ".pacs-orthanc-snapshot."


class Btrfs(loopfs.LoopFilesystem):
    """A loop-mounted btrfs filesystem under a test's tmp_path, with its subvolumes."""

    def __init__(self, tmp_path: pathlib.Path, size: str = "512M"):
        super().__init__(tmp_path, "btrfs", size)

    def subvolume(self, name: str) -> pathlib.Path:
        path = self.mount_point / name
        subprocess.run(["btrfs", "subvolume", "create", str(path)], check=True, capture_output=True)
        return path

    def subvolumes(self) -> list:
        out = subprocess.run(["btrfs", "subvolume", "list", str(self.mount_point)], check=True,
                             capture_output=True, text=True).stdout
        return sorted(line.split(" path ", 1)[1] for line in out.splitlines() if " path " in line)

    def snapshots(self) -> list:
        return [s for s in self.subvolumes() if PREFIX in s]


@pytest.fixture
def btrfs(tmp_path):
    fs = Btrfs(tmp_path)
    try:
        yield fs
    finally:
        fs.close()


@pytest.fixture
def orthancs():
    """Factory of started Orthancs under a given root, stopped before the filesystem goes."""
    started = []

    def make(root: pathlib.Path, name: str, **kwargs) -> OrthancServer:
        server = OrthancServer(root, name=name, **kwargs)
        server.start()
        started.append(server)
        return server

    yield make
    stop_all(started)


class Poller(threading.Thread):
    """GET /system from outside every ``interval`` seconds; counts failures and the longest gap."""

    def __init__(self, server: OrthancServer, interval: float = 0.025):
        super().__init__(daemon=True)
        self.server, self.interval = server, interval
        self.polls = self.failures = 0
        self.longest_gap = 0.0
        self.halt = threading.Event()

    def run(self):
        last = time.monotonic()
        while not self.halt.is_set():
            # a slow answer is an answer: on a loaded 2-core CI machine one can take seconds
            ok = self.server.answers(timeout=30)
            now = time.monotonic()
            self.polls += 1
            if ok:
                self.longest_gap = max(self.longest_gap, now - last)
                last = now
            else:
                self.failures += 1
            self.halt.wait(self.interval)


class Feeder(threading.Thread):
    """Makes and sends one study after another over C-STORE until stopped; records the MD5 of
    every file stored, by SOP Instance UID."""

    def __init__(self, server: OrthancServer, workdir: pathlib.Path):
        super().__init__(daemon=True)
        self.server, self.workdir = server, workdir
        self.stored: dict = {}
        self.errors: list = []
        self.halt = threading.Event()

    def run(self):
        number = 0
        while not self.halt.is_set():
            number += 1
            study = dicomgen.make_study(self.workdir / f"feed-{number}", f"feed-{number}", f"Feed^{number}",
                                        series=1, instances_per_series=3)
            try:
                self.server.store_cstore(study)
            except OrthancError as exc:
                self.errors.append(str(exc))
                continue
            for path in study:
                self.stored[path.stem] = hashlib.md5(path.read_bytes()).hexdigest()


def snapshot_inventory(tmp_path, server, root, **extra):
    return write_inventory(tmp_path / "inventory.json", {server.name: local_host(server, root, **extra)})


def backup_contents(backup: pathlib.Path) -> dict:
    """{instance id: uuid of its DICOM file} from a backup's index."""
    return checks.dicom_uuids(backup / "index" / "index")


def no_incomplete(root: pathlib.Path) -> bool:
    return not root.exists() or not [p for p in root.iterdir() if p.name.endswith(".incomplete")]


def test_backups_from_snapshots_while_orthanc_keeps_receiving(btrfs, orthancs, tmp_path):
    volume = btrfs.subvolume("orthanc")
    server = orthancs(volume / "pacs", "pacs")
    initial = {path.stem: hashlib.md5(path.read_bytes()).hexdigest()  # SOP Instance UID -> MD5 sent
               for path in checks.store_studies(server, tmp_path, patients=1, via="rest")}
    sent = dict(initial)
    root = tmp_path / "backups"
    inventory = snapshot_inventory(tmp_path, server, root)
    pid = server.pid()
    poller, feeder = Poller(server), Feeder(server, tmp_path)
    poller.start()
    feeder.start()
    backups = []
    try:
        for round_no in range(2):
            before = len(feeder.stored)
            leftover = volume / f"{PREFIX}20000101T00000{round_no}Z"
            if round_no == 1:  # what a killed run leaves: a read-only snapshot of our name
                subprocess.run(["btrfs", "subvolume", "snapshot", "-r", str(volume), str(leftover)],
                               check=True, capture_output=True)
                assert len(btrfs.snapshots()) == 1
            result = run_playbook(inventory, extra_vars=SNAPSHOT_VARS)
            assert result.returncode == 0, result.stdout
            assert len(feeder.stored) > before, "nothing arrived over C-STORE while the backup ran"
            backup = (root / "latest").resolve()
            assert backup not in backups
            backups.append(backup)
            manifest = checks.read_manifest(backup)
            assert manifest["strategy"] == "snapshot"
            assert manifest["downtime_seconds"] == 0.0 and manifest["downtime_phases"] == {}
            assert manifest["stopped_at"] is None and manifest["restarted_at"] is None
            capture = manifest["capture"]
            assert capture["kind"] == "btrfs" and capture["polls"]["failures"] == 0 and capture["polls"]["polls"] >= 2
            snapshot = capture["snapshot"]
            assert snapshot["volume"] == str(volume) and snapshot["released_at"] >= snapshot["created_at"]
            assert snapshot["path"] == f"{volume}/{PREFIX}{backup.name}"
            assert "index" in capture["index_source_files"]
            # the backup root is on another filesystem than the snapshot: a reflink is refused, the index copied
            assert capture["index_capture"] == "copy" == manifest["index_capture"]
            assert snapshot["removed_leftovers"] == ([str(leftover)] if round_no == 1 else [])
            assert btrfs.snapshots() == []  # released
            assert server.pid() == pid  # never stopped
            report = _verify.verify_backup(str(backup), md5="all")
            assert report["ok"], report["problems"]
            assert report["orphans"] == 0 and report["files_hashed"] == report["files_checked"] > 0
            assert report["files_hashed"] == checks.attachment_count(backup / "index" / "index")
            assert manifest["counts"] == report["counts"]
            if round_no:
                assert manifest["storage"]["previous"] == str(backups[-2])
                assert manifest["storage"]["linked_files"] > 0
            time.sleep(1.1)  # backups are named by the second
    finally:
        feeder.halt.set()
        feeder.join()
        poller.halt.set()
        poller.join()
    assert feeder.errors == []
    sent.update(feeder.stored)
    assert poller.failures == 0 and poller.polls > 100, (poller.failures, poller.polls)
    # no outage (failures above) and no hang; how short the gaps are is for the benchmarks
    assert poller.longest_gap < 30.0, poller.longest_gap
    counts = [checks.read_manifest(b)["counts"]["instances"] for b in backups]
    assert counts == sorted(counts) and counts[0] < counts[-1]  # each backup caught newer instances

    # What the live Orthanc serves now holds every backup's instances. Over C-STORE, Orthanc
    # rewrites the file meta header, so these bytes, not the files sent, are the originals.
    originals = {instance: hashlib.md5(server.instance_file(instance)).hexdigest() for instance in server.instances()}
    assert {server.instance_sop_uid(i) for i in originals} == set(sent)
    rest_stored = [i for i in originals if server.instance_sop_uid(i) in initial]
    assert rest_stored and all(originals[i] == initial[server.instance_sop_uid(i)] for i in rest_stored)

    # every backup restores into an Orthanc that serves what its index lists, byte for byte
    for backup in backups:
        result = run_playbook(inventory, playbook="restore.yml",
                              extra_vars={"orthanc_restore_confirm": True, "orthanc_restore_backup": backup.name})
        assert result.returncode == 0, result.stdout
        listed = backup_contents(backup)
        assert sorted(server.instances()) == sorted(listed)
        for instance in listed:
            assert hashlib.md5(server.instance_file(instance)).hexdigest() == originals[instance]
            assert server.instance_md5(instance) == originals[instance]
    assert btrfs.snapshots() == []


def host_line(output: str, host: str) -> str:
    match = re.search(rf"Backup of {host} failed at step '([^']*)': (.*)", output)
    assert match, output
    return match


@pytest.mark.fault
def test_failures_leave_no_snapshot_and_orthanc_running(btrfs, orthancs, tmp_path):
    """One fleet run, one host per failure: each is refused (or fails after its snapshot) with a
    clear message, leaves Orthanc running as it was, no snapshot and no incomplete backup."""
    volume = btrfs.subvolume("orthanc")
    plain = orthancs(tmp_path / "plain", "plain")  # not on btrfs
    stoppable = orthancs(tmp_path / "stoppable", "stoppable")  # not on btrfs, fallback allowed
    outside = btrfs.mount_point / "index-outside"  # the top-level subvolume, not the one of the storage
    split = orthancs(volume / "split", "split", extra_config={"IndexDirectory": str(outside)})
    full = orthancs(volume / "full", "full")  # its backup filesystem is too small
    for server in (plain, stoppable, split):
        checks.store_studies(server, tmp_path, patients=1, via="rest", instances=1)
    checks.store_studies(full, tmp_path, patients=1, via="rest", instances=4, pixel_bytes=1_500_000)
    small = tmp_path / "backups-full"
    checks.mount_tmpfs(small, "3m")
    try:
        roots = {name: tmp_path / f"backups-{name}" for name in ("plain", "stoppable", "lvm", "split", "named", "full")}
        btrfs_host = {"orthanc_backup_snapshot": "btrfs"}
        inventory = write_inventory(tmp_path / "inventory.json", {
            "plain": local_host(plain, roots["plain"], **btrfs_host),
            "stoppable": local_host(stoppable, roots["stoppable"], orthanc_backup_snapshot_fallback="stop", **btrfs_host),
            "lvm": local_host(plain, roots["lvm"], orthanc_backup_snapshot="lvm"),
            "split": local_host(split, roots["split"], **btrfs_host),
            "named": local_host(split, roots["named"], orthanc_backup_snapshot_volume=str(volume), **btrfs_host),
            "full": local_host(full, roots["full"], orthanc_backup_min_free_bytes=0, orthanc_backup_space_check=False,
                               **btrfs_host),
        })
        pids = {server.name: server.pid() for server in (plain, stoppable, split, full)}
        result = run_playbook(inventory, extra_vars={"orthanc_backup_batches": [10],
                                                     "orthanc_backup_max_fail_percentage": 100})
        assert result.returncode != 0, result.stdout
        out = result.stdout
        causes = {
            "plain": rf"orthanc_backup_snapshot=btrfs, but the index folder {plain.index_dir} is on a \w+ "
                     r"filesystem .*, not btrfs",
            "lvm": r"orthanc_backup_snapshot=lvm: LVM thin snapshots are not implemented: they could not be tested",
            "split": rf"the index folder {outside} is in the btrfs subvolume {btrfs.mount_point} but the storage "
                     rf"folder {volume}/split/storage is in {volume}: one snapshot cannot capture both",
            "named": rf"the index folder {outside} is not inside the subvolume {volume}",
            "full": r"No space left on device",
        }
        for host, cause in causes.items():
            match = host_line(out, host)
            assert match.group(1).startswith("Take a filesystem snapshot"), match.group(0)
            assert re.search(cause, match.group(2)), match.group(0)
            assert "Orthanc was left as it was" in match.group(0)
            assert no_incomplete(roots[host]) and (not roots[host].exists() or not checks.complete_backups(roots[host]))
        assert btrfs.snapshots() == []  # 'full' released its snapshot although its copy failed
        for server in (plain, stoppable, split, full):
            assert server.answers()
        assert plain.pid() == pids["plain"] and split.pid() == pids["split"] and full.pid() == pids["full"]

        # the fallback to a brief stop was taken, said and recorded
        assert "stoppable: ok, sqlite" in out and "WARNING: stoppable: no btrfs snapshot" in out
        manifest = checks.read_manifest((roots["stoppable"] / "latest").resolve())
        assert manifest["strategy"] == "stop" and manifest["downtime_seconds"] > 0
        assert manifest["capture"]["fallback_from"] == "snapshot" and "not btrfs" in manifest["capture"]["warning"]
        assert stoppable.pid() != pids["stoppable"]
    finally:
        checks.umount(small)

    # the btrfs program missing from the PATH (the module alone: the PATH is the controller's)
    bare = tmp_path / "bin-without-btrfs"  # every program of the system's PATH but btrfs*
    bare.mkdir()
    for folder in ("/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin"):
        for program in (os.listdir(folder) if os.path.isdir(folder) else []):
            if not program.startswith("btrfs") and not (bare / program).exists():
                (bare / program).symlink_to(os.path.join(folder, program))
    dirs = [os.path.dirname(sys.executable), os.path.dirname(shutil.which("ansible")), str(bare)]
    if shutil.which("btrfs", path=os.pathsep.join(dirs)):
        pytest.skip("btrfs lives beside python or ansible: cannot hide it")
    dest = tmp_path / "dest"
    answer = run_module_with_path("snapshot_capture", {
        "kind": "btrfs", "name": "20261129T000000Z", "index_directory": str(full.index_dir),
        "storage_directory": str(full.storage_dir), "index_dest": str(dest / "index"),
        "storage_dest": str(dest / "storage"), "state_file": str(dest / "state"), "url": full.url}, dirs)
    assert answer["failed"] and answer["precondition_failed"] is True, answer
    assert answer["msg"] == ("check snapshot preconditions: the btrfs program is not installed or not on the PATH "
                             "(Debian package btrfs-progs)")
    assert not dest.exists() and btrfs.snapshots() == [] and full.pid() == pids["full"]


def run_module_with_path(module: str, args: dict, path_dirs: list) -> dict:
    """One module of the collection, ad hoc on localhost, with the given PATH."""
    env = _env()
    env.update({"PATH": os.pathsep.join(path_dirs), "ANSIBLE_LOAD_CALLBACK_PLUGINS": "1",
                "ANSIBLE_STDOUT_CALLBACK": "ansible.builtin.minimal"})
    proc = subprocess.run([shutil.which("ansible"), "localhost", "-c", "local", "-m", f"pacs.orthanc.{module}",
                           "-a", json.dumps(args)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, timeout=300, check=False)
    marker = proc.stdout.find(" => {")
    assert marker > 0, proc.stdout + proc.stderr
    result = json.loads(proc.stdout[marker + 4:])
    result["failed"] = proc.stdout[:marker].rstrip().endswith("FAILED!")
    return result

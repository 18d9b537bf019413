"""Verification and restore against real Orthanc servers: every backup must come back.

Backups are taken with the backup playbook, then verified, damaged on purpose, and restored with
the restore playbook; restored servers are compared instance by instance with what was stored."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import threading
import time

import pytest

from tests.support import checks, procs
from tests.support.playbook import local_host, run_module, run_playbook, write_inventory

pytestmark = pytest.mark.slow

CONFIRM = {"orthanc_restore_confirm": True}


def contents(server) -> dict:
    """{SOP Instance UID: MD5 of the DICOM file Orthanc serves} for every instance."""
    return {server.instance_sop_uid(i): hashlib.md5(server.instance_file(i)).hexdigest() for i in server.instances()}


def backed_up(servers, tmp_path, name="pacs", **server_args):
    server = servers(name, **server_args)
    checks.store_studies(server, tmp_path, patients=2, via="rest")
    checks.store_studies(server, tmp_path, patients=1, via="cstore")
    inventory = write_inventory(tmp_path / "inventory.json", {
        name: local_host(server, tmp_path / "backups", orthanc_backup_settle_seconds=0)})
    result = run_playbook(inventory)
    assert result.returncode == 0, result.stdout
    return server, inventory, (tmp_path / "backups" / "latest").resolve()


def failure_line(output: str, host: str) -> str:
    match = re.search(rf"Restore of {host} failed at step '[^']*': .*", output)
    assert match, output
    return match.group(0)


def test_round_trip_after_the_data_is_wiped(servers, tmp_path):
    server, inventory, _backup = backed_up(servers, tmp_path)
    stored = contents(server)
    assert len(stored) == 9
    server.stop()
    shutil.rmtree(server.storage_dir)
    shutil.rmtree(server.index_dir)
    server.start()
    assert server.statistics()["CountInstances"] == 0
    result = run_playbook(inventory, playbook="restore.yml", extra_vars=CONFIRM)
    assert result.returncode == 0, result.stdout
    assert contents(server) == stored
    # the (empty) data it replaced is kept aside, not deleted
    assert list(server.storage_dir.parent.glob("storage.pre-restore-*"))
    assert list(server.index_dir.parent.glob("index.pre-restore-*"))


def test_restore_onto_a_fresh_host(servers, tmp_path):
    server, inventory, _backup = backed_up(servers, tmp_path, compression=True)
    stored = contents(server)
    server.stop()
    for folder in (server.config_path, server.storage_dir, server.index_dir):
        shutil.rmtree(folder)  # a host that never held Orthanc data or configuration
    result = run_playbook(inventory, playbook="restore.yml", extra_vars=CONFIRM)
    assert result.returncode == 0, result.stdout
    assert server.answers() and contents(server) == stored
    assert not list(server.root.glob("*.pre-restore-*"))  # there was nothing to set aside
    # the restored index accepts writes
    checks.store_studies(server, tmp_path, patients=1, via="rest", instances=1)
    assert server.statistics()["CountInstances"] == len(stored) + 1


@pytest.mark.fault
def test_restore_refusals_change_nothing(servers, tmp_path):
    server, inventory, backup = backed_up(servers, tmp_path)
    pid, stored = server.pid(), contents(server)

    unconfirmed = run_playbook(inventory, playbook="restore.yml")
    assert unconfirmed.returncode != 0
    assert "run again with -e orthanc_restore_confirm=true" in failure_line(unconfirmed.stdout, "pacs")

    manifest = json.loads((backup / "manifest.json").read_text())
    manifest["orthanc"]["version"] = "1.99.0"
    (backup / "manifest.json").write_text(json.dumps(manifest))
    newer = run_playbook(inventory, playbook="restore.yml", extra_vars=CONFIRM)
    line = failure_line(newer.stdout, "pacs")
    assert "'Plan the restore'" in line and "written by Orthanc 1.99.0, this host runs 1.10.1" in line
    assert "set force" in line and "Nothing was changed" in line
    manifest["orthanc"]["version"] = "1.10.1"
    (backup / "manifest.json").write_text(json.dumps(manifest))

    victim = next(p for p in (backup / "storage").rglob("*") if p.is_file())
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x01
    victim.write_bytes(bytes(data))
    damaged = run_playbook(inventory, playbook="restore.yml", extra_vars=CONFIRM)
    line = failure_line(damaged.stdout, "pacs")
    assert "'Verify the backup'" in line and "1 storage files with a wrong MD5" in line

    assert server.pid() == pid and contents(server) == stored  # never stopped, never touched
    assert not list(server.root.glob("*.pre-restore-*"))


@pytest.mark.fault
def test_verification_catches_each_kind_of_damage(servers, tmp_path):
    _server, _inventory, backup = backed_up(servers, tmp_path)
    clean = run_module("backup_verify", {"path": str(backup)})
    assert not clean["failed"] and clean["ok"] and clean["files_hashed"] == 9 and clean["orphans"] == 0

    def damaged(name, harm):
        copy = tmp_path / f"damaged-{name}"
        shutil.copytree(backup, copy, symlinks=True)  # real copies: the original stays whole
        harm(copy)
        return run_module("backup_verify", {"path": str(copy)})

    files = sorted(p.relative_to(backup) for p in (backup / "storage").rglob("*") if p.is_file())

    def flip(copy):
        path = copy / files[0]
        data = bytearray(path.read_bytes())
        data[-1] ^= 0xFF
        path.write_bytes(bytes(data))

    result = damaged("flip", flip)
    assert result["failed"] and result["problems"]["storage files with a wrong MD5"]["count"] == 1
    result = damaged("delete", lambda copy: (copy / files[1]).unlink())
    assert result["failed"] and result["problems"]["missing storage files"]["count"] == 1

    def truncate(copy):
        index = copy / "index" / "index"
        index.write_bytes(index.read_bytes()[: index.stat().st_size // 2])

    result = damaged("truncate", truncate)
    assert result["failed"] and "index/index" in result["problems"]["files outside storage with a wrong SHA-256"]["examples"]
    assert "index integrity errors" in result["problems"] or "SQLite" in json.dumps(result["problems"])

    def edit_config(copy):
        path = copy / "config" / "orthanc.json"
        path.write_text(path.read_text().replace('"Plugins"', '"Plugins" ', 1))

    result = damaged("config", edit_config)
    assert result["failed"]
    assert result["problems"]["files outside storage with a wrong SHA-256"]["examples"] == ["config/orthanc.json"]

    def orphan(copy):
        extra = copy / "storage" / "ab" / "cd" / "abcd0000-0000-0000-0000-000000000000"
        extra.parent.mkdir(parents=True, exist_ok=True)
        extra.write_bytes(b"not in the index")

    result = damaged("orphan", orphan)
    assert not result["failed"] and result["orphans"] == 1
    assert result["orphan_examples"] == ["abcd0000-0000-0000-0000-000000000000"]
    assert run_module("backup_verify", {"path": str(backup)})["ok"]  # the original is untouched


@pytest.mark.fault
def test_interrupted_restore_puts_the_previous_data_back(servers, tmp_path):
    server = servers("halfway")
    checks.store_studies(server, tmp_path, patients=1, via="rest", instances=6, pixel_bytes=60_000_000)
    checks.store_studies(server, tmp_path, patients=1, via="rest")
    inventory = write_inventory(tmp_path / "inventory.json", {
        "halfway": local_host(server, tmp_path / "backups", orthanc_backup_link_mode="copy")})
    assert run_playbook(inventory).returncode == 0
    # the data diverges from the backup: one patient deleted after it
    patient = server.rest("GET", "/patients")[0]
    server.rest("DELETE", f"/patients/{patient}")
    previous = contents(server)
    play = run_playbook(inventory, playbook="restore.yml", extra_vars=CONFIRM, pipelining=False, popen=True)
    killed = None
    deadline = time.monotonic() + 180
    while killed is None and play.poll() is None and time.monotonic() < deadline:
        if list(server.storage_dir.glob("*/*/*.part")):
            module = procs.module_processes(play.pid, "backup_restore")
            for pid in module:
                os.kill(pid, signal.SIGKILL)
            killed = module or None
        time.sleep(0.005)
    output = play.communicate(timeout=300)[0]
    assert killed, "the restore was never caught copying:\n" + output
    assert play.returncode != 0
    line = failure_line(output, "halfway")
    assert "'Move the current data aside and restore the backup'" in line
    assert "The previous data was put back and Orthanc runs on it" in line
    assert server.answers() and contents(server) == previous
    assert not list(server.root.glob("*.pre-restore-*"))


def test_drill_while_production_keeps_answering(servers, tmp_path):
    server, inventory, backup = backed_up(servers, tmp_path)
    pid = server.pid()
    answers, stop = [], threading.Event()

    def watch():
        while not stop.is_set():
            answers.append(server.answers())
            time.sleep(0.05)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        result = run_playbook(inventory, playbook="drill.yml",
                              extra_vars={"orthanc_drill_sample": 0, "orthanc_drill_workdir": str(tmp_path / "drills")})
    finally:
        stop.set()
        watcher.join()
    assert result.returncode == 0, result.stdout
    assert "pacs: drill ok, 9 instances in the backup, 9 served with the MD5 the index records" in result.stdout
    assert len(answers) > 10 and all(answers)  # production answered throughout
    assert server.pid() == pid
    assert os.listdir(tmp_path / "drills") == []  # the scratch instance is gone

    copy = tmp_path / "damaged"
    shutil.copytree(backup, copy, symlinks=True)
    victim = next(p for p in (copy / "storage").rglob("*") if p.is_file())
    data = bytearray(victim.read_bytes())
    data[-1] ^= 0xFF
    victim.write_bytes(bytes(data))
    failed = run_playbook(inventory, playbook="drill.yml", extra_vars={
        "orthanc_drill_sample": 0, "orthanc_drill_backup": str(copy), "orthanc_drill_workdir": str(tmp_path / "drills")})
    assert failed.returncode != 0
    assert "1 of 9 instances served with another MD5 than the index records" in failed.stdout
    assert os.listdir(tmp_path / "drills") == [] and server.pid() == pid

"""Progress of the long steps, seen for real: a hot pass of a real Orthanc's archive that lasts
several reporting intervals shows in the play's output as lines with growing counts and a last
one at 100%, and in the host's status file, read by this (other) process while the play runs. The
same run ships the backup to a backup server over real SSH: the transfer waits for the server's
only slot (held by this test until the play says it waits), then shows rsync's progress the same
way."""

from __future__ import annotations

import json
import re
import threading
import time

import os

import pytest

from tests.integration.test_ship import fleet_inventory, server_backups
from tests.support import checks, sshd
from tests.support.playbook import local_host, run_playbook
from ansible_collections.pacs.orthanc.plugins.module_utils import _lock

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not sshd.available(), reason="needs openssh-server, ssh and rsync"),
              pytest.mark.skipif(os.geteuid() != 0, reason="runs sshd: needs root")]

LINE = re.compile(r"\(item=(progress) (hot pass): (\d+)/(~?\d+) files, ([\d.]+)/(~?[\d.]+) GiB \((\d+)%\), "
                  r"([\d.]+) MB/s, (ETA [\d:d ?]+|done in [\d:d ]+)\)")
SHIP_LINE = re.compile(r"\(item=progress shipping: (?:\d+/\S+ files, )?([\d.]+)/(~?[\d.?]+) GiB(?: \((\d+)%\))?, "
                       r"[\d.]+ MB/s, (ETA [\d:d ?]+|done in [\d:d ]+)\)")
WAIT_LINE = re.compile(r"\(item=progress shipping: waiting for a transfer slot on 127\.0\.0\.1: all 1 taken by "
                       r"test-holder \(backup b-1, since [\dT:Z-]+\), since \d+:\d\d:\d\d\)")


def test_the_hot_pass_and_the_shipping_show_their_progress_in_the_play_and_the_status_file(
        servers, ssh_server, tmp_path):
    server = servers("progress")
    # files copied (not linked) at most 10 MiB/s: a hot pass of about 8 s, 16 intervals of 0.5 s (a busy machine
    # may show only a few of them)
    checks.store_studies(server, tmp_path, patients=1, via="rest", instances=10, pixel_bytes=8_000_000)
    root = tmp_path / "backups"
    status_file = root / "status.json"
    server_root = tmp_path / "server"
    # the shipping too: at most 16 MiB/s, one transfer at a time on the server
    inventory = fleet_inventory(tmp_path / "inventory.json", {"progress": local_host(
        server, root, orthanc_backup_link_mode="copy", orthanc_backup_settle_seconds=0,
        orthanc_backup_workers=1, orthanc_backup_limit_rate=10 * 1024, orthanc_progress_interval=0.5,
        **ssh_server.ship_vars(server_root, orthanc_ship_bwlimit=16 * 1024, orthanc_ship_max_parallel=1,
                               orthanc_ship_slot_timeout=300))}, ssh_server)
    # another transfer holds the server's only slot until the play says that it waits for it
    holder = _lock.RemoteSlot(["sh", "-c"], str(server_root / _lock.SLOTS_FOLDER), 1, 10,
                              {"host": "test-holder", "backup": "b-1"}, "hold the slot").__enter__()

    seen, waited, stop = [], [], threading.Event()

    def watch():  # another process's view: the status file while the play runs
        while not stop.is_set():
            try:
                progress = json.loads(status_file.read_text()).get("progress")
            except (OSError, ValueError):
                progress = None
            if progress and progress.get("state") == "waiting" and not waited:
                waited.append(progress)
                holder.__exit__(None, None, None)
            if progress and progress.get("state") == "running" and progress.get("seq", 0) > 0:
                if not seen or seen[-1]["seq"] != progress["seq"]:
                    seen.append(progress)
            time.sleep(0.05)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        result = run_playbook(inventory)
    finally:
        stop.set()
        watcher.join()
        holder.__exit__(None, None, None)
    assert result.returncode == 0, result.stdout

    lines = [m for m in LINE.finditer(result.stdout) if m.group(1) == "progress"]
    assert len(lines) >= 3, result.stdout  # at least two while it runs, and the last one
    running, last = lines[:-1], lines[-1]
    files = [int(m.group(3)) for m in running]
    assert len(running) >= 2 and files == sorted(files) and files[0] < files[-1], result.stdout
    assert all(m.group(9).startswith("ETA") for m in running)
    assert last.group(7) == "100" and last.group(9).startswith("done in"), last.group(0)
    assert last.group(3) == last.group(4) == "10", last.group(0)  # every file, and the total is exact
    assert float(last.group(5)) == pytest.approx(10 * 8_000_000 / 2 ** 30, abs=0.01)

    # the shipping waited for the slot, saying who held it, then showed rsync's progress: lines with
    # growing bytes, the last one at 100%
    assert waited and waited[0]["step"] == "shipping", waited
    assert len(WAIT_LINE.findall(result.stdout)) == 1, result.stdout
    shipped = list(SHIP_LINE.finditer(result.stdout))
    assert len(shipped) >= 3, result.stdout
    moving, ship_last = shipped[:-1], shipped[-1]
    sent = [float(m.group(1)) for m in moving]
    assert sent == sorted(sent) and sent[0] < sent[-1] and all(m.group(4).startswith("ETA") for m in moving), sent
    assert ship_last.group(3) == "100" and ship_last.group(4).startswith("done in"), ship_last.group(0)
    assert float(ship_last.group(1)) >= 10 * 8_000_000 / 2 ** 30 - 0.01
    [shipped_name] = server_backups(server_root / "progress")
    checks.assert_backup_matches(server, server_root / "progress" / shipped_name)
    last_ship = json.loads(status_file.read_text())["last_ship"]
    assert last_ship["result"] == "ok" and last_ship["bytes_sent"] > 10 * 8_000_000

    # the status file showed the running step to another process, and the finished run dropped it
    hot = [record for record in seen if record["step"] == "hot pass"]
    assert [record["step"] for record in seen] == ["hot pass"] * len(hot) + ["shipping"] * (len(seen) - len(hot)), seen
    seen = hot
    assert len(seen) >= 2 and seen[0]["step"] == "hot pass" and seen[0]["host"] == "progress", seen
    assert seen[-1]["files_done"] > seen[0]["files_done"] and seen[0]["files_total"] == 10, seen
    status = json.loads(status_file.read_text())
    assert "progress" not in status and status["result"] == "ok"

    # the manifest times the hot pass, and the summary names the longest step with its rate
    manifest = json.loads((root / "latest" / "manifest.json").read_text())
    assert manifest["steps"]["hot pass"]["bytes"] >= 10 * 8_000_000
    assert re.search(r"progress: ok, .*; longest step: [a-z ]+ \d+:\d\d:\d\d at [\d.]+ MB/s", result.stdout), \
        result.stdout

    # check mode says what would be copied and how long the hot pass took the last time
    checked = run_playbook(inventory, check=True)
    assert checked.returncode == 0, checked.stdout
    assert re.search(r"progress: check mode, would back up 10 files .*; the last hot pass took \d+:\d\d:\d\d "
                     r"for [\d.]+ GiB", checked.stdout), checked.stdout
    assert [m for m in LINE.finditer(checked.stdout) if m.group(9).startswith("done in")], checked.stdout

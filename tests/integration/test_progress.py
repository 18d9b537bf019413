"""Progress of the long steps, seen for real: a hot pass of a real Orthanc's archive that lasts
several reporting intervals shows in the play's output as lines with growing counts and a last
one at 100%, and in the host's status file, read by this (other) process while the play runs."""

from __future__ import annotations

import json
import re
import threading
import time

import pytest

from tests.support import checks
from tests.support.playbook import local_host, run_playbook, write_inventory

pytestmark = pytest.mark.slow

LINE = re.compile(r"\(item=(progress) (hot pass): (\d+)/(~?\d+) files, ([\d.]+)/(~?[\d.]+) GiB \((\d+)%\), "
                  r"([\d.]+) MB/s, (ETA [\d:d ?]+|done in [\d:d ]+)\)")


def test_the_hot_pass_shows_its_progress_in_the_play_and_the_status_file(servers, tmp_path):
    server = servers("progress")
    # files copied (not linked) at most 16 MiB/s: a hot pass of about 5 s, ten intervals of 0.5 s
    checks.store_studies(server, tmp_path, patients=1, via="rest", instances=10, pixel_bytes=8_000_000)
    root = tmp_path / "backups"
    status_file = root / "status.json"
    inventory = write_inventory(tmp_path / "inventory.json", {"progress": local_host(
        server, root, orthanc_backup_link_mode="copy", orthanc_backup_settle_seconds=0,
        orthanc_backup_workers=1, orthanc_backup_limit_rate=16 * 1024, orthanc_progress_interval=0.5)})

    seen, stop = [], threading.Event()

    def watch():  # another process's view: the status file while the play runs
        while not stop.is_set():
            try:
                progress = json.loads(status_file.read_text()).get("progress")
            except (OSError, ValueError):
                progress = None
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

    # the status file showed the running step to another process, and the finished run dropped it
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

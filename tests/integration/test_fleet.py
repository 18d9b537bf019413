"""Fleet runs of the backup playbook: HA pairs, a broken host, shipping bounded by the server's slots, the
summary, and the status files; an HA group of five members, --check and --limit; an unreachable
canary. Real Orthanc servers, a real backup server over SSH.

The first test has five private Orthancs: 'broken' (its configuration defines a key twice, as
Orthanc itself would refuse), and two HA pairs a1/a2 and b1/b2. Every stop and start command is
wrapped to append the time to a log, so the tests see when each Orthanc was really down."""

from __future__ import annotations

import datetime
import itertools
import json
import os
import pathlib
import re
import shlex

import pytest

from tests.support import checks, sshd
from tests.support.playbook import local_host, run_playbook
from tests.integration.test_ship import fleet_inventory, server_backups, incomplete
from ansible_collections.pacs.orthanc.plugins.module_utils import _verify

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not sshd.available(), reason="needs openssh-server, ssh and rsync"),
              pytest.mark.skipif(os.geteuid() != 0, reason="runs sshd: needs root")]


def timed_commands(server, log: pathlib.Path) -> dict:
    """Stop and start commands that record when the stop began and when the start ended."""
    stamp = f'echo "%s {server.name} $(date +%%s.%%N)" >> {shlex.quote(str(log))}'
    return {"orthanc_stop_command": f"{stamp % 'stop'} && {server.stop_command()}",
            "orthanc_start_command": f"{server.start_command()} && {stamp % 'start'}"}


def down_intervals(log: pathlib.Path) -> dict:
    """host -> [(stopped, started)] from the log of the wrapped commands."""
    events: dict = {}
    for line in log.read_text().splitlines():
        kind, host, moment = line.split()
        events.setdefault(host, []).append((kind, float(moment)))
    intervals = {}
    for host, items in events.items():
        kinds = [k for k, _t in items]
        assert kinds == ["stop", "start"], (host, items)
        intervals[host] = [(items[0][1], items[1][1])]
    return intervals


NO_MATCH = "Could not match supplied host pattern"


def planned_batches(out: str) -> dict:
    """host -> batch number, from the planning task's lines ("item=a1: batch 1 of 2")."""
    return {host: int(number) for host, number in re.findall(r"\(item=(\S+): batch (\d+) of \d+\)", out)}


def overlap(a: tuple, b: tuple) -> bool:
    return a[0] < b[1] and b[0] < a[1]


def iso_seconds(text: str) -> float:
    return datetime.datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(
        tzinfo=datetime.timezone.utc).timestamp()


@pytest.mark.fault
def test_fleet_with_ha_pairs_a_broken_host_and_a_throttled_server(servers, ssh_server, tmp_path, monkeypatch):
    monkeypatch.setenv("ANSIBLE_SHOW_CUSTOM_STATS", "1")
    log = tmp_path / "downtime.log"
    textfiles = tmp_path / "textfiles"
    names = ["broken", "a1", "b1", "a2", "b2"]
    orthancs = {name: servers(name) for name in names}
    for name in names[1:]:
        checks.store_studies(orthancs[name], tmp_path, patients=1, via="rest", instances=3, pixel_bytes=100_000)
    (orthancs["broken"].config_path / "zz-duplicate.json").write_text('{"HttpPort": 1}')
    broken_pid = orthancs["broken"].pid()
    server_root = tmp_path / "server"
    hosts = {}
    for name, orthanc in orthancs.items():
        extra = dict(timed_commands(orthanc, log), orthanc_backup_textfile_dir=str(textfiles / name))
        if name != "broken":
            extra["orthanc_ha_group"] = f"pair-{name[0]}"
        hosts[name] = local_host(orthanc, tmp_path / f"backups-{name}", **extra)
    inventory = fleet_inventory(tmp_path / "inventory.json", hosts, ssh_server,
                                **ssh_server.ship_vars(server_root, orthanc_ship_max_parallel=1))

    result = run_playbook(inventory, extra_vars={"orthanc_backup_batches": ["100%"]})
    out = result.stdout
    assert result.returncode != 0, out

    # (b) the broken host is named with its step and cause, left running; the others are backed up and shipped
    assert re.search(r"broken: FAILED at 'Read the Orthanc configuration': .*the key 'HttpPort' is defined both in "
                     r".*orthanc.json and in .*zz-duplicate.json \(Orthanc running\)", out), out
    assert "1 of 5 hosts were not backed up: broken: FAILED" in out
    assert orthancs["broken"].answers() and orthancs["broken"].pid() == broken_pid
    assert "4 of 5 hosts backed up (1 failed, 0 not run)" in out and "4 shipped" in out
    for name in names[1:]:
        assert re.search(rf'"{name}: ok, sqlite, 3 instances, .*; shipped to backupsrv:{server_root}/{name}/\d{{8}}T\d{{6}}Z, ', out), out
        [copy] = server_backups(server_root / name)
        checks.assert_backup_matches(orthancs[name], server_root / name / copy)
        assert not incomplete(server_root / name)
        assert orthancs[name].answers()
    assert not (server_root / "broken").exists()

    # (e) members of a pair were never down at the same time; rounds: a1 and b1 went together
    down = down_intervals(log)
    assert set(down) == set(names[1:])  # the broken host was never stopped
    assert not overlap(down["a1"][0], down["a2"][0]), down
    assert not overlap(down["b1"][0], down["b2"][0]), down
    assert overlap(down["a1"][0], down["b1"][0]), down  # same batch: in parallel
    # the plan: the canary with the first members, then the second members; two batches, no warning
    assert planned_batches(out) == {"broken": 1, "a1": 1, "b1": 1, "a2": 2, "b2": 2}, out
    assert out.count("PLAY [Back up Orthanc hosts]") == 2, out
    assert NO_MATCH not in out, out
    # the manifests say the same, measured by the module on the host
    windows = {}
    for name in names[1:]:
        manifest = checks.read_manifest((tmp_path / f"backups-{name}" / "latest").resolve())
        windows[name] = (iso_seconds(manifest["stopped_at"]), iso_seconds(manifest["restarted_at"]))
    assert not overlap(windows["a1"], windows["a2"]) and not overlap(windows["b1"], windows["b2"]), windows

    # one slot on the server (orthanc_ship_max_parallel 1): the transfers, all started at once in the
    # background, never overlapped (each one's times are taken while it holds the slot)
    shipped = {}
    for name in names[1:]:
        status = json.loads((tmp_path / f"backups-{name}" / "status.json").read_text())
        ship = status["last_ship"]
        assert ship["result"] == "ok" and ship["bytes_sent"] > 300_000
        shipped[name] = (iso_seconds(ship["started_at"]), iso_seconds(ship["ended_at"]))
    ordered = sorted(shipped.values())
    assert all(a[1] <= b[0] for a, b in zip(ordered, ordered[1:])), shipped

    # (f) status files and metrics, on success and on failure
    for name in names[1:]:
        status = json.loads((tmp_path / f"backups-{name}" / "status.json").read_text())
        assert status["result"] == "ok" and status["consecutive_failures"] == 0
        success = status["last_success"]
        manifest = checks.read_manifest(pathlib.Path(success["path"]))
        assert success["downtime_seconds"] == manifest["downtime_seconds"] > 0
        assert success["size_bytes"] >= manifest["storage"]["bytes"] > 0 and success["duration_seconds"] > 0
        prom = (textfiles / name / "pacs_orthanc_backup.prom").read_text()
        assert f'pacs_orthanc_backup_last_result{{host="{name}"}} 1' in prom
        stamp = float(re.search(rf'pacs_orthanc_backup_last_success_timestamp_seconds{{host="{name}"}} (\S+)', prom).group(1))
        assert stamp == pytest.approx(iso_seconds(manifest["ended_at"]), abs=0.01)
        for metric in ("last_duration_seconds", "last_size_bytes", "last_downtime_seconds", "last_ship_bytes"):
            assert f"pacs_orthanc_backup_{metric}{{host=\"{name}\"}}" in prom
    status = json.loads((tmp_path / "backups-broken" / "status.json").read_text())
    assert status["result"] == "failed" and status["consecutive_failures"] == 1 and "last_success" not in status
    assert status["last_failure"]["step"] == "Read the Orthanc configuration"
    assert "zz-duplicate.json" in status["last_failure"]["cause"]
    prom = (textfiles / "broken" / "pacs_orthanc_backup.prom").read_text()
    assert 'pacs_orthanc_backup_last_result{host="broken"} 0' in prom
    assert "last_success_timestamp_seconds" not in prom
    assert not list(textfiles.rglob(".tmp-*")) and not list(tmp_path.glob("backups-*/.tmp-*"))

    # AWX: the records published with set_stats carry the shipping
    stats = json.loads(re.search(r"CUSTOM STATS: \*+\s+RUN: (\{.*\})", out).group(1))
    records = {r["host"]: r for r in stats["orthanc_backup_summary"]}
    assert records["broken"]["ok"] is False and records["broken"]["result"] == "failed"
    assert "zz-duplicate.json" in records["broken"]["cause"]
    for name in names[1:]:
        assert records[name]["ok"] is True and records[name]["ship_result"] == "ok"
        assert records[name]["shipped_bytes"] > 300_000 and records[name]["ship_server"] == "backupsrv"
        assert records[name]["ship_path"].startswith(f"{server_root}/{name}/")
    assert stats["orthanc_backup_totals"]["shipped"] == 4 and stats["orthanc_backup_totals"]["failed"] == 1
    for name in names[1:]:
        assert _verify.verify_backup(str(server_root / name / "latest"), md5="all")["ok"]


def test_an_ha_group_of_five_one_member_at_a_time_check_mode_and_limit(servers, tmp_path):
    """Five members of one HA group and a host without group, all in one batch setting
    (["100%"]): the plan puts the lone host and the first member together, then one member per
    batch; no two members are ever down together, and no pattern matches nothing. --check stops
    nothing and writes no backup; --limit backs up only the hosts it names."""
    log = tmp_path / "downtime.log"
    names = ["solo"] + [f"ward-{i}" for i in range(1, 6)]
    orthancs = {name: servers(name) for name in names}
    for name in names:
        checks.store_studies(orthancs[name], tmp_path, patients=1, via="rest", instances=2, pixel_bytes=20_000)
    hosts = {}
    for name, orthanc in orthancs.items():
        extra = timed_commands(orthanc, log)
        if name != "solo":
            extra["orthanc_ha_group"] = "ward"
        hosts[name] = local_host(orthanc, tmp_path / f"backups-{name}", **extra)
    inventory = fleet_inventory(tmp_path / "inventory.json", hosts)
    batches = {"orthanc_backup_batches": ["100%"]}

    dry = run_playbook(inventory, extra_vars=batches, check=True)
    assert dry.returncode == 0, dry.stdout
    for name in names:
        assert re.search(rf'"{name}: check mode, would back up \d+ files', dry.stdout), dry.stdout
        assert not (tmp_path / f"backups-{name}").exists() or not checks.complete_backups(tmp_path / f"backups-{name}")
    assert not log.exists()  # no Orthanc was stopped
    assert NO_MATCH not in dry.stdout, dry.stdout

    result = run_playbook(inventory, extra_vars=batches)
    out = result.stdout
    assert result.returncode == 0, out
    assert NO_MATCH not in out, out
    assert planned_batches(out) == {"solo": 1, "ward-1": 1, "ward-2": 2, "ward-3": 3, "ward-4": 4, "ward-5": 5}, out
    assert out.count("PLAY [Back up Orthanc hosts]") == 5, out
    assert "6 of 6 hosts backed up (0 failed, 0 not run)" in out
    # never two members down at once: the stop and start commands' log, and the manifests
    down = down_intervals(log)
    assert set(down) == set(names)
    windows = {}
    for name in names:
        manifest = checks.read_manifest((tmp_path / f"backups-{name}" / "latest").resolve())
        windows[name] = (iso_seconds(manifest["stopped_at"]), iso_seconds(manifest["restarted_at"]))
        assert windows[name][0] < windows[name][1]
        checks.assert_backup_matches(orthancs[name], (tmp_path / f"backups-{name}" / "latest").resolve())
        assert orthancs[name].answers()
    members = names[1:]
    for a, b in itertools.combinations(members, 2):
        assert not overlap(down[a][0], down[b][0]), (a, b, down)
        assert not overlap(windows[a], windows[b]), (a, b, windows)
    # and one after the other, in inventory order
    assert [down[m][0][0] for m in members] == sorted(down[m][0][0] for m in members), down

    before = {name: checks.complete_backups(tmp_path / f"backups-{name}") for name in names}
    limited = run_playbook(inventory, extra_vars=batches, limit="ward-2,solo,ward-4")
    assert limited.returncode == 0, limited.stdout
    assert NO_MATCH not in limited.stdout, limited.stdout
    assert planned_batches(limited.stdout) == {"solo": 1, "ward-2": 1, "ward-4": 2}, limited.stdout
    assert "3 of 3 hosts backed up (0 failed, 0 not run)" in limited.stdout
    for name in names:
        after = checks.complete_backups(tmp_path / f"backups-{name}")
        assert len(after) == len(before[name]) + (name in ("solo", "ward-2", "ward-4")), (name, before, after)


def test_an_unreachable_canary_stops_the_run_and_the_summary_still_comes(servers, tmp_path):
    """The canary cannot be reached (SSH to a closed port): its batch failed, no later batch
    starts, and every host is still reported; with orthanc_backup_max_fail_percentage 100 the
    others are backed up all the same."""
    server = servers("pacs-2")
    checks.store_studies(server, tmp_path, patients=1, via="rest", instances=2, pixel_bytes=20_000)
    pid = server.pid()
    gone = {"ansible_connection": "ssh", "ansible_host": "127.0.0.1", "ansible_port": 9, "ansible_user": "nobody",
            "ansible_ssh_common_args": "-o ConnectTimeout=5 -o BatchMode=yes"}
    inventory = fleet_inventory(tmp_path / "inventory.json", {
        "pacs-1": gone, "pacs-2": local_host(server, tmp_path / "backups-2")})

    stopped = run_playbook(inventory)
    out = stopped.stdout
    assert stopped.returncode != 0, out
    assert "1 of 1 hosts of batch 1 of 2 were not backed up, more than orthanc_backup_max_fail_percentage (50%): " \
           "no later batch starts" in out, out
    assert '"pacs-1: NOT BACKED UP' in out and '"pacs-2: NOT BACKED UP' in out, out
    assert "0 of 2 hosts backed up (0 failed, 2 not run)" in out and "2 of 2 hosts were not backed up" in out
    assert not (tmp_path / "backups-2").exists() and server.pid() == pid

    tried = run_playbook(inventory, extra_vars={"orthanc_backup_max_fail_percentage": 100})
    assert tried.returncode != 0, tried.stdout
    assert "1 of 2 hosts backed up (0 failed, 1 not run)" in tried.stdout, tried.stdout
    assert "1 of 2 hosts were not backed up: pacs-1: NOT BACKED UP" in tried.stdout
    [backup] = checks.complete_backups(tmp_path / "backups-2")
    checks.assert_backup_matches(server, tmp_path / "backups-2" / backup)
    assert NO_MATCH not in stopped.stdout + tried.stdout

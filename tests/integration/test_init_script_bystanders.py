"""A stop through an init script that stops by program (Debian's /etc/init.d/orthanc:
``start-stop-daemon --stop --exec /usr/sbin/Orthanc``, no PID file) would end every Orthanc of the
host, those in containers too, and nothing would start them again. The backup refuses that stop,
names the processes, and says which command stops only its own Orthanc. Real processes: private
Orthancs of Debian's package, and a program at /usr/sbin/Orthanc in a mount namespace of its own
(what a container's Orthanc looks like from the host)."""

from __future__ import annotations

import os
import re
import secrets
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.support import checks
from tests.support.playbook import local_host, run_module, run_playbook, write_inventory
from tests.integration.test_restore import CONFIRM, backed_up, contents, failure_line
from ansible_collections.pacs.orthanc.plugins.module_utils import _control

pytestmark = pytest.mark.slow

PROGRAM = "/usr/sbin/Orthanc"

# Debian's init script, reduced to what matters here, with a stop that only tests (--test): if the
# guard failed to refuse, the stop would change nothing and the backup would time out waiting.
SCRIPT = """#!/bin/sh
DAEMON={program}
PIDFILE={pidfile}
case "$1" in
    stop)
    start-stop-daemon --stop --quiet --retry=TERM/30/KILL/5 --pidfile $PIDFILE --name Orthanc --test
    start-stop-daemon --stop --quiet --oknodo --retry=0/1/KILL/5 --exec $DAEMON --test
    ;;
esac
exit 0
"""


@pytest.fixture
def init_script():
    """An init script /etc/init.d/pacs-test-<hex> like Debian's (stops by program), removed after."""
    name = f"pacs-test-{secrets.token_hex(4)}"
    path = Path(_control.INIT_DIR) / name
    if not os.access(_control.INIT_DIR, os.W_OK):
        pytest.fail(f"{_control.INIT_DIR} is not writable: these tests run as root")
    path.write_text(SCRIPT.format(program=PROGRAM, pidfile=f"/run/{name}.pid"))
    path.chmod(0o755)
    try:
        yield name
    finally:
        path.unlink()


def named(text: str) -> set:
    """The PIDs a refusal names: the first five described ("PID 12 (...)"), the rest listed ("and
    PIDs 13, 14"). Other tests' Orthancs, and containers', run beside these on a busy machine."""
    match = re.search(r"would end with it and stay stopped: (.*?)\. Nothing was stopped", text)
    assert match, text
    pids = {int(pid) for pid in re.findall(r"PID (\d+) \(", match.group(1))}
    rest = re.search(r"; and PIDs ([\d, ]+)$", match.group(1))
    if rest:
        pids |= {int(pid) for pid in rest.group(1).split(", ")}
    return pids


def in_own_mount_namespace(tmp_path: Path) -> subprocess.Popen:
    """A process whose program reads /usr/sbin/Orthanc from the host but is another file (sleep,
    bind-mounted there in a mount namespace of its own): an Orthanc in a container."""
    proc = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                             f"mount --bind {shutil.which('sleep')} {PROGRAM} && exec {PROGRAM} 300"],
                            start_new_session=True)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            if os.readlink(f"/proc/{proc.pid}/exe") == PROGRAM:
                return proc
        except OSError:
            pass
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("the process in its own mount namespace did not start")


def test_the_processes_an_init_script_stop_would_end(servers, tmp_path, monkeypatch):
    """Listed: a private Orthanc of the same program and a "container's" one; not listed: the
    service's own (its PID file), nor anything when the script stops by PID file only."""
    own, other = servers("own"), servers("other")
    monkeypatch.setattr(_control, "INIT_DIR", str(tmp_path))
    pidfile = tmp_path / "orthanc.pid"
    pidfile.write_text(f"{own.pid()}\n")
    (tmp_path / "orthanc").write_text(SCRIPT.format(program=PROGRAM, pidfile=pidfile))
    container = in_own_mount_namespace(tmp_path)
    try:
        script, program, found_pidfile, found = _control.init_script_bystanders("orthanc")
        pids = dict(found)
        assert (script, program, found_pidfile) == (str(tmp_path / "orthanc"), PROGRAM, str(pidfile))
        assert own.pid() not in pids
        assert pids[other.pid()].startswith(PROGRAM) and str(other.config_path) in pids[other.pid()]
        assert pids[container.pid] == "in another mount namespace: a container"
        # this Orthanc found otherwise (the one on its REST port), as for a service without its PID file
        assert _control.listening_pids(other.http_port) == {other.pid()}
        assert other.pid() not in dict(_control.init_script_bystanders("orthanc", {other.pid()})[3])
        # a script whose every stop names its PID file ends no other process: nothing to refuse
        (tmp_path / "byfile").write_text(re.sub(r"--exec \$DAEMON", "--pidfile $PIDFILE --exec $DAEMON",
                                                SCRIPT.format(program=PROGRAM, pidfile=pidfile)))
        assert _control.init_script_bystanders("byfile") == ("", "", "", [])
        assert _control.init_script_bystanders("absent") == ("", "", "", [])
    finally:
        container.kill()
        container.wait()


def test_the_module_refuses_such_a_stop_and_stops_nothing(servers, init_script):
    """This Orthanc is not in the script's PID file, but it answers at the URL given: it is the one
    to stop, never counted; the other Orthanc of the host is."""
    server, other = servers("service"), servers("other")
    pid = other.pid()
    args = {"state": "stopped", "url": server.url, "service_name": init_script, "timeout": 10}
    for check in (True, False):  # check mode says the same
        result = run_module("orthanc_control", args, check=check)
        assert result["failed"] and result["step"] == "stop Orthanc", result
        assert f"/etc/init.d/{init_script} stop' ends every process running {PROGRAM}" in result["msg"]
        assert pid in named(result["msg"]) and "Nothing was stopped." in result["msg"]
        assert (f"set orthanc_stop_command to 'start-stop-daemon --stop --retry=TERM/60 --pidfile "
                f"/run/{init_script}.pid --exec {PROGRAM}' and orthanc_start_command to "
                f"'service {init_script} start'") in result["msg"]
        assert pid in result["bystanders"] and server.pid() not in result["bystanders"]
        assert server.pid() not in named(result["msg"])
        assert other.pid() == pid and other.answers() and server.answers()


def test_a_backup_through_such_a_service_fails_before_the_stop(servers, tmp_path, init_script):
    """The backup role: the failure names the host, the step and the cause; Orthanc never
    stopped; no backup written."""
    server, other = servers("service"), servers("other")
    checks.store_studies(server, tmp_path, patients=1, via="rest")
    pid, other_pid = server.pid(), other.pid()
    root = tmp_path / "backups"
    host = local_host(server, root, orthanc_stop_command="", orthanc_start_command="",
                      orthanc_service_name=init_script)
    inventory = write_inventory(tmp_path / "inventory.json", {"service": host})
    result = run_playbook(inventory)
    assert result.returncode != 0, result.stdout
    assert re.search(r"Backup of service failed at step 'Check that Orthanc can be stopped alone': .*'/etc/init\.d/"
                     + re.escape(init_script) + r" stop' ends every process running", result.stdout), result.stdout
    assert "TASK [pacs.orthanc.backup : Copy the storage while Orthanc runs]" not in result.stdout
    assert other_pid in named(result.stdout) and pid not in named(result.stdout)
    assert server.pid() == pid and server.answers() and other.pid() == other_pid and other.answers()
    assert not root.exists() or not [p for p in root.iterdir() if p.name != "status.json"]


def test_a_restore_through_such_a_service_fails_before_anything_moves(servers, tmp_path, init_script):
    """The restore role: refused right after reading this Orthanc, before the verification and
    before any folder is moved aside; "Nothing was changed" is true."""
    server, _inventory, backup = backed_up(servers, tmp_path, name="service")
    other = servers("other")
    pid, stored = server.pid(), contents(server)
    host = local_host(server, tmp_path / "backups", orthanc_stop_command="", orthanc_start_command="",
                      orthanc_service_name=init_script)
    inventory = write_inventory(tmp_path / "restore.json", {"service": host})
    result = run_playbook(inventory, playbook="restore.yml", extra_vars=CONFIRM)
    assert result.returncode != 0, result.stdout
    line = failure_line(result.stdout, "service")
    assert "'Check that Orthanc can be stopped alone'" in line and "ends every process running" in line, line
    assert other.pid() in named(line) and pid not in named(line) and "Nothing was changed." in line, line
    assert "TASK [pacs.orthanc.restore : Verify the backup]" not in result.stdout
    assert server.pid() == pid and contents(server) == stored
    assert not list(server.root.glob("*.pre-restore-*")) and backup.is_dir()

"""What the collection says about Orthanc's state, on real Orthanc servers.

Any HTTP answer means Orthanc runs, so a refused password is reported as a refusal (HTTP 401),
never as an Orthanc that is down; "not answering" is said only when nothing answers on its port,
"not running" only when its process is gone, with the command that starts it."""

from __future__ import annotations

import base64
import hashlib
import os
import re
import shlex
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request

import pytest

from tests.support import checks, procs
from tests.support.orthanc_server import ORTHANC_BIN
from tests.support.playbook import local_host, run_module, run_playbook, write_inventory

pytestmark = [pytest.mark.slow, pytest.mark.fault]

_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def secret() -> str:
    return "pw-" + hashlib.sha256(os.urandom(8)).hexdigest()[:16]


def status_with(url: str, user: str, password: str):
    """The HTTP status of GET /system with these credentials; None when nothing answers."""
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    request = urllib.request.Request(url + "/system", headers={"Authorization": "Basic " + token})
    try:
        with _opener.open(request, timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return None


class Watch:
    """Polls an Orthanc's PID and its answers in a thread while a playbook runs: the PIDs seen
    and how often it did not answer HTTP."""

    def __init__(self, server):
        self.server, self.pids, self.silent, self.looks = server, set(), 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.pids.add(self.server.pid())
            self.looks += 1
            if status_with(self.server.url, "nobody", "nothing") is None:
                self.silent += 1
            time.sleep(0.05)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        return False


def no_down_words(text: str) -> None:
    lowered = text.lower()
    assert "not answering" not in lowered and "not running" not in lowered, text


def test_the_probe_module_tells_each_state_apart(servers, tmp_path):
    password = secret()
    server = servers("probe", extra_config={"AuthenticationEnabled": True, "RegisteredUsers": {"backup": password}})
    args = {"url": server.url, "config_path": str(server.config_path), "start_command": server.start_command(),
            "timeout": 1}
    answering = run_module("orthanc_probe", dict(args, username="backup", password=password))
    assert answering["state"] == "answering" and answering["http_status"] == 200 and answering["orthanc_running"]

    wrong = run_module("orthanc_probe", dict(args, username="backup", password="wrong-" + password))
    assert not wrong.get("failed"), wrong
    assert wrong["state"] == "refused" and wrong["http_status"] == 401 and wrong["orthanc_running"]
    assert wrong["message"] == f"Orthanc answered HTTP 401 at {server.url}: it refused the credentials"
    assert password not in str(wrong)
    anonymous = run_module("orthanc_probe", args)
    assert anonymous["state"] == "refused" and "it requires credentials and none were given" in anonymous["message"]

    pid = server.pid()
    os.kill(pid, signal.SIGSTOP)  # the process is there, its port accepts, nothing answers
    try:
        frozen = run_module("orthanc_probe", dict(args, username="backup", password=password))
    finally:
        os.kill(pid, signal.SIGCONT)
    assert frozen["state"] == "not answering" and frozen["http_status"] is None and not frozen["orthanc_running"]
    assert frozen["pids"] == [pid] and frozen["reason"] == "no answer within 1 s"
    assert f"although its process runs (PID {pid})" in frozen["message"]

    os.kill(pid, signal.SIGKILL)
    assert wait_for(lambda: server.pid() is None)
    gone = run_module("orthanc_probe", dict(args, username="backup", password=password))
    assert gone["state"] == "not running" and gone["pids"] == [] and gone["reason"] == "Connection refused"
    assert gone["message"] == f"ORTHANC IS NOT RUNNING: start it with '{server.start_command()}'"
    server.start()


def test_a_wrong_password_is_a_refusal_and_orthanc_is_never_stopped(servers, tmp_path):
    password = secret()
    server = servers("secure", extra_config={"AuthenticationEnabled": True, "RegisteredUsers": {"backup": password}})
    checks.store_studies(server, tmp_path, patients=1, via="rest")
    root = tmp_path / "backups"
    inventory = write_inventory(tmp_path / "inventory.json", {"secure": local_host(
        server, root, orthanc_username="backup", orthanc_password="wrong-" + password)})
    pid = server.pid()
    with Watch(server) as watch:
        result = run_playbook(inventory)
    assert result.returncode != 0, result.stdout
    # Orthanc answered every look, with the same process, from start to end
    assert watch.looks > 0 and watch.silent == 0 and watch.pids == {pid}, (watch.pids, watch.silent)
    assert server.pid() == pid and server.answers()
    refusal = f"Orthanc answered HTTP 401 at {server.url}: it refused the credentials"
    # the host's message
    message = re.search(r"Backup of secure failed at step '([^']*)': (.*)", result.stdout)
    assert message and message.group(1) == "Read the Orthanc configuration", result.stdout
    assert refusal in message.group(2) and "Orthanc was left as it was before the backup: it runs." in message.group(2)
    # the summary line, and the run's final error, which repeats it
    line = ("secure: FAILED at 'Read the Orthanc configuration': " + refusal
            + " (Orthanc answered HTTP 401: it refused the credentials)")
    assert result.stdout.count(line) >= 2, result.stdout
    assert "1 of 1 hosts were not backed up: " + line in result.stdout
    no_down_words(result.stdout)
    assert password not in result.stdout
    assert not [p for p in root.iterdir() if p.name != "status.json"]  # nothing but the monitoring status


def test_an_orthanc_restarted_with_other_credentials_is_said_to_refuse_them(servers, tmp_path):
    """The configuration changed on disk before the backup's restart (an operator edited the
    password and has not restarted Orthanc yet): the restarted Orthanc runs and refuses the
    credentials of the inventory. The backup itself is complete; the run says what Orthanc
    answered, never that it is down."""
    old, new = secret(), secret()
    server = servers("rotated", extra_config={"AuthenticationEnabled": True, "RegisteredUsers": {"backup": old}})
    checks.store_studies(server, tmp_path, patients=1, via="rest")
    root = tmp_path / "backups"
    main = server.config_path / "orthanc.json"
    stop = f"sed -i 's/{old}/{new}/' {main} && {server.stop_command()}"
    # started as a service would be, detached, without waiting for an answer with any password
    # (the test harness's own start waits for one with the password it was given)
    start = (f"setsid {shlex.quote(ORTHANC_BIN)} --logdir={shlex.quote(str(server.log_dir))} "
             f"{shlex.quote(str(server.config_path))} </dev/null >>{shlex.quote(str(server.log_dir / 'stdout.log'))} "
             f"2>&1 & echo $! >{shlex.quote(str(server.pidfile))}")
    inventory = write_inventory(tmp_path / "inventory.json", {"rotated": local_host(
        server, root, orthanc_username="backup", orthanc_password=old, orthanc_stop_command=stop,
        orthanc_start_command=start, orthanc_backup_settle_seconds=0)})
    pid = server.pid()
    result = run_playbook(inventory)
    assert result.returncode == 0, result.stdout
    assert server.pid() not in (None, pid)  # stopped for the capture, and started again
    assert status_with(server.url, "backup", old) == 401 and status_with(server.url, "backup", new) == 200
    assert (f"Orthanc was started again and runs, but Orthanc answered HTTP 401 at {server.url}: it refused "
            "the credentials") in " ".join(result.stdout.split())
    assert "rotated: ok, sqlite, 3 instances" in result.stdout
    no_down_words(result.stdout)
    assert old not in result.stdout and new not in result.stdout


def wait_for(predicate, timeout=30.0, step=0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return False


def test_orthanc_killed_during_a_failed_run_is_said_not_running(servers, tmp_path):
    server = servers("killed")
    # big files, so that the hot pass is caught copying
    checks.store_studies(server, tmp_path, patients=1, via="rest", instances=4, pixel_bytes=60_000_000)
    root = tmp_path / "backups"
    inventory = write_inventory(tmp_path / "inventory.json", {"killed": local_host(
        server, root, orthanc_backup_link_mode="copy", orthanc_backup_settle_seconds=0)})
    pid = server.pid()
    play = run_playbook(inventory, pipelining=False, popen=True)  # the module's name shows in ps
    killed = None
    deadline = time.monotonic() + 300
    while killed is None and play.poll() is None and time.monotonic() < deadline:
        module = procs.module_processes(play.pid, "storage_copy")
        if module and list(root.glob("*.incomplete/storage/*/*/*.part")):
            # Orthanc dies outright, and the run fails there: the hot pass is killed too
            os.kill(pid, signal.SIGKILL)
            for victim in module:
                os.kill(victim, signal.SIGKILL)
            killed = module
        time.sleep(0.005)
    output = play.communicate(timeout=300)[0]
    assert killed, "the hot pass was never caught copying:\n" + output
    assert play.returncode != 0, output
    assert server.pid() is None and not server.answers()
    message = re.search(r"Backup of killed failed at step '([^']*)': (.*)", output)
    assert message and "hot pass" in message.group(1), output
    start = re.search(r"ORTHANC IS NOT RUNNING on killed: start it with '(.*?)'\.", message.group(2))
    assert start and start.group(1) == server.start_command(), message.group(0)
    assert "not answering" not in output.lower()
    assert re.search(r"killed: FAILED at 'Copy the storage while Orthanc runs \(hot pass\)': .*\(ORTHANC NOT RUNNING\)",
                     output), output
    # the command the message gives does start it
    subprocess.run(start.group(1), shell=True, check=True, timeout=60)
    assert server.answers() and server.statistics()["CountInstances"] == 4
    assert not [p for p in root.iterdir() if p.name.endswith(".incomplete")]


def detached_start(server) -> str:
    """A start command as a service's: Orthanc detached, no wait for an answer with any password
    (the test harness's own start waits for one with the password the server was created with)."""
    return (f"setsid {shlex.quote(ORTHANC_BIN)} --logdir={shlex.quote(str(server.log_dir))} "
            f"{shlex.quote(str(server.config_path))} </dev/null >>{shlex.quote(str(server.log_dir / 'stdout.log'))} "
            f"2>&1 & echo $! >{shlex.quote(str(server.pidfile))}")


def test_a_restored_orthanc_that_refuses_the_credentials_is_rolled_back(servers, tmp_path):
    """The password was changed after the backup: the restored configuration brings the old one
    back, so the restored Orthanc runs and answers 401. The restore is rolled back (Orthanc is
    stopped although it refuses the credentials, and started on the previous data), and the
    message says what Orthanc answered."""
    old, new = secret(), secret()
    server = servers("restored", extra_config={"AuthenticationEnabled": True, "RegisteredUsers": {"backup": old}})
    checks.store_studies(server, tmp_path, patients=1, via="rest")
    hostvars = dict(orthanc_username="backup", orthanc_backup_settle_seconds=0,
                    orthanc_start_command=detached_start(server))
    root = tmp_path / "backups"
    host = local_host(server, root, orthanc_password=old, **hostvars)
    inventory = write_inventory(tmp_path / "old.json", {"restored": host})
    assert run_playbook(inventory).returncode == 0
    # the password changes: in the configuration, Orthanc restarted, and in the inventory
    server.stop()
    main = server.config_path / "orthanc.json"
    main.write_text(main.read_text().replace(old, new))
    subprocess.run(detached_start(server), shell=True, check=True)
    assert wait_for(lambda: status_with(server.url, "backup", new) == 200)
    pid = server.pid()
    host = local_host(server, root, orthanc_password=new, **hostvars)
    inventory = write_inventory(tmp_path / "new.json", {"restored": host})
    result = run_playbook(inventory, playbook="restore.yml", extra_vars={"orthanc_restore_confirm": True})
    assert result.returncode != 0, result.stdout
    line = re.search(r"Restore of restored failed at step '([^']*)': (.*)", result.stdout)
    assert line and line.group(1) == "Read the restored Orthanc", result.stdout
    assert line.group(2) == (f"Orthanc answered HTTP 401 at {server.url}: it refused the credentials. "
                             "The previous data was put back and Orthanc runs on it."), line.group(0)
    no_down_words(result.stdout)
    assert old not in result.stdout and new not in result.stdout
    # Orthanc runs on the previous data, with the current password
    assert server.pid() not in (None, pid) and status_with(server.url, "backup", new) == 200
    assert new in main.read_text() and not list(server.root.glob("*.pre-restore-*"))

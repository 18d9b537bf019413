# -*- coding: utf-8 -*-
# Copyright: pacs.orthanc contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Stopping and starting Orthanc, through its service, given shell commands or its container (one
container, by id: ``docker|podman stop -t N`` / ``start``, never ``down``), and waiting until it
really is stopped (REST API silent, index lock released) or answering."""

from __future__ import annotations

import os
import re
import shutil
import time
import urllib.parse

from ansible_collections.pacs.orthanc.plugins.module_utils import _container, _probe, _sqlite
from ansible_collections.pacs.orthanc.plugins.module_utils._common import PacsError, iso, run_command, utc_now

__metaclass__ = type

POLL = 0.02  # seconds between two looks: part of the downtime, so kept short
INIT_DIR = "/etc/init.d"
GUARDIAN_DIR = "/var/tmp"
GUARDIAN_TAG = "pacs-orthanc-guardian"


def service_argv(name: str, action: str) -> list:
    if os.path.isdir("/run/systemd/system") and shutil.which("systemctl"):
        return [shutil.which("systemctl"), action, name]
    if shutil.which("service"):
        return [shutil.which("service"), name, action]
    script = os.path.join(INIT_DIR, name)
    if os.path.exists(script):
        return [script, action]
    raise PacsError(f"{action} Orthanc", f"neither systemctl, service nor {script} can {action} '{name}'")


_INIT_VARIABLE = re.compile(r"""^\s*(DAEMON|PIDFILE)=["']?([^\s"']+)""", re.M)
# a stop by program alone: a start-stop-daemon line with --stop and --exec but no --pidfile
_STOP_BY_PROGRAM = re.compile(r"^[^#\n]*start-stop-daemon[^\n]*--stop(?![^\n]*--pidfile)[^\n]*--exec", re.M)


def _read_pid(path: str):
    try:
        with open(path, encoding="ascii", errors="replace") as handle:
            return int(handle.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def listening_pids(port: int) -> set:
    """The PIDs of the processes of this network namespace that listen on TCP ``port`` (from
    /proc/net/tcp and tcp6, and the socket descriptors in /proc/PID/fd): the Orthanc whose REST
    API answers there. Empty when none is found or /proc cannot tell."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table, encoding="ascii", errors="replace") as handle:
                next(handle, None)
                for line in handle:
                    fields = line.split()
                    # local address "ADDR:PORT" in hexadecimal; state 0A is LISTEN
                    if len(fields) > 9 and fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                        inodes.add(f"socket:[{fields[9]}]")
        except (OSError, ValueError, IndexError):
            continue
    found = set()
    if not inodes:
        return found
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            for fd in os.listdir(f"/proc/{entry}/fd"):
                if os.readlink(f"/proc/{entry}/fd/{fd}") in inodes:
                    found.add(int(entry))
                    break
        except OSError:  # gone, or not ours to read
            continue
    return found


def init_script_bystanders(service_name: str, own=()) -> tuple:
    """(script, program, pid file, [(pid, what)]): the Orthanc processes other than the service's
    own that its init script's stop would end too. Debian's /etc/init.d/orthanc stops by program
    (``start-stop-daemon --stop --exec /usr/sbin/Orthanc``, no PID file): every process whose
    /proc/PID/exe reads that path, a private instance of the same package and an Orthanc in a
    container (another mount namespace: the path inside it reads the same), and nothing starts
    them again. ``own``: PIDs of this Orthanc found otherwise (the one listening on its REST port,
    the holder of its index lock), never counted: a service started without its PID file.
    ("", "", "", []) when there is no such script or it stops by PID file only."""
    script = os.path.join(INIT_DIR, service_name)
    try:
        with open(script, encoding="utf-8", errors="replace") as handle:
            text = handle.read()
    except OSError:
        return "", "", "", []
    variables = dict(_INIT_VARIABLE.findall(text))
    program, pidfile = variables.get("DAEMON", ""), variables.get("PIDFILE", "")
    if not program or not _STOP_BY_PROGRAM.search(text):
        return "", "", "", []
    own_pid = _read_pid(pidfile) if pidfile else None
    try:
        own_namespace = os.readlink("/proc/self/ns/mnt")
    except OSError:
        own_namespace = None
    found = []
    for entry in sorted((e for e in os.listdir("/proc") if e.isdigit()), key=int):
        pid = int(entry)
        if pid == own_pid or pid == os.getpid() or pid in own:
            continue
        try:
            exe = os.readlink(f"/proc/{pid}/exe")
        except OSError:  # gone, a kernel thread, or not ours to read
            continue
        if exe not in (program, program + " (deleted)"):
            continue
        try:
            elsewhere = own_namespace is not None and os.readlink(f"/proc/{pid}/ns/mnt") != own_namespace
        except OSError:
            elsewhere = False
        if elsewhere:
            found.append((pid, "in another mount namespace: a container"))
        else:
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as handle:
                    argv = handle.read().rstrip(b"\0").split(b"\0")
                line = " ".join(a.decode("utf-8", "replace") for a in argv)
                # the end names the instance (its configuration): kept when the line is cut
                found.append((pid, line if len(line) <= 200 else line[:40] + " ... " + line[-155:]))
            except OSError:
                continue
    return script, program, pidfile, found


class Controller:
    """One Orthanc: how to reach it, stop it and start it."""

    def __init__(self, url: str, username=None, password=None, service_name: str = "orthanc",
                 stop_command=None, start_command=None, container=None, container_engine=None):
        self.url, self.auth = url, (username, password)
        self.service_name = service_name
        self.stop_command, self.start_command = stop_command, start_command
        # a container (name or id) of engine container_engine (docker|podman): stopped and started
        # alone, with a stop timeout that never lets the engine SIGKILL Orthanc mid-write
        self.container = container
        self.engine = None
        if container:
            self.engine = (_container.find_container("auto", container=container).engine
                           if container_engine in (None, "", "auto") else _container.Engine(container_engine))
        self.last = None  # the last answer (_probe.ask), for messages

    def answers(self, timeout: float = 1) -> bool:
        """Whether Orthanc answers HTTP at all. A 401 or 403 counts: that Orthanc runs (it is
        not stopped yet, or it is started), it only refuses the credentials (see ``refused``)."""
        self.last = _probe.ask(self.url, *self.auth, timeout=timeout)
        return self.last["http_status"] is not None

    def refused(self):
        """The last answer when it refused the credentials (a PacsError to raise or warn), else None."""
        if self.last and self.last["state"] == _probe.REFUSED:
            return _probe.refused_error(self.last)
        return None

    def _silence(self) -> str:
        reason = (self.last or {}).get("reason")
        return f" ({reason})" if reason else ""

    def _argv(self, action: str, timeout: float = 0) -> list:
        if self.container:
            if action == "stop":
                return self.engine.stop_argv(self.container, self.engine_stop_timeout(timeout))
            return self.engine.start_argv(self.container)
        command = self.stop_command if action == "stop" else self.start_command
        return ["/bin/sh", "-c", command] if command else service_argv(self.service_name, action)

    @staticmethod
    def engine_stop_timeout(timeout: float) -> int:
        """The seconds a container engine waits for Orthanc to exit before it sends SIGKILL."""
        return int(max(timeout, _container.STOP_TIMEOUT))

    def describe(self, action: str = "start") -> str:
        """The command that starts (or stops) this Orthanc, for messages."""
        argv = self._argv(action)
        if argv[:2] == ["/bin/sh", "-c"]:
            return argv[2]
        return " ".join([os.path.basename(argv[0])] + argv[1:])

    def stop(self, index_file=None, timeout: float = 60, check_mode: bool = False) -> dict:
        """Stop Orthanc unless it is stopped; return when its API is silent and its index free."""
        began, t0 = utc_now(), time.monotonic()
        holder = _sqlite.lock_holder(index_file) if index_file and os.path.exists(index_file) else None
        needed = holder is not None or self.answers()
        if self.container and not needed:  # a container that runs but whose Orthanc is silent is stopped too
            found = self.engine.inspect(self.container, "stop Orthanc's container")
            needed = found is not None and found.running
        if needed and not self.container and not self.stop_command:
            self._refuse_bystanders(index_file)
        if needed and not check_mode:
            argv = self._argv("stop", timeout)
            if self.container:
                # the engine waits for Orthanc as long as it takes (its own default is 10 s, then SIGKILL)
                timeout = self.engine_stop_timeout(timeout) + 30
            run_command(argv, "stop Orthanc", env=self.engine.env if self.engine else None, timeout=timeout)
            deadline = t0 + timeout
            while self.answers():
                if time.monotonic() > deadline:
                    raise PacsError("stop Orthanc", f"Orthanc still answers at {self.url} {timeout:.0f} s after the stop "
                                    f"(HTTP {self.last['http_status']})")
                time.sleep(POLL)
            if index_file and os.path.exists(index_file):
                _sqlite.wait_until_free(index_file, max(0.0, deadline - time.monotonic()), poll=POLL)
        return self._times(needed, began, t0)

    def _refuse_bystanders(self, index_file=None) -> None:
        """Refuse a stop through an init script that would end other Orthanc processes too."""
        if service_argv(self.service_name, "stop")[0].endswith("systemctl"):
            return  # systemd stops the unit's own processes (its cgroup), nothing else
        own = set()
        parsed = urllib.parse.urlsplit(self.url)
        if parsed.hostname in ("localhost", "127.0.0.1", "::1", "0.0.0.0") or (parsed.hostname or "").startswith("127."):
            try:
                own = listening_pids(parsed.port or (443 if parsed.scheme == "https" else 80))
            except ValueError:  # a port that is not a number: the message names every process
                own = set()
        if index_file and os.path.exists(index_file):
            holder = _sqlite.lock_holder(index_file)
            if holder:
                own.add(holder)
        script, program, pidfile, found = init_script_bystanders(self.service_name, own)
        if not found:
            return
        shown = "; ".join(f"PID {pid} ({what})" for pid, what in found[:5])
        if len(found) > 5:  # every one named, the first five described
            shown += "; and PIDs " + ", ".join(str(pid) for pid, _what in found[5:])
        how = (f"set orthanc_stop_command to 'start-stop-daemon --stop --retry=TERM/60 --pidfile {pidfile} --exec "
               f"{program}' and orthanc_start_command to 'service {self.service_name} start'" if pidfile else
               "set orthanc_stop_command and orthanc_start_command to commands that stop and start this one alone")
        raise PacsError("stop Orthanc", f"'{script} stop' ends every process running {program}, and {len(found)} "
                        f"other than this service's would end with it and stay stopped: {shown}. Nothing was "
                        f"stopped. To stop only this Orthanc, {how}", bystanders=[pid for pid, _what in found])

    def start(self, timeout: float = 60, grace: float = 0, check_mode: bool = False) -> dict:
        """Start Orthanc unless it answers; return when it answers. An Orthanc that answers is
        first given ``grace`` seconds to finish a stop in progress."""
        began, t0 = utc_now(), time.monotonic()
        answering = self.answers()
        deadline = t0 + grace
        while answering and time.monotonic() < deadline:
            time.sleep(0.2)
            answering = self.answers()
        if not answering and not check_mode:
            argv = self._argv("start")
            run_command(argv, "start Orthanc", env=self.engine.env if self.engine else None, timeout=timeout)
            deadline = time.monotonic() + timeout
            while not self.answers():
                if time.monotonic() > deadline:
                    log = (f"{self.engine.name} logs {self.container}" if self.container else "Orthanc's log")
                    raise PacsError("start Orthanc", f"nothing answers at {self.url}{self._silence()} "
                                    f"{timeout:.0f} s after '{' '.join(argv)}': look at {log}")
                time.sleep(POLL)
        result = self._times(not answering, began, t0)
        if self.last:
            result.update({"orthanc_state": self.last["state"], "orthanc_http_status": self.last["http_status"]})
        return result

    @staticmethod
    def _times(changed: bool, began, t0: float) -> dict:
        ended = utc_now()
        return {"changed": changed, "began_at": iso(began), "began_ts": began.timestamp(),
                "ended_at": iso(ended), "ended_ts": ended.timestamp(), "seconds": round(time.monotonic() - t0, 3)}


# A guardian: a small detached process that starts Orthanc again if the process that stopped it
# dies before it could (SIGKILL, an interrupted ansible-playbook that takes its workers down, an
# OOM kill). It watches that process, and exits quietly once the marker file says that the
# stopper is done with Orthanc. It needs no credentials: any HTTP answer means Orthanc is up.
_GUARDIAN = r"""
import json, os, subprocess, sys, time, urllib.error, urllib.request
# argv[1] is the tag "pacs-orthanc-guardian", so that ps shows what this process is
watched, marker, url, argv, timeout = int(sys.argv[2]), sys.argv[3], sys.argv[4], json.loads(sys.argv[5]), float(sys.argv[6])
report = marker + ".guardian"

def alive(pid):
    try:
        with open("/proc/%d/stat" % pid) as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False

def answers():
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        opener.open(url.rstrip("/") + "/system", timeout=1).close()
        return True
    except urllib.error.HTTPError:
        return True
    except Exception:
        return False

while alive(watched) and not os.path.exists(marker):
    time.sleep(0.1)
if os.path.exists(marker):
    os.unlink(marker)
    sys.exit(0)
started = time.time()
note = {"watched_pid": watched, "noticed_at": started, "starts": 0, "result": "Orthanc did not answer"}
stable_since, next_start = None, 0.0
while time.time() - started < timeout:
    if os.path.exists(marker):  # someone else started Orthanc (the role's own start)
        note["result"] = "released after another start"
        break
    if answers():
        # a stop may still be under way: only an Orthanc that keeps answering is up
        stable_since = stable_since or time.time()
        if time.time() - stable_since >= 10:
            note["result"] = "Orthanc answers"
            break
    else:
        stable_since = None
        if time.time() >= next_start:
            note["starts"] += 1
            rc = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                timeout=timeout, check=False).returncode
            note["last_start_status"] = rc
            # the stop the dead process began may still be under way (a container engine refuses
            # to start a container that is stopping, and the stop then wins): after a refused
            # start try again in 2 s, after an accepted one give Orthanc 10 s to answer; a burst
            # of attempts while the stop ran left a slow host's Orthanc stopped
            next_start = time.time() + (2 if rc else 10)
    time.sleep(0.2)
with open(report, "w") as handle:
    json.dump(note, handle)
"""


def guardian_marker(url: str, workdir: str | None = None) -> str:
    """The file that tells the guardian of the Orthanc at ``url`` that it is no longer needed:
    one name per Orthanc, so that whoever starts that Orthanc again (this module, or the role's
    own start after a failure) releases its guardian."""
    import hashlib  # pylint: disable=import-outside-toplevel
    key = hashlib.sha256(url.rstrip("/").encode()).hexdigest()[:16]
    # not tempfile.gettempdir(): inside a module that is Ansible's per-task folder, removed with
    # the task, while the guardian outlives it
    return os.path.join(workdir or GUARDIAN_DIR, f".pacs-orthanc-guardian.{key}")


def release_guardian(url: str) -> None:
    """Orthanc at ``url`` was started: a guardian still watching for it may go."""
    try:
        with open(guardian_marker(url), "w", encoding="ascii") as handle:
            handle.write("done\n")
    except OSError:
        pass


class Guardian:
    """Context manager around the time Orthanc is stopped: outside it, a detached process will
    start Orthanc again should this process die inside it. ``done()`` (or leaving the block
    normally) releases the guardian."""

    def __init__(self, controller: Controller, workdir: str | None = None, timeout: float = 120):
        self.controller = controller
        self.timeout = timeout
        self.marker = guardian_marker(controller.url, workdir)
        self.proc = None

    def start(self) -> "Guardian":
        """Detach the guardian process; call ``done()`` once Orthanc is started again."""
        import json  # pylint: disable=import-outside-toplevel
        import subprocess  # pylint: disable=import-outside-toplevel
        import sys  # pylint: disable=import-outside-toplevel
        for stale in (self.marker, self.marker + ".guardian"):
            if os.path.exists(stale):
                os.unlink(stale)
        argv = [sys.executable, "-c", _GUARDIAN, GUARDIAN_TAG, str(os.getpid()), self.marker, self.controller.url,
                json.dumps(self.controller._argv("start")), str(self.timeout)]
        # Popen, not _common.Program: the guardian is a separate Python program that must outlive
        # this module (it starts Orthanc again if the module is killed), in its own session, and
        # nothing here waits for it or reads its output; its own start command runs in _GUARDIAN,
        # which cannot import this collection.
        env = dict(os.environ)
        if self.controller.engine is not None:  # DOCKER_HOST, CONTAINER_HOST, ...: the engine it starts
            env.update(self.controller.engine.env)
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, start_new_session=True, close_fds=True, env=env)
        return self

    def done(self) -> None:
        if self.proc is None:
            return
        with open(self.marker, "w", encoding="ascii") as handle:
            handle.write("done\n")
        try:
            self.proc.wait(timeout=5)
        except Exception:  # pylint: disable=broad-except  # it exits on its own once it sees the marker
            pass
        self.proc = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.done()
        return False

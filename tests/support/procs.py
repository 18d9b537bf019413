"""Finding the processes a test started (never others): descendants and command lines."""

from __future__ import annotations

import os
import select
import socket
import struct
import subprocess
import threading
import time


def descendants(pid: int) -> set:
    """Every process below ``pid``, read from /proc."""
    children: dict = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", encoding="utf-8", errors="replace") as handle:
                    parent = int(handle.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            return handle.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def environ(pid: int) -> dict:
    try:
        with open(f"/proc/{pid}/environ", "rb") as handle:
            pairs = handle.read().split(b"\0")
    except OSError:
        return {}
    return dict(p.decode(errors="replace").split("=", 1) for p in pairs if b"=" in p)


def play_processes(play_pid: int) -> set:
    """The processes of a play: its descendants, and the modules it runs with async, which
    async_wrapper detaches from it (found by the play's mark, playbook.PLAY_MARK, in their
    environment), with what they run."""
    found = descendants(play_pid)
    mark = environ(play_pid).get("PACS_TEST_PLAY")
    if mark:
        for entry in os.listdir("/proc"):
            if entry.isdigit() and int(entry) not in found and "AnsiballZ_" in cmdline(int(entry)):
                if environ(int(entry)).get("PACS_TEST_PLAY") == mark:
                    found.add(int(entry))
                    found |= descendants(int(entry))  # what the module runs (restic, rsync, ...)
    return found


def module_processes(play_pid: int, module: str) -> list:
    """The processes running an Ansible module (its python and the shell around it) of a play
    started without pipelining, so that the module's file name is on their command line; a module
    run with async too (see play_processes)."""
    return sorted((pid for pid in play_processes(play_pid) if f"AnsiballZ_{module}" in cmdline(pid)), reverse=True)


def keepers_of(root) -> list:
    """The backup lock's keepers (processes tagged pacs-orthanc-lock-keeper) whose lock is
    ``<root>/.lock``."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            line = cmdline(int(entry))
            if "pacs-orthanc-lock-keeper" in line and f" {root}/.lock " in line + " ":
                found.append(int(entry))
    return found


class SecretWatch:
    """While in use (``with SecretWatch(secret, tools) as watch: ...``), a thread reads every
    process's command line and environment from /proc: ``watch.seen`` gets the names of the
    ``tools`` it saw run (proof that it looked at the right moment), ``watch.leaks`` every
    (pid, program, 'argv' or 'environ') whose argv or environment held ``secret`` (one, or a list of them).

    How it looks: where the kernel's process events connector can be read (root, the host's
    network namespace), every process is read the moment it executes a program (so a process
    that lives a millisecond is read too) and every process again every SCAN_INTERVAL seconds (a
    command line rewritten later on; the processes already running); the thread sleeps in
    between. Elsewhere it reads every process over and over without a pause, a core's worth of CPU
    for as long as the watch lasts, which is what the events save. ``watch.events`` says which way
    it looked.

    ``host_environ_only``: environments are read only of processes in this process's PID
    namespace, not of those inside containers (whose environment the container's owner gave
    them: POSTGRES_PASSWORD is the database container's own); command lines are read of all."""

    SCAN_INTERVAL = 0.05

    def __init__(self, secret, tools, host_environ_only: bool = False):
        secrets = secret if isinstance(secret, (list, tuple)) else [secret]
        self.secrets = [s.encode() if isinstance(s, str) else s for s in secrets]
        self.tools = set(tools)
        self.seen: set = set()
        self.leaks: list = []
        self.namespace = os.readlink("/proc/self/ns/pid") if host_environ_only else None
        self.events = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample)

    def _environ(self, pid: str) -> bytes:
        if self.namespace is not None and os.readlink(f"/proc/{pid}/ns/pid") != self.namespace:
            return b""
        with open(f"/proc/{pid}/environ", "rb") as handle:
            return handle.read()

    def _inspect(self, pid: str) -> None:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as handle:
                argv = handle.read()
            environ = self._environ(pid)
        except OSError:
            return
        name = os.path.basename(argv.split(b"\0")[0]).decode(errors="replace")
        if name in self.tools:
            self.seen.add(name)
        for secret in self.secrets:
            if secret in argv:
                self.leaks.append((pid, name, "argv"))
            if secret in environ:
                self.leaks.append((pid, name, "environ"))

    def _scan(self) -> None:
        for pid in os.listdir("/proc"):
            if pid.isdigit():
                self._inspect(pid)

    def _sample(self) -> None:
        events = _exec_events()
        self.events = events is not None
        if events is None:
            while not self._stop.is_set():
                self._scan()
            return
        with events:
            next_scan = 0.0
            while not self._stop.is_set():
                now = time.monotonic()
                if now >= next_scan:
                    self._scan()
                    next_scan = now + self.SCAN_INTERVAL
                if not select.select([events], [], [], max(0.0, next_scan - time.monotonic()))[0]:
                    continue
                try:
                    data = events.recv(65536)
                except BlockingIOError:
                    continue
                except OSError:  # ENOBUFS: events were lost; the next scan reads every process
                    next_scan = 0.0
                    continue
                pid = _exec_pid(data)
                if pid is not None:
                    self._inspect(str(pid))

    def __enter__(self) -> "SecretWatch":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> bool:
        self._stop.set()
        self._thread.join()
        return False


# The kernel's process events connector (linux/connector.h, linux/cn_proc.h): a netlink socket
# that is told of every exec on the machine.
_NETLINK_CONNECTOR, _CN_IDX_PROC, _CN_VAL_PROC = 11, 1, 1
_PROC_CN_MCAST_LISTEN, _PROC_EVENT_EXEC = 1, 2
_NLMSG_DONE = 3
_NLMSG_HDR, _CN_MSG_HDR = 16, 20  # struct nlmsghdr, struct cn_msg


def _exec_events():
    """A non-blocking socket that receives the machine's exec events, or None when the connector
    cannot be read here (no root, another network namespace, no CONFIG_PROC_EVENTS)."""
    try:
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, _NETLINK_CONNECTOR)
    except (OSError, AttributeError):
        return None
    try:
        sock.bind((0, _CN_IDX_PROC))
        op = struct.pack("=I", _PROC_CN_MCAST_LISTEN)
        message = struct.pack("=IIIIHH", _CN_IDX_PROC, _CN_VAL_PROC, 0, 0, len(op), 0) + op
        sock.send(struct.pack("=IHHII", _NLMSG_HDR + len(message), _NLMSG_DONE, 0, 0, 0) + message)
        # proof that events arrive: a program of our own runs, and its exec must be reported
        sock.settimeout(5)
        child = subprocess.Popen(["true"])
        child.wait()
        while _exec_pid(sock.recv(65536)) != child.pid:
            pass
        sock.setblocking(False)
        return sock
    except OSError:  # socket.timeout included: no event came
        sock.close()
        return None


def _exec_pid(data: bytes):
    """The process that an event of the connector says executed a program, else None."""
    offset = _NLMSG_HDR + _CN_MSG_HDR  # struct proc_event: what, cpu, timestamp_ns, then the event
    if len(data) < offset + 24 or struct.unpack_from("=I", data, offset)[0] != _PROC_EVENT_EXEC:
        return None
    return struct.unpack_from("=I", data, offset + 20)[0]  # exec_proc_event: process_pid, process_tgid

"""Finding the processes a test started (never others): descendants and command lines."""

from __future__ import annotations

import os
import threading


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

    ``host_environ_only``: environments are read only of processes in this process's PID
    namespace, not of those inside containers (whose environment the container's owner gave
    them: POSTGRES_PASSWORD is the database container's own); command lines are read of all."""

    def __init__(self, secret, tools, host_environ_only: bool = False):
        secrets = secret if isinstance(secret, (list, tuple)) else [secret]
        self.secrets = [s.encode() if isinstance(s, str) else s for s in secrets]
        self.tools = set(tools)
        self.seen: set = set()
        self.leaks: list = []
        self.namespace = os.readlink("/proc/self/ns/pid") if host_environ_only else None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample)

    def _environ(self, pid: str) -> bytes:
        if self.namespace is not None and os.readlink(f"/proc/{pid}/ns/pid") != self.namespace:
            return b""
        with open(f"/proc/{pid}/environ", "rb") as handle:
            return handle.read()

    def _sample(self) -> None:
        while not self._stop.is_set():
            for pid in os.listdir("/proc"):
                if not pid.isdigit():
                    continue
                try:
                    with open(f"/proc/{pid}/cmdline", "rb") as handle:
                        argv = handle.read()
                    environ = self._environ(pid)
                except OSError:
                    continue
                name = os.path.basename(argv.split(b"\0")[0]).decode(errors="replace")
                if name in self.tools:
                    self.seen.add(name)
                for secret in self.secrets:
                    if secret in argv:
                        self.leaks.append((pid, name, "argv"))
                    if secret in environ:
                        self.leaks.append((pid, name, "environ"))

    def __enter__(self) -> "SecretWatch":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> bool:
        self._stop.set()
        self._thread.join()
        return False

# -*- coding: utf-8 -*-
# Copyright: pacs.orthanc contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The collection's locks: one library for the backup root's run lock (managed host) and the
per-step ``flock`` of a folder (backup server, btrfs subvolume).

A **step lock** (``FolderLock``) is an ``flock`` held by the module for one step: the kernel
releases it when the module ends, so it can never outlive its holder.

A **run lock** (``<backup root>/.lock``) must outlive the tasks of a run (each Ansible task is a
process of its own). It is held by a *keeper*: a small detached process (tagged
``pacs-orthanc-lock-keeper`` in ps) that holds an ``flock`` on the lock file for the life of the
run. The file records the run's name and start, the host, its boot id, the keeper's PID and
that process's start time (field 22 of ``/proc/PID/stat``), so that on the same host and boot a
dead holder is provable: the ``flock`` is free and the PID is gone or belongs to another
program. Such a lock is taken over at once. A lock written on another host (a shared backup
root) is judged as before: taken over once nobody touched it for ``stale_seconds``.

The keeper ends when the lock is released (the file removed or replaced), when the step of the
run that it watches (``<lock>.step``, written by ``Heartbeat``) dies without finishing (a killed
module), or when, between steps, nobody touched the lock for ``idle_seconds``. Standard library
only."""

from __future__ import annotations

import fcntl
import json
import os
import select
import shlex
import subprocess
import sys
import time

from ansible_collections.pacs.orthanc.plugins.module_utils import _layout
from ansible_collections.pacs.orthanc.plugins.module_utils._common import PIPE, PacsError, Program, os_error_cause

__metaclass__ = type

KEEPER_TAG = "pacs-orthanc-lock-keeper"
STEP_SUFFIX = ".step"
KEEPER_POLL = 0.5
KEEPER_READY_TIMEOUT = 30


# -- a step lock -------------------------------------------------------------------------------

def try_flock(path: str):
    """Open (create) ``path`` and take an exclusive ``flock`` without waiting: the descriptor, or
    None when another process holds it. OSError when the file cannot be opened."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def unflock(fd) -> None:
    if fd is not None:
        try:
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)


class FolderLock:
    """An ``flock`` on ``<folder>/.lock`` held while one step acts in ``folder``; released by the
    kernel when the process ends, so a killed run never leaves a lock that blocks the next one."""

    def __init__(self, folder: str, step: str, name: str = ".lock", busy: str | None = None):
        self.path = os.path.join(folder, name)
        self.step = step
        self.busy = busy or (f"another run is working in {folder} right now; try again when it has ended")
        self.fd = None

    def __enter__(self):
        try:
            self.fd = try_flock(self.path)
        except OSError as exc:
            raise PacsError(self.step, f"cannot open the lock {self.path}: {os_error_cause(exc)}")
        if self.fd is None:
            raise PacsError(self.step, self.busy)
        return self

    def __exit__(self, *_exc):
        unflock(self.fd)
        self.fd = None
        return False


# -- who and what is alive ---------------------------------------------------------------------

def _read_text(path: str) -> str:
    try:
        with open(path, "r", encoding="ascii", errors="replace") as handle:
            return handle.read().strip()
    except OSError:
        return ""


def identity() -> dict:
    """This host as a lock records it: name, machine id, boot id."""
    return {"host": os.uname().nodename, "machine_id": _read_text("/etc/machine-id") or None,
            "boot_id": _read_text("/proc/sys/kernel/random/boot_id") or None}


def boot_time() -> float | None:
    for line in _read_text("/proc/stat").splitlines():
        if line.startswith("btime "):
            return float(line.split()[1])
    return None


def process_start(pid) -> str | None:
    """The start time of a living process (field 22 of /proc/PID/stat, clock ticks since boot),
    or None when there is no such process (a zombie counts as gone)."""
    try:
        with open(f"/proc/{int(pid)}/stat", "r", encoding="utf-8", errors="replace") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
    except (OSError, ValueError, TypeError, IndexError):
        return None
    if fields[0] in ("Z", "X"):
        return None
    return fields[19]


def process_command(pid) -> str:
    try:
        with open(f"/proc/{int(pid)}/cmdline", "rb") as handle:
            return handle.read().replace(b"\0", b" ").decode("utf-8", "replace").strip()
    except (OSError, ValueError, TypeError):
        return ""


def read_record(path: str) -> dict:
    try:
        with open(path, "r", encoding="utf-8") as handle:
            record = json.load(handle)
        return record if isinstance(record, dict) else {}
    except (OSError, ValueError):
        return {}


def _same_file(fd, path: str) -> bool:
    try:
        here, there = os.fstat(fd), os.stat(path)
    except OSError:
        return False
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


def _step_note(lock_path: str) -> str:
    """What the run's last step file says, for a holder found dead."""
    step = read_record(lock_path + STEP_SUFFIX)
    if not step.get("pid"):
        return ""
    if process_start(step["pid"]) == str(step.get("start")):
        return f"; its step {step.get('what') or '?'} (PID {step['pid']}) still runs"
    return f"; its last step {step.get('what') or '?'} (PID {step['pid']}) died without finishing"


class Verdict:
    """What a look at an existing lock found: ``alive`` (refuse), else ``reason`` for taking it
    over; ``fd`` holds its ``flock`` when that could be taken (kept for a takeover)."""

    def __init__(self, record: dict, age: float, alive: bool, reason: str, fd=None, provable: bool = False):
        self.record, self.age, self.alive, self.reason, self.fd, self.provable = record, age, alive, reason, fd, provable

    def close(self) -> None:
        unflock(self.fd)
        self.fd = None

    def taken_over(self) -> dict:
        return {"host": self.record.get("host"), "pid": self.record.get("pid"),
                "started": self.record.get("started_at"), "name": self.record.get("name"),
                "age_seconds": int(self.age), "provable": self.provable, "reason": self.reason}


def judge(lock_path: str, stale_seconds: int, me: dict | None = None, now: float | None = None):
    """Look at the lock at ``lock_path``: None when there is none, else a Verdict. The caller
    closes the Verdict (it may hold the dead lock's ``flock``)."""
    me = me or identity()
    now = time.time() if now is None else now
    try:
        fd = os.open(lock_path, os.O_RDWR)
    except FileNotFoundError:
        return None
    except OSError:
        try:
            fd = os.open(lock_path, os.O_RDONLY)
        except FileNotFoundError:
            return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            free = True
        except BlockingIOError:
            free = False
        record = read_record(lock_path)
        try:
            age = max(0.0, now - os.fstat(fd).st_mtime)
        except OSError:
            age = 0.0
        verdict = _judge(lock_path, record, age, free, stale_seconds, me)
    except BaseException:
        os.close(fd)
        raise
    if verdict.alive or not free:
        unflock(fd) if free else os.close(fd)
    else:
        verdict.fd = fd
    return verdict


def _judge(lock_path: str, record: dict, age: float, free: bool, stale_seconds: int, me: dict) -> Verdict:
    host, pid = record.get("host"), record.get("pid")
    same_machine = (host and host == me["host"] and record.get("boot_id")
                    and (not record.get("machine_id") or not me.get("machine_id")
                         or record.get("machine_id") == me.get("machine_id")))
    if same_machine and record.get("boot_id") == me.get("boot_id") and pid:
        if not free:
            if process_start(pid) == str(record.get("pid_start")):
                return Verdict(record, age, True, f"its keeper process {pid} on {host} holds it "
                               f"(ps shows '{KEEPER_TAG}'; touched {int(age)} s ago{_step_note(lock_path)})")
            return Verdict(record, age, True, f"a process on {host} holds it, although the keeper it names "
                           f"(PID {pid}) is gone: another run taking it over, or a keeper in another PID namespace")
        start = process_start(pid)
        if start is None:
            return Verdict(record, age, False, f"its keeper process {pid} on {host} is gone{_step_note(lock_path)}",
                           provable=True)
        if start != str(record.get("pid_start")):
            return Verdict(record, age, False, f"PID {pid} on {host} now belongs to a process started later "
                           f"({process_command(pid)[:80] or '?'}): its keeper is gone", provable=True)
        if KEEPER_TAG not in process_command(pid):
            return Verdict(record, age, False, f"PID {pid} on {host} now runs another program "
                           f"({process_command(pid)[:80] or '?'}): its keeper is gone", provable=True)
        # the keeper runs but does not hold the flock: never seen; do not guess
        return Verdict(record, age, True, f"its keeper process {pid} on {host} is alive (ps shows '{KEEPER_TAG}')")
    if same_machine and record.get("boot_id") != me.get("boot_id"):
        btime = boot_time()
        if btime is not None and age > 0 and time.time() - age < btime:
            return Verdict(record, age, False, f"it was written on {host} before this host last booted "
                           f"(boot {record.get('boot_id')}, now {me.get('boot_id')})", provable=True)
    if not free and host == me["host"]:
        return Verdict(record, age, True, f"a process on this host holds it (touched {int(age)} s ago)")
    origin = f"on {host}" if host else "by an older version of this collection"
    if age < stale_seconds:
        where = (f"it was written {origin}, whose processes this host cannot see, and touched {int(age)} s ago"
                 if host and host != me["host"] else f"it was written {origin} and touched {int(age)} s ago")
        return Verdict(record, age, True, where)
    return Verdict(record, age, False, f"it was written {origin} and nobody touched it for {int(age)} s "
                   f"(more than {stale_seconds} s)")


def refusal(lock_path: str, verdict: Verdict, stale_seconds: int) -> str:
    """The message for a lock held by a live (or not provably dead) run."""
    record = verdict.record
    text = (f"another backup ({record.get('name', '?')}, started {record.get('started_at', '?')}) holds the lock "
            f"{lock_path}: {verdict.reason}. Wait for it to end")
    if verdict.reason.startswith("its keeper process"):
        idle = f" (it ends by itself once no step of its run has run for {record['idle_seconds']:.0f} s)" \
            if isinstance(record.get("idle_seconds"), (int, float)) else ""
        text += (f"{idle}; if no backup of this root runs, end that process (kill {record['pid']}) and the next "
                 "run takes the lock over at once")
    elif verdict.reason.startswith("a process on"):
        text += f"; 'fuser -v {lock_path}' names the process that holds it"
    else:
        text += (f"; a lock from another host (or an older version) is taken over once nobody touched it for "
                 f"{stale_seconds} s (a running backup touches it every minute), or remove that file if no "
                 "backup runs")
    return text


# -- the keeper --------------------------------------------------------------------------------

_KEEPER = r"""
import fcntl, json, os, sys, time
# argv[1] is the tag "pacs-orthanc-lock-keeper", so that ps shows what this process is
lock_path, own_path, name, idle, poll = sys.argv[2], sys.argv[3], sys.argv[4], float(sys.argv[5]), float(sys.argv[6])
step_path = lock_path + ".step"
fd = os.open(own_path, os.O_RDWR)
fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
os.write(1, b"ready\n")
null = os.open(os.devnull, os.O_RDWR)
os.dup2(null, 1)
os.close(null)
born, published = time.monotonic(), False

def start_of(pid):
    try:
        with open("/proc/%d/stat" % int(pid)) as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
    except Exception:
        return None
    return None if fields[0] in ("Z", "X") else fields[19]

def step():
    try:
        with open(step_path) as handle:
            found = json.load(handle)
        return found if found.get("name") == name else None
    except Exception:
        return None

while True:
    time.sleep(poll)
    try:
        own = os.fstat(fd)
    except OSError:
        break
    if own.st_nlink == 0:
        break  # released (or taken over): the file is gone
    try:
        there = os.stat(lock_path)
        here = (there.st_dev, there.st_ino) == (own.st_dev, own.st_ino)
    except OSError:
        here = False
    if here:
        published = True
    elif published or time.monotonic() - born > 120:
        break  # removed or replaced, or never put in place
    if not published:
        continue
    running = step()
    if running:
        if start_of(running.get("pid")) == str(running.get("start")):
            continue  # a step of the run works: the run is alive
        if step() == running:
            break  # that step died without finishing (killed): the run is gone
        continue
    if time.time() - own.st_mtime > idle:
        break  # between steps, nobody touched the lock for too long
"""


def _start_keeper(own_path: str, lock_path: str, name: str, idle_seconds: float, step: str):
    argv = [sys.executable, "-c", _KEEPER, KEEPER_TAG, lock_path, own_path, name, str(float(idle_seconds)),
            str(KEEPER_POLL)]
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            start_new_session=True, close_fds=True, cwd="/")
    ready, _w, _x = select.select([proc.stdout], [], [], KEEPER_READY_TIMEOUT)
    line = proc.stdout.readline() if ready else b""
    proc.stdout.close()
    if line.strip() != b"ready":
        try:
            proc.kill()
            proc.wait(5)
        except Exception:  # pylint: disable=broad-except
            pass
        raise PacsError(step, f"the lock keeper process did not start (Python {sys.executable})")
    return proc.pid, process_start(proc.pid)


def acquire(lock_path: str, name: str, started_at: str, stale_seconds: int, step: str,
            idle_seconds: float | None = None) -> dict | None:
    """Take the run lock ``lock_path`` for the backup ``name``, taking over a dead holder's lock.
    Returns what was taken over (None when the lock was free). Raises PacsError naming a live
    holder. ``idle_seconds`` (default ``stale_seconds``): how long the keeper waits between
    steps for a touch of the lock before it takes the run for gone."""
    me = identity()
    taken = None
    verdict = None
    for _attempt in range(3):
        verdict = judge(lock_path, stale_seconds, me)
        if verdict is None:
            break
        if verdict.alive:
            raise PacsError(step, refusal(lock_path, verdict, stale_seconds))
        if verdict.fd is not None and not _same_file(verdict.fd, lock_path):
            verdict.close()  # replaced while we looked: look again
            verdict = None
            continue
        taken = verdict.taken_over()
        try:
            os.unlink(lock_path)
        except FileNotFoundError:
            pass
        for leftover in (lock_path + STEP_SUFFIX,):
            if os.path.lexists(leftover):
                os.unlink(leftover)
        break
    else:
        raise PacsError(step, f"the lock {lock_path} kept changing while it was examined; try again")
    try:
        _publish(lock_path, name, started_at, stale_seconds if idle_seconds is None else idle_seconds, step, me)
    finally:
        if verdict is not None:
            verdict.close()
    return taken


def _publish(lock_path: str, name: str, started_at: str, idle_seconds: float, step: str, me: dict) -> None:
    """Write the lock under a private name, start its keeper on it, then link it into place
    atomically (a hard link fails when the name exists: two runs cannot both take it)."""
    own = f"{lock_path}.{os.getpid()}"
    fd = os.open(own, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.close(fd)
    try:
        pid, start = _start_keeper(own, lock_path, name, idle_seconds, step)
        record = dict(me, name=name, started_at=started_at, pid=pid, pid_start=start, keeper=KEEPER_TAG,
                      opened_by=os.getpid(), idle_seconds=idle_seconds)
        fd = os.open(own, os.O_WRONLY | os.O_TRUNC)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(record, handle)
            handle.flush()
            os.fsync(handle.fileno())
        try:
            os.link(own, lock_path)
        except FileExistsError:
            raise PacsError(step, f"another backup took the lock {lock_path} at the same moment; wait for it to end")
    finally:
        os.unlink(own)  # with the lock not in place, the keeper sees its file gone and ends


def release(lock_path: str, name: str, wait: float = 5.0) -> bool:
    """Release the run lock if it is ``name``'s: remove the file (its keeper sees that and ends;
    wait up to ``wait`` seconds for it). True when it was released."""
    record = read_record(lock_path)
    if record.get("name") != name:
        return False
    try:
        os.unlink(lock_path)
    except FileNotFoundError:
        return False
    step = read_record(lock_path + STEP_SUFFIX)
    if step.get("name") == name:
        try:
            os.unlink(lock_path + STEP_SUFFIX)
        except FileNotFoundError:
            pass
    me = identity()
    if record.get("pid") and record.get("host") == me["host"] and record.get("boot_id") == me["boot_id"]:
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and process_start(record["pid"]) == str(record.get("pid_start")):
            time.sleep(0.05)
    return True


def holder_is_dead(lock_path: str, stale_seconds: int) -> bool:
    """Whether the run lock at ``lock_path`` may be ignored: none, or its holder gone (as
    ``acquire`` would judge it, without taking it)."""
    verdict = judge(lock_path, stale_seconds)
    if verdict is None:
        return True
    verdict.close()
    return not verdict.alive


# -- a run's steps -----------------------------------------------------------------------------

def register_step(lock_path: str, name: str) -> str | None:
    """Tell the keeper of ``lock_path`` that this process is a step of the run ``name``: should
    this process die without ``unregister_step``, the keeper takes the run for gone. Returns the
    step file, or None when it cannot be written."""
    path = lock_path + STEP_SUFFIX
    what = os.path.basename(sys.argv[0] or "?") if sys.argv else "?"
    what = what[:-3] if what.endswith(".py") else what
    record = {"name": name, "pid": os.getpid(), "start": process_start(os.getpid()), "what": what}
    try:
        with _layout.atomic_writer(path, 0o644, encoding="utf-8", durable=False) as handle:
            json.dump(record, handle)
    except OSError:
        return None
    return path


def unregister_step(path: str | None) -> None:
    if path and read_record(path).get("pid") == os.getpid():
        try:
            os.unlink(path)
        except OSError:
            pass


# -- slots: at most N holders at once, on another machine ------------------------------------------
#
# The backup server takes at most N transfers at once, from every play and controller alike
# (orthanc_ship_max_parallel). A transfer holds one of N slot files of <server root>/.slots with an
# flock for as long as it runs. The flock is taken on the server by the small program below, run
# through the transfer's own SSH connection (python3 -c): it takes a free slot (or waits, saying who
# holds them, until its timeout), prints "slot N", then holds the slot until its standard input
# ends. That input is a pipe from the module, inherited by the transfer's rsync processes: the slot
# is released when the module and its rsync processes have all ended, however they end (killed
# too), and by the kernel if the holder itself dies.

SLOTS_FOLDER = ".slots"
SLOT_POLL = 1.0

_SLOT_HOLDER = r"""
import fcntl, json, os, sys, time
folder, count, timeout, who = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), json.loads(sys.argv[4])
def say(text):
    sys.stdout.write(text + "\n")
    sys.stdout.flush()
try:
    os.makedirs(folder, mode=0o700, exist_ok=True)
except OSError as exc:
    say("error cannot create %s: %s" % (folder, exc.strerror or exc))
    sys.exit(2)
deadline, told = time.monotonic() + timeout, None
while True:
    busy = []
    for number in range(count):
        path = os.path.join(folder, "slot.%d" % number)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            say("error cannot open %s: %s" % (path, exc.strerror or exc))
            sys.exit(2)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                busy.append(json.loads(os.pread(fd, 4096, 0).decode("utf-8", "replace") or "{}"))
            except ValueError:
                busy.append({})
            os.close(fd)
            continue
        record = dict(who, pid=os.getpid(), since=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode("utf-8"), 0)
        say("slot %d" % number)
        while os.read(0, 65536):
            pass
        sys.exit(0)
    if time.monotonic() >= deadline:
        say("timeout " + json.dumps(busy))
        sys.exit(3)
    holders = sorted(str(b.get("host")) for b in busy)
    if holders != told:
        say("wait " + json.dumps(busy))
        told = holders
    time.sleep(POLL)
"""


def slot_holder_command(folder: str, count: int, timeout: float, who: dict, python: str = "python3") -> str:
    """The shell command that takes one of ``count`` slots in ``folder`` (see above); for ssh's
    remote command line, or ``sh -c`` here."""
    program = _SLOT_HOLDER.replace("POLL", repr(SLOT_POLL))
    return shlex.join([python, "-c", program, folder, str(int(count)), str(float(timeout)),
                       json.dumps(who, sort_keys=True)])


def describe_holders(busy: list) -> str:
    """'pacs-2 (backup 20261130T020000Z, since 2026-11-30T02:04:10Z), pacs-3 (...)'."""
    parts = []
    for record in busy:
        detail = ", ".join(f"{key} {record[key]}" for key in ("backup", "since") if record.get(key))
        parts.append(f"{record.get('host') or '?'}" + (f" ({detail})" if detail else ""))
    return ", ".join(parts) or "?"


class RemoteSlot:
    """Hold one of ``count`` slots in ``folder`` on the machine that ``prefix`` reaches (an ssh
    command line ending with the server's address; ``["sh", "-c"]`` for this machine) while the
    ``with`` block runs. ``waiting(busy)`` is called when all slots are taken (the records of their
    holders), again whenever the holders change. ``inherit`` is the descriptor to hand to the
    processes that must hold the slot too (Program's ``pass_fds``): the slot is free once they and
    this process have ended. Raises PacsError (``step``) on a timeout or when the holder cannot
    run there (no python3, a forced command that allows rsync only)."""

    def __init__(self, prefix: list, folder: str, count: int, timeout: float, who: dict, step: str,
                 where: str = "the backup server", waiting=None, python: str = "python3", grace: float = 60.0,
                 remedy: str = ""):
        self.argv = list(prefix) + [slot_holder_command(folder, count, timeout, who, python)]
        self.folder, self.count, self.timeout, self.step, self.where = folder, count, timeout, step, where
        self.waiting, self.grace, self.remedy = waiting, grace, remedy
        self.program = None
        self.number = None
        self.waited = 0.0

    @property
    def inherit(self) -> tuple:
        return (self.program.proc.stdin.fileno(),) if self.program is not None else ()

    def __enter__(self):
        started = time.monotonic()
        self.program = Program(self.argv, self.step, data=True, stdout=PIPE)
        try:
            self.number = self._read_slot(started + self.timeout + self.grace)
        except BaseException:
            self._end()
            raise
        self.waited = time.monotonic() - started
        return self

    def _read_slot(self, deadline: float) -> int:
        out = self.program.stdout
        buffer = b""
        while True:
            left = deadline - time.monotonic()
            ready, _w, _x = select.select([out], [], [], max(0.0, left))
            if not ready:
                raise PacsError(self.step, f"no answer about a transfer slot from {self.where} within "
                                f"{self.timeout + self.grace:.0f} s")
            chunk = os.read(out.fileno(), 65536)
            if not chunk:
                rc = self.program.wait(timeout=10)
                said = " ".join(self.program.errors().strip().splitlines()[-3:])
                raise PacsError(self.step, f"could not take a transfer slot on {self.where} (exit {rc}"
                                f"{': ' + said if said else ''}): the slot program (python3 -c) cannot run there "
                                f"with this key (no python3, or a forced command such as rrsync that allows rsync "
                                f"only){'; ' + self.remedy if self.remedy else ''}")
            buffer += chunk
            while b"\n" in buffer:
                text, buffer = buffer.split(b"\n", 1)
                word, _sep, rest = text.decode("utf-8", "replace").partition(" ")
                if word == "slot":
                    return int(rest)
                if word in ("wait", "timeout"):
                    try:
                        busy = json.loads(rest)
                    except ValueError:
                        busy = []
                    if word == "timeout":
                        raise PacsError(self.step, f"no transfer slot free on {self.where} within {self.timeout:.0f} s: "
                                        f"all {self.count} are taken by {describe_holders(busy)} "
                                        f"(orthanc_ship_max_parallel, orthanc_ship_slot_timeout)")
                    if self.waiting is not None:
                        self.waiting(busy)
                elif word == "error":
                    raise PacsError(self.step, f"could not take a transfer slot on {self.where}: {rest}")

    def _end(self) -> None:
        program, self.program = self.program, None
        if program is None:
            return
        try:
            program.proc.stdin.close()  # the holder reads the end of its input and lets go
            program.wait(timeout=30)
        except (OSError, PacsError):
            pass
        finally:
            program.close()

    def __exit__(self, *_exc):
        self._end()
        return False

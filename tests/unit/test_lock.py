"""The run lock of a backup root on real processes: a live keeper refuses, a provably dead holder
(gone, or its PID reused by another program) is taken over at once, another host's lock keeps
the freshness rule, and the keeper ends by itself when its run is over or gone."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import uuid

import pytest

from ansible_collections.pacs.orthanc.plugins.module_utils import _lock
from ansible_collections.pacs.orthanc.plugins.module_utils._common import PacsError

STEP = "prepare backup folder"


def wait_for(predicate, timeout=10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def gone(pid) -> bool:
    return _lock.process_start(pid) is None


def held(path) -> bool:
    fd = _lock.try_flock(str(path))
    _lock.unflock(fd)
    return fd is None


def write_lock(path, mtime=None, **fields):
    """A lock file as another run wrote it: this host's identity unless ``fields`` say otherwise."""
    record = dict(_lock.identity(), name="20261129T070000Z", started_at="2026-11-29T07:00:00.000000Z",
                  keeper=_lock.KEEPER_TAG)
    record.update(fields)
    path.write_text(json.dumps(record))
    if mtime is not None:
        os.utime(path, (mtime, mtime))
    return record


@pytest.fixture
def lock_path(tmp_path):
    return tmp_path / ".lock"


@pytest.fixture
def sleeper():
    """A real process that is not a keeper (it plays a reused PID, or a step of a run)."""
    procs = []

    def start():
        proc = subprocess.Popen(["sleep", "120"])
        procs.append(proc)
        assert wait_for(lambda: "sleep" in _lock.process_command(proc.pid))
        return proc
    yield start
    for proc in procs:
        proc.kill()
        proc.wait()


def test_a_live_keeper_is_refused_and_ends_on_release(lock_path):
    assert _lock.acquire(str(lock_path), "20261130T010000Z", "now", 900, STEP) is None
    record = json.loads(lock_path.read_text())
    keeper = record["pid"]
    assert record["host"] == os.uname().nodename and record["boot_id"] == _lock.identity()["boot_id"]
    assert record["pid_start"] == _lock.process_start(keeper)
    assert _lock.KEEPER_TAG in _lock.process_command(keeper) and str(lock_path) in _lock.process_command(keeper)
    assert keeper != os.getpid()
    # even with a lock "stale" by age, a live keeper on this host is refused, and named
    old = time.time() - 5000
    os.utime(lock_path, (old, old))
    with pytest.raises(PacsError, match=rf"another backup \(20261130T010000Z, started now\) holds the lock .*"
                                        rf"its keeper process {keeper} on .* holds it .*kill {keeper}"):
        _lock.acquire(str(lock_path), "20261130T020000Z", "now", 60, STEP)
    assert not _lock.holder_is_dead(str(lock_path), 60)
    # another run's name does not release it
    assert not _lock.release(str(lock_path), "20261130T020000Z") and lock_path.exists()
    assert _lock.release(str(lock_path), "20261130T010000Z")
    assert not lock_path.exists() and gone(keeper)
    assert os.listdir(lock_path.parent) == []


def test_a_dead_holder_on_this_host_is_taken_over_at_once(lock_path):
    done = subprocess.Popen(["true"])
    done.wait()
    write_lock(lock_path, pid=done.pid, pid_start="12345")  # touched just now: age does not matter
    (lock_path.parent / ".lock.step").write_text(json.dumps(
        {"name": "20261129T070000Z", "pid": done.pid, "start": "12345", "what": "stopped_capture"}))
    taken = _lock.acquire(str(lock_path), "20261130T010000Z", "now", 900, STEP)
    assert taken["provable"] and taken["pid"] == done.pid and taken["name"] == "20261129T070000Z"
    assert taken["host"] == os.uname().nodename and taken["started"] == "2026-11-29T07:00:00.000000Z"
    assert f"keeper process {done.pid} on" in taken["reason"] and "is gone" in taken["reason"]
    assert "last step stopped_capture" in taken["reason"] and "died without finishing" in taken["reason"]
    record = json.loads(lock_path.read_text())
    assert record["name"] == "20261130T010000Z" and _lock.KEEPER_TAG in _lock.process_command(record["pid"])
    assert not (lock_path.parent / ".lock.step").exists()
    assert _lock.release(str(lock_path), "20261130T010000Z")


def test_a_pid_reused_by_another_program_is_taken_over(lock_path, sleeper):
    other = sleeper()
    # the same PID and even the same start time, but not a keeper: another program
    write_lock(lock_path, pid=other.pid, pid_start=_lock.process_start(other.pid))
    taken = _lock.acquire(str(lock_path), "20261130T010000Z", "now", 900, STEP)
    assert taken["provable"] and "another program (sleep 120)" in taken["reason"], taken
    assert _lock.release(str(lock_path), "20261130T010000Z")
    # the PID now belongs to a process started after the keeper was
    write_lock(lock_path, pid=other.pid, pid_start="1")
    taken = _lock.acquire(str(lock_path), "20261130T010000Z", "now", 900, STEP)
    assert taken["provable"] and "started later" in taken["reason"], taken
    assert _lock.release(str(lock_path), "20261130T010000Z")
    assert other.poll() is None  # never touched


def test_a_lock_whose_file_a_process_holds_is_never_taken(lock_path):
    """Whatever the record says (a PID of another PID namespace, say), a held flock is a live run."""
    write_lock(lock_path, pid=999999, pid_start="1")
    holder = subprocess.Popen(["flock", "--exclusive", "--close", str(lock_path), "sleep", "120"])
    try:
        assert wait_for(lambda: held(lock_path))
        with pytest.raises(PacsError, match="holds the lock .*a process on .* holds it, although the keeper"):
            _lock.acquire(str(lock_path), "20261130T010000Z", "now", 900, STEP)
    finally:
        holder.kill()
        holder.wait()
    # flock(1) takes the lock before it forks its command, whose copy of the descriptor is closed
    # only once that child runs: on a loaded machine the lock outlives the killed parent briefly
    assert wait_for(lambda: not held(lock_path))
    assert _lock.acquire(str(lock_path), "20261130T010000Z", "now", 900, STEP)["provable"]
    assert _lock.release(str(lock_path), "20261130T010000Z")


def test_another_hosts_lock_keeps_the_freshness_rule(lock_path):
    other = {"host": "pacs-other-host", "boot_id": str(uuid.uuid4()), "machine_id": uuid.uuid4().hex,
             "pid": os.getpid(), "pid_start": _lock.process_start(os.getpid())}  # a PID means nothing here
    write_lock(lock_path, mtime=time.time() - 30, **other)
    with pytest.raises(PacsError, match=r"holds the lock .*written on pacs-other-host, whose processes this host "
                                        r"cannot see, and touched \d+ s ago.*taken over once nobody touched it for 900 s"):
        _lock.acquire(str(lock_path), "20261130T010000Z", "now", 900, STEP)
    assert lock_path.exists() and json.loads(lock_path.read_text())["host"] == "pacs-other-host"
    # stale: taken over, and said so (not provable: another host's processes cannot be seen)
    write_lock(lock_path, mtime=time.time() - 1000, **other)
    taken = _lock.acquire(str(lock_path), "20261130T010000Z", "now", 900, STEP)
    assert not taken["provable"] and taken["host"] == "pacs-other-host"
    assert "nobody touched it for" in taken["reason"] and "more than 900 s" in taken["reason"]
    assert _lock.release(str(lock_path), "20261130T010000Z")


def test_a_lock_of_an_older_version_keeps_the_freshness_rule(lock_path):
    lock_path.write_text(json.dumps({"name": "20261129T070000Z", "started_at": "x", "pid": 1}))
    with pytest.raises(PacsError, match="written by an older version"):
        _lock.acquire(str(lock_path), "20261130T010000Z", "now", 900, STEP)
    old = time.time() - 1000
    os.utime(lock_path, (old, old))
    assert not _lock.acquire(str(lock_path), "20261130T010000Z", "now", 900, STEP)["provable"]
    assert _lock.release(str(lock_path), "20261130T010000Z")


def test_a_lock_from_before_this_boot_is_taken_over(lock_path):
    booted = _lock.boot_time()
    write_lock(lock_path, mtime=booted - 600, boot_id=str(uuid.uuid4()), pid=1, pid_start="1")
    taken = _lock.acquire(str(lock_path), "20261130T010000Z", "now", 10 ** 9, STEP)
    assert taken["provable"] and "before this host last booted" in taken["reason"]
    assert _lock.release(str(lock_path), "20261130T010000Z")


def test_the_keeper_ends_when_the_step_it_watches_dies(lock_path, sleeper):
    _lock.acquire(str(lock_path), "20261130T010000Z", "now", 900, STEP)
    keeper = json.loads(lock_path.read_text())["pid"]
    # a step of the run (here a sleep) registered as this process registers itself
    step = sleeper()
    (lock_path.parent / ".lock.step").write_text(json.dumps(
        {"name": "20261130T010000Z", "pid": step.pid, "start": _lock.process_start(step.pid), "what": "hot_pass"}))
    time.sleep(3 * _lock.KEEPER_POLL)
    assert not gone(keeper)  # a live step: the run is alive
    step.send_signal(signal.SIGKILL)
    step.wait()
    assert wait_for(lambda: gone(keeper))
    # the next run takes over at once, and says why
    taken = _lock.acquire(str(lock_path), "20261130T020000Z", "now", 900, STEP)
    assert taken["provable"] and "is gone" in taken["reason"] and "last step hot_pass" in taken["reason"]
    assert _lock.release(str(lock_path), "20261130T020000Z")


def test_a_step_that_ends_normally_keeps_the_keeper(lock_path):
    _lock.acquire(str(lock_path), "20261130T010000Z", "now", 900, STEP)
    keeper = json.loads(lock_path.read_text())["pid"]
    step = _lock.register_step(str(lock_path), "20261130T010000Z")
    assert json.loads(open(step, encoding="utf-8").read())["pid"] == os.getpid()
    time.sleep(2 * _lock.KEEPER_POLL)
    _lock.unregister_step(step)
    assert not os.path.exists(step)
    time.sleep(3 * _lock.KEEPER_POLL)
    assert not gone(keeper)
    assert _lock.release(str(lock_path), "20261130T010000Z") and gone(keeper)


def test_the_keeper_ends_when_its_lock_is_replaced_or_idle(lock_path):
    _lock.acquire(str(lock_path), "20261130T010000Z", "now", 900, STEP)
    keeper = json.loads(lock_path.read_text())["pid"]
    replacement = lock_path.parent / "other"
    replacement.write_text("{}")
    os.replace(replacement, lock_path)
    assert wait_for(lambda: gone(keeper))
    lock_path.unlink()
    # between steps, nobody touches the lock for idle_seconds: the run is gone
    _lock.acquire(str(lock_path), "20261130T020000Z", "now", 900, STEP, idle_seconds=1)
    keeper = json.loads(lock_path.read_text())["pid"]
    assert wait_for(lambda: gone(keeper), timeout=15)
    taken = _lock.acquire(str(lock_path), "20261130T030000Z", "now", 900, STEP)
    assert taken["provable"] and taken["name"] == "20261130T020000Z"
    assert _lock.release(str(lock_path), "20261130T030000Z")


def test_a_folder_lock_is_one_step_at_a_time(tmp_path):
    with _lock.FolderLock(str(tmp_path), "x"):
        with pytest.raises(PacsError, match="another run is working"):
            with _lock.FolderLock(str(tmp_path), "y"):
                pass
    with _lock.FolderLock(str(tmp_path), "z"):
        pass


# -- transfer slots (the backup server's bound on transfers at once), here through sh -c ---------

LOCAL = ["sh", "-c"]


def slot(folder, who, count=1, timeout=5.0, waiting=None):
    return _lock.RemoteSlot(LOCAL, str(folder), count, timeout, who, "send the backup to the server",
                            where="the test server", waiting=waiting, grace=10)


def test_slots_bound_the_holders_and_say_who_holds_them(tmp_path):
    folder = tmp_path / ".slots"
    with slot(folder, {"host": "pacs-1", "backup": "20261130T020000Z"}, count=2) as first, \
            slot(folder, {"host": "pacs-2", "backup": "20261130T020001Z"}, count=2) as second:
        assert {first.number, second.number} == {0, 1}
        assert held(folder / "slot.0") and held(folder / "slot.1")
        seen = []
        started = time.monotonic()
        with pytest.raises(PacsError) as caught:
            with slot(folder, {"host": "pacs-3"}, count=2, timeout=1.5, waiting=seen.append):
                pass
        assert time.monotonic() - started >= 1.5
        cause = caught.value.cause
        assert cause.startswith("no transfer slot free on the test server within 2 s: all 2 are taken by "), cause
        assert "pacs-1 (backup 20261130T020000Z, since 20" in cause and "pacs-2 (backup 20261130T020001Z" in cause
        assert len(seen) == 1 and sorted(r["host"] for r in seen[0]) == ["pacs-1", "pacs-2"], seen
    # released at the end of the block: a newcomer gets slot 0 at once
    with slot(folder, {"host": "pacs-3"}, count=2, timeout=1) as third:
        assert third.number == 0 and third.waited < 1


def test_a_waiting_holder_takes_the_slot_when_it_is_released(tmp_path):
    folder = tmp_path / ".slots"
    seen = []
    with slot(folder, {"host": "pacs-1"}) as first:
        # the first holder lets go in about a second, from another thread
        import threading
        timer = threading.Timer(1.0, first.__exit__, (None, None, None))
        timer.start()
        with slot(folder, {"host": "pacs-2"}, timeout=20, waiting=seen.append) as second:
            assert second.number == 0 and second.waited >= 0.9
        timer.join()
    assert [r["host"] for r in seen[0]] == ["pacs-1"]


def test_the_slot_lives_as_long_as_the_processes_that_inherit_it_even_when_its_taker_is_killed(tmp_path):
    folder = tmp_path / ".slots"
    taker = subprocess.Popen(["python3", "-c", f"""
import os, subprocess, sys, time
sys.path[:0] = {json.dumps([p for p in __import__('sys').path if p])}
from ansible_collections.pacs.orthanc.plugins.module_utils import _lock
held = _lock.RemoteSlot(["sh", "-c"], {str(folder)!r}, 1, 5, {{"host": "taker"}}, "step").__enter__()
child = subprocess.Popen(["sleep", "3"], pass_fds=held.inherit)  # rsync, say
print(child.pid, flush=True)
time.sleep(60)
"""], stdout=subprocess.PIPE, text=True)
    try:
        child = int(taker.stdout.readline())
        taker.kill()  # SIGKILL: nothing of it runs again
        taker.wait()
        assert held(folder / "slot.0")  # its child still runs: the slot is still taken
        assert wait_for(lambda: gone(child), 10)
        assert wait_for(lambda: not held(folder / "slot.0"), 10)  # the child ended: the slot is free
    finally:
        if taker.poll() is None:
            taker.kill()


def test_a_server_that_cannot_run_the_holder_is_named(tmp_path):
    broken = _lock.RemoteSlot(LOCAL, str(tmp_path / ".slots"), 1, 5, {}, "send the backup to the server",
                              where="the test server", python="/nonexistent/python3", remedy="or do this")
    with pytest.raises(PacsError) as caught:
        with broken:
            pass
    assert caught.value.cause.startswith("could not take a transfer slot on the test server (exit 127"), caught.value.cause
    assert "python3" in caught.value.cause and caught.value.cause.endswith("; or do this"), caught.value.cause

"""Interrupting a play for real: wait for a condition, and kill (or Ctrl-C) ansible-playbook while
Orthanc is stopped inside the backup's stop window (tests/integration/test_faults.py,
tests/containers/test_containers.py)."""

from __future__ import annotations

import os
import signal
import time

from tests.support import procs
from tests.support.playbook import run_playbook
from ansible_collections.pacs.orthanc.plugins.module_utils import _lock


def wait_for(predicate, timeout=30.0, step=0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return False


def interrupt_during_downtime(inventory, server, how, step_name: str = "Stop Orthanc, capture the index"):
    """Start the backup, wait until Orthanc is really down inside the stop window, then
    interrupt: 'sigint' (Ctrl-C on ansible-playbook) or 'kill' (SIGKILL to ansible-playbook and
    every process of its session, the module included). ``server`` is anything with an
    ``answers()`` (an OrthancServer, a container's REST API); the play's output is returned."""
    proc = run_playbook(inventory, popen=True, pipelining=False)  # the module's name shows in ps
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if step_name in line:
            break
    assert wait_for(lambda: not server.answers(), timeout=30, step=0.02), "".join(lines)
    if how == "sigint":
        proc.send_signal(signal.SIGINT)
    else:
        # everything of the run dies at once, the module that stopped Orthanc included (Ansible's
        # workers have sessions of their own, so this goes by process tree, which includes the
        # play's process group); only the guardian and the lock's keeper, which the modules
        # detached for this very case, are spared
        victims = [pid for pid in procs.descendants(proc.pid)
                   if "pacs-orthanc-guardian" not in procs.cmdline(pid)
                   and _lock.KEEPER_TAG not in procs.cmdline(pid)] + [proc.pid]
        assert any("AnsiballZ_stopped_capture" in procs.cmdline(pid) for pid in victims)
        for pid in victims:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    out = proc.stdout.read()
    proc.wait(timeout=120)
    return "".join(lines) + out

# -*- coding: utf-8 -*-
# Copyright: pacs.orthanc contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Stopping and starting Orthanc, through its service or given shell commands, and waiting until
it really is stopped (REST API silent, index lock released) or answering."""

from __future__ import annotations

import os
import shutil
import time

from ansible_collections.pacs.orthanc.plugins.module_utils import _rest, _sqlite
from ansible_collections.pacs.orthanc.plugins.module_utils._common import PacsError, iso, run_command, utc_now

__metaclass__ = type

POLL = 0.02  # seconds between two looks: part of the downtime, so kept short


def service_argv(name: str, action: str) -> list:
    if os.path.isdir("/run/systemd/system") and shutil.which("systemctl"):
        return [shutil.which("systemctl"), action, name]
    if shutil.which("service"):
        return [shutil.which("service"), name, action]
    script = f"/etc/init.d/{name}"
    if os.path.exists(script):
        return [script, action]
    raise PacsError(f"{action} Orthanc", f"neither systemctl, service nor {script} can {action} '{name}'")


class Controller:
    """One Orthanc: how to reach it, stop it and start it."""

    def __init__(self, url: str, username=None, password=None, service_name: str = "orthanc",
                 stop_command=None, start_command=None):
        self.url, self.auth = url, (username, password)
        self.service_name = service_name
        self.stop_command, self.start_command = stop_command, start_command

    def answers(self, timeout: float = 1) -> bool:
        return _rest.answers(self.url, *self.auth, timeout=timeout)

    def _argv(self, action: str) -> list:
        command = self.stop_command if action == "stop" else self.start_command
        return ["/bin/sh", "-c", command] if command else service_argv(self.service_name, action)

    def stop(self, index_file=None, timeout: float = 60, check_mode: bool = False) -> dict:
        """Stop Orthanc unless it is stopped; return when its API is silent and its index free."""
        began, t0 = utc_now(), time.monotonic()
        holder = _sqlite.lock_holder(index_file) if index_file and os.path.exists(index_file) else None
        needed = holder is not None or self.answers()
        if needed and not check_mode:
            run_command(self._argv("stop"), "stop Orthanc", timeout=timeout)
            deadline = t0 + timeout
            while self.answers():
                if time.monotonic() > deadline:
                    raise PacsError("stop Orthanc", f"Orthanc still answers at {self.url} {timeout:.0f} s after the stop")
                time.sleep(POLL)
            if index_file and os.path.exists(index_file):
                _sqlite.wait_until_free(index_file, max(0.0, deadline - time.monotonic()), poll=POLL)
        return self._times(needed, began, t0)

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
            run_command(argv, "start Orthanc", timeout=timeout)
            deadline = time.monotonic() + timeout
            while not self.answers():
                if time.monotonic() > deadline:
                    raise PacsError("start Orthanc", f"Orthanc does not answer at {self.url} {timeout:.0f} s after "
                                    f"'{' '.join(argv)}': look at its log")
                time.sleep(POLL)
        return self._times(not answering, began, t0)

    @staticmethod
    def _times(changed: bool, began, t0: float) -> dict:
        ended = utc_now()
        return {"changed": changed, "began_at": iso(began), "began_ts": began.timestamp(),
                "ended_at": iso(ended), "ended_ts": ended.timestamp(), "seconds": round(time.monotonic() - t0, 3)}

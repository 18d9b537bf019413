# -*- coding: utf-8 -*-
# Copyright: pacs.orthanc contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Is Orthanc up? The one answer that modules, roles and the summary share.

Any HTTP answer means Orthanc runs: a 401 or 403 says it refused the credentials, a 5xx that it
answered with an error, and a message says what it answered. Only when nothing answers on its
port (connection refused, timeout) is Orthanc "not answering", and only when no Orthanc process
is left for its configuration (and none holds its index) is it "not running".

States (the ``state`` of a record, and ``orthanc_state`` of a backup's result):

- ``answering``: ``GET /system`` answered 200 with Orthanc's JSON;
- ``refused``: it answered 401 or 403: Orthanc runs, the credentials are wrong or missing;
- ``http error``: it answered another HTTP status (or 200 with something that is not Orthanc's);
- ``not answering``: nothing answered; an Orthanc process runs (``pids``), or whether one runs
  could not be told;
- ``not running``: nothing answered, and no Orthanc process runs for that configuration.

Runs on the managed host (standard library and ansible.module_utils only); the wording functions
are also used on the controller by the filters."""

from __future__ import annotations

import http.client
import json
import os
import socket
import urllib.error

from ansible.module_utils.urls import open_url

from ansible_collections.pacs.orthanc.plugins.module_utils import _sqlite
from ansible_collections.pacs.orthanc.plugins.module_utils._common import PacsError

__metaclass__ = type

ANSWERING = "answering"
REFUSED = "refused"
HTTP_ERROR = "http error"
NOT_ANSWERING = "not answering"
NOT_RUNNING = "not running"
STATES = (ANSWERING, REFUSED, HTTP_ERROR, NOT_ANSWERING, NOT_RUNNING)
HTTP_STATES = (ANSWERING, REFUSED, HTTP_ERROR)  # Orthanc runs: something answered HTTP


def ask(url: str, username: str | None = None, password: str | None = None, timeout: float = 5) -> dict:
    """``GET /system`` once. Returns ``state`` (answering, refused, http error, or not answering),
    ``http_status`` (None when nothing answered), ``reason`` (the HTTP reason, or why nothing
    answered), ``credentials`` (whether any were sent) and, when it answered, ``system``."""
    record = {"url": url, "state": NOT_ANSWERING, "http_status": None, "reason": None,
              "credentials": bool(username), "system": None}
    try:
        response = open_url(url.rstrip("/") + "/system", timeout=timeout, url_username=username or None,
                            url_password=password or None, force_basic_auth=bool(username))
        try:
            status = response.getcode() if hasattr(response, "getcode") else 200
            body = response.read()
        finally:
            response.close()
    except urllib.error.HTTPError as exc:
        record.update({"http_status": exc.code, "reason": str(exc.reason or ""),
                       "state": REFUSED if exc.code in (401, 403) else HTTP_ERROR})
        return record
    except http.client.HTTPException as exc:  # something answers on the port, but not in HTTP
        record["reason"] = f"the port answers, but not in HTTP ({type(exc).__name__})"
        return record
    except (OSError, ValueError, socket.timeout) as exc:  # URLError is an OSError
        reason = getattr(exc, "reason", None) or exc
        record["reason"] = os.strerror(reason.errno) if getattr(reason, "errno", None) else (str(reason) or type(reason).__name__)
        if isinstance(reason, socket.timeout) or "timed out" in record["reason"]:
            record["reason"] = f"no answer within {timeout:g} s"
        return record
    record["http_status"] = status
    try:
        system = json.loads(body.decode("utf-8"))
        if not isinstance(system, dict) or "Version" not in system:
            raise ValueError("no Version")
    except ValueError:
        record.update({"state": HTTP_ERROR, "reason": "the answer is not Orthanc's /system"})
        return record
    record.update({"state": ANSWERING, "system": system})
    return record


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return False


def _same_config(arg: str, target: str) -> bool:
    """The configuration Orthanc was given (a file or a folder) is the one we know, or the folder
    of it, or a file of it (/etc/orthanc and /etc/orthanc/orthanc.json name one configuration)."""
    return arg == target or os.path.dirname(target) == arg or os.path.dirname(arg) == target


def orthanc_processes(config_path: str | None = None, index_file: str | None = None):
    """PIDs of the live Orthanc processes started on ``config_path`` (any Orthanc when it is None),
    plus the process that holds the SQLite index ``index_file``. None when /proc cannot be read
    (then nobody can tell whether Orthanc runs)."""
    found = set()
    if index_file and os.path.exists(index_file):
        try:
            holder = _sqlite.lock_holder(index_file)
            if holder:
                found.add(holder)
        except Exception:  # pylint: disable=broad-except  # only evidence, never a failure
            pass
    try:
        entries = [int(e) for e in os.listdir("/proc") if e.isdigit()]
    except OSError:
        return sorted(found) if found else None
    target = os.path.realpath(config_path) if config_path else None
    for pid in entries:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as handle:
                argv = [a.decode("utf-8", "replace") for a in handle.read().split(b"\0") if a]
        except OSError:
            continue
        if not argv or os.path.basename(argv[0]).lower() != "orthanc" or not _alive(pid):
            continue
        if target is None:
            found.add(pid)
            continue
        try:
            cwd = os.readlink(f"/proc/{pid}/cwd")
        except OSError:
            cwd = "/"
        for arg in argv[1:]:
            if arg.startswith("-"):
                continue
            if _same_config(os.path.realpath(os.path.join(cwd, arg)), target):
                found.add(pid)
                break
    return sorted(found)


def probe(url: str, username: str | None = None, password: str | None = None, timeout: float = 5,
          config_path: str | None = None, index_file: str | None = None) -> dict:
    """``ask``, and when nothing answered, whether an Orthanc process still runs. Adds ``pids``
    (Orthanc processes found, None when that could not be told) and ``orthanc_running`` (True
    when Orthanc answered HTTP at all)."""
    record = ask(url, username, password, timeout)
    record["pids"] = None
    if record["state"] == NOT_ANSWERING:
        record["pids"] = orthanc_processes(config_path, index_file)
        if record["pids"] == []:
            record["state"] = NOT_RUNNING
    record["orthanc_running"] = record["state"] in HTTP_STATES
    record["config_path"] = config_path
    return record


# -- wording: the same sentences from modules, roles and the summary ------------------------------

def _answered(status) -> str:
    return f"Orthanc answered HTTP {status}"


def phrase(record) -> str:
    """A few words for a summary line: 'Orthanc running', 'Orthanc answered HTTP 401: it refused
    the credentials', 'ORTHANC NOT ANSWERING', 'ORTHANC NOT RUNNING'. Takes a probe record, or a
    backup result (``orthanc_state``, ``orthanc_http_status``, or only ``orthanc_running``)."""
    record = record or {}
    state = record.get("state", record.get("orthanc_state"))
    status = record.get("http_status", record.get("orthanc_http_status"))
    if state is None:  # a result from before the states: orthanc_running only
        return "Orthanc running" if record.get("orthanc_running") else "ORTHANC NOT ANSWERING"
    if state == ANSWERING:
        return "Orthanc running"
    if state == REFUSED:
        return f"{_answered(status)}: it refused the credentials"
    if state == HTTP_ERROR:
        return f"{_answered(status)}" + ("" if status and status != 200 else ": not Orthanc's answer")
    if state == NOT_ANSWERING:
        return "ORTHANC NOT ANSWERING" + (", its process runs" if record.get("pids") else "")
    if state == NOT_RUNNING:
        return "ORTHANC NOT RUNNING"
    return f"Orthanc's state unknown ({state})"


def sentence(record, host: str | None = None, start_hint: str | None = None) -> str:
    """One sentence (no final period) on Orthanc's state for a message, naming what it answered,
    or that nothing answers, or that it is not running and how to start it."""
    record = record or {}
    state = record.get("state")
    url = record.get("url") or "its URL"
    status, reason = record.get("http_status"), record.get("reason")
    where = f" on {host}" if host else ""
    start_hint = start_hint or record.get("start_hint")
    if state == ANSWERING:
        return f"Orthanc answers at {url}"
    if state == REFUSED:
        what = ("it refused the credentials" if record.get("credentials", True)
                else "it requires credentials and none were given")
        return f"{_answered(status)} at {url}: {what}"
    if state == HTTP_ERROR:
        detail = f" ({reason})" if reason else ""
        return f"{_answered(status)} at {url}{detail}"
    if state == NOT_ANSWERING:
        why = f" ({reason})" if reason else ""
        pids = record.get("pids")
        if pids:
            return (f"ORTHANC IS NOT ANSWERING{where}: nothing answers at {url}{why}, although its process runs "
                    f"(PID {', '.join(str(p) for p in pids)}): look at its log")
        return f"ORTHANC IS NOT ANSWERING{where}: nothing answers at {url}{why}"
    if state == NOT_RUNNING:
        how = f": start it with '{start_hint}'" if start_hint else ""
        return f"ORTHANC IS NOT RUNNING{where}{how}"
    return f"whether Orthanc runs{where} could not be told" + (f": {record.get('msg')}" if record.get("msg") else "")


def refused_error(record, step: str = "ask Orthanc's REST API"):
    """The PacsError for an Orthanc that answered but refused the credentials."""
    return PacsError(step, sentence(record), orthanc_state=record.get("state"),
                     orthanc_http_status=record.get("http_status"))

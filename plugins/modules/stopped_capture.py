#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: pacs.orthanc contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: stopped_capture
short_description: Stop Orthanc, capture its index and the last storage files, start it again, in one task
version_added: 0.1.0
description:
  - The part of a SQLite backup that needs Orthanc stopped, done in one process so that the
    downtime holds no task start-up, stop Orthanc (M(pacs.orthanc.orthanc_control)'s logic),
    take the whole C(index*) set as it is (M(pacs.orthanc.sqlite_capture)'s logic), run the storage
    delta pass against that copy (M(pacs.orthanc.storage_copy)'s logic), and start Orthanc again.
  - The index files are taken by reflink (C(FICLONE)) where the backup is on the index's filesystem
    and that filesystem shares extents (XFS made with C(reflink=1), btrfs), in milliseconds whatever the
    index size. Elsewhere (another filesystem, ext4) their bytes are copied. Either way the write-ahead
    log is replayed into the copy only after Orthanc was started again, and the integrity check runs
    later still (M(pacs.orthanc.backup_set) C(complete)). The manifest says which (C(index_capture)).
  - Orthanc is started again whatever failed after the stop; the task then fails with the first
    cause. Its result says whether Orthanc was started again (C(restarted)), so that a role's
    C(always) block starts it only when this process could not (killed, for instance).
  - The downtime is measured here, from the stop command to the first answer of the REST API,
    with the time of each phase.
  - The storage delta inside the window examines only what Orthanc's change log names since the hot
    pass began (recorded by M(pacs.orthanc.storage_copy)'s hot phase), so its work follows what
    changed, not the archive; it compares every attachment when that position cannot be trusted, and
    always once Orthanc runs again, as a safety net. RV(delta) (its C(window_pass)) and the manifest's
    C(window_pass) say which way it ran.
extends_documentation_fragment:
  - pacs.orthanc.rest
  - pacs.orthanc.capture
  - pacs.orthanc.container
options:
  stop:
    description: Stop Orthanc first (and start it after). False for an Orthanc that is not running.
    type: bool
    default: true
  service_name:
    description: The service that runs Orthanc, when no commands are given.
    type: str
    default: orthanc
  stop_command:
    description: Shell command that stops Orthanc instead of the service.
    type: str
  start_command:
    description: Shell command that starts Orthanc instead of the service.
    type: str
  stop_timeout:
    description: Seconds to wait for Orthanc to stop and release its index.
    type: float
    default: 60
  start_timeout:
    description: Seconds to wait for Orthanc to answer after the start.
    type: float
    default: 60
  index_directory:
    description: Orthanc's index folder.
    type: path
    required: true
  storage_source:
    description: Orthanc's storage folder.
    type: path
    required: true
attributes:
  check_mode:
    support: none
    description: Stops Orthanc; not run in check mode.
author:
  - pacs.orthanc developers (@pacs-orthanc)
"""

EXAMPLES = r"""
- name: Stop, capture, delta, start
  pacs.orthanc.stopped_capture:
    index_directory: /var/lib/orthanc/db-v6
    index_dest: /var/backups/orthanc/20261129T070000Z.incomplete/index
    storage_source: /var/lib/orthanc/db-v6
    storage_dest: /var/backups/orthanc/20261129T070000Z.incomplete/storage
    state_file: /var/backups/orthanc/20261129T070000Z.incomplete/.work/storage.db
  register: window
"""

RETURN = r"""
downtime_seconds:
  description: From the stop command to the first answer after the start (0 when O(stop) is false).
  type: float
  returned: success
phases:
  description: Seconds spent stopping, capturing the index, in the delta pass and starting. The delta
    pass here is only the fetch of the files the hot pass lacks; the removal of the files deleted
    meanwhile and the totals run after the start (RV(after_start_seconds)).
  type: dict
  returned: success
  sample: {"stop": 1.21, "capture": 0.08, "delta": 0.02, "start": 0.24}
after_start_seconds:
  description: Seconds spent after the start on what could wait (replay of the write-ahead log into the
    index copy, index summary, removal of files deleted since the hot pass, storage totals).
  type: float
  returned: success
stopped_at:
  description: When the stop began (UTC).
  type: str
  returned: success
restarted_at:
  description: When Orthanc answered again (UTC).
  type: str
  returned: success
running_after:
  description: Whether Orthanc answered at the end of this task (also returned on failure).
  type: bool
  returned: always
capture:
  description: The index copy, its path, size, schema version and counts, and how the index files were
    taken (C(index_capture), C(reflink) or C(copy)).
  type: dict
  returned: success
  sample: {"path": "/var/backups/orthanc/20261129T070000Z.incomplete/index/index", "index_capture": "reflink"}
delta:
  description:
    - The delta pass, as M(pacs.orthanc.storage_copy) returns it, and C(window_pass), how the window
      examined the storage. C(mode) C(changes), only the attachments of the resources that Orthanc's
      change log names since the hot pass's C(change_position) (C(changes) entries) and the files the hot
      pass left; C(full), every attachment of the index, because the position could not be trusted
      (C(reason)).
    - With C(changes), once Orthanc runs again every attachment is compared as a safety net, and
      C(late_files) counts the files placed then (Orthanc logs no change for some attachments it adds
      itself), C(late_examples) names a few.
  type: dict
  returned: success
  sample: {"fetched_files": 4, "late_files": 0, "window_pass": {"mode": "changes", "reason": null,
           "change_position": 1821, "changes": 9}}
"""

import signal
import time

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.pacs.orthanc.plugins.module_utils import _backupset, _control, _record, _rest, _specs, _sqlite, _storage
from ansible_collections.pacs.orthanc.plugins.module_utils._common import PacsError, run_module


def capture_window(module):
    with _backupset.Heartbeat(module.params["storage_dest"]):
        return _capture_window(module)


def _capture_window(module):
    p = module.params
    controller = _control.Controller(p["url"], p["username"], p["password"], p["service_name"],
                                     p["stop_command"], p["start_command"],
                                     container=p["container"], container_engine=p["container_engine"])
    index_file = f"{p['index_directory'].rstrip('/')}/index"
    phases, result = {}, {"changed": True, "running_after": False}
    stopped = None
    failure = None
    guardian = None
    delta_step = None
    changes_since = None
    # Orthanc is down from here to the start below: an interrupt (Ctrl-C, a job cancelled in AWX)
    # must not stop us halfway, and should this process die anyway, the guardian starts Orthanc.
    previous_handlers = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        if p["stop"]:
            guardian = _control.Guardian(controller, timeout=p["start_timeout"]).start()
            stopped = controller.stop(index_file, p["stop_timeout"])
            phases["stop"] = stopped["seconds"]
        t0 = time.monotonic()
        _sqlite.wait_until_free(index_file, 0 if p["stop"] else p["stop_timeout"])
        # by reflink where the filesystem can: milliseconds whatever the index size; the WAL is
        # replayed into the copy after the start (SQLite reads the set as it is meanwhile)
        copied = _sqlite.capture_index_set(p["index_directory"], p["index_dest"])
        phases["capture"] = round(time.monotonic() - t0, 3)
        t0 = time.monotonic()
        # only what the hot pass lacks is fetched here: the removal of files deleted meanwhile,
        # the totals and the index's summary wait until Orthanc runs again (below). Where the
        # index's change log names what changed since the hot pass began, only that is examined
        delta_step = _storage.Delta(p["storage_source"], p["storage_dest"], p["state_file"], index=copied["path"],
                                    previous=p["previous"], link_mode=p["link_mode"], workers=p["workers"])
        plan = delta_step.window_plan()
        changes_since = plan["change_position"] if plan["mode"] == _storage.WINDOW_CHANGES else None
        delta = delta_step.fetch(changes_since=changes_since)
        phases["delta"] = round(time.monotonic() - t0, 3)
        delta["window_pass"] = plan
        if delta["missing_files"]:
            raise PacsError("copy storage (delta pass)",
                            f"{delta['missing_files']} files that the index lists are missing from {p['storage_source']} "
                            f"(e.g. {delta['missing_examples'][0]}): the live archive is already damaged")
        lost = delta.get("lost_in_live_storage") or []
        if lost:
            module.warn(f"{len(lost)} files that Orthanc's index lists are gone from {p['storage_source']} "
                        f"(e.g. {lost[0]}): THE LIVE ARCHIVE IS DAMAGED. This backup holds them, from the "
                        "previous backup; restore them from it")
        result.update({"capture": copied, "delta": delta})
    except Exception as exc:  # pylint: disable=broad-except  # whatever failed, Orthanc is started below
        failure = exc if isinstance(exc, PacsError) else PacsError(
            "capture while stopped", str(exc) if isinstance(exc, OSError) else f"unexpected {type(exc).__name__}: {exc}")
    finally:
        if stopped is not None or (failure is not None and p["stop"]):
            try:
                started = controller.start(p["start_timeout"], grace=3 if failure else 0)
                result["running_after"] = True
                if controller.refused() is not None:  # it runs again; its configuration may have changed
                    module.warn(f"Orthanc was started again and runs, but {controller.refused().cause}")
                phases["start"] = started["seconds"]
                if stopped is not None:
                    result.update({"stopped_at": stopped["began_at"], "restarted_at": started["ended_at"],
                                   "downtime_seconds": round(started["ended_ts"] - stopped["began_ts"], 3)})
            except PacsError as exc:
                cause = f"{exc}" + (f" (after: {failure})" if failure else "")
                raise PacsError("start Orthanc again", cause, running_after=False)
            finally:
                if guardian is not None:
                    guardian.done()
        elif guardian is not None:
            guardian.done()
        for sig, handler in previous_handlers.items():
            signal.signal(sig, handler)
    if failure is None:
        try:  # Orthanc runs again: what can wait for it
            t0 = time.monotonic()
            if changes_since is not None:
                _safety_net(module, p, delta_step, result["delta"])
            result["delta"].update(delta_step.tidy())
            delta_step.close()  # it reads the index copy: closed before the copy is consolidated
            _sqlite.finish_capture(result["capture"])
            result["capture"].update(_sqlite.read_summary(result["capture"]["path"]))
            result["after_start_seconds"] = round(time.monotonic() - t0, 3)
        except (PacsError, OSError) as exc:
            failure = exc if isinstance(exc, PacsError) else PacsError("copy storage (delta pass)", str(exc))
    if delta_step is not None:
        delta_step.close()
    if failure is not None:
        failure.details["running_after"] = result["running_after"]
        raise failure
    result.setdefault("downtime_seconds", 0.0)
    result["phases"] = phases
    _record.record_beside(p["storage_dest"], "stopped", {
        "stopped_at": result.get("stopped_at"), "restarted_at": result.get("restarted_at"),
        "downtime_seconds": result["downtime_seconds"], "phases": phases,
        "index_capture": result["capture"]["index_capture"],
        "window_pass": _window_record(result["delta"]),
        "lost_in_live_storage": result["delta"].get("lost_in_live_storage") or []})
    return result


def _safety_net(module, p, delta_step, delta: dict) -> None:
    """After the start, the full comparison of the captured index with what is placed: whatever
    the change log did not name (attachments Orthanc adds without logging a change) is placed now,
    from the live storage or the previous backup; a file that is in neither fails the backup."""
    late = delta_step.fetch()
    delta["late_files"] = late["fetched_files"]
    delta["late_examples"] = late["fetched_examples"]
    if late["missing_files"]:
        raise PacsError("copy storage (after the start)",
                        f"{late['missing_files']} files that the captured index lists were neither seen by the hot "
                        f"pass nor named by Orthanc's change log, so the stop window did not copy them, and now "
                        f"neither {p['storage_source']} nor the previous backup holds them (e.g. "
                        f"{late['missing_examples'][0]}): deleted since Orthanc was started again, or lost from the "
                        "live archive; this backup would lack them. Run the backup again")
    lost = late.get("lost_in_live_storage") or []
    if lost:
        delta["lost_in_live_storage"] = sorted(set(delta.get("lost_in_live_storage") or []) | set(lost))
        module.warn(f"{len(lost)} files that Orthanc's index lists are gone from {p['storage_source']} "
                    f"(e.g. {lost[0]}): THE LIVE ARCHIVE IS DAMAGED. This backup holds them, from the "
                    "previous backup; restore them from it")


def _window_record(delta: dict) -> dict:
    """Which way the window pass ran, for the manifest: ``mode`` changes|full, why not by changes
    (``reason``), the change position, and the files placed only after the start (``late_files``)."""
    plan = delta.get("window_pass") or {}
    return {"mode": plan.get("mode"), "reason": plan.get("reason"), "change_position": plan.get("change_position"),
            "changes": plan.get("changes"), "fetched_files": delta.get("fetched_files"),
            "late_files": delta.get("late_files", 0)}


def main():
    module = AnsibleModule(
        argument_spec=dict(
            stop=dict(type="bool", default=True),
            service_name=dict(type="str", default="orthanc"),
            stop_command=dict(type="str"),
            start_command=dict(type="str"),
            stop_timeout=dict(type="float", default=60),
            start_timeout=dict(type="float", default=60),
            **_rest.ARGUMENT_SPEC,
            index_directory=dict(type="path", required=True),
            storage_source=dict(type="path", required=True),
            **_specs.CAPTURE,
            **_specs.CONTAINER,
        ),
        supports_check_mode=False,
    )
    run_module(module, capture_window)


if __name__ == "__main__":
    main()

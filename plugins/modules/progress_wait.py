#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: pacs.orthanc contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: progress_wait
short_description: Wait for the next progress report of a long step running with async
version_added: 0.3.0
description:
  - A long step (hot pass, verification, restore copy, shipping, off-site upload, dump, drill) runs
    with C(async) and C(poll=0) and writes its progress into O(path) (the module option C(progress)).
    This module waits until that file holds a report newer than O(seen), or the step has ended, or
    O(timeout) seconds have passed, and returns the report and its line (C(HOST STEP) followed by
    C(n/N files, b/B GiB (p%), R MB/s, ETA ...)).
  - The roles run it in a loop (roles/common/tasks/progress.yml) whose label is that line, so that
    C(ansible-playbook) and AWX's job output show one line per report without a callback plugin.
  - It only reads, and removes the progress file once it has returned the step's last report.
options:
  path:
    description: The progress file of the step.
    type: path
    required: true
  job_file:
    description:
      - The async job's results file (C(results_file) of the task started with C(poll=0)); the wait
        ends when it says the job has finished.
    type: path
  seen:
    description: The number (C(seq)) of the last report already shown; 0 for none.
    type: int
    default: 0
  timeout:
    description: Seconds to wait at most for a new report.
    type: float
    default: 60
  label:
    description: The host and step named in the line while the step has written no report yet.
    type: str
    default: ""
attributes:
  check_mode:
    support: full
    description: Reads only, as in a real run.
author:
  - pacs.orthanc developers (@pacs-orthanc)
"""

EXAMPLES = r"""
- name: Hot pass, started in the background
  pacs.orthanc.storage_copy:
    phase: hot
    source: /var/lib/orthanc/db-v6
    dest: /var/backups/orthanc/20261129T070000Z.incomplete/storage
    progress:
      path: /tmp/pacs-orthanc-progress-1234.json
      interval: 30
  async: 2592000
  poll: 0
  register: job

- name: Show the progress of the hot pass
  pacs.orthanc.progress_wait:
    path: /tmp/pacs-orthanc-progress-1234.json
    job_file: "{{ job.results_file }}"
    seen: "{{ 0 if item == 0 else progress.seq }}"
    timeout: 45
  loop: "{{ range(100000) | list }}"
  loop_control:
    label: "{{ progress.line }}"
    break_when: progress.finished
  register: progress
"""

RETURN = r"""
line:
  description: The line of the newest report (or a word that none is new).
  type: str
  returned: always
seq:
  description: The number of the newest report (0 before the first).
  type: int
  returned: always
new:
  description: Whether the report is newer than O(seen).
  type: bool
  returned: always
ended:
  description: Whether the step wrote its last report (C(state) done or failed).
  type: bool
  returned: always
finished:
  description: Whether the step is over, its last report shown or its job finished (this ends the loop).
  type: bool
  returned: always
progress:
  description: The report itself (files, bytes, totals, percent, rate, ETA, state).
  type: dict
  returned: always
"""

import json
import os
import time

from ansible.module_utils.basic import AnsibleModule

POLL = 0.25


def read_json(path):
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def job_finished(job_file) -> bool:
    """async_wrapper writes {"started": 1, "finished": 0} first and the module's result at the end."""
    if not job_file:
        return False
    data = read_json(job_file)
    if not data:
        return False  # being written
    return not (data.get("started") and not data.get("finished"))


GONE = "the module process ended without a result (it was killed)"
GRACE = 3.0  # seconds a gone process's job may take to get its result written


def alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except (TypeError, ValueError):
        return True  # unknown: taken for alive
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def close_job(job_file) -> None:
    """The job's process is gone and nobody wrote its result (its async_wrapper was killed with
    it): write the failure that async_wrapper would have written, so that async_status ends."""
    tmp = job_file + ".pacs-tmp"
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump({"failed": True, "msg": GONE, "cause": GONE, "data": ""}, handle)
    os.rename(tmp, job_file)


def wait(path, job_file, seen, timeout, clock=time.monotonic, sleep=time.sleep, is_alive=alive):
    deadline = clock() + timeout
    gone_since = None
    while True:
        record = read_json(path)
        seq = int(record.get("seq") or 0)
        ended = record.get("state") in ("done", "failed")
        done = job_finished(job_file)
        if not done and not ended and job_file and record.get("pid") and not is_alive(record["pid"]):
            gone_since = gone_since if gone_since is not None else clock()
            if clock() - gone_since >= GRACE and not job_finished(job_file):
                close_job(job_file)
                return record, False, True
        if ended and seq > seen:
            # the last report: give the job a moment to hand its result over, then end the loop
            end = clock() + min(timeout, 30)
            while not job_finished(job_file) and job_file and clock() < end:
                sleep(POLL)
            return record, True, True
        if seq > seen and not ended:
            return record, True, False
        if done:
            return record, False, True
        if clock() >= deadline:
            return record, False, False
        sleep(POLL)


def main():
    module = AnsibleModule(
        argument_spec=dict(
            path=dict(type="path", required=True),
            job_file=dict(type="path"),
            seen=dict(type="int", default=0),
            timeout=dict(type="float", default=60),
            label=dict(type="str", default=""),
        ),
        supports_check_mode=True,
    )
    p = module.params
    record, new, finished = wait(p["path"], p["job_file"], p["seen"], max(0.0, p["timeout"]))
    seq = int(record.get("seq") or 0)
    if new:
        text = record.get("line") or ""
    elif finished:
        text = f"{p['label']}: ended" + (f" ({record.get('state')})" if record.get("state") else "")
    else:
        text = f"{p['label']}: still running, no new report for {p['timeout']:.0f} s"
    if finished:
        try:
            os.unlink(p["path"])  # this step's own scratch file, read for the last time
        except OSError:
            pass
    module.exit_json(changed=False, line=text.strip(": "), seq=max(seq, p["seen"]), new=new,
                     ended=record.get("state") in ("done", "failed"), finished=finished, progress=record)


if __name__ == "__main__":
    main()

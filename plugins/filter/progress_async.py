# -*- coding: utf-8 -*-
# Copyright: pacs.orthanc contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Whether a long step runs in the background with its progress lines, or at once: the one place
that decides it for every long step (hot pass, dump, verification, restore copy, drill, off-site
upload, shipping)."""

from __future__ import annotations

import base64
import binascii
import json

DOCUMENTATION = r"""
name: progress_async
short_description: Decide whether a long step runs with async and progress lines, or synchronously
version_added: 0.3.0
description:
  - A long step runs in the background (C(async), its progress shown every
    C(orthanc_progress_interval) seconds) unless its estimated duration is below one interval; then
    it runs at once, as a plain task, without the progress loop and the C(async_status) tasks
    (which cost about a second per step). Results and failures are the same either way.
  - The estimate is conservative; without anything known it runs in the background.
  - "Estimate: C(1) s to start, plus I(fixed), plus I(bytes) at 20 MB/s (or at I(rate) when lower),
    plus I(files) at 200 files/s; at least what the same step took the last time (I(last)) times
    1.5, scaled up by how much more work there is now; all times I(rounds)."
positional: _input, interval, async_seconds
options:
  _input:
    description:
      - The step's work, as far as it is known. Keys, all optional C(bytes) (to copy, read or send),
        C(files) (to visit), C(last) (the same step's C(seconds), C(bytes), C(files) the last time),
        C(rate) (a bandwidth limit in bytes/s; 0 none), C(fixed) (seconds the step takes anyway),
        C(rounds) (how many times that long it may take, e.g. waiting for a transfer slot).
      - Null or empty, nothing is known.
    type: dict
    required: true
  interval:
    description: C(orthanc_progress_interval), seconds.
    type: float
    required: true
  async_seconds:
    description: The value of C(async) for a step run in the background.
    type: int
    required: true
"""

EXAMPLES = r"""
- name: Copy the storage
  pacs.orthanc.storage_copy:
    phase: hot
  async: "{{ {'bytes': 1000000, 'files': 30} | pacs.orthanc.progress_async(30, 2592000) }}"
  poll: 0
"""

RETURN = r"""
_value:
  description: 0 (run at once) or I(async_seconds) (run in the background with progress lines).
  type: int
"""

BYTES_PER_SECOND = 20e6   # a slow disk, a busy network
FILES_PER_SECOND = 200.0  # a slow filesystem, tiny files
START_SECONDS = 1.0       # a module's start and end
LAST_MARGIN = 1.5


def _number(value):
    if value is None or isinstance(value, bool) or value == "":
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if number >= 0 else None


def estimate_seconds(work) -> float | None:
    """The step's estimated duration in seconds, or None when nothing is known."""
    if not isinstance(work, dict):
        return None
    nbytes, files = _number(work.get("bytes")), _number(work.get("files"))
    last = work.get("last") if isinstance(work.get("last"), dict) else {}
    last_seconds = _number(last.get("seconds"))
    if nbytes is None and files is None and last_seconds is None:
        return None
    rate = _number(work.get("rate")) or 0
    rate = min(BYTES_PER_SECOND, rate) if rate > 0 else BYTES_PER_SECOND
    seconds = START_SECONDS + (_number(work.get("fixed")) or 0) + (nbytes or 0) / rate + (files or 0) / FILES_PER_SECOND
    if last_seconds is not None:
        scale = 1.0
        for now, then in ((nbytes, _number(last.get("bytes"))), (files, _number(last.get("files")))):
            if now is not None and then:
                scale = max(scale, now / then)
        seconds = max(seconds, last_seconds * scale * LAST_MARGIN)
    rounds = _number(work.get("rounds"))
    return seconds * max(1.0, rounds or 1.0)


def progress_async(work, interval, async_seconds) -> int:
    """0 when the step's estimate is below one ``interval``, else ``async_seconds``."""
    seconds = estimate_seconds(work)
    interval = _number(interval) or 30.0
    return 0 if seconds is not None and seconds < interval else int(async_seconds)


def backup_work(content) -> dict | None:
    """A backup's work for the estimate, from its manifest.json as ``slurp`` gives it (base64):
    ``{bytes, files}`` of its storage and dump; None when it cannot be read (the verification says
    why, in its own step)."""
    try:
        manifest = json.loads(base64.b64decode(content or "", validate=False).decode("utf-8"))
    except (TypeError, ValueError, binascii.Error, UnicodeDecodeError):
        return None
    if not isinstance(manifest, dict):
        return None
    storage = manifest.get("storage") if isinstance(manifest.get("storage"), dict) else {}
    dump = manifest.get("dump") if isinstance(manifest.get("dump"), dict) else {}
    nbytes = (_number(storage.get("bytes")) or 0) + (_number(dump.get("bytes")) or 0)
    return {"bytes": int(nbytes), "files": int(_number(storage.get("files")) or 0)}


class FilterModule:
    def filters(self):
        return {"progress_async": progress_async, "backup_work": backup_work}

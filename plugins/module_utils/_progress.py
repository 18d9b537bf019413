# -*- coding: utf-8 -*-
# Copyright: pacs.orthanc contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Progress of a long step (hot pass, verification, restore copy, shipping, off-site upload,
dump, drill): files and bytes done of the total, rate and time left.

The step's loop calls ``Progress.add`` (or ``Progress.set``) for every file or chunk; that costs a
few additions, and the clock is read only every ``check_every`` files or ``check_bytes`` bytes.
At most every ``interval`` seconds the progress is written, atomically:

- into a small progress file (``path``), that ``pacs.orthanc.progress_wait`` reads for the play's
  output (one line per report, ``HOST STEP: n/N files, b/B GiB (p%), R MB/s, ETA ...``);
- into the host's status file (``status_file``, key ``progress``, see ``_status``), which the
  metrics read, so that a running step shows there too (not in check mode).

A last report, at 100% when the step succeeded, is written when the step ends (``finish``, or the
context manager). Totals known up front are given; otherwise an estimate (``estimated``), which
the line marks with ``~`` and which grows when the work passes it."""

from __future__ import annotations

import os
import time

from ansible_collections.pacs.orthanc.plugins.module_utils import _status
from ansible_collections.pacs.orthanc.plugins.module_utils._common import Ticker, iso, utc_now, write_json_atomic

__metaclass__ = type

FORMAT = "pacs.orthanc.progress"
GIB = 1024 ** 3
CHECK_EVERY = 256              # files between two readings of the clock
CHECK_BYTES = 4 * 1024 * 1024   # or bytes


def duration(seconds) -> str:
    """H:MM:SS (and days, past one): ``0:04:05``, ``2d 03:00:00``; ``?`` when unknown."""
    if seconds is None:
        return "?"
    seconds = max(0, int(round(float(seconds))))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours:02d}:{minutes:02d}:{secs:02d}"
    return f"{hours}:{minutes:02d}:{secs:02d}"


def percent(done, total, ended_ok: bool = False):
    """Whole percent done (by bytes when there are any, else by files); 100 only once the step
    has ended well, 99 at most before; None when the total is unknown."""
    if ended_ok:
        return 100
    if not total:
        return None
    return max(0, min(99, int(100 * done / total)))


def eta_seconds(done, total, elapsed):
    """Seconds left at the mean rate so far; None when unknown (nothing done yet, no total, or
    the work past its estimated total)."""
    if not total or not done or elapsed <= 0 or done >= total:
        return None
    return (total - done) * elapsed / done


def line(record: dict) -> str:
    """The one line of a report: ``HOST STEP: n/N files, b/B GiB (p%), R MB/s, ETA H:MM:SS``;
    the last one says ``done in`` (or ``FAILED after``) instead of the ETA. Totals that are
    estimates are marked ``~``, unknown ones ``?``."""
    state = record.get("state", "running")
    who = " ".join(p for p in (record.get("host"), record.get("step")) if p)
    if state == "waiting":  # before the work: what it waits for (a transfer slot), and since when
        text = f"{record.get('note') or 'waiting'}, since {duration(record.get('elapsed_seconds'))}"
        return f"{who}: {text}" if who else text
    mark = "~" if record.get("estimated") else ""
    parts = []
    files_done, files_total = record.get("files_done") or 0, record.get("files_total")
    bytes_done, bytes_total = record.get("bytes_done") or 0, record.get("bytes_total")
    if files_total is not None or files_done:
        parts.append(f"{files_done}/{mark + str(files_total) if files_total is not None else '?'} files")
    if bytes_total is not None or bytes_done or not parts:
        total = f"{mark}{bytes_total / GIB:.2f}" if bytes_total is not None else "?"
        parts.append(f"{bytes_done / GIB:.2f}/{total} GiB")
    share = record.get("percent")
    parts[-1] += f" ({share}%)" if share is not None else ""
    parts.append(f"{(record.get('rate_bytes_per_second') or 0) / 1e6:.1f} MB/s")
    if state == "done":
        parts.append(f"done in {duration(record.get('elapsed_seconds'))}")
    elif state == "failed":
        parts.append(f"FAILED after {duration(record.get('elapsed_seconds'))}")
    else:
        parts.append(f"ETA {duration(record.get('eta_seconds'))}")
    return f"{who}: {', '.join(parts)}" if who else ", ".join(parts)


class Progress:
    """The progress of one step (see the module's docstring). ``clock`` is for tests."""

    def __init__(self, step: str, files_total=None, bytes_total=None, estimated: bool = False,
                 path: str | None = None, status_file: str | None = None, textfile: str | None = None,
                 interval: float = 30.0, host: str | None = None, check_mode: bool = False,
                 check_every: int = CHECK_EVERY, check_bytes: int = CHECK_BYTES, clock=time.monotonic):
        self.step, self.host = step, host
        self.files_total, self.bytes_total, self.estimated = files_total, bytes_total, estimated
        self.path, self.interval = path, max(0.1, float(interval))
        self.status_file = None if check_mode else status_file
        self.textfile = None if check_mode else textfile
        self.check_every, self.check_bytes = max(1, int(check_every)), max(1, int(check_bytes))
        self.clock = clock
        self.files_done = self.bytes_done = 0
        self.seq = 0
        self.started = clock()
        self.started_at = iso(utc_now())
        self.last_write = self.started
        self.ended = None
        self._files_since = self._bytes_since = 0
        self.error = None  # why a report could not be written (reporting never fails the step)
        self.note = None  # what the step waits for before its work begins (wait_note)
        self._write("running", announce=True)

    # the calls of the step's loop: cheap

    def add(self, files: int = 1, nbytes: int = 0) -> None:
        self.files_done += files
        self.bytes_done += nbytes
        self._files_since += files
        self._bytes_since += nbytes
        if self._files_since >= self.check_every or self._bytes_since >= self.check_bytes:
            self.tick()

    def set(self, files=None, nbytes=None, files_total=None, bytes_total=None) -> None:
        """Absolute counts (a tool's own status line, restic's say)."""
        if files is not None:
            self.files_done = int(files)
        if nbytes is not None:
            self.bytes_done = int(nbytes)
        if files_total is not None:
            self.files_total = int(files_total)
        if bytes_total is not None:
            self.bytes_total = int(bytes_total)
        self.tick()

    def wait_note(self, note: str) -> None:
        """The step waits before its work (for a transfer slot, say): a report that says so now."""
        self.note = note
        self._write("waiting")

    def begin(self) -> None:
        """The work begins now (after a wait): its rate, ETA and time count from here."""
        if self.note is not None:
            self.note = None
            self.started = self.last_write = self.clock()
            self.started_at = iso(utc_now())

    def totals(self, files=None, nbytes=None, estimated: bool = False) -> None:
        self.files_total, self.bytes_total, self.estimated = files, nbytes, estimated

    def tick(self) -> None:
        """Read the clock; write a report when ``interval`` has passed since the last one."""
        self._files_since = self._bytes_since = 0
        if self.clock() - self.last_write >= self.interval:
            self._write("running")

    # the end

    def finish(self, ok: bool = True, cause: str | None = None) -> dict:
        """The last report: 100% when ``ok`` (the totals become what was done)."""
        if self.ended is None:
            if ok:
                self.files_total, self.bytes_total, self.estimated = self.files_done, self.bytes_done, False
            self.ended = "done" if ok else "failed"
            self._write(self.ended, cause=cause)
        return self.record(self.ended)

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, _tb):
        self.finish(kind is None, str(getattr(exc, "cause", exc)) if exc is not None else None)
        return False

    # the report

    def record(self, state: str = "running") -> dict:
        elapsed = max(0.0, self.clock() - self.started)
        files_total, bytes_total = self.files_total, self.bytes_total
        if self.estimated:  # an estimate passed: the work so far is the least the total can be
            files_total = None if files_total is None else max(files_total, self.files_done)
            bytes_total = None if bytes_total is None else max(bytes_total, self.bytes_done)
        by_bytes = bool(bytes_total) or (bytes_total is None and self.bytes_done)
        done, total = (self.bytes_done, bytes_total) if by_bytes else (self.files_done, files_total)
        record = {
            "format": FORMAT, "seq": self.seq, "host": self.host, "step": self.step, "state": state,
            "started_at": self.started_at, "updated_at": iso(utc_now()), "pid": os.getpid(),
            "files_done": self.files_done, "files_total": files_total,
            "bytes_done": self.bytes_done, "bytes_total": bytes_total, "estimated": bool(self.estimated),
            "percent": percent(done, total, state == "done"),
            "elapsed_seconds": round(elapsed, 3),
            "rate_bytes_per_second": round(self.bytes_done / elapsed, 1) if elapsed > 0 else 0.0,
            "rate_files_per_second": round(self.files_done / elapsed, 2) if elapsed > 0 else 0.0,
            "eta_seconds": None if state != "running" else eta_seconds(done, total, elapsed),
            "interval_seconds": self.interval,
        }
        if state == "waiting":
            record["note"] = self.note
        record["line"] = line(record)
        return record

    def _write(self, state: str, announce: bool = False, cause: str | None = None) -> None:
        """The first report (``announce``) has seq 0: it says the step runs, it is not a line of
        the play's output; each later one has the next seq."""
        if not announce:
            self.seq += 1
        self.last_write = self.clock()
        if not (self.path or self.status_file):
            return
        record = self.record(state)
        if cause:
            record["cause"] = cause
        try:
            if self.path:
                write_json_atomic(self.path, record, mode=0o600, indent=None)
            if self.status_file:
                _status.set_progress(self.status_file, record, self.textfile)
        except OSError as exc:  # a full disk must not fail the step: the next report tries again
            self.error = f"{exc.strerror or exc}: {exc.filename or ''}"


def from_params(params, step: str, check_mode: bool = False, **totals) -> Progress:
    """A Progress from a module's ``progress`` option (see the doc fragment pacs.orthanc.progress);
    without it, one that only counts (nothing is written)."""
    params = params or {}
    return Progress(params.get("step") or step, path=params.get("path"), status_file=params.get("status_file"),
                    textfile=params.get("textfile"), interval=params.get("interval") or 30.0,
                    host=params.get("host"), check_mode=check_mode, **totals)


def read(path: str) -> dict:
    return _status.read_status(path)


def size_of(path: str) -> int:
    """Bytes of a file, or of every file below a folder; 0 when it is not there (yet)."""
    try:
        if not os.path.isdir(path):
            return os.path.getsize(path)
    except OSError:
        return 0
    total = 0
    for directory, _subdirs, names in os.walk(path):
        for name in names:
            try:
                total += os.path.getsize(os.path.join(directory, name))
            except OSError:
                pass
    return total


def reading_period(progress) -> float:
    """How often a thread reads the progress of a tool: four times a report, 0.2 to 2 s."""
    return max(0.2, min(2.0, progress.interval / 4))


class Watch:
    """While a tool writes ``paths`` (a dump file or folder, and the name it gets at the end, say)
    and this process waits for it, a thread reads their size as the bytes done."""

    def __init__(self, progress: Progress | None, *paths: str):
        self.progress, self.paths = progress, paths
        self._ticker = Ticker(self._measure)

    def _measure(self) -> None:
        self.progress.set(nbytes=sum(size_of(path) for path in self.paths))

    def __enter__(self):
        if self.progress is not None and (self.progress.path or self.progress.status_file):
            self._ticker.start(reading_period(self.progress))
        return self

    def __exit__(self, *exc):
        self._ticker.stop()
        if self.progress is not None:
            self._measure()
        return False

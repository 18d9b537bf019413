"""The progress reports' logic: the line, percent and ETA, estimates, how often the clock is read
and a report written, the status file's key, the wait of progress_wait, the summary's longest
step. Pure logic (files in tmp_path, a fake clock)."""

from __future__ import annotations

import json
import tempfile
import time

import pytest

from ansible_collections.pacs.orthanc.plugins.filter import backup_summary
from ansible_collections.pacs.orthanc.plugins.module_utils import _progress, _restic, _ship, _status
from ansible_collections.pacs.orthanc.plugins.modules import progress_wait
from ansible_collections.pacs.orthanc.plugins.filter.progress_async import backup_work, estimate_seconds, progress_async

pytestmark = pytest.mark.quick
GIB = 1024 ** 3


class Clock:
    def __init__(self):
        self.now, self.reads = 100.0, 0

    def __call__(self):
        self.reads += 1
        return self.now


def test_duration_and_eta():
    assert _progress.duration(0) == "0:00:00"
    assert _progress.duration(3725.4) == "1:02:05"
    assert _progress.duration(2 * 86400 + 3 * 3600) == "2d 03:00:00"
    assert _progress.duration(None) == "?"
    assert _progress.eta_seconds(25, 100, 10.0) == pytest.approx(30.0)
    assert _progress.eta_seconds(0, 100, 10.0) is None  # nothing done yet: no rate
    assert _progress.eta_seconds(120, 100, 10.0) is None  # past an estimate
    assert _progress.percent(99.9, 100) == 99 and _progress.percent(100, 100) == 99  # 100 only at the end
    assert _progress.percent(5, 100, ended_ok=True) == 100 and _progress.percent(5, None) is None


def test_line_of_a_running_and_a_last_report():
    record = {"host": "pacs-1", "step": "hot pass", "files_done": 1200, "files_total": 6030,
              "bytes_done": int(0.59 * GIB), "bytes_total": int(2.94 * GIB), "percent": 20,
              "rate_bytes_per_second": 85.3e6, "eta_seconds": 28, "state": "running"}
    assert _progress.line(record) == "pacs-1 hot pass: 1200/6030 files, 0.59/2.94 GiB (20%), 85.3 MB/s, ETA 0:00:28"
    assert _progress.line(dict(record, estimated=True)).startswith("pacs-1 hot pass: 1200/~6030 files, 0.59/~2.94 GiB")
    done = dict(record, state="done", percent=100, files_done=6030, bytes_done=int(2.94 * GIB), elapsed_seconds=75)
    assert _progress.line(done).endswith("(100%), 85.3 MB/s, done in 0:01:15")
    assert "FAILED after 0:01:15" in _progress.line(dict(done, state="failed"))
    # bytes only (a dump), unknown total
    dump = {"host": "db", "step": "dump", "bytes_done": GIB, "bytes_total": None, "percent": None,
            "rate_bytes_per_second": 0, "eta_seconds": None}
    assert _progress.line(dump) == "db dump: 1.00/? GiB, 0.0 MB/s, ETA ?"


def test_reports_are_written_every_interval_and_the_clock_read_only_every_n_files(tmp_path):
    clock = Clock()
    path, status_file = tmp_path / "p.json", tmp_path / "status.json"
    status_file.write_text(json.dumps({"host": "pacs-1", "result": "ok", "last_success": {"name": "x"}}))
    progress = _progress.Progress("hot pass", files_total=1000, bytes_total=1000 * 1024, estimated=True,
                                  path=str(path), status_file=str(status_file), interval=30, host="pacs-1",
                                  clock=clock, check_every=100, check_bytes=GIB)
    first = json.loads(path.read_text())
    assert first["seq"] == 0 and first["state"] == "running" and first["files_total"] == 1000
    reads = clock.reads
    for _count in range(99):
        progress.add(1, 1024)
    assert clock.reads == reads  # 99 files: the clock is not read
    progress.add(1, 1024)
    assert clock.reads == reads + 1 and json.loads(path.read_text())["seq"] == 0  # read; 30 s not passed
    clock.now += 30
    for _count in range(100):
        progress.add(1, 1024)
    report = json.loads(path.read_text())
    assert report["seq"] == 1 and report["files_done"] == 200 and report["percent"] == 20
    assert report["eta_seconds"] == pytest.approx(120.0) and report["line"].startswith("pacs-1 hot pass: 200/~1000 files")
    status = json.loads(status_file.read_text())
    assert status["progress"]["seq"] == 1 and status["last_success"] == {"name": "x"}  # the rest unchanged
    assert "pacs_orthanc_backup_progress_ratio{host=\"pacs-1\"} 0.2" in _status.prom_text(status)
    # the work passes its estimate: the total follows
    for _count in range(1000):
        progress.add(1, 1024)
    clock.now += 30
    progress.tick()
    report = json.loads(path.read_text())
    assert report["files_total"] == 1200 and report["percent"] == 99 and report["eta_seconds"] is None
    last = progress.finish()
    assert last["state"] == "done" and last["percent"] == 100 and last["files_total"] == 1200
    assert json.loads(path.read_text())["seq"] == 3
    # the status of the ended run drops the progress
    after = _status.update(json.loads(status_file.read_text()), "pacs-1", "backup", "failed", step="s", cause="c")
    assert "progress" not in after and "progress_ratio" not in _status.prom_text(after)


def test_a_failed_step_ends_with_a_failed_report_and_check_mode_writes_no_status(tmp_path):
    path, status_file = tmp_path / "p.json", tmp_path / "status.json"
    with pytest.raises(RuntimeError):
        with _progress.Progress("restore copy", path=str(path), status_file=str(status_file), check_mode=True,
                                clock=Clock()) as progress:
            progress.add(3, 300)
            raise RuntimeError("disk full")
    report = json.loads(path.read_text())
    assert report["state"] == "failed" and report["cause"] == "disk full" and report["percent"] is None
    assert not status_file.exists()


def test_an_unwritable_report_does_not_fail_the_step(tmp_path):
    progress = _progress.Progress("ship", path=str(tmp_path / "missing" / "p.json"), clock=Clock())
    assert progress.error and progress.finish()["state"] == "done"


def test_progress_wait_returns_a_new_report_or_the_end_or_a_timeout(tmp_path):
    path, job = tmp_path / "p.json", tmp_path / "job"
    job.write_text(json.dumps({"started": True, "finished": False}))
    clock = Clock()

    def sleep(seconds):
        clock.now += seconds

    path.write_text(json.dumps({"seq": 2, "state": "running", "line": "l2"}))
    record, new, finished = progress_wait.wait(str(path), str(job), 1, 10, clock=clock, sleep=sleep)
    assert (record["seq"], new, finished) == (2, True, False)
    start = clock.now
    record, new, finished = progress_wait.wait(str(path), str(job), 2, 10, clock=clock, sleep=sleep)
    assert (new, finished) == (False, False) and clock.now - start >= 10  # timed out
    job.write_text(json.dumps({"changed": True, "files": 3}))  # the module's result: finished
    record, new, finished = progress_wait.wait(str(path), str(job), 2, 10, clock=clock, sleep=sleep)
    assert (new, finished) == (False, True)
    path.write_text(json.dumps({"seq": 3, "state": "done", "line": "l3"}))
    record, new, finished = progress_wait.wait(str(path), str(job), 2, 10, clock=clock, sleep=sleep)
    assert (record["line"], new, finished) == ("l3", True, True)


def test_summary_names_the_longest_step_with_its_rate():
    steps = {"hot pass": {"seconds": 100.0, "files": 10, "bytes": 2_000_000_000},
             "check": {"seconds": 20.0, "files": 10}}
    text, fields = backup_summary.longest_step(steps)
    assert text == "; longest step: hot pass 0:01:40 at 20.0 MB/s" and fields["longest_step"] == "hot pass"
    ship = {"result": "ok", "seconds": 300, "bytes_sent": 3_000_000_000}
    assert backup_summary.longest_step(steps, ship)[0] == "; longest step: shipping 0:05:00 at 10.0 MB/s"
    assert backup_summary.longest_step({"check": {"seconds": 4, "files": 400}})[0].endswith("at 100 files/s")
    assert backup_summary.longest_step({}) == ("", {})
    assert backup_summary.longest_step({}, ship) == ("", {})  # no step times: an older backup
    assert backup_summary.longest_step({"hot pass": {"seconds": 2, "bytes": 3000}})[0].endswith("at 1.5 kB/s")
    assert backup_summary.last_time_part({"seconds": 65, "bytes": GIB}) == "; the last hot pass took 0:01:05 for 1.00 GiB"
    assert "the last backup took" in backup_summary.last_time_part({"seconds": 65, "bytes": GIB, "whole_backup": True})


def test_progress_wait_ends_the_job_of_a_process_gone_without_a_result(tmp_path):
    """The module and its async_wrapper killed together: nobody writes the job's result; the wait
    writes async_wrapper's failure for it once the process has been gone a few seconds."""
    path, job = tmp_path / "p.json", tmp_path / "job"
    job.write_text(json.dumps({"started": True, "finished": False}))
    path.write_text(json.dumps({"seq": 1, "state": "running", "pid": 4242}))
    clock = Clock()

    def sleep(seconds):
        clock.now += seconds

    record, new, finished = progress_wait.wait(str(path), str(job), 1, 60, clock=clock, sleep=sleep,
                                               is_alive=lambda pid: False)
    assert (new, finished) == (False, True) and clock.now - 100.0 >= progress_wait.GRACE
    result = json.loads(job.read_text())
    assert result["failed"] and "killed" in result["cause"] and "started" not in result
    # a live process is waited for
    job.write_text(json.dumps({"started": True, "finished": False}))
    assert progress_wait.wait(str(path), str(job), 1, 5, clock=clock, sleep=sleep,
                              is_alive=lambda pid: True)[2] is False


def test_a_watched_file_and_restic_status_lines_feed_the_progress(tmp_path):
    """Steps whose work is done by a tool: the size of what it writes (a dump), or its own status
    lines (restic backup --json), become the bytes done."""
    part, dest = tmp_path / "dump.part", tmp_path / "dump"
    progress = _progress.Progress("dump", path=str(tmp_path / "p.json"), interval=0.1)
    with _progress.Watch(progress, str(part), str(dest)):
        part.write_bytes(b"x" * 3000)
        time.sleep(0.4)
        assert progress.bytes_done == 3000  # the thread read it while the tool wrote
        part.rename(dest)
    assert progress.bytes_done == 3000 and progress.finish()["bytes_total"] == 3000

    progress = _progress.Progress("off-site upload", clock=Clock())
    with tempfile.TemporaryFile() as out:
        lines = _restic._StatusLines(out, progress)
        out.write(b'{"message_type":"status","percent_done":0.25,"total_files":8,"files_done":2,'
                  b'"total_bytes":4000,"bytes_done":1000}\n{"message_type":"status","files_done":3,"byt')
        out.flush()
        lines.read()
        assert (progress.files_done, progress.files_total, progress.bytes_done, progress.bytes_total) == (2, 8, 1000, 4000)
        out.write(b'es_done":1500,"total_files":8,"total_bytes":4000}\n')
        out.flush()
        lines.read()  # the line cut in two is read whole
        assert (progress.files_done, progress.bytes_done) == (3, 1500)


def test_rsync_progress2_lines_are_read():
    match = _ship._PROGRESS2.match(b"     20,000,000  50%   20.56MB/s    0:00:00 (xfr#10, to-chk=9/21)")
    assert match.groups() == (b"20,000,000", b"50", b"9", b"21")
    assert _ship._PROGRESS2.match(b"         32,768   0%    0.00kB/s    0:00:00  ").group(2) == b"0"
    assert _ship._PROGRESS2.match(b"Number of files: 21 (reg: 20, dir: 1)") is None


def test_an_rsync_failure_names_the_first_os_error():
    err = ("rsync: [receiver] write failed on \"/srv/x/storage/ab/cd/abcd\": No space left on device (28)\n"
           "rsync error: error in file IO (code 11) at receiver.c(380) [receiver=3.2.7]\n"
           "rsync: [sender] write error: Broken pipe (32)\n"
           "rsync error: error in file IO (code 11) at io.c(848) [sender=3.2.7]\n")
    text = _ship.describe_rsync_failure(11, err)
    assert text.startswith("rsync exited with 11 (error in file I/O): rsync: [receiver] write failed on")
    assert "No space left on device (28) ... rsync error: error in file IO (code 11) at receiver.c" in text
    short = _ship.describe_rsync_failure(11, "rsync: [sender] write error: Broken pipe (32)\n")
    assert short == "rsync exited with 11 (error in file I/O): rsync: [sender] write error: Broken pipe (32)"


# -- the one decision: a long step runs at once when it is expected to be short -----------------


ASYNC = 2592000


def test_nothing_known_runs_in_the_background():
    for work in (None, {}, {"rate": 1000}, {"last": None}, "junk"):
        assert estimate_seconds(work) is None
        assert progress_async(work, 30, ASYNC) == ASYNC


def test_a_small_step_runs_at_once_and_a_large_one_in_the_background():
    small = {"bytes": 50 * 10 ** 6, "files": 1000}  # 1 + 2.5 + 5 s
    assert estimate_seconds(small) == pytest.approx(8.5)
    assert progress_async(small, 30, ASYNC) == 0
    assert progress_async(small, 8, ASYNC) == ASYNC  # not below one interval
    assert progress_async({"bytes": 10 ** 9}, 30, ASYNC) == ASYNC  # 50 s at 20 MB/s


def test_limits_rounds_and_the_last_time_only_make_the_estimate_longer():
    base = {"bytes": 100 * 10 ** 6}
    assert estimate_seconds(dict(base, rate=10 ** 6)) == pytest.approx(101)  # a bandwidth limit below 20 MB/s
    assert estimate_seconds(dict(base, rate=10 ** 9)) == pytest.approx(6)  # never above 20 MB/s
    assert estimate_seconds(dict(base, rounds=3)) == pytest.approx(18)  # waiting for a slot
    # the last time took 20 s for half the bytes: 20 x 2 x 1.5
    assert estimate_seconds(dict(base, last={"seconds": 20, "bytes": 50 * 10 ** 6})) == pytest.approx(60)
    # a fast last time never makes it shorter than the sizes say
    assert estimate_seconds(dict(base, last={"seconds": 0.1, "bytes": 10 ** 9})) == pytest.approx(6)
    # only the last time is known
    assert progress_async({"last": {"seconds": 25}}, 30, ASYNC) == ASYNC  # 37.5 s
    assert progress_async({"last": {"seconds": 2}}, 30, ASYNC) == 0


def test_the_work_of_a_backup_from_its_manifest_as_slurp_gives_it():
    import base64
    import json
    encoded = base64.b64encode(json.dumps({"storage": {"bytes": 1000, "files": 3}, "dump": {"bytes": 500}}).encode())
    assert backup_work(encoded.decode()) == {"bytes": 1500, "files": 3}
    assert backup_work(base64.b64encode(b"{not json").decode()) is None
    assert backup_work("") is None and backup_work(None) is None


def test_a_step_that_waits_says_for_what_and_counts_its_time_from_when_its_work_begins():
    clock = [100.0]
    progress = _progress.Progress("shipping", host="pacs-3", interval=30, clock=lambda: clock[0])
    clock[0] = 131.0
    progress.wait_note("waiting for a transfer slot on backup-1: all 1 taken by pacs-1")
    record = progress.record("waiting")
    assert record["line"] == "pacs-3 shipping: waiting for a transfer slot on backup-1: all 1 taken by pacs-1, since 0:00:31"
    progress.begin()
    clock[0] = 141.0
    progress.set(nbytes=10 ** 8)
    done = progress.finish()
    assert done["elapsed_seconds"] == 10 and done["line"].endswith("10.0 MB/s, done in 0:00:10"), done["line"]

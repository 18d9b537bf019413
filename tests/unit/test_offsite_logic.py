"""The pure parts of off-site shipping: restic's messages, URLs, tags, the summary line."""

from __future__ import annotations

import datetime
import pathlib

import pytest

from ansible_collections.pacs.orthanc.plugins.filter import backup_summary
from ansible_collections.pacs.orthanc.plugins.module_utils import _restic, _status
from ansible_collections.pacs.orthanc.plugins.module_utils._common import PacsError

pytestmark = pytest.mark.quick

STACK = """Fatal: unable to open config file: client.Head: Head "http://127.0.0.1:1/config": dial tcp 127.0.0.1:1: connect: connection refused
Is there a repository at the following location?
rest:http://127.0.0.1:1/
"""

PANIC = """error: removing snapshot: blob not removed, server response: 403 Forbidden
goroutine 1 [running]:
main.main()
\t/build/restic-0.14.0/cmd/restic/main.go:98 +0x3f
runtime.main()
"""


def repo(location="/srv/repo"):
    return _restic.Repository(location, password="x")


def test_url_secret_and_shown():
    location = "rest:https://pacs-1:s3cr3t@backup.example.org:8000/pacs-1/"
    assert _restic.url_secret(location) == "s3cr3t"
    assert "s3cr3t" not in repo(location).shown() and ":***@" in repo(location).shown()
    assert _restic.url_secret("/srv/repo") is None
    assert _restic.url_secret("rest:http://127.0.0.1:8000/") is None


def test_messages_by_cause():
    wrong = repo().explain("open", 1, "Fatal: wrong password or no key found\n")
    assert "wrong restic password" in wrong.cause and wrong.details["restic_exit_code"] == 1
    missing = repo().explain("open", 1, "Fatal: unable to open config file: stat /srv/repo/config: "
                                        "no such file or directory\nIs there a repository at the following location?")
    assert "there is no restic repository at /srv/repo" in missing.cause and "orthanc_restic_init" in missing.cause
    unreachable = repo("rest:http://127.0.0.1:1/").explain("open", 1, STACK)
    assert "cannot be reached" in unreachable.cause and "connection refused" in unreachable.cause
    other = repo().explain("forget", 1, PANIC)
    assert other.cause.startswith("restic exited with 1:") and "goroutine" not in other.cause
    assert "403 Forbidden" in other.cause


def test_options_are_checked():
    with pytest.raises(PacsError, match="exactly one"):
        _restic.Repository("/srv/repo")
    with pytest.raises(PacsError, match="exactly one"):
        _restic.Repository("/srv/repo", password_file="/f", password="x")
    with pytest.raises(PacsError, match="empty"):
        _restic.Repository("", password="x")


def test_tags_and_summary_record():
    manifest = {"name": "20261130T010203Z", "orthanc": {"name": "PACS"}, "strategy": "snapshot"}
    assert _restic.snapshot_tags("pacs-1", manifest) == [
        "pacs.orthanc", "host:pacs-1", "orthanc:PACS", "backup:20261130T010203Z", "strategy:snapshot"]
    out = '{"message_type":"status","percent_done":0.5}\n{"message_type":"summary","snapshot_id":"abc","data_added":12}\n'
    assert _restic.summary_of(out) == {"message_type": "summary", "snapshot_id": "abc", "data_added": 12}
    assert _restic.summary_of("garbage\n") == {}


def test_summary_line_gains_the_offsite_part():
    entry = {"line": "pacs-1: ok, sqlite", "record": {"host": "pacs-1", "ok": True}, "ok": True}
    ok = backup_summary.add_offsite(entry, {"result": "ok", "snapshot_id": "0123456789ab", "data_added": 2048,
                                            "already_shipped": False})
    assert ok["ok"] and ok["line"] == "pacs-1: ok, sqlite; off site: snapshot 01234567, 2.0 KiB added"
    failed = backup_summary.add_offsite(entry, {"result": "failed", "step": "open the restic repository",
                                                "cause": "wrong restic password"})
    assert not failed["ok"] and not failed["record"]["ok"] and "OFF-SITE SHIPPING FAILED" in failed["line"]
    assert failed["record"]["offsite_result"] == "failed"
    assert backup_summary.add_offsite(entry, None) is entry


def snap(sid, host, time, *tags):
    return {"id": sid, "short_id": sid[:8], "hostname": host, "time": time, "tags": ["pacs.orthanc", *tags]}


def test_choose_snapshot_latest_timestamp_id():
    found = [snap("aaaa1111", "pacs-1", "2026-11-28T07:00:00Z", "backup:20261128T070000Z"),
             snap("bbbb2222", "pacs-1", "2026-11-29T07:00:00Z", "backup:20261129T070000Z"),
             snap("cccc3333", "pacs-2", "2026-11-30T07:00:00Z", "backup:20261130T070000Z"),
             snap("aaaa4444", "pacs-2", "2026-11-27T07:00:00Z", "backup:20261127T070000Z")]
    assert _restic.choose_snapshot(found, "pacs-1", "latest")["id"] == "bbbb2222"  # not pacs-2's newer one
    assert _restic.choose_snapshot(found, "pacs-1", "20261128T070000Z")["id"] == "aaaa1111"
    assert _restic.choose_snapshot(found, "pacs-1", "cccc")["id"] == "cccc3333"  # an id: any host's
    with pytest.raises(PacsError, match="neither latest"):
        _restic.choose_snapshot(found, "pacs-1", "aaa")  # too short to be an id
    with pytest.raises(PacsError, match="ambiguous"):
        _restic.choose_snapshot(found, "pacs-1", "aaaa")
    with pytest.raises(PacsError, match="no snapshot of pacs-1's backup 20261130T070000Z"):
        _restic.choose_snapshot(found, "pacs-1", "20261130T070000Z")
    with pytest.raises(PacsError, match="holds no snapshot of pacs-3"):
        _restic.choose_snapshot(found, "pacs-3", "latest")
    with pytest.raises(PacsError, match="neither latest"):
        _restic.choose_snapshot(found, "pacs-1", "../etc")
    assert _restic.backup_name_of(found[0]) == "20261128T070000Z"
    assert _restic.backup_name_of({"tags": ["backup:nonsense"]}) is None


def test_pre_upgrade_backups_are_tagged():
    manifest = {"name": "20261130T010203Z", "pre_upgrade": {"from": "1.10.1", "to": "1.12.0"}}
    assert _restic.snapshot_tags("pacs-1", manifest)[-1] == "pre-upgrade"
    assert "pre-upgrade" not in _restic.snapshot_tags("pacs-1", {"name": "20261130T010203Z"})


def test_read_rotation_covers_every_slice():
    now = datetime.datetime(2026, 11, 30, 7, 0, tzinfo=datetime.timezone.utc)
    assert _restic.read_slices_due({}, 30, now) == (1, 1)
    day_ago = {"slices": 30, "next": 7, "last_read_at": "2026-11-29T06:00:00.000000Z"}
    assert _restic.read_slices_due(day_ago, 30, now) == (7, 1)
    three_days = dict(day_ago, last_read_at="2026-11-27T06:00:00.000000Z")
    assert _restic.read_slices_due(three_days, 30, now) == (7, 3)  # the days missed are caught up
    assert _restic.read_slices_due(dict(day_ago, last_read_at="2000-01-01T00:00:00.000000Z"), 30, now) == (7, 30)
    assert _restic.read_slices_due(dict(day_ago, slices=10), 30, now) == (1, 1)  # N changed: start again
    assert _restic.read_slices_due(dict(day_ago, last_read_at="2026-11-30T06:00:00.000000Z"), 30, now) == (7, 1)


def test_restic_times():
    moment = _restic.parse_restic_time("2026-11-30T07:38:12.821794413Z")
    assert moment == datetime.datetime(2026, 11, 30, 7, 38, 12, 821794, tzinfo=datetime.timezone.utc)
    assert _restic.parse_restic_time("2026-11-30T08:38:12+01:00") == moment.replace(microsecond=0)
    assert _restic.parse_restic_time("yesterday") is None
    newest = _restic.newest([snap("aaaa1111", "h", "2026-11-30T06:00:00Z"), snap("bbbb2222", "h", "2026-11-30T05:00:00Z")],
                            now=moment)
    assert newest["id"] == "aaaa1111" and newest["time"] == "2026-11-30T06:00:00.000000Z"
    assert newest["age_seconds"] == 5892.822
    assert _restic.newest([]) == {}


def test_status_records_the_newest_offsite_snapshot_and_freshness():
    now = datetime.datetime(2026, 11, 30, 7, 0, tzinfo=datetime.timezone.utc)
    status = _status.update({}, "pacs-1", "offsite", "ok", now=now, offsite={
        "snapshot_id": "abc", "snapshot_time": "2026-11-30T06:59:00.000000Z", "backup": "20261130T065800Z"})
    assert status["newest_offsite_snapshot"] == {"id": "abc", "time": "2026-11-30T06:59:00.000000Z",
                                                 "backup": "20261130T065800Z"}
    failed = _status.update(status, "pacs-1", "offsite", "failed", step="back up", cause="disk full", now=now)
    assert failed["last_offsite"]["result"] == "failed" and failed["newest_offsite_snapshot"]["id"] == "abc"
    prom = _status.prom_text(failed)
    assert 'pacs_orthanc_backup_last_offsite_result{host="pacs-1"} 0' in prom
    assert 'pacs_orthanc_backup_offsite_newest_snapshot_timestamp_seconds{host="pacs-1"} 1796021940.0' in prom
    fresh = _status.freshness(now, 26, backup_time="2026-11-30T06:58:00.000000Z",
                              offsite_time="2026-11-29T03:00:00.000000Z", expect_offsite=True)
    assert not fresh["fresh"] and fresh["stale"] == ["off-site snapshot 28 h old"]
    assert _status.freshness(now, 26, backup_time="2026-11-30T06:58:00.000000Z", expect_ship=True)["stale"] == \
        ["no shipped copy"]
    assert _status.freshness(now, 26, backup_time="2026-11-30T06:58:00.000000Z")["fresh"]


def test_fetch_into_is_whole_or_nothing(tmp_path):
    from ansible_collections.pacs.orthanc.plugins.module_utils import _layout  # pylint: disable=import-outside-toplevel
    folder, name = tmp_path / "staging" / "pacs-1", "20261130T010203Z"

    def fill(partial):
        (pathlib.Path(partial) / "manifest.json").write_text("{}")

    def refuse(_partial):
        raise PacsError("fetch", "not whole")

    with pytest.raises(PacsError, match="not whole"):
        _layout.fetch_into(str(folder), name, fill, refuse)
    assert list(folder.iterdir()) == []  # the partial copy is gone, nothing looks fetched
    assert (folder.parent.stat().st_mode & 0o777, folder.stat().st_mode & 0o777) == (0o700, 0o700)
    (folder / (name + ".fetching")).mkdir()  # what a killed fetch left
    path = _layout.fetch_into(str(folder), name, fill, lambda _p: None)
    assert path == str(folder / name) and sorted(p.name for p in folder.iterdir()) == [name]
    with pytest.raises(ValueError):
        _layout.fetch_into(str(folder), "../x", fill, lambda _p: None)


def test_find_on_the_server(tmp_path):
    from ansible_collections.pacs.orthanc.plugins.module_utils import _ship  # pylint: disable=import-outside-toplevel
    for name in ("20261128T070000Z", "20261129T070000Z", "20261130T070000Z.incomplete"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "manifest.json").write_text("{}")
    assert _ship.find(str(tmp_path), "latest")["name"] == "20261129T070000Z"
    assert _ship.find(str(tmp_path), "20261128T070000Z")["path"] == str(tmp_path / "20261128T070000Z")
    with pytest.raises(PacsError, match="no complete backup 20261130T070000Z"):
        _ship.find(str(tmp_path), "20261130T070000Z")
    with pytest.raises(PacsError, match="neither latest"):
        _ship.find(str(tmp_path), "../etc")

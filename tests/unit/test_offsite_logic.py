"""The pure parts of off-site shipping: restic's messages, URLs, tags, the summary line."""

from __future__ import annotations

import pytest

from ansible_collections.pacs.orthanc.plugins.filter import backup_summary
from ansible_collections.pacs.orthanc.plugins.module_utils import _restic
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

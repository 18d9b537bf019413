"""The stop window's delta pass by Orthanc's change log (issue 15.2), on a real Orthanc: the hot
pass (storage_copy) reads the change position before it walks; stopped_capture, with Orthanc
stopped, examines only what the captured index's Changes name since then, and once Orthanc runs
again compares everything as a safety net. An attachment Orthanc adds without logging a change
(compressed over REST) is placed by that net; after DELETE /changes the window compares every
attachment. Each round is checked instance by instance, byte for byte, against the server."""

from __future__ import annotations

import pathlib
import sqlite3
import zlib

import pytest

from tests.support import checks
from tests.support.playbook import run_module
from ansible_collections.pacs.orthanc.plugins.module_utils import _record, _verify

pytestmark = pytest.mark.slow


def hot_pass(server, backup: pathlib.Path, previous: pathlib.Path | None = None) -> dict:
    args = {"phase": "hot", "source": str(server.storage_dir), "dest": str(backup / "storage"),
            "state_file": str(backup / ".work" / "storage.db"), "url": server.url, "settle_seconds": 0}
    if previous:
        args["previous"] = str(previous / "storage")
    result = run_module("storage_copy", args)
    assert not result["failed"], result
    return result


def window(server, backup: pathlib.Path, previous: pathlib.Path | None = None) -> dict:
    args = {"url": server.url, "stop_command": server.stop_command(), "start_command": server.start_command(),
            "index_directory": str(server.index_dir), "storage_source": str(server.storage_dir),
            "index_dest": str(backup / "index"), "storage_dest": str(backup / "storage"),
            "state_file": str(backup / ".work" / "storage.db")}
    if previous:
        args["previous"] = str(previous / "storage")
    result = run_module("stopped_capture", args)
    assert not result["failed"], result
    assert server.answers()
    return result


def assert_holds_every_instance(server, backup: pathlib.Path) -> None:
    """The backup's index lists exactly the server's instances, and each one's file in the backup
    is, byte for byte, the DICOM file the server serves (inflated when Orthanc compressed it)."""
    conn = sqlite3.connect(f"file:{backup / 'index' / 'index'}?mode=ro", uri=True)
    try:
        files = {public: (uuid, compression) for public, uuid, compression in conn.execute(
            "SELECT r.publicId, a.uuid, a.compressionType FROM Resources r JOIN AttachedFiles a "
            "ON a.id = r.internalId WHERE r.resourceType = 4 AND a.fileType = 1")}
    finally:
        conn.close()
    assert sorted(files) == sorted(server.instances())
    for public, (uuid, compression) in files.items():
        data = (backup / "storage" / uuid[0:2] / uuid[2:4] / uuid).read_bytes()
        assert (zlib.decompress(data[8:]) if compression == 2 else data) == server.instance_file(public), public
    report = _verify.verify_backup(str(backup), md5="all")
    assert report["ok"] and report["orphans"] == 0, report["problems"]


def test_window_by_changes_its_safety_net_and_the_fallback(servers, tmp_path):
    server = servers("window")
    checks.store_studies(server, tmp_path, patients=2, via="rest")
    first = tmp_path / "20261130T000001Z.incomplete"  # records are written inside an incomplete backup

    # The change log names what arrives after the hot pass began; the window examines only that.
    hot = hot_pass(server, first)
    assert hot["change_position"] == server.rest("GET", "/changes?last")["Last"] > 0
    assert hot["files"] == 6
    checks.store_studies(server, tmp_path, patients=1, via="rest", instances=4)  # between hot pass and stop
    compressed = server.instances()[0]  # a new file, without a change: Orthanc logs none for its own attachments
    server.rest("POST", f"/instances/{compressed}/attachments/dicom/compress", body=b"")
    assert server.rest("GET", f"/instances/{compressed}/attachments/dicom/is-compressed") in (b"1", 1, True)
    result = window(server, first)
    delta = result["delta"]
    assert delta["window_pass"]["mode"] == "changes" and delta["window_pass"]["change_position"] == hot["change_position"]
    assert delta["window_pass"]["changes"] >= 4  # NewInstance x4 (and the new study's series, patient)
    assert delta["fetched_files"] == 4  # the four new instances: nothing else was examined
    assert delta["late_files"] == 1  # the compressed file, placed once Orthanc ran again
    assert delta["removed_files"] == 1  # its uncompressed predecessor, deleted by Orthanc
    assert result["downtime_seconds"] > 0
    recorded = _record.read_records(str(first))["stopped"]["window_pass"]  # what the manifest will say
    assert recorded == {"mode": "changes", "reason": None, "change_position": hot["change_position"],
                        "changes": delta["window_pass"]["changes"], "fetched_files": 4, "late_files": 1}
    assert_holds_every_instance(server, first)

    # DELETE /changes after the hot pass: the position cannot be trusted, every attachment is compared.
    second = tmp_path / "20261130T000002Z.incomplete"
    hot = hot_pass(server, second, previous=first)
    assert hot["linked_files"] == hot["files"] == 10
    server.rest("DELETE", "/changes")
    checks.store_studies(server, tmp_path, patients=1, via="rest", instances=2)
    result = window(server, second, previous=first)
    delta = result["delta"]
    assert delta["window_pass"]["mode"] == "full" and "cleared" in delta["window_pass"]["reason"], delta
    assert delta["fetched_files"] == 2 and "late_files" not in delta
    assert_holds_every_instance(server, second)

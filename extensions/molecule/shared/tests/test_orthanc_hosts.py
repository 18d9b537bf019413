"""Checks of every Orthanc host of a molecule scenario, after the backup (and after the restore).

Run by molecule's testinfra verifier (connection podman): the hosts are the group ``orthanc`` of
the scenario's inventory. Each host must answer on its REST API with the counts that the prepare
step stored (/root/pacs-test/expected.json), and hold a complete backup in /var/backups/orthanc
whose manifest shows those counts and which pacs.orthanc.backup_verify finds intact (every file's
size and MD5 against the backup's own index, or against the database dump, which holds the files
themselves when Orthanc stores them in its database).
"""

from __future__ import annotations

import json
import os
import re

import pytest

from _molecule import LOCAL_ROOT, counts_of, files_in_database, inventory_group, run_module

testinfra_hosts = [f"podman://{name}" for name in inventory_group("orthanc")]


@pytest.fixture(name="expected")
def fixture_expected(host) -> dict:
    return json.loads(host.file("/root/pacs-test/expected.json").content_string)


@pytest.fixture(scope="module", name="verified")
def fixture_verified() -> dict:
    """pacs.orthanc.backup_verify of every host's latest backup (all MD5s), by host name."""
    return run_module("orthanc", "backup_verify", f"path={LOCAL_ROOT}/latest md5=all")


def test_the_scenario_has_orthanc_hosts():
    assert testinfra_hosts


def test_orthanc_answers_with_the_stored_counts(host, expected):
    assert counts_of(json.loads(host.check_output("curl -sSf http://127.0.0.1:8042/statistics"))) == expected


def test_latest_backup_is_complete(host, expected):
    latest = host.file(f"{LOCAL_ROOT}/latest")
    assert latest.is_symlink
    assert re.fullmatch(r"\d{8}T\d{6}Z", os.path.basename(latest.linked_to))
    leftovers = host.check_output(f"find {LOCAL_ROOT} -maxdepth 1 '(' -name '*.incomplete' -o -name .lock ')'")
    assert leftovers == ""
    manifest_file = host.file(f"{latest.linked_to}/manifest.json")
    assert manifest_file.mode == 0o600
    manifest = json.loads(manifest_file.content_string)
    assert manifest["format"] == "pacs.orthanc.backup"
    assert manifest["host"] == host.backend.get_hostname()
    assert manifest["counts"] == expected
    if files_in_database(host.backend.get_hostname()):
        # The DICOM files are in the database, so in its dump (backup_verify reads them there).
        assert manifest["storage"]["files"] == 0
    else:
        assert manifest["storage"]["files"] >= expected["instances"]
    # The containers run with --init: a stop that waited on zombies would take 35 s.
    assert manifest["downtime_seconds"] < 20


def test_latest_backup_verifies(host, expected, verified):
    result = verified[host.backend.get_hostname()]
    assert not result.get("failed"), result.get("msg")
    assert result["ok"] is True
    assert result["counts"] == expected
    assert result["files_hashed"] == result["files_checked"] >= expected["instances"]
    assert result["orphans"] == 0
    assert result.get("storage_in_database", False) == files_in_database(host.backend.get_hostname())

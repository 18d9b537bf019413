"""Restoring what was lost, not everything, against real Orthanc servers: pre-upgrade backups that
retention keeps and the restore's version guard names; point restore of one study into a running
production Orthanc; reconciliation with a modality after a restore."""

from __future__ import annotations

import json
import re

import pytest

from tests.support import checks
from tests.support.playbook import local_host, run_playbook, write_inventory

pytestmark = pytest.mark.slow


def test_pre_upgrade_backup_outlives_retention_and_the_guard_names_it(servers, tmp_path):
    server = servers("upgrade")
    checks.store_studies(server, tmp_path, patients=1, via="rest", instances=1)
    root = tmp_path / "backups"
    inventory = write_inventory(tmp_path / "inventory.json", {
        "upgrade": local_host(server, root, orthanc_backup_settle_seconds=0, orthanc_backup_keep=1)})

    def backup(**extra):
        result = run_playbook(inventory, extra_vars=extra)
        assert result.returncode == 0, result.stdout
        return (root / "latest").resolve().name

    older = backup()
    marked = backup(orthanc_backup_pre_upgrade=True, orthanc_backup_pre_upgrade_keep_days=30)
    manifest = checks.read_manifest(root / marked)
    marker = manifest["pre_upgrade"]
    system = server.rest("GET", "/system")
    assert marker["orthanc_version"] == system["Version"] == "1.10.1"
    assert marker["plugins"] == {}  # the test Orthancs load no plugin
    assert marker["database_version"] == str(system["DatabaseVersion"]) == marker["index_schema_version"]
    assert marker["keep_days"] == 30 and marker["keep_until"][:10] > manifest["started_at"][:10]
    assert "pre_upgrade" not in checks.read_manifest(root / older)
    newer = backup()
    assert checks.complete_backups(root) == [marked, newer]  # the older ordinary neighbour went, not it
    newest = backup()
    assert checks.complete_backups(root) == [marked, newest]  # and the newer one too

    # Only one Orthanc version is installed here: "a backup from a newer Orthanc" is the newest
    # backup with its manifest saying so (the guard reads the manifest)
    path = root / newest / "manifest.json"
    faked = json.loads(path.read_text())
    faked["orthanc"]["version"] = "1.12.9"
    path.write_text(json.dumps(faked))
    refused = run_playbook(inventory, playbook="restore.yml", extra_vars={"orthanc_restore_confirm": True})
    assert refused.returncode != 0
    line = re.search(r"Restore of upgrade failed at step .*", refused.stdout).group(0)
    assert "written by Orthanc 1.12.9, this host runs 1.10.1" in line
    assert f"the newest pre-upgrade backup that Orthanc 1.10.1 can open is {root / marked}" in line
    assert f"orthanc_restore_backup={marked}" in line and "Nothing was changed" in line

"""Planning a restore: the backup's configuration is read with the environment Orthanc's service
sees (orthanc_config_environment), so a ${VAR} path goes where that Orthanc will look."""

from __future__ import annotations

import json

import pytest

from ansible_collections.pacs.orthanc.plugins.module_utils import _restore
from ansible_collections.pacs.orthanc.plugins.module_utils._common import PacsError


@pytest.fixture
def backup(tmp_path, monkeypatch):
    monkeypatch.delenv("PACS_T_DATA", raising=False)
    folder = tmp_path / "backups" / "20261130T000000Z"
    (folder / "config").mkdir(parents=True)
    (folder / "config" / "orthanc.json").write_text('{"StorageDirectory": "${PACS_T_DATA}", "Name": "x"}')
    (folder / "manifest.json").write_text(json.dumps({
        "format": "pacs.orthanc.backup", "format_version": 1, "orthanc": {"version": "1.10.1"},
        "source": {"config_is_folder": True}, "counts": {"instances": 0}}))
    return folder


def test_plan_reads_the_backups_configuration_with_the_given_environment(backup, tmp_path):
    data = tmp_path / "srv" / "orthanc-data"
    planned = _restore.plan(str(backup), str(tmp_path / "etc-orthanc"), "1.10.1", None, False,
                            {"PACS_T_DATA": str(data)})
    assert planned["targets"] == {"config": str(tmp_path / "etc-orthanc"), "index": str(data),
                                  "storage": str(data)}


def test_plan_without_the_variable_names_it(backup, tmp_path):
    with pytest.raises(PacsError, match=r"not set for this module: PACS_T_DATA; .*orthanc_config_environment"):
        _restore.plan(str(backup), str(tmp_path / "etc-orthanc"), "1.10.1", None, False)

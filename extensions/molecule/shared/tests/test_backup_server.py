"""Checks of the backup server of a molecule scenario (the group ``backup_server``): the playbook
pacs.orthanc.backup ships every Orthanc host's backup there, into
/srv/orthanc-backups/<host>/<timestamp>/. For each Orthanc host, the server's newest copy must be
the host's newest local backup (same name, same manifest), complete (no leftovers), and
pacs.orthanc.backup_verify, run on the server, must find it intact with the counts the host serves.
"""

from __future__ import annotations

import json

import pytest
import testinfra

from _molecule import LOCAL_ROOT, SERVER_ROOT, inventory_group, run_module

SERVERS = inventory_group("backup_server")
ORTHANC_HOSTS = inventory_group("orthanc")
testinfra_hosts = [f"podman://{name}" for name in SERVERS[:1]]


@pytest.fixture(scope="module", name="verified")
def fixture_verified() -> dict:
    """backup_verify on the server of each host's newest copy there, by Orthanc host name."""
    # One parallel run over the Orthanc hosts, each reaching the server instead of itself (with the
    # podman connection, ansible_host is the container), so that results come keyed by Orthanc host.
    return run_module("orthanc", "backup_verify", f"path={SERVER_ROOT}/{{{{ inventory_hostname }}}}/latest md5=all",
                      "-e", f"ansible_host={SERVERS[0]}")


def test_the_scenario_has_one_backup_server():
    assert len(SERVERS) == 1


@pytest.mark.parametrize("name", ORTHANC_HOSTS)
def test_server_holds_the_hosts_latest_backup(host, name):
    orthanc = testinfra.get_host(f"podman://{name}")
    local = orthanc.file(f"{LOCAL_ROOT}/latest").linked_to
    shipped = host.file(f"{SERVER_ROOT}/{name}/latest")
    assert shipped.is_symlink
    assert shipped.linked_to.rsplit("/", 1)[1] == local.rsplit("/", 1)[1]
    assert host.check_output(f"sha256sum < {shipped.linked_to}/manifest.json") \
        == orthanc.check_output(f"sha256sum < {local}/manifest.json")
    leftovers = host.check_output(f"find {SERVER_ROOT}/{name} -maxdepth 1 -name '*.incomplete'")
    assert leftovers == ""


@pytest.mark.parametrize("name", ORTHANC_HOSTS)
def test_servers_copy_verifies(name, verified):
    result = verified[name]
    assert not result.get("failed"), result.get("msg")
    assert result["ok"] is True
    expected = json.loads(testinfra.get_host(f"podman://{name}").file("/root/pacs-test/expected.json").content_string)
    assert result["counts"] == expected
    assert result["files_hashed"] == result["files_checked"] >= expected["instances"]
    assert result["orphans"] == 0

"""${VAR} in Orthanc's configuration that only the service's environment sets: Debian's Orthanc is
started with the variable, the role without it refuses naming it (Orthanc untouched), and with
orthanc_config_environment the backup and the restore put the data where that Orthanc keeps it."""

from __future__ import annotations

import json
import os
import secrets
import signal
import time
import urllib.request

import pytest

from tests.support.dicomgen import make_study
from tests.support.orthanc_server import ORTHANC_BIN, free_port
from tests.support.playbook import MODULE_PYTHON, run_playbook, write_inventory

OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def rest(url: str, method: str = "GET", body: bytes | None = None):
    request = urllib.request.Request(url, data=body, method=method)
    with OPENER.open(request, timeout=10) as response:
        text = response.read()
    return json.loads(text) if text else None


def answers(url: str) -> bool:
    try:
        rest(url + "/system")
        return True
    except OSError:
        return False


@pytest.fixture
def env_orthanc(tmp_path):
    """An Orthanc whose StorageDirectory is ${VAR}, set only in the environment its start command gives it."""
    var = "PACS_T_DATA_" + secrets.token_hex(4).upper()
    data, config, pidfile = tmp_path / "data", tmp_path / "config", tmp_path / "orthanc.pid"
    config.mkdir()
    port = free_port()
    (config / "orthanc.json").write_text(json.dumps({
        "Name": "env-test", "StorageDirectory": "${%s}" % var, "HttpPort": port,
        "DicomServerEnabled": False, "RemoteAccessAllowed": False, "AuthenticationEnabled": False}))
    start, stop = tmp_path / "start.sh", tmp_path / "stop.sh"
    start.write_text(f"#!/bin/sh\ncd {tmp_path} && {var}={data} setsid {ORTHANC_BIN} {config} "
                     f">>{tmp_path}/orthanc.out 2>&1 </dev/null &\necho $! > {pidfile}\n")
    stop.write_text(f"#!/bin/sh\nkill \"$(cat {pidfile})\"\n")
    start.chmod(0o755)
    stop.chmod(0o755)
    url = f"http://127.0.0.1:{port}"
    os.system(str(start))  # noqa: S605 - our own script
    deadline = time.monotonic() + 60
    while not answers(url):
        assert time.monotonic() < deadline, (tmp_path / "orthanc.out").read_text()
        time.sleep(0.3)
    try:
        yield {"var": var, "data": data, "config": config, "url": url, "start": str(start), "stop": str(stop),
               "pidfile": pidfile, "root": tmp_path}
    finally:
        try:
            os.kill(int(pidfile.read_text()), signal.SIGTERM)
        except (OSError, ValueError):
            pass


def test_a_storage_path_from_the_services_environment(env_orthanc, tmp_path):
    o = env_orthanc
    for path in make_study(tmp_path / "dicom", "P-ENV-1", "Env^Test", series=1):
        rest(o["url"] + "/instances", "POST", path.read_bytes())
    assert rest(o["url"] + "/statistics")["CountInstances"] == 2
    pid = int(o["pidfile"].read_text())
    host = {"ansible_connection": "local", "ansible_python_interpreter": MODULE_PYTHON,
            "orthanc_config_path": str(o["config"]), "orthanc_url": o["url"],
            "orthanc_backup_root": str(tmp_path / "backups"),
            "orthanc_backup_status_file": str(tmp_path / "status.json"),
            "orthanc_stop_command": o["stop"], "orthanc_start_command": o["start"]}

    # without the variable: refused at the first step, naming it and the fix; Orthanc untouched
    inventory = write_inventory(tmp_path / "inventory.json", {"pacs": host})
    refused = run_playbook(inventory)
    assert refused.returncode != 0
    assert f"not set for this module: {o['var']}; give the values that Orthanc's service sees in " \
           "orthanc_config_environment" in refused.stdout, refused.stdout
    assert int(o["pidfile"].read_text()) == pid and answers(o["url"])
    assert not list((tmp_path / "backups").glob("2*"))

    # with it: backed up from where Orthanc keeps its files
    host["orthanc_config_environment"] = {o["var"]: str(o["data"])}
    inventory = write_inventory(tmp_path / "inventory.json", {"pacs": host})
    backed_up = run_playbook(inventory)
    assert backed_up.returncode == 0, backed_up.stdout
    manifest = json.loads((tmp_path / "backups" / "latest" / "manifest.json").read_text())
    assert manifest["source"]["storage_directory"] == str(o["data"])
    assert manifest["counts"]["instances"] == 2

    # the restore reads the backup's configuration with the same environment
    patient = rest(o["url"] + "/patients")[0]
    rest(o["url"] + f"/patients/{patient}", "DELETE")
    assert rest(o["url"] + "/statistics")["CountInstances"] == 0
    restored = run_playbook(inventory, playbook="restore.yml", extra_vars={"orthanc_restore_confirm": True})
    assert restored.returncode == 0, restored.stdout
    assert rest(o["url"] + "/statistics")["CountInstances"] == 2
    assert list(tmp_path.glob("data.pre-restore-*"))  # the live data it replaced, set aside

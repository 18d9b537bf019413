"""Orthanc in real containers (Podman, Docker, a docker-compose project): back up through the
playbooks, wipe the volumes, restore, compare every instance byte for byte over REST; the
configuration Orthanc runs with is found from its own command line inside the container; an
Orthanc whose storage is not on a volume is refused; the container runs after a failure.
Run by scripts/containers.sh (image, dockerd), in their own CI lane."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import signal
import stat
import subprocess
import sys
import time

import pytest

from tests.containers.conftest import DATA, IMAGE, Rest, engine_ready, sh
from tests.support.orthanc_server import free_port
from tests.support.playbook import link_collection
from tests.support.playbook import run_module, run_playbook, write_inventory

pytestmark = pytest.mark.slow

CONFIRM = {"orthanc_restore_confirm": True}


def host_vars(url: str, tmp_path: pathlib.Path, **extra) -> dict:
    import sys  # pylint: disable=import-outside-toplevel
    hostvars = {"ansible_connection": "local", "ansible_python_interpreter": sys.executable, "orthanc_url": url,
                "orthanc_backup_root": str(tmp_path / "backups"), "orthanc_backup_settle_seconds": 0}
    hostvars.update(extra)
    return hostvars


def check_config_copy(backup: pathlib.Path, engine: str) -> dict:
    """The backup's config/ holds the effective configuration, its sources and the image, 0600."""
    config = backup / "config"
    effective = json.loads((config / "effective" / "tmp" / "orthanc.json").read_text())
    assert effective["StorageDirectory"] == "/var/lib/orthanc/db"
    assert isinstance(effective["HttpPort"], int)  # merged from ORTHANC__HTTP_PORT by the entrypoint
    assert (config / "etc-orthanc" / "orthanc.json").is_file()
    environment = (config / "container" / "environment").read_text()
    assert "SOME_PASSWORD=s3cret-in-env" in environment
    image = json.loads((config / "container" / "image.json").read_text())
    assert image["engine"] == engine and image["image"].startswith(IMAGE)
    assert image["image_digest"].startswith("sha256:")
    for path in config.rglob("*"):
        if path.is_file():
            assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    manifest = json.loads((backup / "manifest.json").read_text())
    assert manifest["container"]["engine"] == engine
    assert manifest["container"]["effective_config"] == "/tmp/orthanc.json"
    assert {v["role"] for v in manifest["container"]["volumes"]} == {"storage", "index"}
    assert manifest["strategy"] == "stop" and manifest["downtime_seconds"] > 0
    # the environment's secret is in the 0600 copy only: not in the manifest
    assert "s3cret-in-env" not in (backup / "manifest.json").read_text()
    return manifest


def test_container_round_trip(containers, tmp_path):
    """A podman container by name (engine auto): back up, wipe the volume, restore in place."""
    engine = "podman"
    orthanc = containers(engine)
    orthanc.store(tmp_path, patients=2)
    stored = orthanc.contents()
    assert len(stored) == 6
    volume = orthanc.volume_dir()
    inventory = write_inventory(tmp_path / "inventory.json", {"c": host_vars(
        orthanc.url, tmp_path, orthanc_container=orthanc.container, orthanc_container_engine="auto")})

    result = run_playbook(inventory)
    assert result.returncode == 0, result.stdout
    backup = (tmp_path / "backups" / "latest").resolve()
    check_config_copy(backup, engine)
    assert orthanc.running() and orthanc.answers()
    container_id = orthanc.inspect()["Id"]
    # a drill of the backup: a scratch Orthanc (the host's) on the effective configuration
    drill = run_module("orthanc_drill", {"backup": str(backup), "workdir": str(tmp_path / "drill")})
    assert not drill["failed"] and drill["ok"] and drill["checked_instances"] == 6, drill

    # destroy the volume's contents (the container stopped, as anyone wiping it would)
    sh([engine, "stop", "-t", "60", orthanc.container])
    data_inode = os.stat(volume).st_ino
    sh(["find", volume, "-mindepth", "1", "-delete"])
    sh([engine, "start", orthanc.container])
    orthanc.wait()
    assert orthanc.rest("GET", "/statistics")["CountInstances"] == 0

    result = run_playbook(inventory, playbook="restore.yml", extra_vars=CONFIRM)
    assert result.returncode == 0, result.stdout
    assert orthanc.contents() == stored
    # the same container, the volume's own folder kept (its contents were moved aside beside it)
    assert orthanc.inspect()["Id"] == container_id
    assert os.stat(volume).st_ino == data_inode
    aside = list(volume.parent.glob(volume.name + ".pre-restore-*"))
    assert len(aside) == 1 and (aside[0] / "index").exists()  # the empty Orthanc's index, kept


def compose_project(engine_tool: list, tmp_path: pathlib.Path) -> tuple:
    """A compose project (network_mode host, a named volume) in the manner of orthanc-setup-samples."""
    project = f"pacsct{os.urandom(3).hex()}"
    folder = tmp_path / project
    (folder / "etc").mkdir(parents=True)
    port, dicom = free_port(), free_port()
    name = f"compose-{project}"
    (folder / "etc" / "orthanc.json").write_text(json.dumps({
        "Name": name, "StorageDirectory": "/var/lib/orthanc/db", "Plugins": [], "RemoteAccessAllowed": True,
        "AuthenticationEnabled": False}))
    (folder / "entrypoint.py").write_text((DATA / "entrypoint.py").read_text())
    (folder / ".env").write_text(f"ORTHANC_HTTP={port}\n")
    (folder / "docker-compose.yml").write_text(f"""version: "3"
services:
  orthanc:
    image: {IMAGE}
    network_mode: host
    init: true
    entrypoint: ["/usr/bin/python3", "/entrypoint.py"]
    environment:
      ORTHANC__HTTP_PORT: "${{ORTHANC_HTTP}}"
      ORTHANC__DICOM_PORT: "{dicom}"
      SOME_PASSWORD: s3cret-in-env
    volumes:
      - ./etc:/etc/orthanc:ro
      - ./entrypoint.py:/entrypoint.py:ro
      - orthanc-db:/var/lib/orthanc/db
volumes:
  orthanc-db:
""")
    base = engine_tool + ["-p", project, "-f", str(folder / "docker-compose.yml")]
    return project, folder, base, Rest(port, name)


def test_compose_project_round_trip_onto_empty_volumes(tmp_path):
    """A docker-compose (v1) project on dockerd, found by its project name: back up; `down -v` and
    `up` again (the project exists, its volumes are empty: a fresh host); restore; every instance
    identical. (The Docker lane's one round trip: with dockerd's vfs driver here every container
    costs a copy of the image; a plain Docker container is the same after it is found by name.)"""
    why = engine_ready("docker") or (None if shutil.which("docker-compose") else "docker-compose is not installed")
    if why:
        pytest.fail(why)
    project, folder, compose, orthanc = compose_project(["docker-compose"], tmp_path)
    try:
        sh(compose + ["up", "-d"], cwd=folder)
        orthanc.wait()
        orthanc.store(tmp_path, patients=2)
        stored = orthanc.contents()
        inventory = write_inventory(tmp_path / "inventory.json", {"c": host_vars(
            orthanc.url, tmp_path, orthanc_compose_project=project, orthanc_container_engine="docker")})
        result = run_playbook(inventory)
        assert result.returncode == 0, result.stdout
        backup = (tmp_path / "backups" / "latest").resolve()
        manifest = check_config_copy(backup, "docker")
        assert manifest["container"]["compose_project"] == project
        # the same container named plainly, the engine left to choose (docker answers, podman has none)
        by_name = run_module("orthanc_info", {"container": manifest["container"]["name"], "url": orthanc.url})
        assert not by_name["failed"] and by_name["container"]["engine"] == "docker", by_name
        assert by_name["storage_directory"] == manifest["container"]["volumes"][0]["host_path"]
        assert "/volumes/" in by_name["storage_directory"] and by_name["storage_directory"].endswith("/_data")
        assert (backup / "config" / "compose" / "docker-compose.yml").is_file()
        assert (backup / "config" / "compose" / ".env").read_text().startswith("ORTHANC_HTTP=")

        sh(compose + ["down", "-v"], cwd=folder)
        sh(compose + ["up", "-d"], cwd=folder)
        orthanc.wait()
        assert orthanc.rest("GET", "/statistics")["CountInstances"] == 0
        result = run_playbook(inventory, playbook="restore.yml", extra_vars=CONFIRM)
        assert result.returncode == 0, result.stdout
        assert orthanc.contents() == stored
    finally:
        sh(compose + ["down", "-v"], cwd=folder, check=False)


def podman_compose_labels(project: str, folder: pathlib.Path) -> list:
    """The labels podman-compose 1.0.3 puts on a service's container (its `--dry-run up` prints
    them): the compose file relative to the working directory."""
    labels = {"io.podman.compose.project": project, "com.docker.compose.project": project,
              "com.docker.compose.project.working_dir": str(folder),
              "com.docker.compose.project.config_files": "docker-compose.yml",
              "com.docker.compose.container-number": "1", "com.docker.compose.service": "orthanc"}
    return [arg for name, value in labels.items() for arg in ("--label", f"{name}={value}")]


def test_podman_compose_service_found_by_its_compose_file(containers, tmp_path):
    """podman-compose 1.0.3 cannot run `network_mode: host` services (it adds its own network
    too: "cannot set multiple networks without bridge network mode"), and podman's bridge does not
    forward here: the container is made with the labels podman-compose sets, and found through
    orthanc_compose_file (its relative config_files label resolved against working_dir)."""
    project = f"pacsct{os.urandom(3).hex()}"
    folder = tmp_path / project
    folder.mkdir()
    (folder / "docker-compose.yml").write_text("services: {orthanc: {image: x}}\n")
    (folder / ".env").write_text("A=1\n")
    orthanc = containers("podman", extra=podman_compose_labels(project, folder))
    info = run_module("orthanc_info", {"compose_file": str(folder / "docker-compose.yml"), "url": orthanc.url})
    assert not info["failed"], info
    assert info["container"]["name"] == orthanc.container and info["unsupported"] == []
    assert info["container"]["compose_files"] == [str(folder / "docker-compose.yml")]
    assert info["container"]["effective_config"] == "/tmp/orthanc.json"
    assert info["storage_directory"] == str(orthanc.volume_dir())
    other = run_module("orthanc_info", {"compose_file": str(tmp_path / "elsewhere.yml"), "url": orthanc.url})
    assert other["failed"] and "no compose file at" in other["msg"]


def test_storage_not_on_a_volume_is_refused(containers, tmp_path):
    orthanc = containers("podman", volume=False)
    info = run_module("orthanc_info", {"container": orthanc.container, "url": orthanc.url})
    assert not info["failed"], info
    assert any("/var/lib/orthanc/db" in u and "own layer" in u for u in info["unsupported"]), info["unsupported"]
    inventory = write_inventory(tmp_path / "inventory.json", {"c": host_vars(
        orthanc.url, tmp_path, orthanc_container=orthanc.container)})
    result = run_playbook(inventory)
    assert result.returncode != 0
    assert "Backup of c failed at step 'Check that this Orthanc can be backed up'" in result.stdout
    assert "lost by the next 'rm'" in result.stdout
    assert orthanc.running() and orthanc.answers()
    assert not list((tmp_path / "backups").glob("2*")) if (tmp_path / "backups").exists() else True


def test_container_runs_again_after_a_failure_while_stopped(containers, tmp_path):
    """stopped_capture stops the container, fails (the index cannot be written), starts it again."""
    orthanc = containers("podman")
    orthanc.store(tmp_path, patients=1, instances=1)
    volume = orthanc.volume_dir()
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    before = orthanc.inspect()["State"]["StartedAt"]
    result = run_module("stopped_capture", {
        "url": orthanc.url, "container": orthanc.container, "container_engine": "podman",
        "index_directory": str(volume), "storage_source": str(volume),
        "index_dest": str(blocker / "index"), "storage_dest": str(tmp_path / "storage"),
        "state_file": str(tmp_path / "state.db")})
    assert result["failed"] and result["running_after"] is True, result
    assert orthanc.running() and orthanc.answers()
    assert orthanc.inspect()["State"]["StartedAt"] != before  # it was stopped and started


def test_clear_messages_for_what_cannot_be_found():
    why = engine_ready("podman")
    if why:
        pytest.fail(why)
    missing = run_module("orthanc_info", {"compose_project": "pacs-no-such-project", "container_engine": "podman"})
    assert missing["failed"]
    assert missing["msg"] == ("find Orthanc's container: compose service 'orthanc' of project "
                              "'pacs-no-such-project' not found by podman")
    engine = run_module("orthanc_info", {"container": "x", "container_engine": "docker"},)
    assert engine["failed"] and "docker" in engine["msg"]


GUARDED_STOP = r"""
import os, signal, sys
sys.path.insert(0, sys.argv[1])
from ansible_collections.pacs.orthanc.plugins.module_utils import _control
controller = _control.Controller(sys.argv[2], container=sys.argv[3], container_engine=sys.argv[4])
_control.Guardian(controller, timeout=120).start()
controller.stop(timeout=60)
os.kill(os.getpid(), signal.SIGKILL)  # dies while Orthanc's container is stopped
"""


def test_guardian_starts_the_container_after_the_stopper_is_killed(containers, tmp_path):
    """The process that stopped the container dies (SIGKILL) before it could start it again: the
    guardian (given the engine's environment) starts that container, without anyone's help."""
    orthanc = containers("podman")
    collections = link_collection()
    proc = subprocess.run([sys.executable, "-c", GUARDED_STOP, str(collections), orthanc.url, orthanc.container,
                           "podman"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=120,
                          check=False)
    assert proc.returncode == -signal.SIGKILL, proc.stdout
    deadline = time.monotonic() + 60
    while not (orthanc.running() and orthanc.answers()):
        assert time.monotonic() < deadline, "the guardian did not start the container again"
        time.sleep(0.5)

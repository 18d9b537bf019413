"""Orthanc in real containers (Podman, Docker, a docker-compose and a podman-compose project): back
up through the playbooks, wipe the volumes, restore, compare every instance byte for byte over
REST; the configuration Orthanc runs with is found from its own command line inside the container;
an Orthanc whose storage is not on a volume is refused; the container runs after a failure and
after the play is killed while it is stopped; every lookup failure is a clear message and leaves
the containers as they were.
Run by scripts/containers.sh (image, dockerd), in their own CI lane."""

from __future__ import annotations

import json
import os
import pathlib
import secrets
import shutil
import stat

import pytest

from tests.containers.conftest import DATA, IMAGE, Rest, engine_ready, sh
from tests.support.orthanc_server import free_port
from tests.support import checks
from tests.support.interrupt import interrupt_during_downtime, wait_for
from tests.support.playbook import MODULE_PYTHON, run_module, run_playbook, write_inventory
from ansible_collections.pacs.orthanc.plugins.module_utils import _control

pytestmark = pytest.mark.slow

CONFIRM = {"orthanc_restore_confirm": True}


def host_vars(url: str, tmp_path: pathlib.Path, **extra) -> dict:
    hostvars = {"ansible_connection": "local", "ansible_python_interpreter": MODULE_PYTHON, "orthanc_url": url,
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


def compose_project(engine_tool: list, tmp_path: pathlib.Path, host_network: bool = True) -> tuple:
    """A compose project (a named volume) in the manner of orthanc-setup-samples: on the host's
    network (`network_mode: host`), or on the project's own network (`<project>_default`, made
    here beforehand with a /30 subnet: its one container address stays the same across stop,
    start, `down` and `up`, so orthanc_url holds; podman-compose 1.0.3 uses a network that
    exists)."""
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
{"    network_mode: host" if host_network else ""}
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
    address = "127.0.0.1"
    if not host_network:
        for _attempt in range(20):
            address = f"10.{secrets.randbelow(50) + 200}.{secrets.randbelow(256)}.2"
            made = sh(["podman", "network", "create", "--subnet", address[:-1] + "0/30", f"{project}_default"],
                      check=False)
            if made.returncode == 0:
                break
        else:
            pytest.fail(f"no free subnet for the project's network: {made.stdout}")
    return project, folder, base, Rest(port, name, address)


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


def test_podman_compose_project_round_trip(tmp_path):
    """A real podman-compose (1.0.3) project, found by its compose file (podman-compose labels it
    with the file relative to its working directory), the engine left to choose: back up; drill
    the backup; empty the volume (the container stopped, as anyone wiping it would); restore in
    place; every instance identical, the same container, the volume's own folder kept (its
    contents moved aside beside it). podman-compose 1.0.3 cannot run a `network_mode: host`
    service (it always adds `--net <project>_default`: "cannot set multiple networks without
    bridge network mode"), and published ports are not forwarded here; the host reaches a
    container on a podman bridge by its address, so the service stays on the project's own
    network, made beforehand with a /30 subnet that holds exactly one container address (the
    same across the backup's stop and start)."""
    why = engine_ready("podman") or (None if shutil.which("podman-compose") else "podman-compose is not installed")
    if why:
        pytest.fail(why)
    project, folder, compose, orthanc = compose_project(["podman-compose"], tmp_path, host_network=False)
    compose_file = str(folder / "docker-compose.yml")
    engine = "podman"
    try:
        sh(compose + ["up", "-d"], cwd=folder)
        orthanc.wait()
        orthanc.store(tmp_path, patients=2)
        stored = orthanc.contents()
        assert len(stored) == 6
        container = f"{project}_orthanc_1"  # podman-compose's own naming
        other = run_module("orthanc_info", {"compose_file": str(tmp_path / "elsewhere.yml"), "url": orthanc.url})
        assert other["failed"] and "no compose file at" in other["msg"]
        inventory = write_inventory(tmp_path / "inventory.json", {"c": host_vars(
            orthanc.url, tmp_path, orthanc_compose_file=compose_file, orthanc_container_engine="auto")})
        result = run_playbook(inventory)
        assert result.returncode == 0, result.stdout
        backup = (tmp_path / "backups" / "latest").resolve()
        manifest = check_config_copy(backup, engine)
        assert manifest["container"]["name"] == container
        assert manifest["container"]["compose_project"] == project
        assert manifest["container"]["compose_files"] == [compose_file]
        assert (backup / "config" / "compose" / "docker-compose.yml").read_text() == pathlib.Path(compose_file).read_text()
        assert (backup / "config" / "compose" / ".env").read_text().startswith("ORTHANC_HTTP=")
        assert orthanc.answers()
        # a drill of the backup: a scratch Orthanc (the host's) on the effective configuration
        drill = run_module("orthanc_drill", {"backup": str(backup), "workdir": str(tmp_path / "drill")})
        assert not drill["failed"] and drill["ok"] and drill["checked_instances"] == 6, drill

        inspect = json.loads(sh([engine, "container", "inspect", container]).stdout)[0]
        volume = pathlib.Path(next(m["Source"] for m in inspect["Mounts"] if m["Destination"] == "/var/lib/orthanc/db"))
        sh([engine, "stop", "-t", "60", container])
        data_inode = os.stat(volume).st_ino
        sh(["find", volume, "-mindepth", "1", "-delete"])
        sh([engine, "start", container])
        orthanc.wait()
        assert orthanc.rest("GET", "/statistics")["CountInstances"] == 0

        result = run_playbook(inventory, playbook="restore.yml", extra_vars=CONFIRM)
        assert result.returncode == 0, result.stdout
        assert orthanc.contents() == stored
        # the same container, the volume's own folder kept (its contents were moved aside beside it)
        assert json.loads(sh([engine, "container", "inspect", container]).stdout)[0]["Id"] == inspect["Id"]
        assert os.stat(volume).st_ino == data_inode
        aside = list(volume.parent.glob(volume.name + ".pre-restore-*"))
        assert len(aside) == 1 and (aside[0] / "index").exists()  # the empty Orthanc's index, kept
    finally:
        sh(compose + ["down", "-v"], cwd=folder, check=False)
        sh(["podman", "network", "rm", "-f", f"{project}_default"], check=False)


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


def without_engines(tmp_path: pathlib.Path) -> str:
    """A PATH on which every program of this machine is found but docker and podman."""
    farm = tmp_path / "bin-without-engines"
    farm.mkdir()
    for folder in os.environ["PATH"].split(os.pathsep):
        if not os.path.isdir(folder):
            continue
        for entry in os.scandir(folder):
            if not entry.name.startswith(("docker", "podman")) and not (farm / entry.name).exists():
                (farm / entry.name).symlink_to(entry.path)
    return str(farm)


def test_clear_messages_and_the_containers_left_as_they_were(containers, tmp_path, monkeypatch):
    """Point 7 of the container issue, each a clear message naming the step and the cause, the
    containers untouched (the running one not restarted, the stopped one not started): engine not
    installed, engine not reachable, container not found, compose service not found, several
    matches, not running, database container not found. (A path not on a volume, and the host and
    step that a failed play names: test_storage_not_on_a_volume_is_refused.)"""
    project = f"pacsct{os.urandom(3).hex()}"
    labels = ["--label", f"com.docker.compose.project={project}", "--label", "com.docker.compose.service=orthanc"]
    orthanc = containers("podman", extra=labels)
    # a second container of the same service, created and never started (as `compose create` leaves it)
    twin = f"{orthanc.container}-twin"
    sh(["podman", "create", "--name", twin, *labels, IMAGE, "sleep", "infinity"])
    try:
        started = orthanc.inspect()["State"]["StartedAt"]

        def info(**args) -> dict:
            return run_module("orthanc_info", dict(args, url=orthanc.url))

        several = info(compose_project=project, container_engine="podman")
        assert several["failed"] and several["msg"].startswith(
            f"find Orthanc's container: compose service 'orthanc' of project '{project}' matches 2 containers ("), several
        assert orthanc.container in several["msg"] and twin in several["msg"]

        stopped = info(container=twin, container_engine="podman")
        assert stopped["failed"] and stopped["msg"].startswith(
            f"read Orthanc's configuration in its container: podman container {twin} is not running ("), stopped

        missing = info(container=f"{orthanc.container}-gone", container_engine="podman")
        assert missing["failed"] and missing["msg"] == (
            f"find Orthanc's container: container '{orthanc.container}-gone' not found by podman"), missing
        no_service = info(compose_project=project, compose_service="web", container_engine="podman")
        assert no_service["failed"] and no_service["msg"] == (
            f"find Orthanc's container: compose service 'web' of project '{project}' not found by podman"), no_service

        config = tmp_path / "pg.json"
        config.write_text(json.dumps({"PostgreSQL": {"EnableIndex": True, "Host": "127.0.0.1", "Port": 5432,
                                                     "Database": "x", "Username": "x", "Password": "x"}}))
        no_db = run_module("db_dump", {"config_path": str(config), "container": "pacs-no-such-db",
                                       "container_engine": "podman", "dest": str(tmp_path / "x.pgdump")})
        assert no_db["failed"] and no_db["msg"] == (
            "find the database container: container 'pacs-no-such-db' not found by podman"), no_db
        assert not (tmp_path / "x.pgdump").exists()

        with monkeypatch.context() as env:
            env.setenv("DOCKER_HOST", f"unix://{tmp_path}/no-daemon.sock")
            unreachable = info(container=orthanc.container, container_engine="docker")
        assert unreachable["failed"] and unreachable["msg"].startswith(
            f"find Orthanc's container: docker is not reachable at unix://{tmp_path}/no-daemon.sock"), unreachable
        with monkeypatch.context() as env:
            env.setenv("PATH", without_engines(tmp_path))
            not_installed = info(container=orthanc.container, container_engine="podman")
        assert not_installed["failed"] and "podman is not installed on this host (no 'podman' on PATH)" \
            in not_installed["msg"], not_installed

        # left as they were: the running one never restarted, the created one never started
        assert orthanc.running() and orthanc.answers()
        assert orthanc.inspect()["State"]["StartedAt"] == started
        assert json.loads(sh(["podman", "container", "inspect", twin]).stdout)[0]["State"]["Status"] == "created"
    finally:
        sh(["podman", "rm", "-f", "-t", "0", twin], check=False)


def test_container_runs_again_after_a_failure_or_a_kill_while_stopped(containers, tmp_path):
    """stopped_capture stops the container, fails (the index cannot be written) and starts it
    again. Then SIGKILL to ansible-playbook and every process of its run (the module that stopped
    the container included) while the container is stopped: the detached guardian, given the
    engine and the container, starts that container again without anyone's help, says so, and
    nothing looks like a complete backup."""
    orthanc = containers("podman")
    orthanc.store(tmp_path, patients=2)
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

    root = tmp_path / "backups"
    inventory = write_inventory(tmp_path / "inventory.json", {"c": host_vars(
        orthanc.url, tmp_path, orthanc_container=orthanc.container, orthanc_container_engine="podman")})
    started = orthanc.inspect()["State"]["StartedAt"]
    output = interrupt_during_downtime(inventory, orthanc, "kill")
    assert wait_for(lambda: orthanc.running() and orthanc.answers(), timeout=90), output
    assert orthanc.inspect()["State"]["StartedAt"] != started  # stopped by the play, started by the guardian
    assert orthanc.rest("GET", "/statistics")["CountInstances"] == 6
    report = _control.guardian_marker(orthanc.url) + ".guardian"
    assert wait_for(lambda: os.path.exists(report), timeout=60), output
    assert json.loads(pathlib.Path(report).read_text())["result"] == "Orthanc answers"
    assert checks.complete_backups(root) == []

"""Pure logic of the container engine library (plugins/module_utils/_container.py) on inspect
output as Docker and Podman print it: mounts by destination, compose labels, exec argv without
secrets. The real engines are in tests/containers/ (scripts/containers.sh)."""

from __future__ import annotations

import pytest

from ansible_collections.pacs.orthanc.plugins.module_utils import _config, _container
from ansible_collections.pacs.orthanc.plugins.module_utils._common import PacsError


class FakeEngine(_container.Engine):
    def __init__(self):  # pylint: disable=super-init-not-called  # no client needed for pure logic
        self.name, self.binary, self.env = "docker", "/usr/bin/docker", {}


DOCKER_INSPECT = {
    "Id": "abc123", "Name": "/pacs-orthanc-1", "Image": "sha256:1111",
    "State": {"Status": "running", "Running": True, "Pid": 4242},
    "Config": {"Env": ["ORTHANC__HTTP_PORT=8042", "DB_PASSWORD=a=b"], "Cmd": None,
               "Entrypoint": ["/docker-entrypoint.sh"], "Image": "orthancteam/orthanc:24.1.2",
               "Labels": {"com.docker.compose.project": "pacs", "com.docker.compose.service": "orthanc",
                          "com.docker.compose.project.working_dir": "/srv/pacs",
                          "com.docker.compose.project.config_files": "/srv/pacs/docker-compose.yml,override.yml"}},
    "Mounts": [
        {"Type": "volume", "Name": "pacs_orthanc-db", "Source": "/var/lib/docker/volumes/pacs_orthanc-db/_data",
         "Destination": "/var/lib/orthanc/db", "RW": True},
        {"Type": "bind", "Source": "/srv/pacs/orthanc.json", "Destination": "/etc/orthanc/orthanc.json", "RW": False},
        {"Type": "bind", "Source": "/srv/big", "Destination": "/var/lib/orthanc/db/big", "RW": True},
        {"Type": "tmpfs", "Source": "", "Destination": "/tmp", "RW": True},
    ],
}


def test_inspect_output_is_read_as_docker_prints_it():
    container = _container.Container(FakeEngine(), DOCKER_INSPECT)
    assert (container.name, container.running, container.pid) == ("pacs-orthanc-1", True, 4242)
    assert container.env == {"ORTHANC__HTTP_PORT": "8042", "DB_PASSWORD": "a=b"}
    assert container.image == "orthancteam/orthanc:24.1.2" and container.cmd == []
    assert (container.compose_project, container.compose_service) == ("pacs", "orthanc")
    # docker-compose v1 writes absolute paths, podman-compose paths relative to the working dir
    assert container.compose_files() == ["/srv/pacs/docker-compose.yml", "/srv/pacs/override.yml"]
    assert "a=b" not in repr(container.as_dict())  # names of the environment only, never values


def test_paths_map_to_the_longest_mount_by_destination():
    container = _container.Container(FakeEngine(), DOCKER_INSPECT)
    data = "/var/lib/docker/volumes/pacs_orthanc-db/_data"
    assert container.host_path("/var/lib/orthanc/db") == data
    assert container.host_path("/var/lib/orthanc/db/index") == data + "/index"
    assert container.host_path("/var/lib/orthanc/db/big/x") == "/srv/big/x"
    assert container.host_path("/var/lib/orthanc/dbx") is None  # a prefix of a name is not a parent
    assert container.host_path("/var/lib/orthanc") is None       # the container's own layer
    assert container.mount_for("/tmp/orthanc.json")["type"] == "tmpfs"


def test_exec_argv_keeps_secret_values_off_the_command_line():
    engine = FakeEngine()
    container = _container.Container(engine, DOCKER_INSPECT)
    argv = engine.exec_argv(container, ["pg_dump", "-Fc"], interactive=True, env_names=["PGPASSWORD"], user="postgres")
    assert argv == ["/usr/bin/docker", "exec", "-i", "-e", "PGPASSWORD", "-u", "postgres", "abc123", "pg_dump", "-Fc"]
    with pytest.raises(PacsError, match="not as NAME=VALUE"):
        engine.exec_argv(container, ["true"], env_names=["PGPASSWORD=secret"])
    assert engine.stop_argv(container, 600) == ["/usr/bin/docker", "stop", "-t", "600", "abc123"]


def test_the_configuration_is_the_last_argument_that_is_not_an_option():
    assert _config.orthanc_config_argument(["Orthanc", "/tmp/orthanc.json"]) == "/tmp/orthanc.json"
    assert _config.orthanc_config_argument(["/usr/sbin/Orthanc", "--verbose", "--logdir=/x", "/etc/orthanc/"]) == \
        "/etc/orthanc/"
    assert _config.orthanc_config_argument(["Orthanc", "--verbose"]) is None


def test_an_unknown_engine_is_refused_with_the_choices():
    with pytest.raises(PacsError, match="must be one of auto, docker, podman"):
        _container.Engine.choose("lxc")

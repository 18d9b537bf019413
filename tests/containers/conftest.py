"""Real Orthanc containers for the container tests (run by scripts/containers.sh, which builds the
image localhost/pacs-orthanc-debian12, starts the shared dockerd and loads the image into it).

Orthanc runs in the image as orthancteam/orthanc runs it: data/entrypoint.py merges the
container's /etc/orthanc/*.json and ORTHANC__... variables into /tmp/orthanc.json and execs
``Orthanc /tmp/orthanc.json``; storage and index on a named volume at /var/lib/orthanc/db.
Containers run with --init and --network host (dockerd has no bridge here), on free ports."""

from __future__ import annotations

import http.client
import json
import os
import pathlib
import secrets
import shutil
import subprocess
import time
import urllib.error
import urllib.request

import pytest

from tests.support import dicomgen
from tests.support.orthanc_server import free_port

REPO = pathlib.Path(__file__).resolve().parents[2]
DATA = pathlib.Path(__file__).resolve().parent / "data"
IMAGE = "localhost/pacs-orthanc-debian12"
DEFAULT_DOCKER_HOST = "unix:///work/main/.work/docker/docker.sock"
os.environ.setdefault("CONTAINERS_CONF", str(REPO / "extensions" / "molecule" / "containers.conf"))
if not os.environ.get("DOCKER_HOST") and os.path.exists(DEFAULT_DOCKER_HOST[len("unix://"):]):
    os.environ["DOCKER_HOST"] = DEFAULT_DOCKER_HOST


def engine_ready(engine: str) -> str | None:
    """None when ``engine`` can run the test image here, else why not."""
    if shutil.which(engine) is None:
        return f"{engine} is not installed (scripts/setup.sh)"
    proc = subprocess.run([engine, "image", "inspect", IMAGE], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          text=True, check=False)
    if proc.returncode != 0:
        return f"{engine} has no image {IMAGE} ({proc.stderr.strip()[-200:]}): run scripts/containers.sh"
    return None


def sh(argv, check=True, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in argv], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          check=check, timeout=kwargs.pop("timeout", 300), **kwargs)


class Rest:
    """The REST API of an Orthanc on 127.0.0.1."""

    def __init__(self, port: int, name: str, address: str = "127.0.0.1"):
        self.port, self.name = port, name
        self.url = f"http://{address}:{port}"

    def rest(self, method: str, path: str, body: bytes | None = None, timeout: float = 30):
        request = urllib.request.Request(self.url + path, data=body, method=method)
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(request, timeout=timeout) as answer:
            data = answer.read()
        try:
            return json.loads(data)
        except ValueError:
            return data

    def answers(self) -> bool:
        try:
            return self.rest("GET", "/system", timeout=2).get("Name") == self.name
        except (OSError, ValueError, AttributeError, http.client.HTTPException):  # cut off mid-answer: stopping
            return False

    def wait(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not self.answers():
            assert time.monotonic() < deadline, f"Orthanc {self.name} does not answer at {self.url}"
            time.sleep(0.2)

    def store(self, tmp_path: pathlib.Path, patients: int = 2, instances: int = 3) -> None:
        for i in range(patients):
            out = tmp_path / f"dicom-{self.name}-{secrets.token_hex(3)}"
            out.mkdir()
            for path in dicomgen.make_study(out, f"{self.name}-{i}", f"Test^{i}", series=1,
                                            instances_per_series=instances):
                self.rest("POST", "/instances", path.read_bytes())

    def contents(self) -> dict:
        """{SOP Instance UID: MD5 of the DICOM file Orthanc serves}."""
        import hashlib  # pylint: disable=import-outside-toplevel
        found = {}
        for instance in self.rest("GET", "/instances"):
            uid = self.rest("GET", f"/instances/{instance}")["MainDicomTags"]["SOPInstanceUID"]
            found[uid] = hashlib.md5(self.rest("GET", f"/instances/{instance}/file")).hexdigest()
        return found


class OrthancContainer(Rest):
    """One Orthanc container (engine run), removed with its volume at the end."""

    def __init__(self, engine: str, tmp_path: pathlib.Path, volume: bool = True, extra: list | None = None):
        tag = secrets.token_hex(3)
        super().__init__(free_port(), f"ctest{tag}")
        self.engine, self.container, self.volume = engine, f"pacs-ctest-{tag}", (f"pacs-ctest-{tag}" if volume else None)
        self.etc = tmp_path / f"etc-{tag}"
        self.etc.mkdir()
        (self.etc / "orthanc.json").write_text(json.dumps({
            "Name": self.name, "StorageDirectory": "/var/lib/orthanc/db", "Plugins": [],
            "RemoteAccessAllowed": True, "AuthenticationEnabled": False}))
        self.dicom_port = free_port()
        self.extra = list(extra or [])

    def run(self) -> "OrthancContainer":
        argv = [self.engine, "run", "-d", "--init", "--network", "host", "--name", self.container,
                "-v", f"{self.etc}:/etc/orthanc:ro", "-v", f"{DATA / 'entrypoint.py'}:/entrypoint.py:ro",
                "-e", f"ORTHANC__HTTP_PORT={self.port}", "-e", f"ORTHANC__DICOM_PORT={self.dicom_port}",
                "-e", "SOME_PASSWORD=s3cret-in-env", "--entrypoint", "/usr/bin/python3"] + self.extra
        if self.volume:
            argv += ["-v", f"{self.volume}:/var/lib/orthanc/db"]
        sh(argv + [IMAGE, "/entrypoint.py"])
        self.wait()
        return self

    def inspect(self) -> dict:
        return json.loads(sh([self.engine, "container", "inspect", self.container]).stdout)[0]

    def running(self) -> bool:
        return self.inspect()["State"]["Running"]

    def volume_dir(self) -> pathlib.Path:
        out = sh([self.engine, "volume", "inspect", self.volume]).stdout
        return pathlib.Path(json.loads(out)[0]["Mountpoint"])

    def remove(self) -> None:
        sh([self.engine, "rm", "-f", self.container], check=False)
        if self.volume:
            sh([self.engine, "volume", "rm", "-f", self.volume], check=False)


@pytest.fixture
def containers(tmp_path):
    """Factory: containers(engine, volume=True, extra=[run options]) -> a started OrthancContainer; all
    removed at the end."""
    made = []

    def make(engine: str, volume: bool = True, extra: list | None = None) -> OrthancContainer:
        why = engine_ready(engine)
        if why:
            pytest.fail(why)
        one = OrthancContainer(engine, tmp_path, volume, extra)
        made.append(one)
        return one.run()

    yield make
    for one in made:
        one.remove()

"""Fixtures for tests against real Orthanc servers started from Debian's package."""

from __future__ import annotations

import shutil

import pytest

from tests.support import sshd
from tests.support.orthanc_server import OrthancServer, stop_all


@pytest.fixture
def servers(tmp_path):
    """Factory of started OrthancServers, all stopped at the end of the test."""
    if shutil.which("Orthanc") is None:
        pytest.fail("Debian's orthanc package is not installed: run scripts/setup.sh")
    started = []

    def make(name: str, **kwargs) -> OrthancServer:
        server = OrthancServer(tmp_path / name, name=name, **kwargs)
        server.start()
        started.append(server)
        return server

    yield make
    stop_all(started)


@pytest.fixture
def ssh_server(tmp_path):
    """A real OpenSSH server on 127.0.0.1 (the backup server of the shipping tests), stopped at the end."""
    server = sshd.SshServer(tmp_path / "sshd")
    server.start()
    yield server
    server.stop()

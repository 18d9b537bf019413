"""Smoke test of tests/support: two real private Orthanc servers side by side."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import pytest

from tests.support.dicomgen import make_study
from tests.support.orthanc_server import OrthancServer, stop_all


@pytest.fixture
def servers(tmp_path: Path):
    """A folder-config server and a single-file-config server with compression, running."""
    a = OrthancServer(tmp_path / "a", name="smoke-a")
    b = OrthancServer(tmp_path / "b", name="smoke-b", compression=True, config_as_folder=False)
    try:
        a.start()
        b.start()
        yield a, b
    finally:
        stop_all([a, b])  # in parallel: each Orthanc 1.10.1 takes ~3.5 s to stop


def _dataset_part(dicom_file: bytes) -> bytes:
    """Bytes after the file meta group (preamble, "DICM", group 0002 skipped)."""
    assert dicom_file[128:132] == b"DICM" and dicom_file[132:136] == b"\x02\x00\x00\x00"
    return dicom_file[144 + int.from_bytes(dicom_file[140:144], "little"):]


def _shell_all(commands: list[str]) -> None:
    """Run shell commands in parallel (stops take seconds each) and check every one."""
    procs = [subprocess.Popen(c, shell=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for c in commands]
    for c, p in zip(commands, procs):
        out = p.communicate(timeout=90)[0]
        assert p.returncode == 0, f"{c} -> {p.returncode}: {out.decode()}"


def test_two_servers_store_restart(servers, tmp_path: Path) -> None:
    a, b = servers
    assert a.config_path.is_dir() and (a.config_path / "extra.json").is_file()
    assert b.config_path.is_file()
    assert a.http_port != b.http_port and a.dicom_port != b.dicom_port

    files_a = make_study(tmp_path / "dcm-a", "PA", "Alpha^Patient", series=1,
                         instances_per_series=3, seed=1)
    files_b = make_study(tmp_path / "dcm-b", "PB", "Beta^Patient", series=2,
                         instances_per_series=2, seed=2)
    ids_a = {a.store_rest(f): f for f in files_a}
    b.store_cstore(files_b)
    assert a.statistics()["CountInstances"] == 3
    assert b.statistics()["CountInstances"] == 4
    assert b.statistics()["CountSeries"] == 2

    def check(server: OrthancServer, files: list[Path], exact: bool) -> None:
        """Every stored instance matches its file: byte for byte when sent over REST; over
        C-STORE the receiver writes its own file meta header (Implementation Class UID of
        DCMTK), so there only the data set after it must be identical."""
        by_uid = {f.stem: f for f in files}  # files are named <SOPInstanceUID>.dcm
        ids = server.instances()
        assert len(ids) == len(files)
        for i in ids:
            original = by_uid[server.instance_sop_uid(i)].read_bytes()
            stored = server.instance_file(i)
            assert server.instance_md5(i) == hashlib.md5(stored).hexdigest()
            if exact:
                assert stored == original
            else:
                assert _dataset_part(stored) == _dataset_part(original)

    check(a, files_a, exact=True)
    check(b, files_b, exact=False)
    assert set(ids_a) == set(a.instances())
    # Compression really is on for b: the stored file is not the DICOM file.
    stored = [p for p in b.storage_dir.rglob("*") if p.is_file()]
    assert stored and not any(p.read_bytes()[128:132] == b"DICM" for p in stored)

    pids = (a.pid(), b.pid())
    _shell_all([a.stop_command(), b.stop_command()])
    assert a.pid() is None and b.pid() is None and not a.answers() and not b.answers()
    assert (a.index_dir / "index").is_file() and not (a.storage_dir / "index").exists()

    _shell_all([a.start_command(), b.start_command()])
    assert a.answers() and b.answers()
    assert a.pid() not in (None, pids[0]) and b.pid() not in (None, pids[1])
    assert subprocess.run(OrthancServer.load(a.root).ctl_command("status"), shell=True,
                          capture_output=True, check=False).returncode == 0
    assert a.statistics()["CountInstances"] == 3
    assert b.statistics()["CountInstances"] == 4
    check(a, files_a, exact=True)
    check(b, files_b, exact=False)


@pytest.mark.parametrize("way", ["events", "sampling"])
def test_secret_watch_sees_a_secret_in_argv_and_in_environ(way, monkeypatch) -> None:
    """procs.SecretWatch, the tests' leak detector, finds a secret on a command line and in an
    environment, whether it hears of each exec (where the kernel's connector can be read) or
    samples /proc without a pause (elsewhere)."""
    import os
    import secrets
    import time

    from tests.support import procs

    if way == "sampling":
        monkeypatch.setattr(procs, "_exec_events", lambda: None)
    secret = "pacs-secret-" + secrets.token_hex(8)
    with procs.SecretWatch(secret, {"sleep"}) as watch:
        time.sleep(0.2)  # the watch is running
        subprocess.run(["sh", "-c", "sleep 0.3; true", secret], check=True)  # the secret is sh's $0
        subprocess.run(["sleep", "0.3"], env={**os.environ, "PACS_TEST_SECRET": secret}, check=True)
    if way == "events" and not watch.events:
        pytest.skip("the process events connector cannot be read here: SecretWatch samples /proc")
    assert watch.events is (way == "events")
    assert "sleep" in watch.seen
    assert ("sh", "argv") in {(name, kind) for _pid, name, kind in watch.leaks}, watch.leaks
    assert ("sleep", "environ") in {(name, kind) for _pid, name, kind in watch.leaks}, watch.leaks

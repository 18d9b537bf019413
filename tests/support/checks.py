"""Checks of backups against real Orthanc servers, shared by tests and benchmarks."""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import sqlite3
import subprocess
import zlib

from tests.support import dicomgen
from tests.support.orthanc_server import OrthancServer
from ansible_collections.pacs.orthanc.plugins.module_utils import _verify


def store_studies(server: OrthancServer, tmp_path: pathlib.Path, patients: int, via: str = "rest",
                  instances: int = 3, pixel_bytes: int = 64 * 64 * 2) -> list:
    """Store one study per patient; returns the files written."""
    paths = []
    for i in range(patients):
        out = tmp_path / f"dicom-{server.name}-{via}-{len(list(tmp_path.glob('dicom-*')))}"
        out.mkdir()
        paths += dicomgen.make_study(out, f"{server.name}-{via}-{i}", f"Test^{via}{i}", series=1,
                                     instances_per_series=instances, pixel_bytes=pixel_bytes)
    if via == "rest":
        for path in paths:
            server.store_rest(path)
    else:
        server.store_cstore(paths)
    return paths


def dicom_uuids(index_file: pathlib.Path) -> dict:
    """{instance public id: uuid of its DICOM attachment} read from an index copy (Orthanc 1.10.1
    has no REST route for an attachment's uuid)."""
    conn = sqlite3.connect(f"file:{index_file}?mode=ro", uri=True)
    try:
        return dict(conn.execute(
            "SELECT r.publicId, a.uuid FROM Resources r JOIN AttachedFiles a ON a.id = r.internalId "
            "WHERE r.resourceType = 4 AND a.fileType = 1"))
    finally:
        conn.close()


def attachment_count(index_file: pathlib.Path) -> int:
    conn = sqlite3.connect(f"file:{index_file}?mode=ro", uri=True)
    try:
        return conn.execute("SELECT COUNT(*) FROM AttachedFiles").fetchone()[0]
    finally:
        conn.close()


def disk_bytes_to_dicom(data: bytes, compressed: bool) -> bytes:
    """Storage files with StorageCompression are zlib data behind an 8-byte size header."""
    return zlib.decompress(data[8:]) if compressed else data


def read_manifest(backup: pathlib.Path) -> dict:
    return json.loads((backup / "manifest.json").read_text())


def assert_backup_matches(server: OrthancServer, backup: pathlib.Path, compressed: bool = False) -> dict:
    """The backup holds exactly what the (idle) server holds: same counts, every instance's DICOM
    file byte for byte, the configuration files identical, and it verifies offline."""
    manifest = read_manifest(backup)
    stats = server.statistics()
    assert manifest["counts"] == {"patients": stats["CountPatients"], "studies": stats["CountStudies"],
                                  "series": stats["CountSeries"], "instances": stats["CountInstances"]}
    assert manifest["format_version"] == 1 and manifest["backend"] == "sqlite"
    assert manifest["orthanc"]["version"] == server.rest("GET", "/system")["Version"]
    assert manifest["database_schema_version"] == str(server.rest("GET", "/system")["DatabaseVersion"])
    instances = server.instances()
    assert len(instances) == stats["CountInstances"] > 0
    uuids = dicom_uuids(backup / "index" / "index")
    assert sorted(uuids) == sorted(instances)
    for instance in instances:
        uuid = uuids[instance]
        on_disk = (backup / "storage" / uuid[0:2] / uuid[2:4] / uuid).read_bytes()
        assert disk_bytes_to_dicom(on_disk, compressed) == server.instance_file(instance)
        assert hashlib.md5(disk_bytes_to_dicom(on_disk, compressed)).hexdigest() == server.instance_md5(instance)
    config = pathlib.Path(server.config_path)
    originals = sorted(config.iterdir()) if config.is_dir() else [config]
    for original in originals:
        assert (backup / "config" / original.name).read_bytes() == original.read_bytes()
    for rel, digest in manifest["files"].items():
        assert hashlib.sha256((backup / rel).read_bytes()).hexdigest() == digest
    assert set(manifest["files"]) == {f"config/{p.name}" for p in originals} | {"index/index"}
    report = _verify.verify_backup(str(backup), md5="all")
    assert report["ok"], report["problems"]
    attached = attachment_count(backup / "index" / "index")
    assert attached >= stats["CountInstances"]  # with compression, 1.10.1 also keeps a DICOM-until-pixel-data file
    assert report["orphans"] == 0 and report["files_hashed"] == attached == manifest["storage"]["files"]
    assert stat_mode(backup) == 0o700 and stat_mode(backup / "manifest.json") == 0o600
    return manifest


def stat_mode(path: pathlib.Path) -> int:
    return os.stat(path).st_mode & 0o777


def complete_backups(root: pathlib.Path) -> list:
    return sorted(p.name for p in root.iterdir()
                  if p.is_dir() and not p.is_symlink() and (p / "manifest.json").exists())


def mount_tmpfs(path: pathlib.Path, size: str, readonly: bool = False) -> None:
    path.mkdir(parents=True, exist_ok=True)
    options = f"size={size},mode=0700" + (",ro" if readonly else "")
    subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], check=True)


def umount(path: pathlib.Path) -> None:
    subprocess.run(["umount", "-l", str(path)], check=False)

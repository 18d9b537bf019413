# -*- coding: utf-8 -*-
# Copyright: pacs.orthanc contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Restore drills: start a scratch Orthanc on a copy of a backup, beside production, and check
that it serves what the backup holds. Production is never touched."""

from __future__ import annotations

import hashlib
import json
import os
import random
import secrets
import shutil
import signal
import socket
import sqlite3
import time

from ansible_collections.pacs.orthanc.plugins.module_utils import _config, _container, _layout, _rest, _storage
from ansible_collections.pacs.orthanc.plugins.module_utils._common import PacsError, Program, os_error_cause

__metaclass__ = type

DRILL_USER = "pacs-drill"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def overrides(scratch: str, port: int, password: str) -> dict:
    """Settings that keep a scratch Orthanc to itself: its own folders and port, loopback only,
    no plugins, scripts, peers, modalities or saved jobs (nothing it could send anywhere), no
    recycling, and a user of its own."""
    return {
        "Name": "pacs-orthanc-drill",
        "StorageDirectory": os.path.join(scratch, "storage"),
        "IndexDirectory": os.path.join(scratch, "index"),
        "HttpPort": port,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": True,
        "RegisteredUsers": {DRILL_USER: password},
        "DicomServerEnabled": False,
        "Plugins": [],
        "LuaScripts": [],
        "DicomModalities": {},
        "OrthancPeers": {},
        "SaveJobs": False,
        "MaximumStorageSize": 0,
        "MaximumPatientCount": 0,
        "WebDavEnabled": False,
        "SslEnabled": False,
        "HttpsVerifyPeers": False,
    }


def backup_config_files(backup: str, manifest: dict) -> list:
    """The configuration files Orthanc ran with, in a backup: the files of its config/, or for an
    Orthanc in a container the effective configuration (config/effective/<path in the container>)."""
    config = os.path.join(backup, _layout.CONFIG)
    effective = (manifest.get("container") or {}).get("effective_config_files") or []
    if effective:
        return [os.path.join(config, _container.EFFECTIVE, name.lstrip("/")) for name in effective]
    return [os.path.join(config, name) for name in sorted(os.listdir(config))]


def write_scratch_config(backup_config, dest: str, settings: dict) -> None:
    """Copy the backup's configuration files (a folder, or a list of files) into ``dest`` (a
    folder), each override written into the file that defines its key (a key in two files is an
    error for Orthanc), the others into a file of their own."""
    os.makedirs(dest, mode=0o700)
    placed = set()
    files = backup_config if isinstance(backup_config, list) else [
        os.path.join(backup_config, name) for name in sorted(os.listdir(backup_config))]
    for src in files:
        name = os.path.basename(src)
        if not (name.lower().endswith(".json") and os.path.isfile(src)):
            continue
        values = _config.load_configuration(src)["values"]
        for key in settings:
            if key in values:
                values[key] = settings[key]
                placed.add(key)
        with open(os.path.join(dest, name), "w", encoding="utf-8") as handle:
            json.dump(values, handle, indent=2)
    rest = {k: v for k, v in settings.items() if k not in placed}
    with open(os.path.join(dest, "zz-pacs-orthanc-drill.json"), "w", encoding="utf-8") as handle:
        json.dump(rest, handle, indent=2)


def attachment_uuids(index_file: str, instances) -> list:
    """The storage uuids of every attachment (the DICOM file and any other) of ``instances``
    (public ids), read from the backup's index."""
    wanted = set(instances)
    conn = sqlite3.connect(f"file:{index_file}?mode=ro", uri=True)
    try:
        rows = conn.execute("SELECT r.publicId, a.uuid FROM Resources r JOIN AttachedFiles a ON a.id = r.internalId "
                            "WHERE r.resourceType = 4")
        return sorted({uuid for public, uuid in rows if public in wanted})
    finally:
        conn.close()


def dicom_md5s(index_file: str) -> dict:
    """{instance public id: MD5 of its DICOM file} from the backup's index."""
    conn = sqlite3.connect(f"file:{index_file}?mode=ro", uri=True)
    try:
        return dict(conn.execute(
            "SELECT r.publicId, a.uncompressedMD5 FROM Resources r JOIN AttachedFiles a ON a.id = r.internalId "
            "WHERE r.resourceType = 4 AND a.fileType = 1"))
    finally:
        conn.close()


class Scratch:
    """A scratch Orthanc serving a copy of a backup (SQLite index; storage files hard-linked when
    the scratch folder is on the backup's filesystem), on a free loopback port with a random user
    of its own. As a context manager it is started on entry and, unless ``keep``, stopped and its
    folder removed on exit, whatever happened. Used by the drill and by the point restore."""

    def __init__(self, backup: str, workdir: str, orthanc_binary: str, keep: bool = False,
                 start_timeout: float = 60, all_files: bool = True, progress=None):
        self.backup = os.path.realpath(backup)
        try:
            self.manifest = _layout.read_manifest(self.backup)
        except (OSError, ValueError) as exc:
            raise PacsError("read backup", f"{self.backup} is not a complete backup: {exc}")
        self.workdir, self.orthanc_binary, self.keep, self.start_timeout = workdir, orthanc_binary, keep, start_timeout
        self.scratch = os.path.join(workdir, f"{self.manifest.get('name', 'backup')}-{os.getpid()}")
        self.port, self.password = free_port(), secrets.token_urlsafe(18)
        self.url = f"http://127.0.0.1:{self.port}"
        self.user = DRILL_USER
        self.session = _rest.Session(self.url, self.user, self.password, timeout=120)
        self.all_files = all_files  # False: only the files given to place() later (a point restore)
        self.progress = progress    # a _progress.Progress counting the files placed, or None
        self.process = None
        self.removed = False

    def get(self, path: str):
        return self.session.get(path)

    def post(self, path: str, data):
        return self.session.post(path, data)

    def file(self, instance: str) -> bytes:
        return self.session.request(f"/instances/{instance}/file")

    def index_md5s(self) -> dict:
        """{instance: MD5 of its DICOM file} as the backup's index records them (the scratch copy
        is locked by the scratch Orthanc)."""
        return dicom_md5s(os.path.join(self.backup, "index", "index"))

    def start(self) -> None:
        scratch, backup = self.scratch, self.backup
        if not os.path.isfile(os.path.join(backup, "index", "index")):
            raise PacsError("prepare scratch Orthanc", f"{backup} holds no SQLite index (a {self.manifest.get('backend')} "
                            "backup): a scratch Orthanc serves SQLite backups only")
        try:
            os.makedirs(self.workdir, mode=0o700, exist_ok=True)
            os.makedirs(os.path.join(scratch, "index"), mode=0o700)
            os.makedirs(os.path.join(scratch, "log"), mode=0o700)
            write_scratch_config(backup_config_files(backup, self.manifest), os.path.join(scratch, "config"),
                                 overrides(scratch, self.port, self.password))
            shutil.copyfile(os.path.join(backup, "index", "index"), os.path.join(scratch, "index", "index"))
            os.makedirs(os.path.join(scratch, "storage"), mode=0o700)
            if self.all_files:
                if self.progress is not None:
                    stored = self.manifest.get("storage") or {}
                    self.progress.totals(stored.get("files"), stored.get("bytes"), estimated=True)
                self.place(uuid for uuid, _entry in _storage.walk_storage(os.path.join(backup, "storage")))
        except OSError as exc:
            raise PacsError("prepare scratch Orthanc", os_error_cause(exc))
        log = open(os.path.join(scratch, "log", "stdout.log"), "ab")
        try:
            # detached: with keep, the scratch Orthanc outlives this module
            self.process = Program([self.orthanc_binary, f"--logdir={os.path.join(scratch, 'log')}",
                                    os.path.join(scratch, "config")], "start scratch Orthanc", stdout=log, stderr=log,
                                   cwd=scratch, detach=True)
        finally:
            log.close()
        deadline = time.monotonic() + self.start_timeout
        while not _rest.answers(self.url, self.user, self.password, timeout=1):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise PacsError("start scratch Orthanc", f"the scratch Orthanc did not answer at {self.url}: "
                                f"{_log_tail(scratch)}")
            time.sleep(0.1)

    def place(self, uuids) -> int:
        """Put these storage files of the backup into the scratch storage (hard links when on the
        backup's filesystem, else copies). Orthanc reads a file only when it is asked for it: a
        scratch Orthanc started without files serves the index, and the files placed since."""
        source = os.path.join(self.backup, "storage")
        placer = _storage.Placer(source, os.path.join(self.scratch, "storage"), None,
                                 _storage.same_filesystem(source, self.scratch))
        if self.progress is not None:
            placer.on_done = self.progress.add
        count, missing = 0, []
        try:
            for uuid in uuids:
                if placer.place(uuid, None)[0] is None:
                    missing.append(uuid)
                count += 1
            missing += placer.finish("copy backup into the scratch folder")
            if missing:
                raise PacsError("copy backup into the scratch folder", f"{len(missing)} files are missing from "
                                f"{source} (e.g. {missing[0]}): the backup is damaged (run backup_verify)")
        except OSError as exc:
            raise PacsError("copy backup into the scratch folder", os_error_cause(exc))
        return count

    def stop(self) -> None:
        self.session.close()
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except PacsError:
                pass  # killed after 60 s
        shutil.rmtree(self.scratch, ignore_errors=True)
        self.removed = True

    def __enter__(self):
        try:
            self.start()
        except BaseException:
            if not self.keep:
                self.stop()
            raise
        return self

    def __exit__(self, *exc):
        if not self.keep:
            self.stop()
        return False


def run_drill(backup: str, workdir: str, orthanc_binary: str, sample: int, keep: bool,
              start_timeout: float = 60, seed=None, progress=None) -> dict:
    """``progress`` (a _progress.Progress) counts the storage files copied into the scratch folder."""
    scratch = Scratch(backup, workdir, orthanc_binary, keep, start_timeout, progress=progress)
    manifest = scratch.manifest
    result = {"backup": scratch.backup, "scratch": scratch.scratch, "url": scratch.url, "kept": keep}
    try:
        with scratch:
            result["pid"] = scratch.process.pid
            stats = scratch.get("/statistics")
            served = {"patients": stats["CountPatients"], "studies": stats["CountStudies"],
                      "series": stats["CountSeries"], "instances": stats["CountInstances"]}
            expected = scratch.index_md5s()
            ids = sorted(scratch.get("/instances"))
            chosen = ids if sample <= 0 or sample >= len(ids) else random.Random(seed).sample(ids, sample)
            mismatches = []
            for instance in chosen:
                digest = hashlib.md5(scratch.file(instance)).hexdigest()
                if expected.get(instance) != digest:
                    mismatches.append(instance)
            problems = []
            if served != manifest.get("counts"):
                problems.append(f"the scratch Orthanc counts {served}, the manifest {manifest.get('counts')}")
            if sorted(expected) != ids:
                problems.append(f"the scratch Orthanc lists {len(ids)} instances, the index {len(expected)}")
            if mismatches:
                problems.append(f"{len(mismatches)} of {len(chosen)} instances served with another MD5 than the index "
                                f"records (e.g. {mismatches[0]})")
            result.update({"counts": served, "manifest_counts": manifest.get("counts"),
                           "checked_instances": len(chosen), "mismatched_instances": mismatches[:10],
                           "problems": problems, "ok": not problems,
                           "orthanc_version": scratch.get("/system").get("Version")})
            if problems:
                raise PacsError("compare scratch Orthanc with the backup", "; ".join(problems), **result)
            return result
    finally:
        if scratch.removed:
            result["removed"] = True


def _log_tail(scratch: str) -> str:
    lines = []
    log_dir = os.path.join(scratch, "log")
    for name in sorted(os.listdir(log_dir)) if os.path.isdir(log_dir) else []:
        with open(os.path.join(log_dir, name), "r", encoding="utf-8", errors="replace") as handle:
            lines += handle.read().splitlines()
    errors = [line for line in lines if line.startswith(("E", "W"))] or lines
    return " | ".join(errors[-3:]) or "no log"

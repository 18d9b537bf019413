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

from ansible_collections.pacs.orthanc.plugins.module_utils import _config, _layout, _rest, _storage
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


def write_scratch_config(backup_config: str, dest: str, settings: dict) -> None:
    """Copy the backup's configuration files into ``dest`` (a folder), each override written
    into the file that defines its key (a key in two files is an error for Orthanc), the others
    into a file of their own."""
    os.makedirs(dest, mode=0o700)
    placed = set()
    for name in sorted(os.listdir(backup_config)):
        src = os.path.join(backup_config, name)
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


def dicom_md5s(index_file: str) -> dict:
    """{instance public id: MD5 of its DICOM file} from the backup's index."""
    conn = sqlite3.connect(f"file:{index_file}?mode=ro", uri=True)
    try:
        return dict(conn.execute(
            "SELECT r.publicId, a.uncompressedMD5 FROM Resources r JOIN AttachedFiles a ON a.id = r.internalId "
            "WHERE r.resourceType = 4 AND a.fileType = 1"))
    finally:
        conn.close()


def _get_file(url: str, instance: str, password: str) -> bytes:
    from ansible.module_utils.urls import open_url
    response = open_url(f"{url}/instances/{instance}/file", timeout=60, url_username=DRILL_USER,
                        url_password=password, force_basic_auth=True)
    try:
        return response.read()
    finally:
        response.close()


def run_drill(backup: str, workdir: str, orthanc_binary: str, sample: int, keep: bool,
              start_timeout: float = 60, seed=None, progress=None) -> dict:
    """``progress`` (a _progress.Progress) counts the storage files copied into the scratch folder."""
    backup = os.path.realpath(backup)
    try:
        manifest = _layout.read_manifest(backup)
    except (OSError, ValueError) as exc:
        raise PacsError("read backup", f"{backup} is not a complete backup: {exc}")
    os.makedirs(workdir, mode=0o700, exist_ok=True)
    scratch = os.path.join(workdir, f"{manifest.get('name', 'backup')}-{os.getpid()}")
    port, password = free_port(), secrets.token_urlsafe(18)
    url = f"http://127.0.0.1:{port}"
    result = {"backup": backup, "scratch": scratch, "url": url, "kept": keep}
    process = None
    try:
        try:
            os.makedirs(os.path.join(scratch, "index"), mode=0o700)
            os.makedirs(os.path.join(scratch, "log"), mode=0o700)
            write_scratch_config(os.path.join(backup, "config"), os.path.join(scratch, "config"),
                                 overrides(scratch, port, password))
            shutil.copyfile(os.path.join(backup, "index", "index"), os.path.join(scratch, "index", "index"))
            link = _storage.same_filesystem(os.path.join(backup, "storage"), scratch)
            placer = _storage.Placer(os.path.join(backup, "storage"), os.path.join(scratch, "storage"), None, link)
            if progress is not None:
                stored = manifest.get("storage") or {}
                progress.totals(stored.get("files"), stored.get("bytes"), estimated=True)
                placer.on_done = progress.add
            for uuid, _entry in _storage.walk_storage(os.path.join(backup, "storage")):
                placer.place(uuid, None)
            placer.finish("copy backup into the scratch folder")
        except OSError as exc:
            raise PacsError("prepare scratch Orthanc", os_error_cause(exc))
        log = open(os.path.join(scratch, "log", "stdout.log"), "ab")
        try:
            # detached: with keep, the scratch Orthanc outlives this module
            process = Program([orthanc_binary, f"--logdir={os.path.join(scratch, 'log')}",
                               os.path.join(scratch, "config")], "start scratch Orthanc", stdout=log, stderr=log,
                              cwd=scratch, detach=True)
        finally:
            log.close()
        result["pid"] = process.pid
        deadline = time.monotonic() + start_timeout
        while not _rest.answers(url, DRILL_USER, password, timeout=1):
            if process.poll() is not None or time.monotonic() > deadline:
                raise PacsError("start scratch Orthanc", f"the scratch Orthanc did not answer at {url}: "
                                f"{_log_tail(scratch)}")
            time.sleep(0.1)
        stats = _rest.get(url, "/statistics", DRILL_USER, password, timeout=30)
        served = {"patients": stats["CountPatients"], "studies": stats["CountStudies"],
                  "series": stats["CountSeries"], "instances": stats["CountInstances"]}
        expected = dicom_md5s(os.path.join(backup, "index", "index"))  # the scratch copy is locked
        ids = sorted(_rest.get(url, "/instances", DRILL_USER, password, timeout=60))
        chosen = ids if sample <= 0 or sample >= len(ids) else random.Random(seed).sample(ids, sample)
        mismatches = []
        for instance in chosen:
            digest = hashlib.md5(_get_file(url, instance, password)).hexdigest()
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
        result.update({"counts": served, "manifest_counts": manifest.get("counts"), "checked_instances": len(chosen),
                       "mismatched_instances": mismatches[:10], "problems": problems, "ok": not problems,
                       "orthanc_version": _rest.get(url, "/system", DRILL_USER, password).get("Version")})
        if problems:
            raise PacsError("compare scratch Orthanc with the backup", "; ".join(problems), **result)
        return result
    finally:
        if not keep:
            if process is not None and process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout=60)
                except PacsError:
                    pass  # killed after 60 s
            shutil.rmtree(scratch, ignore_errors=True)
            result["removed"] = True


def _log_tail(scratch: str) -> str:
    lines = []
    log_dir = os.path.join(scratch, "log")
    for name in sorted(os.listdir(log_dir)) if os.path.isdir(log_dir) else []:
        with open(os.path.join(log_dir, name), "r", encoding="utf-8", errors="replace") as handle:
            lines += handle.read().splitlines()
    errors = [line for line in lines if line.startswith(("E", "W"))] or lines
    return " | ".join(errors[-3:]) or "no log"

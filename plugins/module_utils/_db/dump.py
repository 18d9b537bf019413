# -*- coding: utf-8 -*-
# Copyright: pacs.orthanc contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Hot dumps with the engines' own tools (pg_dump -Fc or -Fd, mysqldump), where they live in a
backup folder, and the check that a dump reads back. A dump is written beside its final name
(``.part``) and moved into place only once the tool succeeded and the dump reads back."""

from __future__ import annotations

import concurrent.futures
import hashlib
import os
import re
import shutil
import time

from ansible_collections.pacs.orthanc.plugins.module_utils import _layout
from ansible_collections.pacs.orthanc.plugins.module_utils._common import (
    PacsError, fsync_dir, os_error_cause, run_command, sha256_file)
from ansible_collections.pacs.orthanc.plugins.module_utils._db import container as db_container
from ansible_collections.pacs.orthanc.plugins.module_utils._db.client import Client
from ansible_collections.pacs.orthanc.plugins.module_utils._db.connection import public

__metaclass__ = type

PART = ".part"
CHUNK = 1024 * 1024
MYSQL_TRAILER = b"-- Dump completed"
DUMP_NAMES = _layout.DUMP_NAMES
find_dump = _layout.find_dump


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        os.unlink(path)


def _write_and_follow(tool: str, args: list, part: str, step: str, client: Client, timeout: float | None) -> dict:
    """Run a dump tool that writes ``part`` front to back (mysqldump --result-file, or its standard
    output inside a container), and hash the file as it grows: no copy through this process, and
    the hash keeps pace with the tool on the other core. Returns bytes, sha256 and the last bytes
    (for the MySQL trailer)."""
    digest = hashlib.sha256()
    size = 0
    deadline = time.monotonic() + timeout if timeout else None
    os.close(os.open(part, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))  # the tool keeps the mode
    with client.start(tool, args, step, output=part) as program:
        try:
            with open(part, "rb") as handle:
                while True:
                    chunk = handle.read(CHUNK)
                    if chunk:
                        digest.update(chunk)
                        size += len(chunk)
                        continue
                    if program.poll() is not None:
                        rest = handle.read()
                        if not rest:
                            break
                        digest.update(rest)
                        size += len(rest)
                        continue
                    if deadline and time.monotonic() > deadline:
                        raise PacsError(step, f"{program.name} did not finish within {timeout} s")
                    time.sleep(0.005)
                os.fsync(handle.fileno())
                handle.seek(max(0, size - 4096))
                tail = handle.read()
        except OSError as exc:
            raise PacsError(step, f"cannot read the dump back: {os_error_cause(exc)}")
        rc = program.wait()
        err = program.errors()
    if rc != 0:
        cause = f"{tool} was killed by signal {-rc}. " if rc < 0 else f"{tool} exited with {rc}: "
        raise PacsError(step, cause + client.explain(err))
    return {"bytes": size, "sha256": digest.hexdigest(), "tail": tail, "stderr": err}


def _tree_stats(path: str) -> dict:
    total, files = 0, {}
    for directory, _subdirs, names in os.walk(path):
        for name in names:
            full = os.path.join(directory, name)
            total += os.path.getsize(full)
            files[os.path.relpath(full, path)] = sha256_file(full)
    return {"bytes": total, "files": files}


# pg_dump's compression level (-Z): 1, not pg_dump's own default (6). On Orthanc's index at
# 1,000,000 instances (1.9 GB) -Z 6 took 21.4 s of CPU-bound compression and wrote 173 MB; -Z 1
# took 7.1 s and wrote 185 MB (7% more); -Z 0 5.0 s, 642 MB (benchmarks/README.md).
DEFAULT_COMPRESSION = 1


def check_compression(level: int, step: str = "dump the database") -> None:
    if not 0 <= level <= 9:
        raise PacsError(step, f"the compression level must be 0 (none) to 9, not {level}")


def dump(conn: dict, dest: str, fmt: str = "custom", jobs: int = 1, bin_dir: str | None = None,
         timeout: float | None = None, container=None, compression: int = DEFAULT_COMPRESSION) -> dict:
    """Dump the database into ``dest`` (a file, or a folder for the directory format), with the
    host's tools, or with those of the database's ``container`` (a ``_db.container.InContainer``).
    ``compression``: pg_dump's level, 0 (none) to 9 (a MySQL dump is plain SQL)."""
    step = "dump the database"
    engine = conn["engine"]
    check_compression(compression, step)
    if engine == "mysql":
        fmt = "sql"
    elif fmt not in ("custom", "directory"):
        raise PacsError(step, f"unknown PostgreSQL dump format {fmt!r}: use custom or directory")
    elif fmt == "directory" and container is not None:
        raise PacsError(step, f"the directory format is written as a folder by pg_dump itself, which runs inside the "
                        f"container {container.name}: use the custom format (orthanc_backup_dump_format: custom)")
    if os.path.lexists(dest):
        raise PacsError(step, f"{dest} exists already; a dump never overwrites a file")
    parent = os.path.dirname(dest) or "."
    try:
        os.makedirs(parent, mode=0o700, exist_ok=True)
    except OSError as exc:
        raise PacsError(step, f"cannot create the folder for the dump: {os_error_cause(exc)}")
    part = dest + PART
    _remove(part)  # a leftover of an interrupted run
    started = time.monotonic()
    with Client(conn, bin_dir, step, container=container) as client:
        tool_name = "pg_dump" if engine == "postgresql" else "mysqldump"
        client.tool(tool_name)  # a clear message when it is missing, before anything else
        if engine == "postgresql":
            client.tool("pg_restore")

        def ask_versions():
            try:
                return client.server_version(), client.tool_version(tool_name)
            except PacsError:
                return "unknown", client.tool_version(tool_name)

        # One executor beside the dump, shut down once whatever happens: the versions are asked
        # there (two client start-ups, ~0.1 s each; a connection problem then shows in the dump
        # tool's own error, explained the same way), and a custom-format archive is hashed there
        # while pg_restore reads it back.
        with concurrent.futures.ThreadPoolExecutor(max_workers=2) as side:
            versions = side.submit(ask_versions)
            try:
                if engine == "postgresql" and fmt == "custom":
                    # written by pg_dump itself (-f): a seekable archive records where each table's
                    # data starts, which selective and parallel restores need
                    # (inside a container it writes to its standard output: no table offsets, which
                    # only selective and parallel restores of a custom archive miss)
                    os.close(os.open(part, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))  # pg_dump keeps the mode
                    rc, out, err = client.run("pg_dump", ["-d", conn["database"], "-Fc", "-Z", str(compression)],
                                              step, output=part, timeout=timeout)
                    if rc != 0:
                        raise PacsError(step, f"pg_dump exited with {rc}: {client.explain(err or out)}")
                    hashed = side.submit(sha256_file, part)  # beside the read-back check below
                    info = {"bytes": os.path.getsize(part)}
                    with open(part, "rb") as handle:
                        os.fsync(handle.fileno())
                    check = check_dump(engine, part, fmt, client=client)
                    info["sha256"] = hashed.result()
                elif engine == "postgresql":
                    argv = client.argv("pg_dump", "-d", conn["database"], "-Fd", "-j", str(max(1, jobs)),
                                       "-Z", str(compression), "-f", part)
                    rc, out, err = run_command(argv, step, env=client.env, check=False, timeout=timeout)
                    if rc != 0:
                        raise PacsError(step, f"pg_dump exited with {rc}: {client.explain(err or out)}")
                    info = _tree_stats(part)
                    info["sha256"] = hashlib.sha256("".join(f"{k}  {v}\n" for k, v in sorted(info["files"].items()))
                                                    .encode()).hexdigest()
                else:
                    args = ["--single-transaction", "--routines", "--triggers", "--hex-blob", "--no-tablespaces",
                            "--default-character-set=utf8mb4", "--quick", "--skip-dump-date", conn["database"]]
                    info = _write_and_follow("mysqldump", args, part, step, client, timeout)
                dumped = time.monotonic()
                if fmt != "custom":
                    check = check_dump(engine, part, fmt, client=client, tail=info.get("tail"))
                os.rename(part, dest)
                fsync_dir(parent)
            except BaseException:
                _remove(part)
                raise
            version, tool_version = versions.result()
        result = {"path": dest, "engine": engine, "format": fmt, "bytes": info["bytes"], "sha256": info["sha256"],
                  "compression": compression if engine == "postgresql" else None,
                  "duration_seconds": round(time.monotonic() - started, 3),
                  "dump_seconds": round(dumped - started, 3),
                  "server_version": version, "tool": os.path.basename(client.tool(tool_name)),
                  "container": container.name if container is not None else None,
                  "tool_version": tool_version, "connection": public(conn),
                  "check": check}
        if fmt == "directory":
            result["files"] = info["files"]
    return result


def check_dump(engine: str, path: str, fmt: str, client: Client | None = None, tail: bytes | None = None,
               bin_dir: str | None = None, container: str | None = None) -> dict:
    """A dump reads back: pg_restore lists it and it holds Orthanc's tables; a MySQL dump ends
    with mysqldump's completion line and holds Orthanc's tables and procedures. ``container``:
    the database container that made it, whose pg_restore reads it when it runs here."""
    step = "check the dump"
    if engine == "postgresql":
        if client is None:
            with db_container.reader(container, bin_dir, step) as own:
                return check_dump(engine, path, fmt, client=own)
        rc, out, err = client.run("pg_restore", ["--list"], step, source=path, auth=False, timeout=600)
        if rc != 0:
            raise PacsError(step, f"pg_restore cannot read {path}: {' '.join(err.strip().splitlines()[-2:])}")
        tables = set(re.findall(r"TABLE DATA \S+ (\w+) ", out))
        blobs = len(re.findall(r" BLOB ", out))
        if not {"resources", "attachedfiles"} <= tables:
            raise PacsError(step, f"{path} does not hold Orthanc's index (no resources/attachedfiles table data)")
        return {"tables": len(tables), "large_objects": blobs}
    if tail is None:
        with open(path, "rb") as handle:
            handle.seek(max(0, os.path.getsize(path) - 4096))
            tail = handle.read()
    if MYSQL_TRAILER not in tail[-200:]:
        raise PacsError(step, f"{path} does not end with mysqldump's '-- Dump completed' line: it is truncated")
    return {"complete": True}

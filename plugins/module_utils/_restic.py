# -*- coding: utf-8 -*-
# Copyright: pacs.orthanc contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Shipping a complete local backup to a restic repository (issue 14, part 1).

Every restic command runs through _common.Program / run_command: an argument list, LC_ALL=C, the
repository in RESTIC_REPOSITORY and the password in RESTIC_PASSWORD_FILE (a file the caller names,
or a 0600 temporary file this module writes and removes), never on a command line. Restic 0.14
prints Go stack traces on some errors: the outcome is decided by exit codes; the text of its error
output only chooses the words of the message. Standard library only."""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
import threading
import time
import urllib.parse

from ansible_collections.pacs.orthanc.plugins.module_utils import _layout
from ansible_collections.pacs.orthanc.plugins.module_utils._common import (
    PacsError, Program, iso, run_command, utc_now)

__metaclass__ = type

TAG = "pacs.orthanc"  # every snapshot this collection makes carries it

# restic's error text -> what it means (only to word the message; the exit code decides)
WRONG_PASSWORD = re.compile(r"wrong password|no key found", re.I)
NOT_FOUND = re.compile(r"no such file or directory|404|not found|does not exist", re.I)
UNREACHABLE = re.compile(r"connection refused|dial tcp|no such host|timeout|timed out|unreachable|"
                         r"network|EOF|unable to start the sftp session", re.I)


def url_secret(repository: str):
    """The password inside a repository URL (rest:https://user:SECRET@host/), or None."""
    text = repository.split(":", 1)[1] if repository.startswith(("rest:", "sftp:")) else repository
    try:
        return urllib.parse.urlsplit(text).password
    except ValueError:
        return None


def snapshot_tags(host: str, manifest: dict) -> list:
    orthanc = (manifest.get("orthanc") or {}).get("name") or "orthanc"
    return [TAG, f"host:{host}", f"orthanc:{orthanc}", f"backup:{manifest.get('name')}",
            f"strategy:{manifest.get('strategy') or 'stop'}"]


def last_lines(text: str, count: int = 3) -> str:
    """The last lines of restic's error output that are not part of a Go stack trace."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    lines = [line for line in lines if not line.startswith(("goroutine ", "github.com/", "main.", "runtime.",
                                                            "/build/", "/usr/", "created by ", "panic:",
                                                            "\t"))
             and not re.match(r"^[\w./-]+\.go:\d+", line)]
    for index, line in enumerate(lines):  # a Fatal: line says it best
        if line.startswith("Fatal:"):
            return " ".join(lines[index:index + 2])
    return " ".join(lines[-count:])


class Repository:
    """One restic repository as the managed host reaches it."""

    def __init__(self, repository: str, password_file: str | None = None, password: str | None = None,
                 environment: dict | None = None, restic: str = "restic", limit_upload: int = 0):
        if not repository:
            raise PacsError("check the options", "orthanc_restic_repository is empty")
        if bool(password_file) == bool(password):
            raise PacsError("check the options", "give exactly one of orthanc_restic_password_file and "
                                                 "orthanc_restic_password")
        self.repository = repository
        self.password_file = password_file
        self.password = password
        self.environment = {str(k): str(v) for k, v in (environment or {}).items()}
        self.restic = restic
        self.limit_upload = int(limit_upload or 0)
        self._stack = contextlib.ExitStack()
        self.env = None

    def __enter__(self):
        if self.password_file:
            if not os.path.isfile(self.password_file):
                raise PacsError("read the restic password", f"the password file {self.password_file} does not exist "
                                                            "on this host (orthanc_restic_password_file)")
            if not os.access(self.password_file, os.R_OK):
                raise PacsError("read the restic password", f"the password file {self.password_file} cannot be read")
            path = self.password_file
        else:
            # a private 0600 file, removed when we are done: the password is on no command line
            # and in no environment, only the file's name is
            handle = tempfile.NamedTemporaryFile(prefix="pacs-orthanc-restic-", mode="w", encoding="utf-8")
            self._stack.callback(handle.close)
            os.chmod(handle.name, 0o600)
            handle.write(self.password)
            handle.flush()
            path = handle.name
        env = dict(self.environment)
        env.update({"RESTIC_REPOSITORY": self.repository, "RESTIC_PASSWORD_FILE": path,
                    "RESTIC_PASSWORD": "", "RESTIC_PASSWORD_COMMAND": "", "RESTIC_PROGRESS_FPS": "0.0166"})
        self.env = env
        return self

    def __exit__(self, *exc):
        self._stack.close()
        return False

    def run(self, args: list, step: str, cwd: str | None = None, progress=None):
        """(exit code, stdout, stderr) of ``restic ARGS``; PacsError only when restic cannot start.
        ``progress`` (a _progress.Progress, with ``cwd``): fed from restic's ``--json`` status lines."""
        if cwd is None:
            return run_command([self.restic] + args, step, env=self.env, check=False)
        env = self.env
        if progress is not None:  # restic writes a status line this often (its default off a terminal: 1/min)
            env = dict(env, RESTIC_PROGRESS_FPS=str(1.0 / max(0.1, progress.interval)))
        with tempfile.TemporaryFile() as out, Program([self.restic] + args, step, env=env, stdout=out,
                                                      cwd=cwd) as program, _StatusLines(out, progress):
            code = program.wait()
            out.seek(0)
            return code, out.read().decode("utf-8", "replace"), program.errors()

    def explain(self, step: str, code: int, err: str, out: str = "") -> PacsError:
        """A clear PacsError for restic's failure ``code``."""
        detail = last_lines(err) or out.strip()[-300:]
        where = self.shown()
        if WRONG_PASSWORD.search(err):
            cause = (f"wrong restic password for the repository {where} (orthanc_restic_password_file / "
                     "orthanc_restic_password)")
        elif "unable to open config file" in err and NOT_FOUND.search(err) and not UNREACHABLE.search(err):
            cause = (f"there is no restic repository at {where}: initialise it once, with "
                     "orthanc_restic_init=true or 'restic init' run by the administrator")
        elif UNREACHABLE.search(err):
            cause = f"the restic repository {where} cannot be reached: {detail}"
        else:
            cause = f"restic exited with {code}: {detail}"
        return PacsError(step, cause, restic_exit_code=code)

    def shown(self) -> str:
        """The repository's location without a password in its URL."""
        secret = url_secret(self.repository)
        return self.repository.replace(f":{secret}@", ":***@") if secret else self.repository

    def is_initialised(self) -> bool:
        code, out, err = self.run(["cat", "config", "--no-lock"], "open the restic repository")
        if code == 0:
            return True
        if "unable to open config file" in err and NOT_FOUND.search(err) and not UNREACHABLE.search(err) \
                and not WRONG_PASSWORD.search(err):
            return False
        raise self.explain("open the restic repository", code, err, out)

    def init(self) -> None:
        code, out, err = self.run(["init"], "initialise the restic repository")
        if code != 0:
            raise self.explain("initialise the restic repository", code, err, out)

    def file_sizes(self, snapshot_id: str) -> dict:
        """{"/relative/path": size} of every file of a snapshot (``restic ls --json``), read as a stream."""
        step = "list the files of the restic snapshot"
        sizes = {}
        with tempfile.TemporaryFile() as out:
            with Program([self.restic, "ls", "--json", "--no-lock", snapshot_id], step, env=self.env,
                         stdout=out) as program:
                code = program.wait()
                err = program.errors()
            if code != 0:
                raise self.explain(step, code, err)
            out.seek(0)
            for line in out:
                try:
                    node = json.loads(line)
                except ValueError:
                    continue
                if isinstance(node, dict) and node.get("struct_type") == "node" and node.get("type") == "file":
                    sizes[node.get("path")] = node.get("size", 0)
        return sizes

    def snapshots(self, host: str) -> list:
        """This host's snapshots made by this collection, oldest first."""
        code, out, err = self.run(["snapshots", "--json", "--no-lock", "--host", host, "--tag", TAG],
                                  "list the host's restic snapshots")
        if code != 0:
            raise self.explain("list the host's restic snapshots", code, err, out)
        try:
            found = json.loads(out or "[]") or []
        except ValueError as exc:
            raise PacsError("list the host's restic snapshots", f"restic's list cannot be read: {exc}")
        return sorted(found, key=lambda s: s.get("time", ""))


class _StatusLines:
    """While restic runs, read the status lines it appends to ``out`` (``--json``: percent_done,
    files_done, total_files, bytes_done, total_bytes) into ``progress``, from a thread."""

    def __init__(self, out, progress):
        self.out, self.progress = out, progress
        self.offset, self.rest = 0, b""
        self._stop = threading.Event()
        self._thread = None

    def read(self) -> None:
        chunk = os.pread(self.out.fileno(), 1 << 20, self.offset)  # leaves the shared offset alone
        while chunk:
            self.offset += len(chunk)
            self.rest += chunk
            chunk = os.pread(self.out.fileno(), 1 << 20, self.offset)
        *lines, self.rest = self.rest.split(b"\n")
        for line in reversed(lines):
            try:
                status = json.loads(line)
            except ValueError:
                continue
            if isinstance(status, dict) and status.get("message_type") == "status":
                self.progress.set(files=status.get("files_done", 0), nbytes=status.get("bytes_done", 0),
                                  files_total=status.get("total_files"), bytes_total=status.get("total_bytes"))
                break

    def _run(self) -> None:
        while not self._stop.wait(max(0.2, min(2.0, self.progress.interval / 4))):
            self.read()

    def __enter__(self):
        if self.progress is not None:
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self._thread:
            self._stop.set()
            self._thread.join()
            self.read()
        return False


def summary_of(out: str) -> dict:
    """The summary record of ``restic backup --json``."""
    summary = {}
    for line in out.splitlines():
        line = line.strip()
        if not line.startswith("{"):
            continue
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and record.get("message_type") == "summary":
            summary = record
    return summary


def local_file_sizes(backup: str) -> dict:
    """{"/relative/path": size} of every file of a local backup folder, as restic names them."""
    sizes = {}
    for directory, _dirs, files in os.walk(backup):
        for filename in files:
            path = os.path.join(directory, filename)
            if os.path.isfile(path) and not os.path.islink(path):
                sizes["/" + os.path.relpath(path, backup)] = os.path.getsize(path)
    return sizes


def ship(backup: str, host: str, repo: Repository, init: bool = False, check_mode: bool = False,
         progress=None) -> dict:
    """Make one snapshot of the complete backup folder ``backup`` (from inside it), with this host's
    newest snapshot as parent. The local backup is only read."""
    step = "read the local backup"
    backup = os.path.abspath(backup.rstrip("/"))
    try:
        manifest = _layout.read_manifest(backup)
    except FileNotFoundError:
        raise PacsError(step, f"{backup} is not a complete backup (no {_layout.MANIFEST})")
    except _layout.ManifestError as exc:
        raise PacsError(step, str(exc))
    if not _layout.NAME_RE.match(os.path.basename(backup)) or os.path.basename(backup) != manifest.get("name"):
        raise PacsError(step, f"{backup} is not a complete backup folder named by its timestamp")
    tags = snapshot_tags(host, manifest)
    result = {"repository": repo.shown(), "backup": backup, "name": manifest.get("name"), "host": host,
              "tags": tags, "initialised": False, "changed": False}
    if not repo.is_initialised():
        if not init:
            raise repo.explain("open the restic repository", 1,
                               "unable to open config file: no such file or directory")
        if check_mode:
            return dict(result, changed=True, snapshot_id=None, parent=None, already_shipped=False)
        repo.init()
        result["initialised"] = True
    previous = repo.snapshots(host)
    # a snapshot of this backup counts as shipped only when it holds every file of it with its size
    # (restic's exit code 3 leaves a snapshot that lacks the files it could not read)
    done = [s for s in previous if f"backup:{manifest.get('name')}" in (s.get("tags") or [])
            and repo.file_sizes(s["id"]) == local_file_sizes(backup)]
    if done:
        return dict(result, snapshot_id=done[-1].get("id"), short_id=done[-1].get("short_id"),
                    parent=done[-1].get("parent"), already_shipped=True, changed=result["initialised"])
    parent = previous[-1] if previous else None
    result.update(parent=parent.get("id") if parent else None, already_shipped=False, changed=True)
    if check_mode:
        return dict(result, snapshot_id=None)
    args = ["backup", ".", "--json", "--host", host, "--ignore-ctime"]
    for tag in tags:
        args += ["--tag", tag]
    if parent:
        args += ["--parent", parent["id"]]
    if repo.limit_upload > 0:
        args += ["--limit-upload", str(repo.limit_upload)]
    started, clock = utc_now(), time.monotonic()
    code, out, err = repo.run(args, "back up to the restic repository", cwd=backup, progress=progress)
    seconds = round(time.monotonic() - clock, 3)
    summary = summary_of(out)
    if code != 0:
        failure = repo.explain("back up to the restic repository", code, err, out)
        if code == 3:
            failure = PacsError(failure.step, "restic could not read every file of the backup, its snapshot "
                                f"{summary.get('snapshot_id', '?')[:8]} is incomplete: {last_lines(err)}",
                                restic_exit_code=code)
        raise failure
    if not summary.get("snapshot_id"):
        raise PacsError("back up to the restic repository", "restic ended without naming its snapshot")
    return dict(result, snapshot_id=summary["snapshot_id"], short_id=summary["snapshot_id"][:8],
                started_at=iso(started), ended_at=iso(utc_now()), seconds=seconds,
                files_new=summary.get("files_new", 0), files_changed=summary.get("files_changed", 0),
                files_unmodified=summary.get("files_unmodified", 0), data_added=summary.get("data_added", 0),
                total_files=summary.get("total_files_processed", 0),
                total_bytes=summary.get("total_bytes_processed", 0))

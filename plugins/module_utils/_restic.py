# -*- coding: utf-8 -*-
# Copyright: pacs.orthanc contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Off-site copies in a restic repository (issue 14): shipping a complete local backup as one
snapshot, fetching a snapshot back into a local folder (the one place a restore, a drill or a
point restore gets an off-site backup from), and the maintenance that only the administrator's
credentials may run (forget and prune, check with a rotating read of the data).

Every restic command runs through _common.Program / run_command: an argument list, LC_ALL=C, the
repository in RESTIC_REPOSITORY and the password in RESTIC_PASSWORD_FILE (a file the caller names,
or a 0600 temporary file this module writes and removes), never on a command line. Restic 0.14
prints Go stack traces on some errors: the outcome is decided by exit codes; the text of its error
output only chooses the words of the message. Standard library only."""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import os
import re
import tempfile
import time
import urllib.parse

from ansible_collections.pacs.orthanc.plugins.module_utils import _layout, _progress
from ansible_collections.pacs.orthanc.plugins.module_utils._common import (
    PacsError, Program, Ticker, iso, os_error_cause, run_command, utc_now)

__metaclass__ = type

TAG = "pacs.orthanc"  # every snapshot this collection makes carries it
PRE_UPGRADE = "pre-upgrade"  # the tag of a backup taken before an upgrade (manifest key pre_upgrade)

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
    tags = [TAG, f"host:{host}", f"orthanc:{orthanc}", f"backup:{manifest.get('name')}",
            f"strategy:{manifest.get('strategy') or 'stop'}"]
    if isinstance(manifest.get("pre_upgrade"), dict):  # kept by forget (--keep-tag) whatever the policy
        tags.append(PRE_UPGRADE)
    return tags


def backup_name_of(snapshot: dict):
    """The local backup's timestamp a snapshot holds (its tag backup:<name>), or None."""
    for tag in snapshot.get("tags") or []:
        if tag.startswith("backup:") and _layout.NAME_RE.match(tag[7:]):
            return tag[7:]
    return None


def choose_snapshot(found: list, host: str, which: str) -> dict:
    """The snapshot ``which`` names among ``found`` (every snapshot this collection made):
    ``latest``, the newest of ``host``; a backup timestamp, ``host``'s snapshot of that backup (the
    newest, if shipped twice); else a snapshot id or its prefix (of any host: a host rebuilt under
    another name restores its predecessor's backup by id)."""
    step = "find the off-site snapshot"
    which = str(which or "latest").strip()
    mine = sorted((s for s in found if s.get("hostname") == host), key=lambda s: s.get("time", ""))
    if which == "latest":
        if not mine:
            raise PacsError(step, f"the restic repository holds no snapshot of {host}")
        return mine[-1]
    if _layout.NAME_RE.match(which):
        named = [s for s in mine if backup_name_of(s) == which]
        if not named:
            raise PacsError(step, f"the restic repository holds no snapshot of {host}'s backup {which}")
        return named[-1]
    if not re.match(r"^[0-9a-f]{4,64}$", which):
        raise PacsError(step, f"{which!r} is neither latest, a backup timestamp nor a snapshot id")
    matches = [s for s in found if str(s.get("id", "")).startswith(which)]
    if len(matches) > 1:
        raise PacsError(step, f"the snapshot id {which} is ambiguous ({len(matches)} snapshots): give more of it")
    if not matches:
        raise PacsError(step, f"the restic repository holds no pacs.orthanc snapshot {which}")
    return matches[0]


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

    def snapshots(self, host: str | None = None) -> list:
        """This host's (every host's, without ``host``) snapshots made by this collection, oldest first."""
        args = ["snapshots", "--json", "--no-lock", "--tag", TAG] + (["--host", host] if host else [])
        code, out, err = self.run(args, "list the host's restic snapshots")
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
        self._ticker = Ticker(self.read)

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

    def __enter__(self):
        if self.progress is not None:
            self._ticker.start(_progress.reading_period(self.progress))
        return self

    def __exit__(self, *exc):
        if self._ticker.stop():
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
        moment = parse_restic_time(done[-1].get("time"))
        return dict(result, snapshot_id=done[-1].get("id"), short_id=done[-1].get("short_id"),
                    parent=done[-1].get("parent"), already_shipped=True, changed=result["initialised"],
                    snapshot_time=iso(moment) if moment else None)
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
                started_at=iso(started), snapshot_time=iso(started), ended_at=iso(utc_now()), seconds=seconds,
                files_new=summary.get("files_new", 0), files_changed=summary.get("files_changed", 0),
                files_unmodified=summary.get("files_unmodified", 0), data_added=summary.get("data_added", 0),
                total_files=summary.get("total_files_processed", 0),
                total_bytes=summary.get("total_bytes_processed", 0))


def fetch(repo: Repository, host: str, which: str, dest: str, check_mode: bool = False) -> dict:
    """Restore the snapshot ``which`` names (choose_snapshot) into ``<dest>/<host>/<backup name>/``,
    a private folder, and return where (through _layout.fetch_into: restored into
    ``<name>.fetching/``, renamed only once every file the snapshot lists is there with its size, so
    a folder of that name is always a whole copy). A folder already holding exactly the snapshot's files is kept (nothing
    to do). Only the repository is read; ``dest`` is the one place written."""
    step = "fetch the off-site snapshot"
    snapshot = choose_snapshot(repo.snapshots(), host, which)
    name = backup_name_of(snapshot)
    short = str(snapshot.get("id", ""))[:8]
    if not name:
        raise PacsError(step, f"the snapshot {short} names no backup (no tag backup:<timestamp>): it was not made "
                              "by pacs.orthanc.offsite_restic")
    owner = snapshot.get("hostname") or host
    folder = os.path.join(os.path.abspath(dest), owner)
    target = os.path.join(folder, name)
    result = {"snapshot_id": snapshot.get("id"), "short_id": short, "snapshot_time": snapshot.get("time"),
              "snapshot_host": owner, "name": name, "path": target, "tags": snapshot.get("tags") or [],
              "repository": repo.shown(), "pre_upgrade": PRE_UPGRADE in (snapshot.get("tags") or [])}
    expected = repo.file_sizes(snapshot["id"])
    if os.path.isdir(target) and local_file_sizes(target) == expected:
        return dict(result, changed=False, already_fetched=True, files=len(expected),
                    bytes=sum(expected.values()))
    if check_mode:
        return dict(result, changed=True, already_fetched=False, files=len(expected), bytes=sum(expected.values()))
    started = time.monotonic()

    def fill(partial):
        code, out, err = repo.run(["restore", snapshot["id"], "--target", partial], step)
        if code != 0:
            raise repo.explain(step, code, err, out)

    def whole(partial):
        got = local_file_sizes(partial)
        if got != expected:
            missing = sorted(set(expected) - set(got))
            wrong = sorted(p for p in set(expected) & set(got) if expected[p] != got[p])
            raise PacsError(step, f"the restored copy of snapshot {short} is not whole: {len(missing)} files missing, "
                                  f"{len(wrong)} of another size (e.g. {(missing + wrong)[:1]})")

    try:
        _layout.fetch_into(folder, name, fill, whole)
    except OSError as exc:
        raise PacsError(step, f"cannot restore snapshot {short} into {folder}: {os_error_cause(exc)}")
    return dict(result, changed=True, already_fetched=False, files=len(expected), bytes=sum(expected.values()),
                seconds=round(time.monotonic() - started, 3))


def _json_head(out: str):
    """The first JSON document of restic's output (forget --json prints prune's text after it)."""
    for line in out.splitlines():
        line = line.strip()
        if line.startswith(("[", "{")):
            try:
                return json.loads(line)
            except ValueError:
                continue
    return None


def forget(repo: Repository, keep_last: int, keep_daily: int, keep_weekly: int, keep_monthly: int,
           keep_tags: list, prune: bool = True, check_mode: bool = False) -> dict:
    """Apply retention to every host's pacs.orthanc snapshots (grouped by host only: a snapshot's
    path is its backup's timestamp folder, different every night), then prune. The newest
    snapshot of each host is always kept (``--keep-last`` at least 1) and so is every snapshot
    tagged with one of ``keep_tags``. Needs credentials that may delete: append-only ones fail."""
    step = "forget old off-site snapshots"
    if not check_mode:
        code, out, err = repo.run(["unlock"], "remove stale restic locks")
        if code != 0:
            raise repo.explain("remove stale restic locks", code, err, out)
    args = ["forget", "--json", "--tag", TAG, "--group-by", "host", "--keep-last", str(max(1, int(keep_last)))]
    for flag, count in (("--keep-daily", keep_daily), ("--keep-weekly", keep_weekly),
                        ("--keep-monthly", keep_monthly)):
        if int(count) > 0:
            args += [flag, str(int(count))]
    for tag in keep_tags or []:
        args += ["--keep-tag", tag]
    if prune:
        args.append("--prune")
    if check_mode:
        args.append("--dry-run")
    code, out, err = repo.run(args, step)
    if code != 0:
        failure = repo.explain(step, code, err, out)
        if not WRONG_PASSWORD.search(err) and not UNREACHABLE.search(err):
            failure = PacsError(step, f"{failure.cause} (do these credentials allow deleting? The Orthanc hosts' "
                                      "append-only ones must not: use orthanc_restic_admin_repository)",
                                restic_exit_code=code)
        raise failure
    groups = _json_head(out) or []
    hosts = {}
    for group in groups if isinstance(groups, list) else []:
        hosts[group.get("host") or "?"] = {
            "kept": [s.get("short_id") or str(s.get("id", ""))[:8] for s in group.get("keep") or []],
            "removed": [s.get("short_id") or str(s.get("id", ""))[:8] for s in group.get("remove") or []]}
    removed = sum(len(h["removed"]) for h in hosts.values())
    return {"changed": removed > 0, "hosts": hosts, "removed": removed,
            "kept": sum(len(h["kept"]) for h in hosts.values()), "pruned": bool(prune and not check_mode),
            "repository": repo.shown()}


def read_slices_due(state: dict, slices: int, now) -> tuple:
    """(first slice, how many) to read now, so that every byte is read once per ``slices`` days:
    one slice per day since the last read (at least one, at most all), continuing where it
    stopped; a changed number of slices starts again at 1."""
    slices = max(1, int(slices))
    position = state.get("next") if state.get("slices") == slices else None
    if not isinstance(position, int) or not 1 <= position <= slices:
        position = 1
    count = 1
    last = state.get("last_read_at")
    if last:
        try:
            then = datetime.datetime.strptime(last, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=datetime.timezone.utc)
            count = int((now - then).total_seconds() // 86400)
        except ValueError:
            count = 1
    return position, min(slices, max(1, count))


def check(repo: Repository, state_dir: str, read_days: int, check_mode: bool = False, now=None) -> dict:
    """``restic check`` with ``--read-data-subset=n/N`` (N = ``read_days``), the slices due since the
    last run (read_slices_due), the position kept in a state file of this repository in
    ``state_dir``. A check that finds damage fails, naming it; the position does not move then."""
    step = "check the off-site repository"
    now = now or utc_now()
    key = hashlib.sha256(repo.repository.encode("utf-8")).hexdigest()[:12]
    state_file = os.path.join(state_dir, f"offsite-check-{key}.json")
    try:
        with open(state_file, encoding="utf-8") as handle:
            state = json.load(handle)
        if not isinstance(state, dict):
            state = {}
    except (OSError, ValueError):
        state = {}
    slices = max(1, int(read_days))
    position, count = read_slices_due(state, slices, now)
    due = [((position - 1 + i) % slices) + 1 for i in range(count)]
    result = {"repository": repo.shown(), "state_file": state_file, "of": slices, "slices": due,
              "next": (due[-1] % slices) + 1}
    if check_mode:
        return dict(result, changed=True, read=[])
    read = []
    for part in due:
        code, out, err = repo.run(["check", f"--read-data-subset={part}/{slices}"], step)
        if code != 0:
            detail = last_lines(err + "\n" + out, 4)
            if WRONG_PASSWORD.search(err) or UNREACHABLE.search(err):
                raise repo.explain(step, code, err, out)
            raise PacsError(step, f"restic check of {repo.shown()} (data slice {part}/{slices}) found errors: {detail}",
                            restic_exit_code=code, slices_read=read)
        read.append(part)
        state = {"repository": repo.shown(), "slices": slices, "next": (part % slices) + 1,
                 "last_read_at": iso(now), "last_slice": part}
        try:
            os.makedirs(state_dir, mode=0o700, exist_ok=True)
            _layout.write_json_atomic(state_file, state)
        except OSError as exc:
            raise PacsError("record the check's position", os_error_cause(exc))
    return dict(result, changed=True, read=read)


def newest(snapshots: list, now=None) -> dict:
    """The newest of ``snapshots`` (a restic list) with its age in seconds, or {} when there is none."""
    if not snapshots:
        return {}
    snap = max(snapshots, key=lambda s: s.get("time", ""))
    moment = parse_restic_time(snap.get("time"))
    age = round(((now or utc_now()) - moment).total_seconds(), 3) if moment else None
    return {"id": snap.get("id"), "short_id": snap.get("short_id") or str(snap.get("id", ""))[:8],
            "time": iso(moment) if moment else snap.get("time"), "age_seconds": age, "backup": backup_name_of(snap),
            "hostname": snap.get("hostname")}


def parse_restic_time(text):
    """restic's time (RFC 3339 with nanoseconds and an offset) as an aware UTC datetime, or None."""
    match = re.match(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d+))?(Z|[+-]\d\d:\d\d)$", str(text or ""))
    if not match:
        return None
    moment = datetime.datetime.strptime(match.group(1), "%Y-%m-%dT%H:%M:%S")
    micro = int((match.group(2) or "0")[:6].ljust(6, "0"))
    zone = match.group(3)
    offset = datetime.timedelta(0) if zone == "Z" else \
        (1 if zone[0] == "+" else -1) * datetime.timedelta(hours=int(zone[1:3]), minutes=int(zone[4:6]))
    return (moment.replace(microsecond=micro) - offset).replace(tzinfo=datetime.timezone.utc)

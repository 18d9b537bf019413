# -*- coding: utf-8 -*-
# Copyright: pacs.orthanc contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Shared helpers of pacs.orthanc: the one error type, the one way to run a command,
hashing and atomic writes. Runs on the managed host: standard library only."""

from __future__ import annotations

import datetime
import grp
import hashlib
import os
import pwd
import shutil
import subprocess
import tempfile

from ansible_collections.pacs.orthanc.plugins.module_utils import _layout

__metaclass__ = type

HASH_CHUNK = 1024 * 1024


class PacsError(Exception):
    """A failure with a step and a cause, turned into one clear fail_json message.

    ``step`` says what the module was doing ("read configuration", "copy index"),
    ``cause`` why it failed, in words an administrator can act on."""

    def __init__(self, step: str, cause: str, **details):
        super().__init__(f"{step}: {cause}")
        self.step = step
        self.cause = cause
        self.details = details

    def as_result(self) -> dict:
        result = {"msg": str(self), "step": self.step, "cause": self.cause}
        result.update(self.details)
        return result


def os_error_cause(exc: OSError) -> str:
    """A short cause for an OSError that names the path: 'No space left on device: /x'."""
    text = exc.strerror or str(exc)
    if exc.filename:
        text = f"{text}: {exc.filename}"
    return text


def run_command(argv: list, step: str, data: bytes | None = None, env: dict | None = None,
                check: bool = True, timeout: float | None = None):
    """The one place that runs external programs: an argument list (no shell), LC_ALL=C,
    secrets passed through ``data`` (standard input) or ``env``, never through argv.

    Returns (rc, stdout, stderr) as text. With ``check`` a non-zero exit raises PacsError
    naming the program and the last lines of its error output."""
    full_env = dict(os.environ)
    full_env.update({"LC_ALL": "C", "LANG": "C"})
    if env:
        full_env.update(env)
    # Output goes to temporary files, not pipes: a start command that leaves a daemon behind
    # (holding our standard output) must not make us wait for that daemon to exit.
    with tempfile.TemporaryFile() as out_file, tempfile.TemporaryFile() as err_file:
        try:
            proc = subprocess.Popen(argv, stdin=subprocess.PIPE if data is not None else subprocess.DEVNULL,
                                    stdout=out_file, stderr=err_file, env=full_env)
        except FileNotFoundError:
            raise PacsError(step, f"program not found: {argv[0]}")
        try:
            proc.communicate(input=data, timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise PacsError(step, f"{os.path.basename(argv[0])} did not finish within {timeout} s")
        out_file.seek(0)
        err_file.seek(0)
        out = out_file.read().decode("utf-8", "replace")
        err = err_file.read().decode("utf-8", "replace")
    if check and proc.returncode != 0:
        tail = " ".join(err.strip().splitlines()[-3:]) or out.strip()[-300:]
        raise PacsError(step, f"{os.path.basename(argv[0])} exited with {proc.returncode}: {tail}")
    return proc.returncode, out, err


def safe_relative(name) -> bool:
    """A path taken from a manifest may only name something inside the backup (or the target it
    is restored to): relative, without '..', without NUL."""
    if not isinstance(name, str) or not name or "\0" in name or os.path.isabs(name):
        return False
    return ".." not in name.replace("\\", "/").split("/")


def sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while True:
            chunk = handle.read(HASH_CHUNK)
            if not chunk:
                break
            digest.update(chunk)
    return digest.hexdigest()


def md5_file(path: str) -> str:
    digest = hashlib.md5()  # Orthanc records MD5s; this is a checksum, not security
    with open(path, "rb") as handle:
        while True:
            chunk = handle.read(64 * 1024)  # small reads let the disk and the hashing overlap
            if not chunk:
                break
            digest.update(chunk)
    return digest.hexdigest()


def utc_now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def iso(moment: datetime.datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


# atomic writes live with the layout of the backup folders; these names stay for their callers
write_text_atomic = _layout.write_text_atomic
write_json_atomic = _layout.write_json_atomic
fsync_dir = _layout.fsync_dir


def owner_of(path: str) -> dict:
    """Owner, group (names where the host knows them) and mode of a file."""
    st = os.lstat(path)
    try:
        owner = pwd.getpwuid(st.st_uid).pw_name
    except KeyError:
        owner = str(st.st_uid)
    try:
        group = grp.getgrgid(st.st_gid).gr_name
    except KeyError:
        group = str(st.st_gid)
    return {"owner": owner, "group": group, "mode": f"{st.st_mode & 0o7777:04o}"}


def resolve_ids(owner: str, group: str) -> tuple:
    """Numeric ids of owner and group names on this host (numbers pass through)."""
    try:
        uid = int(owner) if owner.isdigit() else pwd.getpwnam(owner).pw_uid
        gid = int(group) if group.isdigit() else grp.getgrnam(group).gr_gid
    except KeyError as exc:
        raise PacsError("resolve owner", f"no such user or group on this host: {exc.args[0]}")
    return uid, gid


def copy_tree_as_is(src: str, dest: str) -> list:
    """Copy a file or a folder like ``cp -a``: contents, modes, times, owners, symlinks (into
    ``dest``, which may exist). Returns the copied files relative to ``dest`` (a file lands as
    dest/<its name>)."""
    if os.path.isdir(src):
        shutil.copytree(src, dest, symlinks=True, dirs_exist_ok=True)
        pairs = [(src, dest)]
        for directory, subdirs, files in os.walk(src):
            for name in subdirs + files:
                full = os.path.join(directory, name)
                pairs.append((full, os.path.join(dest, os.path.relpath(full, src))))
    else:
        os.makedirs(dest, mode=0o700, exist_ok=True)
        target = os.path.join(dest, os.path.basename(src))
        shutil.copy2(src, target, follow_symlinks=False)
        pairs = [(src, target)]
    for original, copy in pairs:
        st = os.lstat(original)
        os.lchown(copy, st.st_uid, st.st_gid)
    if os.path.isdir(src):
        os.chmod(dest, os.stat(src).st_mode & 0o7777)
    return sorted(os.path.relpath(os.path.join(d, f), dest) for d, _s, fs in os.walk(dest) for f in fs)


def run_module(module, action) -> None:
    """Call ``action(module)`` and turn its outcome into exit_json/fail_json.

    PacsError becomes a clear message with its step and cause; an OSError becomes one too
    (the step is then the module's name), so that no traceback reaches the user."""
    try:
        result = action(module)
    except PacsError as exc:
        module.fail_json(**exc.as_result())
    except OSError as exc:
        module.fail_json(msg=f"{module._name}: {os_error_cause(exc)}", step=module._name,
                         cause=os_error_cause(exc))
    except Exception as exc:  # pylint: disable=broad-except  # a message, never a traceback
        cause = f"unexpected {type(exc).__name__}: {exc}"
        module.fail_json(msg=f"{module._name}: {cause}", step=module._name, cause=cause)
    module.exit_json(**result)

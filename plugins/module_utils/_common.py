# -*- coding: utf-8 -*-
# Copyright: pacs.orthanc contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Shared helpers of pacs.orthanc: the one error type, the one way to run a command,
hashing and atomic writes. Runs on the managed host: standard library only."""

from __future__ import annotations

import contextlib
import datetime
import grp
import hashlib
import os
import pwd
import shutil
import subprocess
import tempfile
import threading
import traceback

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


# for the stdin/stdout arguments of Program and run_command, so that callers need not import subprocess
PIPE = subprocess.PIPE
DEVNULL = subprocess.DEVNULL


class Program:
    """One external program, started the one way every program is started here: an argument
    list (no shell), LC_ALL=C, secrets through standard input or the environment (never argv), its
    error output in a temporary file (a pipe could fill up, or be held open by a daemon it leaves
    behind). ``stdin`` and ``stdout`` are open files, DEVNULL (the default) or PIPE; ``data=True``
    gives a pipe to standard input for ``communicate``. ``detach`` starts it in its own session
    (a server that may outlive this module), with ``stderr`` a file of its own. ``pass_fds``: open
    descriptors it inherits (a lock that must live as long as it, see _lock.RemoteSlot).

    As a context manager: a program still running at the end is killed (unless detached)."""

    def __init__(self, argv: list, step: str, env: dict | None = None, stdin=None, stdout=None, stderr=None,
                 data: bool = False, cwd: str | None = None, detach: bool = False, pass_fds=()):
        self.argv = list(argv)
        self.step = step
        self.name = os.path.basename(str(argv[0]))
        self.detach = detach
        full_env = dict(os.environ)
        full_env.update({"LC_ALL": "C", "LANG": "C"})
        if env:
            full_env.update(env)
        self.err_file = tempfile.TemporaryFile() if stderr is None else None
        try:
            self.proc = subprocess.Popen(
                self.argv, stdin=PIPE if data else (DEVNULL if stdin is None else stdin),
                stdout=DEVNULL if stdout is None else stdout,
                stderr=self.err_file if stderr is None else stderr,
                env=full_env, cwd=cwd, start_new_session=detach, close_fds=True, pass_fds=tuple(pass_fds))
        except FileNotFoundError:
            self.close()
            raise PacsError(step, f"program not found: {argv[0]}")
        except OSError as exc:
            self.close()
            raise PacsError(step, f"cannot run {argv[0]}: {os_error_cause(exc)}")

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def stdout(self):
        return self.proc.stdout

    def poll(self):
        return self.proc.poll()

    def send_signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    def kill(self) -> None:
        """Kill it (if it still runs) and reap it."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()

    def wait(self, timeout: float | None = None, data: bytes | None = None, hint: str = "") -> int:
        """Its exit status (negative: the signal that ended it); past ``timeout`` it is killed and
        PacsError says so (``hint`` added: what the caller left behind)."""
        try:
            if data is not None:
                self.proc.communicate(input=data, timeout=timeout)
            else:
                self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise PacsError(self.step, f"{self.name} did not finish within {timeout} s{hint}")
        return self.proc.returncode

    def errors(self) -> str:
        """What it wrote to its standard error."""
        if self.err_file is None:
            return ""
        self.err_file.seek(0)
        return self.err_file.read().decode("utf-8", "replace")

    def close(self) -> None:
        proc = getattr(self, "proc", None)
        if proc is not None and not self.detach and proc.poll() is None:
            self.kill()
        if proc is not None and proc.stdout is not None:
            proc.stdout.close()
        if self.err_file is not None:
            self.err_file.close()
            self.err_file = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


def run_command(argv: list, step: str, data: bytes | None = None, env: dict | None = None,
                check: bool = True, timeout: float | None = None, stdin=None, stdout=None,
                timeout_hint: str = "", pass_fds=()):
    """Run a program to its end (through Program: an argument list, LC_ALL=C, secrets through
    ``data`` (standard input) or ``env``, never through argv). ``stdin``: an open file it reads
    instead of ``data``; ``stdout``: an open file (or DEVNULL) it writes to, then the returned
    stdout is empty.

    Returns (rc, stdout, stderr) as text. With ``check`` a non-zero exit raises PacsError
    naming the program and the last lines of its error output."""
    # Output goes to temporary files, not pipes: a start command that leaves a daemon behind
    # (holding our standard output) must not make us wait for that daemon to exit.
    with contextlib.ExitStack() as stack:
        out_file = stack.enter_context(tempfile.TemporaryFile()) if stdout is None else None
        program = stack.enter_context(Program(argv, step, env=env, stdin=stdin, data=data is not None,
                                              stdout=out_file if stdout is None else stdout, pass_fds=pass_fds))
        returncode = program.wait(timeout=timeout, data=data, hint=timeout_hint)
        out = ""
        if out_file is not None:
            out_file.seek(0)
            out = out_file.read().decode("utf-8", "replace")
        err = program.errors()
    if check and returncode != 0:
        tail = " ".join(err.strip().splitlines()[-3:]) or out.strip()[-300:]
        raise PacsError(step, f"{os.path.basename(argv[0])} exited with {returncode}: {tail}")
    return returncode, out, err


def safe_relative(name) -> bool:
    """A path taken from a manifest may only name something inside the backup (or the target it
    is restored to): relative, without '..', without NUL."""
    if not isinstance(name, str) or not name or "\0" in name or os.path.isabs(name):
        return False
    return ".." not in name.replace("\\", "/").split("/")


def hash_open_file(fd: int, constructor, size: int | None = None) -> tuple:
    """(bytes read, hex digest) of the open file ``fd``, read from where it stands to its end: the
    one hashing routine of the collection (verification of storage files, SHA-256 of the files a
    manifest names). With ``size`` (the length the caller expects), a file of up to HASH_CHUNK
    bytes is read in one os.read, and a file of another length is not hashed: (its length, None).
    Larger files are read into one reused buffer, with sequential read-ahead asked of the kernel."""
    if size is not None and size <= HASH_CHUNK:
        data = os.read(fd, size + 1)  # one more than expected: a longer file shows at once
        if len(data) != size:
            return os.fstat(fd).st_size, None
        return size, constructor(data).hexdigest()
    if size is not None:
        actual = os.fstat(fd).st_size
        if actual != size:
            return actual, None
    if hasattr(os, "posix_fadvise"):
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        except OSError:
            pass
    digest = constructor()
    buffer = bytearray(HASH_CHUNK)
    view = memoryview(buffer)
    total = 0
    while True:
        count = os.readv(fd, [buffer])
        if not count:
            break
        digest.update(view[:count])
        total += count
    if size is not None and total != size:
        return total, None
    return total, digest.hexdigest()


_READ_FLAGS = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NONBLOCK", 0)


def open_for_hashing(path: str) -> int:
    """A read-only descriptor of ``path``; O_NONBLOCK so that a FIFO left in a backup cannot
    block the reader (it has no effect on regular files)."""
    return os.open(path, _READ_FLAGS)


def file_digest(path: str, constructor) -> str:
    fd = open_for_hashing(path)
    try:
        return hash_open_file(fd, constructor)[1]
    finally:
        os.close(fd)


def sha256_file(path: str) -> str:
    return file_digest(path, hashlib.sha256)


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


# Names of environment variables whose values are secrets (ORTHANC_DB_PASSWORD, PGPASSWORD,
# RESTIC_PASSWORD, AWS_SECRET_ACCESS_KEY, ...). Matched on the name: masking every value of the
# option would also mask paths and short values such as "1" wherever they appear in a result.
SECRET_NAME_PARTS = ("PASS", "PWD", "SECRET", "TOKEN", "KEY", "CREDENTIAL", "AUTH")


class Ticker:
    """Calls ``tick()`` every ``period`` seconds from a daemon thread between ``start()`` and
    ``stop()``: the background part of a heartbeat or of a progress reader."""

    def __init__(self, tick):
        self.tick = tick
        self._stop = threading.Event()
        self._thread = None

    def start(self, period: float) -> None:
        def run():
            while not self._stop.wait(period):
                self.tick()
        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()

    def stop(self) -> bool:
        """Stops the thread and waits for it; whether it had been started."""
        if self._thread is None:
            return False
        self._stop.set()
        self._thread.join()
        self._thread = None
        return True


def hide_secret_environment(module) -> None:
    """Keep the values of secret-looking variables of a module's ``environment`` option (Orthanc's
    ``${VAR}`` values, often a database password) out of its result, ``invocation`` included."""
    environment = module.params.get("environment")
    if not isinstance(environment, dict):
        return
    for name, value in environment.items():
        if value not in (None, "") and any(part in str(name).upper() for part in SECRET_NAME_PARTS):
            module.no_log_values.add(str(value))


def run_module(module, action) -> None:
    """Call ``action(module)`` and turn its outcome into exit_json/fail_json.

    PacsError becomes a clear message with its step and cause. An OSError or any unexpected
    exception becomes one too (the step is then the module's name): the message stays one
    clean line, and the traceback goes into the result's ``exception`` key, which Ansible
    shows only at -vvv, so that the place an unexpected error came from can still be found."""
    hide_secret_environment(module)
    try:
        result = action(module)
    except PacsError as exc:
        module.fail_json(**exc.as_result())
    except OSError as exc:
        module.fail_json(msg=f"{module._name}: {os_error_cause(exc)}", step=module._name,
                         cause=os_error_cause(exc), exception=traceback.format_exc())
    except Exception as exc:  # pylint: disable=broad-except  # one clean message; the traceback for -vvv
        cause = f"unexpected {type(exc).__name__}: {exc}"
        module.fail_json(msg=f"{module._name}: {cause}", step=module._name, cause=cause,
                         exception=traceback.format_exc())
    module.exit_json(**result)

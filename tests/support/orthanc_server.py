"""Run real, private Orthanc servers for tests and benchmarks (stdlib only).

Each server lives entirely under one ROOT directory::

    ROOT/server.json   settings, so another process (orthancctl.py) can rebuild the object
    ROOT/config/       folder configuration (orthanc.json with comments + extra.json),
                       or the single file config/orthanc.json when config_as_folder=False
    ROOT/storage/      StorageDirectory
    ROOT/index/        IndexDirectory (kept apart from the storage on purpose)
    ROOT/log/          --logdir, plus stdout.log / stderr.log of the process
    ROOT/orthanc.pid   PID of the running Orthanc

Orthanc is started fully detached (own session, no inherited pipes), so it outlives the
process that started it. Only the PID recorded in the pidfile is ever signalled, and only
if its command line still names this server's configuration.
"""

from __future__ import annotations

import base64
import fcntl
import hashlib
import http.client
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Iterable

ORTHANC_BIN = os.environ.get("ORTHANC_BIN", "/usr/sbin/Orthanc")
CTL_SCRIPT = Path(__file__).resolve().with_name("orthancctl.py")
DICOM_AET = "ORTHANC"


# Debian's DCMTK (in Orthanc and in storescu) leaves Nagle's algorithm on unless the
# environment says TCP_NODELAY=1: each C-STORE then waits ~90 ms on delayed ACKs.
def _dicom_env() -> dict[str, str]:
    return {**os.environ, "TCP_NODELAY": "1"}


# Never go through an HTTP proxy from the environment, even for 127.0.0.1.
_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class OrthancError(RuntimeError):
    """Orthanc could not be started, stopped or reached."""


# Test ports come from below the kernel's ephemeral range (so that no client socket of any process
# can hold one between the moment it is handed out and the moment Orthanc binds it), in blocks of
# BLOCK ports. A process claims a block by holding an flock on PORT_LOCKS/<first port> for as long
# as it lives, so that pytest-xdist workers, several pytest sessions and benchmarks on one machine
# never hand out the same port; within the block, a port is handed out once, and only if it can be
# bound now.
PORT_LOCKS = Path(os.environ.get("PACS_TEST_PORT_LOCKS", "/tmp/pacs-orthanc-test-ports"))
BLOCK = 100
_blocks: list[tuple[int, int]] = []  # (first port, the open lock file descriptor that holds the claim)
_next_in_block = 0


def _port_range() -> tuple[int, int]:
    """[low, high) below the ephemeral range (ip_local_port_range), at most 12,000 ports wide."""
    try:
        ephemeral_low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        ephemeral_low = 32768
    high = ephemeral_low if ephemeral_low > 12000 else 30000
    return max(high - 12000, 10000), high


def _claim_block() -> int:
    """Claim a block of ports no other process holds; return its first port."""
    low, high = _port_range()
    PORT_LOCKS.mkdir(parents=True, exist_ok=True)
    try:
        os.chmod(PORT_LOCKS, 0o1777)  # any user's tests may claim ports
    except OSError:
        pass
    starts = list(range(low, high - BLOCK + 1, BLOCK))
    offset = os.getpid() % len(starts)  # spread the processes, fewer lock attempts
    held = {block[0] for block in _blocks}
    for first in starts[offset:] + starts[:offset]:
        if first in held:
            continue
        fd = os.open(PORT_LOCKS / str(first), os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            continue
        _blocks.append((first, fd))
        return first
    raise OrthancError(f"no free block of {BLOCK} test ports in {low}-{high} (locks in {PORT_LOCKS})")


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """A TCP port free on 127.0.0.1 that no other process (pytest-xdist worker, another test
    session, a benchmark) on this machine has been given, nor this process before."""
    global _next_in_block  # pylint: disable=global-statement
    for _attempt in range(20):
        if not _blocks or _next_in_block >= BLOCK:
            _claim_block()
            _next_in_block = 0
        first = _blocks[-1][0]
        while _next_in_block < BLOCK:
            port = first + _next_in_block
            _next_in_block += 1
            if _bindable(port):
                return port
    raise OrthancError("no free TCP port found")


def _process_state(pid: int) -> str | None:
    """One-letter state of PID from /proc (e.g. 'S', 'Z'), or None if it does not exist."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return stat.rsplit(")", 1)[1].split()[0]


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


class OrthancServer:
    """A private Orthanc 1.10.x instance under ``root`` (see the module docstring)."""

    def __init__(
        self,
        root: Path,
        name: str = "orthanc",
        http_port: int | None = None,
        dicom_port: int | None = None,
        compression: bool = False,
        config_as_folder: bool = True,
        extra_config: dict | None = None,
    ) -> None:
        self._init_attrs(
            Path(root).resolve(), name, http_port or free_port(), dicom_port or free_port(),
            compression, config_as_folder, dict(extra_config or {}),
        )
        for d in (self.root, self.storage_dir, self.index_dir, self.log_dir):
            d.mkdir(parents=True, exist_ok=True)
        self._write_config()
        (self.root / "server.json").write_text(json.dumps(self._settings(), indent=2) + "\n")

    # -- construction ------------------------------------------------------------------

    def _init_attrs(self, root: Path, name: str, http_port: int, dicom_port: int,
                    compression: bool, config_as_folder: bool, extra_config: dict) -> None:
        self.root = root
        self.name = name
        self.http_port = http_port
        self.dicom_port = dicom_port
        self.compression = compression
        self.config_as_folder = config_as_folder
        self.extra_config = extra_config
        config_dir = root / "config"
        self.config_path = config_dir if config_as_folder else config_dir / "orthanc.json"
        self.storage_dir = root / "storage"
        self.index_dir = root / "index"
        self.log_dir = root / "log"
        self.pidfile = root / "orthanc.pid"
        self.url = f"http://127.0.0.1:{http_port}"
        self._proc: subprocess.Popen | None = None

    def _settings(self) -> dict[str, Any]:
        return {"name": self.name, "http_port": self.http_port, "dicom_port": self.dicom_port,
                "compression": self.compression, "config_as_folder": self.config_as_folder,
                "extra_config": self.extra_config}

    @classmethod
    def load(cls, root: Path) -> "OrthancServer":
        """Rebuild the server object from ROOT/server.json without rewriting anything."""
        root = Path(root).resolve()
        try:
            s = json.loads((root / "server.json").read_text())
        except FileNotFoundError:
            raise OrthancError(f"{root}/server.json not found: not an OrthancServer root") from None
        self = cls.__new__(cls)
        self._init_attrs(root, s["name"], s["http_port"], s["dicom_port"], s["compression"],
                         s["config_as_folder"], s["extra_config"])
        return self

    def _write_config(self) -> None:
        main: dict[str, Any] = {
            "Name": self.name,
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "StorageDirectory": str(self.storage_dir),
            "IndexDirectory": str(self.index_dir),
            "StorageCompression": self.compression,
            "Plugins": [],
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            # Accept C-STORE from any calling AET, whatever called AET it uses.
            "DicomCheckCalledAet": False,
            "DicomAlwaysAllowStore": True,
            "DicomCheckModalityHost": False,
            "UnknownSopClassAccepted": True,
        }
        extra: dict[str, Any] = {"DicomAet": DICOM_AET}
        for key, value in self.extra_config.items():
            (extra if key in extra else main)[key] = value
        body = ",\n".join(f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in main.items())
        text = (
            "/* Generated by tests/support/orthanc_server.py.\n"
            "   Orthanc accepts comments in its JSON: this file uses both kinds. */\n"
            "{\n"
            f"  // private test instance {self.name!r}\n"
            f"{body}"
        )
        self.config_path.parent.mkdir(parents=True, exist_ok=True)
        if self.config_as_folder:
            self.config_path.mkdir(exist_ok=True)
            text += "\n}\n"
            (self.config_path / "extra.json").write_text(
                "// A second file of the configuration folder, with its own top-level keys.\n"
                + json.dumps(extra, indent=2) + "\n")
        else:
            text += ",\n" + ",\n".join(f"  {json.dumps(k)}: {json.dumps(v)}"
                                       for k, v in extra.items()) + "\n}\n"
        (self.config_path / "orthanc.json" if self.config_as_folder else self.config_path
         ).write_text(text)

    # -- process control ---------------------------------------------------------------

    def pid(self) -> int | None:
        """PID of this server's running Orthanc, or None.

        A PID counts only if it is alive (not a zombie) and its command line names this
        server's configuration, so a recycled PID is never mistaken for ours.
        """
        if self._proc is not None and self._proc.poll() is not None:
            self._proc = None  # reaped our exited child
        try:
            pid = int(self.pidfile.read_text().strip())
        except (FileNotFoundError, ValueError):
            return None
        state = _process_state(pid)
        if state is None or state in "ZX":
            return None
        cmd = _cmdline(pid)
        if str(self.config_path) not in cmd or not any(a.endswith("Orthanc") for a in cmd):
            return None
        return pid

    def answers(self, timeout: float = 2) -> bool:
        """True when GET /system answers with this server's name within ``timeout`` seconds."""
        try:
            return self.rest("GET", "/system", timeout=timeout).get("Name") == self.name
        except (OSError, ValueError, AttributeError, http.client.HTTPException, OrthancError):
            return False

    def start(self, timeout: float = 30) -> None:
        """Start Orthanc detached and return once its REST API answers.

        Does not start a second process if the recorded one runs: waits for it instead.
        Raises OrthancError (with the log tail) if it exits or does not answer in time.
        """
        deadline = time.monotonic() + timeout
        if self.pid() is not None:
            while not self.answers():
                if time.monotonic() > deadline or self.pid() is None:
                    raise OrthancError(f"{self.name}: the recorded Orthanc does not answer "
                                       f"on {self.url}\n{self.log_tail()}")
                time.sleep(0.05)
            return
        with open(self.log_dir / "stdout.log", "ab") as out, \
                open(self.log_dir / "stderr.log", "ab") as err:
            self._proc = subprocess.Popen(
                [ORTHANC_BIN, f"--logdir={self.log_dir}", str(self.config_path)],
                stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                cwd=self.root, env=_dicom_env(), start_new_session=True, close_fds=True,
            )
        self.pidfile.write_text(f"{self._proc.pid}\n")
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise OrthancError(f"{self.name}: Orthanc exited with status "
                                   f"{self._proc.returncode} while starting\n{self.log_tail()}")
            if self.answers():
                return
            time.sleep(0.05)
        self._kill_after_failed_start()
        raise OrthancError(f"{self.name}: no answer on {self.url} after {timeout}s\n"
                           f"{self.log_tail()}")

    def _kill_after_failed_start(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        self._proc = None

    def stop(self, timeout: float = 60) -> None:
        """SIGTERM the recorded PID and wait until it is gone (reaping it if it is our child).

        Does nothing if the server is not running. On timeout it is SIGKILLed and
        OrthancError is raised. Orthanc 1.10.1 needs about 3.5 s to stop.
        """
        self._wait_stopped(self._send_sigterm(), time.monotonic() + timeout, timeout)

    def _send_sigterm(self) -> int | None:
        pid = self.pid()
        if pid is not None:
            os.kill(pid, signal.SIGTERM)
        return pid

    def _wait_stopped(self, pid: int | None, deadline: float, timeout: float) -> None:
        while pid is not None and self.pid() is not None:
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                raise OrthancError(f"{self.name}: PID {pid} still alive {timeout}s after "
                                   f"SIGTERM, killed\n{self.log_tail()}")
            time.sleep(0.05)
        if self._proc is not None and self._proc.pid == pid:
            self._proc.wait()
            self._proc = None
        self.pidfile.unlink(missing_ok=True)

    def start_command(self) -> str:
        """Shell command that starts this server from any process (returns once it answers)."""
        return self.ctl_command("start")

    def stop_command(self) -> str:
        """Shell command that stops this server from any process (returns once it exited)."""
        return self.ctl_command("stop")

    def ctl_command(self, action: str) -> str:
        """Shell command running ``orthancctl.py ACTION ROOT`` (start, stop or status)."""
        return shlex.join([sys.executable, str(CTL_SCRIPT), action, str(self.root)])

    def log_tail(self, lines: int = 30) -> str:
        """Last lines of Orthanc's log and of its stderr, for error messages."""
        parts = []
        for path in (self.log_dir / "Orthanc.log", self.log_dir / "stderr.log"):
            try:
                text = path.read_text(errors="replace").splitlines()[-lines:]
            except FileNotFoundError:
                continue
            if text:
                parts.append(f"--- {path} ---\n" + "\n".join(text))
        return "\n".join(parts) or f"(no log in {self.log_dir})"

    # -- REST --------------------------------------------------------------------------

    def rest(self, method: str, path: str, body: bytes | None = None,
             json_body: Any = None, timeout: float = 60) -> Any:
        """Call the REST API; return parsed JSON for JSON answers, else the raw bytes."""
        headers = {}
        users = self.extra_config.get("RegisteredUsers") or {}
        if self.extra_config.get("AuthenticationEnabled") and users:
            user, password = next(iter(users.items()))
            headers["Authorization"] = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
        if json_body is not None:
            body = json.dumps(json_body).encode()
            headers["Content-Type"] = "application/json"
        req = urllib.request.Request(self.url + path, data=body, method=method, headers=headers)
        try:
            with _opener.open(req, timeout=timeout) as resp:
                data = resp.read()
                ctype = resp.headers.get("Content-Type", "")
        except urllib.error.HTTPError as e:
            raise OrthancError(f"{method} {self.url}{path}: HTTP {e.code}: "
                               f"{e.read().decode(errors='replace')}") from None
        return json.loads(data) if ctype.startswith("application/json") else data

    def store_rest(self, path_or_bytes: Path | str | bytes) -> str:
        """POST one DICOM file to /instances; return its Orthanc instance ID."""
        data = (path_or_bytes if isinstance(path_or_bytes, bytes)
                else Path(path_or_bytes).read_bytes())
        answer = self.rest("POST", "/instances", body=data)
        if answer.get("Status") not in ("Success", "AlreadyStored"):
            raise OrthancError(f"{self.name}: store failed: {answer}")
        return answer["ID"]

    def store_cstore(self, paths: Iterable[Path | str]) -> None:
        """Send files over DICOM (C-STORE); raise if any is not stored."""
        cstore("127.0.0.1", self.dicom_port, paths, label=self.name)

    def statistics(self) -> dict:
        """GET /statistics (CountInstances, TotalDiskSize, ...)."""
        return self.rest("GET", "/statistics")

    def instances(self) -> list[str]:
        """IDs of all stored instances."""
        return self.rest("GET", "/instances")

    def instance_md5(self, instance_id: str) -> str:
        """MD5 Orthanc recorded for the instance's DICOM file (of the uncompressed bytes)."""
        return self.rest("GET", f"/instances/{instance_id}/attachments/dicom/md5").decode().strip()

    def instance_file(self, instance_id: str) -> bytes:
        """The DICOM file of an instance, as stored (uncompressed)."""
        return self.rest("GET", f"/instances/{instance_id}/file")

    def instance_sop_uid(self, instance_id: str) -> str:
        """SOPInstanceUID of an instance."""
        return self.rest("GET", f"/instances/{instance_id}")["MainDicomTags"]["SOPInstanceUID"]

    def __repr__(self) -> str:
        return f"OrthancServer({self.name!r}, {self.url}, root={str(self.root)!r})"


def cstore(host: str, port: int, paths: Iterable[Path | str], label: str = "storescu") -> None:
    """Send files with dcmtk's storescu over DICOM (C-STORE); raise if any is not stored.

    storescu exits 0 even when a C-STORE is answered with an error status, so its
    verbose log is read: every file must get a "Received Store Response (Success...)"
    (or a warning). Files go in batches of 500, one association each.
    """
    files = [str(p) for p in paths]
    for start in range(0, len(files), 500):
        batch = files[start:start + 500]
        res = subprocess.run(
            ["storescu", "-v", "-aec", DICOM_AET, host, str(port), *batch],
            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=600, check=False,
            env=_dicom_env(),
        )
        log = res.stdout + res.stderr
        statuses = re.findall(r"Received Store Response \((.*)\)", log)
        failed = [st for st in statuses if not st.startswith(("Success", "Warning"))]
        if res.returncode != 0 or failed or len(statuses) != len(batch):
            errors = "\n".join(line for line in log.splitlines() if not line.startswith("I:"))
            raise OrthancError(
                f"{label}: storescu exit {res.returncode}, {len(statuses)} responses "
                f"for {len(batch)} files, failed: {failed}\n{errors or log[-2000:]}")


def stop_all(servers: Iterable[OrthancServer], timeout: float = 60) -> None:
    """Stop several servers in parallel (SIGTERM all, then wait for each).

    Every server is waited for even if one fails; the first error is raised at the end.
    """
    servers = list(servers)
    deadline = time.monotonic() + timeout
    pids, first_error = [], None
    for server in servers:
        try:
            pids.append(server._send_sigterm())
        except OSError as e:
            pids.append(None)
            first_error = first_error or e
    for server, pid in zip(servers, pids):
        try:
            server._wait_stopped(pid, deadline, timeout)
        except (OrthancError, OSError) as e:
            first_error = first_error or e
    if first_error is not None:
        raise first_error


def md5_file(path: Path | str) -> str:
    """Hex MD5 of a file, to compare with instance_md5()."""
    return hashlib.md5(Path(path).read_bytes()).hexdigest()

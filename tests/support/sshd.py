"""A private OpenSSH server on 127.0.0.1 for tests and benchmarks: a backup server that Ansible
and rsync reach over real SSH.

Everything lives under one folder: a generated host key, a generated client key (the only one
authorised), a known_hosts file that holds the host key, the configuration and the PID file.
Only the PID this object started is ever signalled."""

from __future__ import annotations

import os
import pathlib
import shutil
import signal
import socket
import subprocess
import time

from tests.support.orthanc_server import free_port
from tests.support.playbook import MODULE_PYTHON

SSHD = "/usr/sbin/sshd"


class SshServer:
    def __init__(self, folder: pathlib.Path, port: int | None = None):
        self.folder = pathlib.Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        os.chmod(self.folder, 0o700)
        self.port = port or free_port()
        self.host_key = self.folder / "host_ed25519"
        self.client_key = self.folder / "client_ed25519"
        self.known_hosts = self.folder / "known_hosts"
        self.config = self.folder / "sshd_config"
        self.log = self.folder / "sshd.log"
        self.proc: subprocess.Popen | None = None
        for key in (self.host_key, self.client_key):
            if not key.exists():
                subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", key.name, "-f", str(key)],
                               check=True, stdin=subprocess.DEVNULL)
        (self.folder / "authorized_keys").write_text(pathlib.Path(f"{self.client_key}.pub").read_text())
        os.chmod(self.folder / "authorized_keys", 0o600)
        host_pub = pathlib.Path(f"{self.host_key}.pub").read_text().split()
        self.known_hosts.write_text(f"[127.0.0.1]:{self.port} {host_pub[0]} {host_pub[1]}\n")
        sftp = next((p for p in ("/usr/lib/openssh/sftp-server", "/usr/libexec/openssh/sftp-server")
                     if os.path.exists(p)), "internal-sftp")
        self.config.write_text("\n".join([
            "ListenAddress 127.0.0.1",
            f"Port {self.port}",
            f"HostKey {self.host_key}",
            f"AuthorizedKeysFile {self.folder / 'authorized_keys'}",
            f"PidFile {self.folder / 'sshd.pid'}",
            "PermitRootLogin prohibit-password",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "UsePAM no",
            "StrictModes no",
            "MaxStartups 50:30:100",
            "MaxSessions 50",
            f"Subsystem sftp {sftp}",
            "",
        ]))

    def start(self, timeout: float = 10) -> None:
        pathlib.Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # privilege separation folder
        self.proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(self.config)], stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=open(self.log, "ab"))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"sshd exited with {self.proc.returncode}: {self.log.read_text()[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"sshd did not listen on {self.port}")

    def stop(self) -> None:
        """SIGTERM the sshd this object started (its forked sessions end with it)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def host_vars(self, **extra) -> dict:
        """Inventory variables of the backup server host (Ansible reaches it over this sshd)."""
        hostvars = {
            "ansible_connection": "ssh",
            "ansible_host": "127.0.0.1",
            "ansible_port": self.port,
            "ansible_user": "root",
            "ansible_ssh_private_key_file": str(self.client_key),
            "ansible_ssh_common_args": f"-o UserKnownHostsFile={self.known_hosts} -o StrictHostKeyChecking=yes",
            "ansible_python_interpreter": MODULE_PYTHON,
        }
        hostvars.update(extra)
        return hostvars

    def ship_vars(self, root, **extra) -> dict:
        """Variables for the managed hosts: how they push to this server."""
        shipvars = {
            "orthanc_ship_root": str(root),
            "orthanc_ship_port": self.port,
            "orthanc_ship_user": "root",
            "orthanc_ship_ssh_key": str(self.client_key),
            "orthanc_ship_known_hosts": str(self.known_hosts),
        }
        shipvars.update(extra)
        return shipvars


def available() -> bool:
    return os.path.exists(SSHD) and shutil.which("rsync") is not None and shutil.which("ssh") is not None

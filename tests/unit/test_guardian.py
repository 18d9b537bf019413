"""The guardian (_control._GUARDIAN) on real processes: once the process that stopped Orthanc is
dead, it keeps starting Orthanc until Orthanc answers, also when the first start commands are
refused because the stop that process began is still under way (a container engine refuses to
start a container that is stopping)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import time

from ansible_collections.pacs.orthanc.plugins.module_utils import _control

# The stand-in of Orthanc's start command: refused (status 1) until the "stop" has ended (the time
# in the file `stop_ends`), then it starts a detached HTTP server on the port (Orthanc answering)
# and exits 0. Each call is counted in `calls`.
START = textwrap.dedent("""
    import os, subprocess, sys, time
    work, port = sys.argv[1], sys.argv[2]
    with open(os.path.join(work, "calls"), "a") as handle:
        handle.write("x")
    if time.time() < float(open(os.path.join(work, "stop_ends")).read()):
        sys.exit(1)
    server = subprocess.Popen([sys.executable, "-m", "http.server", port, "--bind", "127.0.0.1"],
                              cwd=work, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    with open(os.path.join(work, "server.pid"), "w") as handle:
        handle.write(str(server.pid))
""")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_a_start_refused_while_the_stop_runs_is_tried_again_until_orthanc_answers(tmp_path):
    port = free_port()
    (tmp_path / "start.py").write_text(START)
    # the stop goes on for 4 s after the stopper died: the old guardian spent its 5 attempts in
    # the first second and left Orthanc stopped
    (tmp_path / "stop_ends").write_text(str(time.time() + 4))
    dead = subprocess.Popen(["true"])
    dead.wait()  # the stopper: gone
    marker = str(tmp_path / "marker")
    argv = [sys.executable, str(tmp_path / "start.py"), str(tmp_path), str(port)]
    guardian = subprocess.Popen([sys.executable, "-c", _control._GUARDIAN, _control.GUARDIAN_TAG, str(dead.pid),
                                 marker, f"http://127.0.0.1:{port}", json.dumps(argv), "40"])
    try:
        assert guardian.wait(timeout=60) == 0
        note = json.loads((tmp_path / "marker.guardian").read_text())
        assert note["result"] == "Orthanc answers", note
        assert note["last_start_status"] == 0
        calls = len((tmp_path / "calls").read_text())
        assert calls == note["starts"] >= 2  # refused at least once, then accepted
    finally:
        if guardian.poll() is None:
            guardian.kill()
        pid_file = tmp_path / "server.pid"
        if pid_file.exists():
            os.kill(int(pid_file.read_text()), 15)

"""Orthanc's state in words (module_utils/_probe.py), as the summary line and the roles' messages
say it, and what _probe.ask makes of real HTTP answers, of a closed port and of a silent one."""

from __future__ import annotations

import http.server
import json
import socket
import threading

import pytest

from ansible_collections.pacs.orthanc.plugins.filter.backup_summary import backup_result, orthanc_state_sentence
from ansible_collections.pacs.orthanc.plugins.module_utils import _probe

URL = "http://127.0.0.1:8042"


def failed(**state):
    result = {"result": "failed", "step": "Read the Orthanc configuration", "cause": "something"}
    result.update(state)
    return backup_result([result, "pacs-1", None])


def words(text: str) -> str:
    return text.lower()


@pytest.mark.parametrize("state, status, expected", [
    ("answering", 200, "(Orthanc running)"),
    ("refused", 401, "(Orthanc answered HTTP 401: it refused the credentials)"),
    ("refused", 403, "(Orthanc answered HTTP 403: it refused the credentials)"),
    ("http error", 503, "(Orthanc answered HTTP 503)"),
    ("not answering", None, "(ORTHANC NOT ANSWERING)"),
    ("not running", None, "(ORTHANC NOT RUNNING)"),
])
def test_the_summary_line_says_what_orthanc_answered(state, status, expected):
    line = failed(orthanc_state=state, orthanc_http_status=status,
                  orthanc_running=state in _probe.HTTP_STATES)
    assert line["line"] == f"pacs-1: FAILED at 'Read the Orthanc configuration': something {expected}"
    assert line["record"]["orthanc_state"] == state and line["record"]["orthanc_http_status"] == status
    assert line["record"]["orthanc_running"] == (state in _probe.HTTP_STATES)
    if state in _probe.HTTP_STATES:  # any HTTP answer: Orthanc runs, and the line never says otherwise
        assert "not answering" not in words(line["line"]) and "not running" not in words(line["line"])


def test_a_result_without_a_state_keeps_the_old_words():
    assert failed(orthanc_running=True)["line"].endswith("(Orthanc running)")
    assert failed(orthanc_running=False)["line"].endswith("(ORTHANC NOT ANSWERING)")


def test_the_sentence_of_each_state():
    say = orthanc_state_sentence
    assert say({"state": "answering", "url": URL}, "pacs-1") == f"Orthanc answers at {URL}"
    refused = say({"state": "refused", "http_status": 401, "url": URL, "credentials": True}, "pacs-1")
    assert refused == f"Orthanc answered HTTP 401 at {URL}: it refused the credentials"
    assert say({"state": "refused", "http_status": 401, "url": URL, "credentials": False}) == (
        f"Orthanc answered HTTP 401 at {URL}: it requires credentials and none were given")
    assert say({"state": "http error", "http_status": 500, "url": URL, "reason": "Internal Server Error"}) == (
        f"Orthanc answered HTTP 500 at {URL} (Internal Server Error)")
    assert say({"state": "not answering", "url": URL, "reason": "no answer within 5 s", "pids": [4242]}, "pacs-1") == (
        f"ORTHANC IS NOT ANSWERING on pacs-1: nothing answers at {URL} (no answer within 5 s), although its "
        "process runs (PID 4242): look at its log")
    assert say({"state": "not answering", "url": URL, "reason": "Connection refused", "pids": None}, "pacs-1") == (
        f"ORTHANC IS NOT ANSWERING on pacs-1: nothing answers at {URL} (Connection refused)")
    assert say({"state": "not running", "url": URL, "pids": [], "start_hint": "service orthanc start"}, "pacs-1") == (
        "ORTHANC IS NOT RUNNING on pacs-1: start it with 'service orthanc start'")
    # the probe task itself failed: say that nobody knows, never that Orthanc is down
    unknown = say({"failed": True, "msg": "boom"}, "pacs-1")
    assert unknown == "whether Orthanc runs on pacs-1 could not be told: boom"
    for record in ({"state": "refused", "http_status": 401}, {"state": "http error", "http_status": 502}):
        assert "not answering" not in words(say(record)) and "not running" not in words(say(record))


class _Handler(http.server.BaseHTTPRequestHandler):
    answers: dict = {}

    def do_GET(self):  # noqa: N802 (http.server's name)
        status, body = self.answers[self.server.server_address[1]]
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def http_server():
    servers = []

    def make(status: int, body: bytes):
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        _Handler.answers[server.server_address[1]] = (status, body)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield make
    for server in servers:
        server.shutdown()
        server.server_close()


def test_ask_names_every_kind_of_answer(http_server):
    system = json.dumps({"Version": "1.10.1", "Name": "x"}).encode()
    ok = _probe.ask(http_server(200, system), "u", "p", timeout=5)
    assert ok["state"] == "answering" and ok["http_status"] == 200 and ok["system"]["Version"] == "1.10.1"
    refused = _probe.ask(http_server(401, b"{}"), "u", "wrong", timeout=5)
    assert refused["state"] == "refused" and refused["http_status"] == 401 and refused["credentials"]
    forbidden = _probe.ask(http_server(403, b"{}"), timeout=5)
    assert forbidden["state"] == "refused" and forbidden["http_status"] == 403 and not forbidden["credentials"]
    broken = _probe.ask(http_server(503, b"{}"), timeout=5)
    assert broken["state"] == "http error" and broken["http_status"] == 503
    other = _probe.ask(http_server(200, b"<html>not Orthanc</html>"), timeout=5)
    assert other["state"] == "http error" and other["http_status"] == 200


def test_ask_tells_a_closed_port_from_a_silent_one():
    with socket.socket() as sock:  # a port that was free a moment ago: nothing listens on it
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    closed = _probe.ask(f"http://127.0.0.1:{port}", timeout=2)
    assert closed["state"] == "not answering" and closed["http_status"] is None
    assert closed["reason"] == "Connection refused"
    with socket.socket() as silent:  # listens, accepts (the kernel does), never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(5)
        record = _probe.ask(f"http://127.0.0.1:{silent.getsockname()[1]}", timeout=0.5)
    assert record["state"] == "not answering" and record["reason"] == "no answer within 0.5 s"


def test_no_process_for_a_configuration_means_not_running(tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    record = _probe.probe(f"http://127.0.0.1:{port}", timeout=2, config_path=str(tmp_path / "no-such-config"))
    assert record["state"] == "not running" and record["pids"] == [] and record["orthanc_running"] is False


def closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


def test_a_live_process_named_orthanc_on_that_configuration_is_not_answering(tmp_path):
    """A process whose program is called Orthanc and whose argument is the configuration (here a
    Python that sleeps, under that name) keeps the state at "not answering", naming its PID;
    another configuration, or no such process, is "not running"."""
    import subprocess  # pylint: disable=import-outside-toplevel
    import sys  # pylint: disable=import-outside-toplevel
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "Orthanc").symlink_to(sys.executable)
    config = tmp_path / "config"
    config.mkdir()
    (config / "orthanc.json").write_text("{}")
    proc = subprocess.Popen([str(tmp_path / "bin" / "Orthanc"), "-c", "import time; time.sleep(60)", "config"],
                            cwd=tmp_path)  # a relative argument, taken from the process's folder
    try:
        url = closed_port_url()
        for known in (config, config / "orthanc.json"):
            record = _probe.probe(url, timeout=2, config_path=str(known))
            assert record["state"] == "not answering" and record["pids"] == [proc.pid], record
            assert f"although its process runs (PID {proc.pid})" in _probe.sentence(record)
        other = tmp_path / "other"
        other.mkdir()
        assert _probe.probe(url, timeout=2, config_path=str(other))["state"] == "not running"
    finally:
        proc.kill()
        proc.wait()
    assert _probe.probe(url, timeout=2, config_path=str(config))["state"] == "not running"


def test_a_port_that_answers_but_not_in_http_is_not_orthanc_answering():
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)

        def serve():
            conn = listener.accept()[0]
            conn.recv(1000)
            conn.sendall(b"SSH-2.0-OpenSSH_9.2\r\n")
            conn.close()
        threading.Thread(target=serve, daemon=True).start()
        record = _probe.ask(f"http://127.0.0.1:{listener.getsockname()[1]}", timeout=5)
    assert record["state"] == "not answering" and record["http_status"] is None
    assert record["reason"] == "the port answers, but not in HTTP (BadStatusLine)"

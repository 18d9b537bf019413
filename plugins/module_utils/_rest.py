# -*- coding: utf-8 -*-
# Copyright: pacs.orthanc contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""A minimal client of Orthanc's REST API (standard library only). Credentials travel in the
request's Authorization header, never on a command line."""

from __future__ import annotations

import base64
import http.client
import io
import json
import socket
import ssl
import urllib.error
from urllib.parse import quote, urlsplit

from ansible.module_utils.urls import open_url

from ansible_collections.pacs.orthanc.plugins.module_utils import _probe

__metaclass__ = type


def request(url: str, path: str, method: str = "GET", data=None, username: str | None = None,
            password: str | None = None, timeout: float = 60, content_type: str | None = None) -> bytes:
    """The body of Orthanc's answer (bytes). ``data``: bytes, or anything else is sent as JSON.
    HTTP errors raise urllib.error.HTTPError (``.code``), no answer an OSError."""
    headers = {}
    if data is not None and not isinstance(data, (bytes, bytearray)):
        data = json.dumps(data).encode("utf-8")
        headers["Content-Type"] = "application/json"
    elif content_type:
        headers["Content-Type"] = content_type
    response = open_url(url.rstrip("/") + path, method=method, data=data, headers=headers, timeout=timeout,
                        url_username=username or None, url_password=password or None,
                        force_basic_auth=bool(username))
    try:
        return response.read()
    finally:
        response.close()


def get(url: str, path: str, username: str | None = None, password: str | None = None,
        timeout: float = 5):
    return json.loads(request(url, path, "GET", None, username, password, timeout).decode("utf-8"))


def post(url: str, path: str, data, username: str | None = None, password: str | None = None,
         timeout: float = 60, content_type: str | None = None):
    """POST and return the JSON answer (None for an empty one)."""
    body = request(url, path, "POST", data, username, password, timeout, content_type)
    return json.loads(body.decode("utf-8")) if body.strip() else None


def failure(exc: BaseException) -> str:
    """A few words on why a request failed: 'HTTP 404 (Unknown resource)', 'Connection refused'."""
    if isinstance(exc, urllib.error.HTTPError):
        detail = ""
        try:
            body = json.loads(exc.read().decode("utf-8", "replace"))
            detail = body.get("Details") or body.get("Message") or ""
        except (ValueError, AttributeError, OSError):
            pass
        return f"HTTP {exc.code}" + (f" ({detail})" if detail else f" ({exc.reason})" if exc.reason else "")
    if isinstance(exc, (socket.timeout, TimeoutError)):
        return "no answer in time"
    reason = getattr(exc, "reason", None) or exc
    return str(getattr(reason, "strerror", None) or reason) or type(exc).__name__


REQUEST_ERRORS = (OSError, ValueError, http.client.HTTPException)


def quoted(identifier: str) -> str:
    return quote(str(identifier), safe="")


def plugin_versions(url: str, username: str | None = None, password: str | None = None,
                    timeout: float = 5):
    """{plugin id: version} of the plugins Orthanc has loaded (GET /plugins, /plugins/<id>),
    None when it cannot be asked."""
    try:
        listed = get(url, "/plugins", username, password, timeout) or []
    except REQUEST_ERRORS:
        return None
    versions = {}
    for plugin in listed:
        if plugin == "explorer.js":  # not a plugin: the Orthanc Explorer extensions of the plugins
            continue
        try:
            versions[plugin] = (get(url, f"/plugins/{quoted(plugin)}", username, password, timeout) or {}).get("Version")
        except REQUEST_ERRORS:
            versions[plugin] = None
    return versions


_STALE = (http.client.RemoteDisconnected, http.client.CannotSendRequest, ConnectionResetError, BrokenPipeError)


class Session:
    """Many requests to one Orthanc over one kept-alive HTTP connection (``open_url`` sets up a
    new connection and TLS context for every request: about 70 ms each, against well under 1 ms
    here). Same errors as ``request``: urllib.error.HTTPError for an HTTP error status, OSError
    when nothing answers. The credentials go in the Authorization header."""

    def __init__(self, url: str, username: str | None = None, password: str | None = None, timeout: float = 60):
        parts = urlsplit(url)
        self.url = url.rstrip("/")
        self.https = parts.scheme == "https"
        self.host, self.port = parts.hostname, parts.port or (443 if self.https else 80)
        self.base = parts.path.rstrip("/")
        self.timeout = timeout
        self.headers = {}
        if username:
            token = base64.b64encode(f"{username}:{password or ''}".encode("utf-8")).decode("ascii")
            self.headers["Authorization"] = "Basic " + token
        self.connection = None

    def _connect(self):
        if self.https:
            return http.client.HTTPSConnection(self.host, self.port, timeout=self.timeout,
                                               context=ssl.create_default_context())
        return http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)

    def request(self, path: str, method: str = "GET", data=None, content_type: str | None = None) -> bytes:
        headers = dict(self.headers)
        if data is not None and not isinstance(data, (bytes, bytearray)):
            data = json.dumps(data).encode("utf-8")
            headers["Content-Type"] = "application/json"
        elif content_type:
            headers["Content-Type"] = content_type
        while True:
            reused = self.connection is not None
            if not reused:
                self.connection = self._connect()
            try:
                self.connection.request(method, self.base + path, body=data, headers=headers)
                response = self.connection.getresponse()
                body = response.read()
            except _STALE:
                self.close()
                if reused:
                    continue  # a kept-alive connection the server had closed: once more, on a new one
                raise
            except (http.client.HTTPException, OSError):
                self.close()
                raise
            if response.getheader("Connection", "").lower() == "close":
                self.close()
            if response.status >= 400:
                raise urllib.error.HTTPError(self.url + path, response.status, response.reason,
                                             response.headers, io.BytesIO(body))
            return body

    def get(self, path: str):
        return json.loads(self.request(path).decode("utf-8"))

    def post(self, path: str, data, content_type: str | None = None):
        body = self.request(path, "POST", data, content_type)
        return json.loads(body.decode("utf-8")) if body.strip() else None

    def close(self) -> None:
        if self.connection is not None:
            self.connection.close()
            self.connection = None


def answers(url: str, username: str | None = None, password: str | None = None, timeout: float = 2) -> bool:
    """True when Orthanc answers HTTP at ``url`` (see _probe). An Orthanc that answers but refuses
    the credentials (401, 403) runs, but cannot be used: that raises PacsError, saying so."""
    record = _probe.ask(url, username, password, timeout)
    if record["state"] == _probe.REFUSED:
        raise _probe.refused_error(record)
    return record["http_status"] is not None


# The argument spec that goes with the pacs.orthanc.rest documentation fragment.
ARGUMENT_SPEC = dict(
    url=dict(type="str", default="http://127.0.0.1:8042"),
    username=dict(type="str"),
    password=dict(type="str", no_log=True),
)

# -*- coding: utf-8 -*-
# Copyright: pacs.orthanc contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""A minimal client of Orthanc's REST API (standard library only)."""

from __future__ import annotations

import json

from ansible.module_utils.urls import open_url

from ansible_collections.pacs.orthanc.plugins.module_utils import _probe

__metaclass__ = type


def get(url: str, path: str, username: str | None = None, password: str | None = None,
        timeout: float = 5):
    response = open_url(url.rstrip("/") + path, timeout=timeout, url_username=username or None,
                        url_password=password or None, force_basic_auth=bool(username))
    try:
        return json.loads(response.read().decode("utf-8"))
    finally:
        response.close()


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

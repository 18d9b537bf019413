# -*- coding: utf-8 -*-
# Copyright: pacs.orthanc contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""A minimal client of Orthanc's REST API (standard library only)."""

from __future__ import annotations

import json
import urllib.error

from ansible.module_utils.urls import open_url

from ansible_collections.pacs.orthanc.plugins.module_utils._common import PacsError

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
    """True when GET /system answers 200. A 401 means Orthanc runs but refuses the credentials."""
    try:
        get(url, "/system", username, password, timeout)
        return True
    except urllib.error.HTTPError as exc:
        if exc.code == 401:
            raise PacsError("ask Orthanc's REST API", f"{url} refused the credentials (HTTP 401)")
        return True  # something answers HTTP on that port
    except (OSError, ValueError):
        return False


# The argument spec that goes with the pacs.orthanc.rest documentation fragment.
ARGUMENT_SPEC = dict(
    url=dict(type="str", default="http://127.0.0.1:8042"),
    username=dict(type="str"),
    password=dict(type="str", no_log=True),
)

# -*- coding: utf-8 -*-
# Copyright: pacs.orthanc contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations


class ModuleDocFragment:
    """Options of the modules that talk to Orthanc's REST API."""

    DOCUMENTATION = r"""
options:
  url:
    description: Base URL of Orthanc's REST API.
    type: str
    default: http://127.0.0.1:8042
  username:
    description: User for the REST API, when authentication is enabled.
    type: str
  password:
    description: Password for the REST API. Never returned or logged.
    type: str
"""

    READ_ONLY = r"""
attributes:
  check_mode:
    support: full
    description: Reads only; runs the same in check mode.
"""

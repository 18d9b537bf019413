"""The action group 'orthanc' (meta/runtime.yml), through which the roles' module_defaults give
url, username and password: every module with those options is in it, and no other. A module
left out would silently talk to its default URL, http://127.0.0.1:8042, without credentials."""

from __future__ import annotations

import pathlib
import re

import yaml

REPO = pathlib.Path(__file__).resolve().parents[2]


def rest_modules() -> set:
    """The modules whose options include url, username and password (the doc fragment 'rest')."""
    found = set()
    for path in sorted((REPO / "plugins" / "modules").glob("*.py")):
        text = path.read_text()
        if re.search(r"^\s+- pacs\.orthanc\.rest$", text, re.M):
            found.add(path.stem)
    return found


def test_every_module_that_talks_to_orthanc_is_in_the_action_group():
    runtime = yaml.safe_load((REPO / "meta" / "runtime.yml").read_text())
    group = set(runtime["action_groups"]["orthanc"])
    modules = rest_modules()
    assert {"orthanc_info", "orthanc_control", "orthanc_probe", "stopped_capture", "snapshot_capture"} <= modules
    assert group == modules


def test_the_roles_give_the_group_its_connection():
    for role in ("backup", "restore"):
        tasks = yaml.safe_load((REPO / "roles" / role / "tasks" / "main.yml").read_text())
        defaults = tasks[0]["module_defaults"]["group/pacs.orthanc.orthanc"]
        assert defaults["url"] == "{{ orthanc_url }}", role
        assert set(defaults) == {"url", "username", "password"}, role

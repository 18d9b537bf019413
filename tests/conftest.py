"""Test-wide setup: make this checkout importable and runnable as the pacs.orthanc collection;
mark the quick set; under pytest-xdist, run the longest tests first.

The quick set (``python3 -m pytest -m quick -n 2 tests``) is every unit test plus the integration
tests marked ``quick``: the main path (back up, verify, restore, ship, a database) in under three
minutes. The whole suite: ``python3 -m pytest -n 2 tests`` (pytest.ini adds ``--dist load --maxschedchunk 1``).

tests/durations.json holds each test's duration as measured by a whole run (``--store-durations``
rewrites it). Under xdist the tests are handed out longest first, so that the two workers end
together; a test not in the file counts as DEFAULT_DURATION seconds."""

from __future__ import annotations

import json
import os
import pathlib
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
COLLECTIONS = REPO / ".work" / "collections"
DURATIONS = pathlib.Path(__file__).resolve().parent / "durations.json"
DEFAULT_DURATION = 20.0


def _link_collection() -> None:
    target = COLLECTIONS / "ansible_collections" / "pacs" / "orthanc"
    target.parent.mkdir(parents=True, exist_ok=True)
    if not target.is_symlink():
        try:
            target.symlink_to(REPO)
        except FileExistsError:  # another xdist worker made it just now
            pass
    if str(COLLECTIONS) not in sys.path:
        sys.path.insert(0, str(COLLECTIONS))
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    os.environ["ANSIBLE_COLLECTIONS_PATH"] = str(COLLECTIONS)


_link_collection()


def pytest_addoption(parser):
    parser.addoption("--store-durations", action="store_true",
                     help="write every test's duration (setup + call + teardown) into tests/durations.json")


def _recorded() -> dict:
    try:
        return json.loads(DURATIONS.read_text())
    except (FileNotFoundError, ValueError):
        return {}


def pytest_collection_modifyitems(config, items):
    unit = REPO / "tests" / "unit"
    for item in items:
        if unit in item.path.parents or item.path.name == "test_support_smoke.py":
            item.add_marker(pytest.mark.quick)
    if hasattr(config, "workerinput"):  # a pytest-xdist worker: every worker sorts alike
        recorded = _recorded()
        items.sort(key=lambda item: -recorded.get(item.nodeid, DEFAULT_DURATION))


class _DurationRecorder:
    def __init__(self):
        self.durations: dict = {}

    def pytest_runtest_logreport(self, report):
        self.durations[report.nodeid] = self.durations.get(report.nodeid, 0.0) + report.duration

    def pytest_sessionfinish(self, session):
        if not self.durations:
            return
        merged = _recorded()
        merged.update({nodeid: round(seconds, 1) for nodeid, seconds in self.durations.items()})
        DURATIONS.write_text(json.dumps(dict(sorted(merged.items())), indent=1) + "\n")


def pytest_configure(config):
    # in the controlling process only: it sees the reports of every worker
    if config.getoption("--store-durations") and not hasattr(config, "workerinput"):
        config.pluginmanager.register(_DurationRecorder(), "pacs-duration-recorder")

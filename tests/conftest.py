"""Test-wide setup: make this checkout importable and runnable as the pacs.orthanc collection;
mark the quick set; under pytest-xdist, run the longest tests first.

The quick set (``python3 -m pytest -m quick -n 2 tests``) is every unit test plus the integration
tests of QUICK: the main path (back up incrementally, restore, ship, a database round trip) in
under three minutes. The whole suite: ``python3 -m pytest -n 2 tests`` (pytest.ini adds ``--dist loadgroup``).

tests/durations.json holds each test's duration as measured by a whole run (``--store-durations``
rewrites it). Under xdist the tests are handed out longest first (a group of GROUPS first of
all), so that the two workers end together; a test not in the file counts as DEFAULT_DURATION
seconds."""

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
# Test files whose tests must not run beside each other on one machine, by pytest-xdist group
# (pytest.ini: --dist loadgroup sends a group to one worker):
# - test_backup_database.py: test_no_password_in_ps_output_or_files checks that no
#   /tmp/pacs-orthanc-db-* folder (db_dump's private password files) is left, which any other
#   dump running at that moment would have.
GROUPS = {
    "tests/integration/test_backup_database.py": "databases",
}
# Integration tests of the quick set, besides every unit test (by node id, so that one case of a
# parametrized test can be in it).
QUICK = {
    "tests/integration/test_backup_sqlite.py::test_two_hosts_are_backed_up_incrementally",
    "tests/integration/test_restore.py::test_round_trip_after_the_data_is_wiped",
    "tests/integration/test_ship.py::test_two_runs_ship_only_new_files",
    "tests/integration/test_backup_database.py::test_round_trip_into_a_fresh_database[postgresql-files-on-disk]",
}


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


def _plain(nodeid: str) -> str:
    """The node id without the ``@group`` that --dist loadgroup appends."""
    return nodeid.rsplit("@", 1)[0] if "@" in nodeid.rsplit("]", 1)[-1] else nodeid


@pytest.hookimpl(tryfirst=True)  # before xdist reads the xdist_group marks
def pytest_collection_modifyitems(config, items):
    unit = REPO / "tests" / "unit"
    for item in items:
        if unit in item.path.parents or item.path.name == "test_support_smoke.py" or item.nodeid in QUICK:
            item.add_marker(pytest.mark.quick)
        group = GROUPS.get(item.nodeid.split("::")[0])
        if group:
            item.add_marker(pytest.mark.xdist_group(group))
    # a renamed test must not leave the quick set silently: every QUICK test must still exist
    modules = {item.nodeid.split("::")[0]: item.module for item in items if hasattr(item, "module")}
    for nodeid in QUICK:
        path, function = nodeid.split("::")[0], nodeid.split("::")[1].split("[")[0]
        if path in modules and not hasattr(modules[path], function):
            raise pytest.UsageError(f"tests/conftest.py QUICK names {nodeid}: no such test")
    if hasattr(config, "workerinput"):  # a pytest-xdist worker: every worker sorts alike
        recorded = _recorded()
        items.sort(key=lambda item: -recorded.get(_plain(item.nodeid), DEFAULT_DURATION))


class _DurationRecorder:
    def __init__(self):
        self.durations: dict = {}

    def pytest_runtest_logreport(self, report):
        nodeid = _plain(report.nodeid)
        self.durations[nodeid] = self.durations.get(nodeid, 0.0) + report.duration

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

"""Each restore's name is unique on its host: the journal folder /var/tmp is shared by every Orthanc."""

from __future__ import annotations

import datetime
import re

from ansible_collections.pacs.orthanc.plugins.filter.restore_id import restore_id
from ansible_collections.pacs.orthanc.plugins.module_utils import _restore

SECOND = datetime.datetime(2026, 11, 30, 5, 41, 0, tzinfo=datetime.timezone.utc)


def test_two_orthancs_of_one_host_restored_in_the_same_second_have_two_journals():
    main = restore_id(["pacs-1", "/etc/orthanc", "http://127.0.0.1:8042"], now=SECOND)
    second = restore_id(["pacs-1", "/etc/orthanc-2", "http://127.0.0.1:8043"], now=SECOND)
    assert re.fullmatch(r"20261130T054100Z-[0-9a-f]{8}-[0-9a-f]{6}", main), main
    assert main.split("-")[1] != second.split("-")[1]  # the Orthanc's key differs


def test_the_same_orthanc_twice_in_one_second_differs_by_its_random_part():
    ids = {restore_id(["pacs-1", "/etc/orthanc", "http://127.0.0.1:8042"], now=SECOND) for attempt in range(50)}
    assert len(ids) == 50
    assert len({i.rsplit("-", 1)[0] for i in ids}) == 1  # same second, same key


def test_the_id_is_one_the_restore_module_accepts():
    assert _restore._ID.match(restore_id("/etc/orthanc"))
    assert _restore._ID.match("20261129T120000Z")  # a journal named by the second alone still rolls back

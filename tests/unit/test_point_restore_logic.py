"""The decisions of the point restore and of the reconciliation, with a fake scratch Orthanc and
a fake production (the real servers are in tests/integration/test_point_restore.py): a run that
fails while sending deletes again what it added; a damaged backup file is never sent; dates of
the reconciliation window."""

from __future__ import annotations

import hashlib
import urllib.error

import pytest

from ansible_collections.pacs.orthanc.plugins.module_utils import _drill, _items, _reconcile
from ansible_collections.pacs.orthanc.plugins.module_utils._common import PacsError

FILES = {f"i{n}": f"dicom {n}".encode() for n in range(3)}


class FakeScratch:
    def __init__(self, backup, *_args, **_kwargs):
        self.backup, self.manifest, self.files = backup, {"started_at": "2026-11-30T07:00:00Z"}, dict(FILES)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def post(self, path, data):
        assert path == "/tools/find"
        return [{"ID": "s1", "MainDicomTags": {"StudyInstanceUID": "1.2.3"}}] if data["Query"].get(
            "StudyInstanceUID") == "1.2.3" else []

    def get(self, path, timeout=60):
        if path.endswith("/instances"):
            return [{"ID": i} for i in FILES]
        return {"MainDicomTags": {"StudyInstanceUID": "1.2.3"}}

    def file(self, instance):
        return self.files[instance]

    def index_md5s(self):
        return {i: hashlib.md5(data).hexdigest() for i, data in FILES.items()}

    def place(self, uuids):
        return len(list(uuids))


class FakeProduction:
    url = "http://prod"

    def __init__(self, held=(), fail_on=None):
        self.held = {i: hashlib.md5(FILES[i]).hexdigest() for i in held}
        self.fail_on, self.deleted = fail_on, []

    def check_answers(self, *_args):
        return {"Version": "1.10.1"}

    def md5(self, instance):
        return self.held.get(instance)

    def store(self, data):
        instance = next(i for i, d in FILES.items() if d == data)
        if instance == self.fail_on:
            raise urllib.error.HTTPError(self.url, 500, "Internal Server Error", {}, None)
        self.held[instance] = hashlib.md5(data).hexdigest()
        return {"ID": instance, "Status": "Success"}

    def delete(self, instance):
        self.deleted.append(instance)
        del self.held[instance]


@pytest.fixture(autouse=True)
def fake_scratch(monkeypatch):
    monkeypatch.setattr(_drill, "Scratch", FakeScratch)
    monkeypatch.setattr(_drill, "attachment_uuids", lambda index, instances: list(instances))


def run(production, check_mode=False, study="1.2.3"):
    return _items.restore_items("/b", {"study_uids": [study]}, production, "/w", "Orthanc", check_mode)


def test_restores_what_production_lacks_and_skips_the_rest():
    production = FakeProduction(held=["i0"])
    listed = run(production, check_mode=True)
    assert listed["to_restore"] == 2 and listed["changed"] and listed["restored"] == 0 and len(production.held) == 1
    result = run(production)
    assert result["restored"] == 2 == result["verified"] and result["already_present"] == 1
    assert run(production)["changed"] is False


def test_a_failure_while_sending_deletes_what_this_run_added():
    production = FakeProduction(held=["i0"], fail_on="i2")
    with pytest.raises(PacsError) as caught:
        run(production)
    assert caught.value.step == "send to production"
    assert "HTTP 500" in caught.value.cause and "deleted again: production is as before" in caught.value.cause
    assert production.deleted == ["i1"] and set(production.held) == {"i0"}


def test_a_damaged_file_of_the_backup_is_never_sent(monkeypatch):
    monkeypatch.setattr(FakeScratch, "file", lambda self, instance: b"damaged")
    production = FakeProduction()
    with pytest.raises(PacsError, match="the backup is damaged"):
        run(production)
    assert production.held == {}


def test_a_study_the_backup_lacks_is_refused_before_anything_is_sent():
    production = FakeProduction()
    with pytest.raises(PacsError, match="holds no study with StudyInstanceUID 9.9"):
        run(production, study="9.9")
    assert production.held == {}


@pytest.mark.parametrize("since, day", [("20261129", "20261129"), ("2026-11-29", "20261129"),
                                        ("2026-11-29T23:30:00.123456Z", "20261129"),
                                        ("2026-11-30T00:30:00+01:00", "20261129")])
def test_the_first_day_of_the_window(since, day):
    assert _reconcile.study_date(since) == day


def test_a_window_that_is_no_date_is_refused():
    with pytest.raises(PacsError, match="neither a date"):
        _reconcile.study_date("yesterday")
    with pytest.raises(PacsError, match="neither a date"):
        _reconcile.study_date("20261131")

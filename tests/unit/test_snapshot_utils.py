"""Pure parts of the snapshot capture: the mount table, leftovers' names, the refusals that need no
filesystem (the btrfs parts are tested for real in tests/integration/test_snapshot.py)."""

from __future__ import annotations

import pytest

from ansible_collections.pacs.orthanc.plugins.module_utils import _snapshot
from ansible_collections.pacs.orthanc.plugins.module_utils._common import PacsError

MOUNTINFO = """\
22 1 254:0 / / rw,relatime - ext4 /dev/vda rw
40 22 0:39 / /srv/pacs rw,relatime shared:1 - btrfs /dev/loop0 rw,space_cache=v2,subvolid=5,subvol=/
41 40 0:39 /orthanc /srv/pacs/orthanc\\040data rw,relatime - btrfs /dev/loop0 rw,subvol=/orthanc
42 22 0:40 / /srv/pacsro ro,relatime - btrfs /dev/loop1 ro
"""


@pytest.fixture
def mountinfo(tmp_path):
    path = tmp_path / "mountinfo"
    path.write_text(MOUNTINFO)
    return str(path)


def test_the_longest_mount_point_wins_and_escapes_are_read(mountinfo, monkeypatch):
    monkeypatch.setattr(_snapshot.os.path, "realpath", lambda p: p)
    assert _snapshot.mount_of("/srv/pacs/orthanc data/db", mountinfo)["mount_point"] == "/srv/pacs/orthanc data"
    top = _snapshot.mount_of("/srv/pacs/other", mountinfo)
    assert (top["mount_point"], top["fstype"], top["source"]) == ("/srv/pacs", "btrfs", "/dev/loop0")
    assert _snapshot.mount_of("/srv/pacsro/x", mountinfo)["mount_point"] == "/srv/pacsro"  # not /srv/pacs
    assert "ro" in _snapshot.mount_of("/srv/pacsro/x", mountinfo)["options"]
    assert _snapshot.mount_of("/var/lib/orthanc", mountinfo)["fstype"] == "ext4"


@pytest.mark.parametrize("kind, words", [("lvm", "LVM thin snapshots are not implemented"),
                                         ("zfs", "ZFS snapshots are not implemented")])
def test_untested_kinds_are_refused_before_anything(tmp_path, kind, words):
    with pytest.raises(PacsError) as caught:
        _snapshot.capture(kind, str(tmp_path), str(tmp_path), "20261129T000000Z", str(tmp_path / "i"),
                          str(tmp_path / "s"), str(tmp_path / "state"))
    assert words in caught.value.cause and caught.value.details["precondition_failed"] is True
    assert not (tmp_path / "i").exists() and not (tmp_path / "s").exists()


def test_hardlink_mode_is_refused(tmp_path):
    with pytest.raises(PacsError, match="hardlink cannot be used with a snapshot"):
        _snapshot.capture("btrfs", str(tmp_path), str(tmp_path), "n", str(tmp_path / "i"), str(tmp_path / "s"),
                          str(tmp_path / "state"), link_mode="hardlink")


def test_a_folder_on_another_filesystem_is_refused(tmp_path):
    (tmp_path / "index").mkdir()
    with pytest.raises(PacsError) as caught:
        _snapshot.capture("btrfs", str(tmp_path / "index"), str(tmp_path / "index"), "n", str(tmp_path / "i"),
                          str(tmp_path / "s"), str(tmp_path / "state"))
    if "not btrfs" not in caught.value.cause:
        pytest.skip("the test's tmp folder is itself on btrfs")
    assert caught.value.step == _snapshot.STEP_PRECONDITIONS and caught.value.details["precondition_failed"]

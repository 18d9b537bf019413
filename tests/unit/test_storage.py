"""The two-pass storage snapshot on real files: what is linked, copied, deferred and removed."""

from __future__ import annotations

import os

from ansible_collections.pacs.orthanc.plugins.module_utils import _storage
from tests.support.storage_tree import put, at as backup_file


def test_hot_then_delta_matches_the_index(tmp_path):
    src, dest = tmp_path / "src", tmp_path / "b" / "storage"
    src.mkdir()
    (src / "index").write_bytes(b"not part of the storage tree")
    old = [put(src, os.urandom(1000 + i)) for i in range(5)]
    young = put(src, b"still being written", age=0)
    state = str(tmp_path / "state.tsv")
    hot = _storage.hot_pass(str(src), str(dest), state, link_mode="copy", settle=5)
    assert hot["files"] == 5 and hot["deferred_files"] == 1 and hot["copied_files"] == 5
    assert not backup_file(dest, young).exists()
    # Orthanc deletes one file and stores another before the stop
    deleted = old.pop()
    os.unlink(backup_file(src, deleted))
    late = put(src, b"late")
    wanted = {n: os.path.getsize(backup_file(src, n)) for n in old + [young, late]}
    # a dump's listing arrives as a stream of (uuid, size) pairs (_db.listing.attachment_sizes)
    delta = _storage.delta_pass(str(src), str(dest), state, (pair for pair in wanted.items()), link_mode="copy")
    assert delta["removed_files"] == 1 and delta["fetched_files"] == 2 and delta["missing_files"] == 0
    present = {e[0] for e in _storage.walk_storage(str(dest))}
    assert present == set(wanted)
    for name in wanted:
        assert backup_file(dest, name).read_bytes() == backup_file(src, name).read_bytes()
    assert not list(dest.rglob("*.part"))


def test_a_copy_with_the_wrong_size_is_fetched_again(tmp_path):
    src, dest = tmp_path / "src", tmp_path / "storage"
    src.mkdir()
    name = put(src, b"0123456789")
    state = str(tmp_path / "state.tsv")
    _storage.hot_pass(str(src), str(dest), state, link_mode="copy", settle=0)
    with open(backup_file(src, name), "ab") as handle:  # it was still growing during the hot pass
        handle.write(b"more")
    delta = _storage.delta_pass(str(src), str(dest), state, {name: 14}, link_mode="copy")
    assert delta["fetched_files"] == 1
    assert backup_file(dest, name).read_bytes() == b"0123456789more"


def test_previous_backup_is_linked_and_same_filesystem_is_linked(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    names = [put(src, os.urandom(100)) for _number in range(3)]
    first, second = tmp_path / "1" / "storage", tmp_path / "2" / "storage"
    _storage.hot_pass(str(src), str(first), str(tmp_path / "s1"), link_mode="copy", settle=0)
    new = put(src, os.urandom(50))
    result = _storage.hot_pass(str(src), str(second), str(tmp_path / "s2"), previous=str(first),
                               link_mode="copy", settle=0)
    assert result["linked_files"] == 3 and result["new_files"] == 1 and result["copied_files"] == 1
    for name in names:
        assert os.stat(backup_file(second, name)).st_ino == os.stat(backup_file(first, name)).st_ino
    third = tmp_path / "3" / "storage"
    result = _storage.hot_pass(str(src), str(third), str(tmp_path / "s3"), link_mode="auto", settle=0)
    assert result["hardlink_from_source"] is True and result["copied_files"] == 0
    assert os.stat(backup_file(third, new)).st_ino == os.stat(backup_file(src, new)).st_ino


def test_missing_source_files_are_reported(tmp_path):
    src, dest = tmp_path / "src", tmp_path / "storage"
    src.mkdir()
    delta = _storage.delta_pass(str(src), str(dest), str(tmp_path / "s"), {"ab" * 16 + "-x": 10}, link_mode="copy")
    assert delta["missing_files"] == 1 and delta["files"] == 0


def test_check_mode_writes_nothing(tmp_path):
    src, dest = tmp_path / "src", tmp_path / "storage"
    src.mkdir()
    put(src, b"x")
    result = _storage.hot_pass(str(src), str(dest), str(tmp_path / "s"), link_mode="copy", settle=0, check_mode=True)
    assert result["files"] == 1
    assert not dest.exists() and not (tmp_path / "s").exists()

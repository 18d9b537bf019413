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
    # a listing may arrive as a stream of (uuid, size) pairs, never gathered
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


def _placed(state_file) -> dict:
    return _storage.read_state(str(state_file))


def test_the_same_inode_is_linked_from_the_previous_backup_without_asking_its_size(tmp_path, monkeypatch):
    """Backups on the storage's filesystem: a live file that is the very inode the previous backup
    holds under its name is that file (linked from there, origin previous); a live file of that
    name on another inode is linked from the previous backup only with the same size."""
    src = tmp_path / "src"
    src.mkdir()
    kept, same_size, grown = (put(src, os.urandom(100)) for _n in range(3))
    first, second = tmp_path / "1" / "storage", tmp_path / "2" / "storage"
    _storage.hot_pass(str(src), str(first), str(tmp_path / "s1"), link_mode="auto", settle=0)
    for name, data in ((same_size, os.urandom(100)), (grown, os.urandom(150))):
        os.unlink(backup_file(src, name))  # another inode under the same name
        backup_file(src, name).write_bytes(data)
        os.utime(backup_file(src, name), (1, 1))
    statted = []
    real_stat = os.stat
    monkeypatch.setattr(_storage.os, "stat", lambda path, *a, **k: statted.append(path) or real_stat(path, *a, **k))
    result = _storage.hot_pass(str(src), str(second), str(tmp_path / "s2"), previous=str(first),
                               link_mode="auto", settle=0, link_workers=1)
    placed = _placed(tmp_path / "s2")
    assert placed[kept] == (100, _storage.ORIGIN_PREVIOUS)
    assert placed[same_size] == (100, _storage.ORIGIN_PREVIOUS)  # as Placer.place: same name, same size
    assert placed[grown] == (150, _storage.ORIGIN_LINK)
    assert result["linked_files"] == 2 and result["new_files"] == 1
    assert kept not in statted  # its inode answered: no stat of the previous backup's file
    assert {same_size, grown} <= set(statted)
    for name in (kept, same_size):
        assert os.stat(backup_file(second, name)).st_ino == os.stat(backup_file(first, name)).st_ino
    assert os.stat(backup_file(second, grown)).st_ino == os.stat(backup_file(src, grown)).st_ino


def test_link_processes_place_what_one_process_places(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    names = [put(src, os.urandom(10 + n)) for n in range(300)]
    young = put(src, b"young", age=0)
    base = tmp_path / "0" / "storage"
    _storage.hot_pass(str(src), str(base), str(tmp_path / "s0"), link_mode="auto", settle=5)
    os.unlink(backup_file(base, names[0]))  # not in the previous backup: linked from the live file
    results = {}
    for threads in (1, 2, 4):  # link_workers: processes (at most the CPUs)
        dest = tmp_path / str(threads) / "storage"
        walked = []

        class Count:
            @staticmethod
            def add(files, nbytes):
                walked.append((files, nbytes))

        hot = _storage.hot_pass(str(src), str(dest), str(tmp_path / f"s{threads}"), previous=str(base), link_mode="auto",
                                settle=5, link_workers=threads, progress=Count())
        results[threads] = (_placed(tmp_path / f"s{threads}"), hot["deferred_files"], sum(f for f, _b in walked))
        assert {e[0] for e in _storage.walk_storage(str(dest))} == set(names)
    assert results[1] == results[2] == results[4]
    placed, deferred, walked_files = results[1]
    assert deferred == 1 and walked_files == len(names) + 1 and young not in placed
    assert placed[names[0]][1] == _storage.ORIGIN_LINK
    assert all(placed[n][1] == _storage.ORIGIN_PREVIOUS for n in names[1:])


def test_a_folder_removed_by_orthanc_during_the_walk_is_empty(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    linker = _storage._ShardLinker(str(src), str(tmp_path / "dest"), None, True, False, 0.0)
    work = linker.run("ab/cd")  # listed, then emptied and removed by Orthanc
    assert (work.rows, work.skipped, work.copies, work.walked) == ([], [], [], 0)
    assert not (tmp_path / "dest").exists()


def test_a_second_hot_pass_into_the_same_backup_skips_what_is_placed(tmp_path):
    src, dest = tmp_path / "src", tmp_path / "storage"
    src.mkdir()
    first = [put(src, os.urandom(20)) for _n in range(3)]
    state = str(tmp_path / "s")
    _storage.hot_pass(str(src), str(dest), state, link_mode="auto", settle=0)
    later = put(src, os.urandom(30))
    result = _storage.hot_pass(str(src), str(dest), state, link_mode="auto", settle=0)  # no FileExistsError
    assert result["files"] == 4 and set(_placed(state)) == set(first) | {later}


def test_a_copy_to_another_filesystem_goes_through_the_placer(tmp_path, monkeypatch):
    src = tmp_path / "src"
    src.mkdir()
    names = [put(src, os.urandom(40)) for _n in range(5)]
    monkeypatch.setattr(_storage, "same_filesystem", lambda a, b: False)
    result = _storage.hot_pass(str(src), str(tmp_path / "storage"), str(tmp_path / "s"), link_mode="auto", settle=0)
    assert result["copied_files"] == 5 and result["hardlink_from_source"] is False
    for name in names:
        assert backup_file(tmp_path / "storage", name).read_bytes() == backup_file(src, name).read_bytes()
        assert os.stat(backup_file(tmp_path / "storage", name)).st_ino != os.stat(backup_file(src, name)).st_ino

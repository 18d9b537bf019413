# -*- coding: utf-8 -*-
# Copyright: pacs.orthanc contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Incremental snapshots of Orthanc's storage folder (``xx/yy/uuid``).

Orthanc writes a file once and never changes it, so a name that is already in the previous
backup (with the same size) can be hard-linked from there, and a backup on the filesystem of
the storage itself can hard-link the live file. Everything else is copied.

A snapshot is taken in two passes. The *hot* pass runs while Orthanc runs: it walks the storage
tree, skips files modified in the last ``settle`` seconds (they may still be being written) and
records every file it placed, with its size, in a state file. The *delta* pass runs while Orthanc
is stopped and does not walk the live tree: the captured index lists every attachment and its
size, so the delta is computed from that list and the state file alone: files the index lists
that the hot pass did not place (or placed with another size) are fetched, files the hot pass
placed that the index no longer lists (deleted meanwhile) are removed."""

from __future__ import annotations

import concurrent.futures
import os
import re
import shutil
import time

from ansible_collections.pacs.orthanc.plugins.module_utils import _layout
from ansible_collections.pacs.orthanc.plugins.module_utils._common import PacsError, os_error_cause

__metaclass__ = type

_SHARD = re.compile(r"^[0-9a-f]{2}$")

ORIGIN_PREVIOUS = "previous"   # hard link to the previous backup's file
ORIGIN_LINK = "link"           # hard link to the live file (same filesystem)
ORIGIN_COPY = "copy"           # copied bytes


def relpath(uuid: str) -> str:
    return os.path.join(uuid[0:2], uuid[2:4], uuid)


def walk_storage(root: str):
    """Yield (uuid, DirEntry) for every file in root/xx/yy/. Other files (an index kept in the
    storage folder, plugin databases) are not part of the storage tree and are skipped."""
    try:
        level1 = [e for e in os.scandir(root) if _SHARD.match(e.name) and e.is_dir(follow_symlinks=False)]
    except OSError as exc:
        raise PacsError("walk storage", f"cannot list the storage folder: {os_error_cause(exc)}")
    for d1 in sorted(level1, key=lambda e: e.name):
        for d2 in sorted(os.scandir(d1.path), key=lambda e: e.name):
            if not (_SHARD.match(d2.name) and d2.is_dir(follow_symlinks=False)):
                continue
            for entry in os.scandir(d2.path):
                if entry.is_file(follow_symlinks=False) and not entry.name.startswith("."):
                    yield entry.name, entry


def same_filesystem(a: str, b: str) -> bool:
    return os.stat(a).st_dev == os.stat(b).st_dev


class Placer:
    """Puts files into a backup's storage tree: link from the previous backup, link from the
    live storage (same filesystem) or copy; copies run in a small thread pool."""

    def __init__(self, source: str, dest: str, previous: str | None, link_source: bool,
                 workers: int = 4, check_mode: bool = False, owner: tuple | None = None):
        self.source, self.dest, self.previous = source, dest, previous
        self.owner = owner
        self.link_source = link_source
        self.check_mode = check_mode
        self.made_dirs: set = set()
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=max(1, workers))
        self.pending: list = []

    def _ensure_dir(self, uuid: str) -> None:
        shard = os.path.join(uuid[0:2], uuid[2:4])
        if shard not in self.made_dirs:
            if not self.check_mode:
                os.makedirs(os.path.join(self.dest, shard), mode=0o700, exist_ok=True)
                if self.owner:
                    os.chown(os.path.join(self.dest, uuid[0:2]), *self.owner)
                    os.chown(os.path.join(self.dest, shard), *self.owner)
            self.made_dirs.add(shard)

    def place(self, uuid: str, size: int | None) -> tuple:
        """Place one file; returns (origin, size) or (None, 0) when the source is missing.
        Copies are queued; call ``finish`` to wait for them."""
        rel = relpath(uuid)
        src = os.path.join(self.source, rel)
        target = os.path.join(self.dest, rel)
        if self.previous:
            prev = os.path.join(self.previous, rel)
            try:
                prev_size = os.stat(prev).st_size
            except FileNotFoundError:
                prev_size = None
            if prev_size is not None and (size is None or prev_size == size):
                self._ensure_dir(uuid)
                if not self.check_mode:
                    os.link(prev, target)
                return ORIGIN_PREVIOUS, prev_size
        if size is None:
            try:
                size = os.stat(src).st_size
            except FileNotFoundError:
                return None, 0
        self._ensure_dir(uuid)
        if self.check_mode:
            return (ORIGIN_LINK if self.link_source else ORIGIN_COPY), size
        if self.link_source:
            try:
                os.link(src, target)
            except FileNotFoundError:
                return None, 0
            if self.owner:
                os.chown(target, *self.owner)
            return ORIGIN_LINK, size
        self.pending.append((uuid, self.pool.submit(self._copy, src, target, self.owner)))
        return ORIGIN_COPY, size

    @staticmethod
    def _copy(src: str, target: str, owner: tuple | None = None) -> bool:
        """Copy through a temporary name; False when the source no longer exists."""
        tmp = target + ".part"
        try:
            shutil.copyfile(src, tmp)
            if owner:
                os.chown(tmp, *owner)
            os.rename(tmp, target)
            return True
        except BaseException as exc:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            if isinstance(exc, FileNotFoundError) and exc.filename == src:
                return False
            raise

    def finish(self, step: str) -> list:
        """Wait for the copies; returns the uuids whose source vanished before it was copied."""
        vanished = []
        try:
            for uuid, future in self.pending:
                if not future.result():
                    vanished.append(uuid)
        except OSError as exc:
            raise PacsError(step, os_error_cause(exc))
        finally:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pending = []
        return vanished


def read_state(path: str) -> dict:
    """{uuid: (size, origin)} from a state file written by the hot pass."""
    state = {}
    if not path or not os.path.exists(path):
        return state
    with open(path, "r", encoding="ascii") as handle:
        for line in handle:
            parts = line.rstrip("\n").split("\t")
            if len(parts) == 3:
                state[parts[0]] = (int(parts[1]), parts[2])
    return state


def write_state(path: str, state: dict) -> None:
    with _layout.atomic_writer(path, encoding="ascii") as handle:
        for uuid, (size, origin) in state.items():
            handle.write(f"{uuid}\t{size}\t{origin}\n")


def summarize(state: dict) -> dict:
    totals = {"files": 0, "bytes": 0, "new_files": 0, "new_bytes": 0, "linked_files": 0,
              "linked_bytes": 0, "copied_files": 0, "copied_bytes": 0}
    for size, origin in state.values():
        totals["files"] += 1
        totals["bytes"] += size
        if origin == ORIGIN_PREVIOUS:
            totals["linked_files"] += 1
            totals["linked_bytes"] += size
        else:
            totals["new_files"] += 1
            totals["new_bytes"] += size
            if origin == ORIGIN_COPY:
                totals["copied_files"] += 1
                totals["copied_bytes"] += size
    return totals


def _prepare(source: str, dest: str, previous: str | None, link_mode: str, check_mode: bool):
    if not os.path.isdir(source):
        raise PacsError("check storage", f"the storage folder {source} does not exist")
    if previous and not os.path.isdir(previous):
        previous = None
    if not check_mode:
        try:
            os.makedirs(dest, mode=0o700, exist_ok=True)
        except OSError as exc:
            raise PacsError("create backup storage folder", os_error_cause(exc))
    probe = dest
    while not os.path.isdir(probe) and os.path.dirname(probe) != probe:
        probe = os.path.dirname(probe)  # check mode: the folder does not exist yet
    same_fs = same_filesystem(source, probe)
    if link_mode == "hardlink" and not same_fs:
        raise PacsError("check storage", f"link_mode=hardlink, but {dest} is not on the filesystem of {source}")
    return previous, (same_fs if link_mode == "auto" else link_mode == "hardlink")


def hot_pass(source: str, dest: str, state_file: str, previous: str | None = None,
             link_mode: str = "auto", settle: float = 5.0, workers: int = 4,
             check_mode: bool = False) -> dict:
    previous, link_source = _prepare(source, dest, previous, link_mode, check_mode)
    state = read_state(state_file)
    placer = Placer(source, dest, previous, link_source, workers, check_mode)
    deferred = 0
    cutoff = time.time() - settle
    try:
        for uuid, entry in walk_storage(source):
            if uuid in state:
                continue
            try:
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue  # deleted by Orthanc since it was listed
            if st.st_mtime > cutoff:
                deferred += 1  # may still be being written: left to the delta pass
                continue
            origin, size = placer.place(uuid, st.st_size)
            if origin:
                state[uuid] = (size, origin)
    except OSError as exc:
        placer.pool.shutdown(wait=True, cancel_futures=True)
        raise PacsError("copy storage (hot pass)", os_error_cause(exc))
    for uuid in placer.finish("copy storage (hot pass)"):
        del state[uuid]  # deleted by Orthanc while the hot pass ran
    if not check_mode:
        write_state(state_file, state)
    result = summarize(state)
    result.update({"phase": "hot", "deferred_files": deferred, "hardlink_from_source": link_source,
                   "previous": previous})
    return result


def delta_pass(source: str, dest: str, state_file: str, wanted: dict, previous: str | None = None,
               link_mode: str = "auto", workers: int = 4, check_mode: bool = False,
               missing_out: list | None = None) -> dict:
    """``wanted``: {uuid: size} from the captured index. Every uuid that the source lacks is
    appended to ``missing_out`` when given."""
    previous, link_source = _prepare(source, dest, previous, link_mode, check_mode)
    state = read_state(state_file)
    removed = 0
    for uuid in [u for u in state if u not in wanted]:
        removed += 1
        del state[uuid]
        if not check_mode:
            try:
                os.unlink(os.path.join(dest, relpath(uuid)))
            except FileNotFoundError:
                pass
    placer = Placer(source, dest, previous, link_source, workers, check_mode)
    missing = []
    missing_live = []
    fetched = 0
    try:
        for uuid, size in wanted.items():
            known = state.get(uuid)
            if known and known[0] == size:
                continue
            if known and not check_mode:
                os.unlink(os.path.join(dest, relpath(uuid)))  # placed while still being written
            if not known and not os.path.lexists(os.path.join(source, relpath(uuid))):
                # the hot pass did not see it and it is not there now: the live archive lost it
                # (the previous backup may still hold it, and then this backup does too)
                missing_live.append(uuid)
            origin, placed = placer.place(uuid, size)
            if origin is None:
                missing.append(uuid)
                state.pop(uuid, None)
                continue
            fetched += 1
            state[uuid] = (placed, origin)
    except OSError as exc:
        placer.pool.shutdown(wait=True, cancel_futures=True)
        raise PacsError("copy storage (delta pass)", os_error_cause(exc))
    for uuid in placer.finish("copy storage (delta pass)"):
        missing.append(uuid)
        del state[uuid]
        fetched -= 1
    if not check_mode:
        write_state(state_file, state)
    if missing_out is not None:
        missing_out.extend(sorted(missing))
    recovered = sorted(set(missing_live) - set(missing))
    result = summarize(state)
    result["lost_in_live_storage"] = recovered  # listed by the index, gone live, kept from the previous backup
    result.update({"phase": "delta", "fetched_files": fetched, "removed_files": removed,
                   "missing_files": len(missing), "missing_examples": sorted(missing)[:10],

                   "hardlink_from_source": link_source, "previous": previous})
    return result

# -*- coding: utf-8 -*-
# Copyright: pacs.orthanc contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Restoring a backup onto a host: plan (what goes where, may it go there), apply (move the
current data aside, never delete it, put the backup in place) and roll back (put it back)."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil

from ansible_collections.pacs.orthanc.plugins.module_utils import _config, _layout, _sqlite, _storage
from ansible_collections.pacs.orthanc.plugins.module_utils._db import dump as db_dump
from ansible_collections.pacs.orthanc.plugins.module_utils._common import (
    PacsError, copy_tree_as_is, os_error_cause, resolve_ids, safe_relative)

__metaclass__ = type

ASIDE = ".pre-restore-"
_ID = re.compile(r"^[0-9A-Za-z._-]+$")


def version_tuple(text) -> tuple:
    numbers = re.findall(r"\d+", str(text or ""))
    return tuple(int(n) for n in numbers[:3]) if numbers else ()


def read_manifest(backup: str) -> dict:
    path = os.path.join(backup, _layout.MANIFEST)
    try:
        manifest = _layout.read_manifest(backup)
    except FileNotFoundError:
        raise PacsError("read backup", f"{backup} is not a complete backup (no manifest.json)")
    except _layout.ManifestError as exc:
        raise PacsError("read backup", str(exc))
    for key in ("files", "config_files"):
        unsafe = [name for name in (manifest.get(key) or {}) if not safe_relative(name)]
        if unsafe:
            raise PacsError("read backup", f"{path} names paths outside the backup ({unsafe[0]!r}): refusing "
                            "a manifest that could write outside the restore's targets")
    return manifest


def fitting_pre_upgrade(root: str, orthanc_version, database_version=None):
    """The newest pre-upgrade backup in the folder of backups ``root`` that an Orthanc of
    ``orthanc_version`` (and schema ``database_version``) can open: (path, manifest), or None."""
    running, schema = version_tuple(orthanc_version), version_tuple(database_version)
    for name in reversed(_layout.complete_backups(root)):
        path = os.path.join(root, name)
        try:
            manifest = _layout.read_manifest(path)
        except (OSError, ValueError):
            continue
        if not isinstance(manifest.get(_layout.PRE_UPGRADE), dict):
            continue
        written_by = version_tuple(manifest.get("orthanc", {}).get("version"))
        backup_schema = version_tuple(manifest.get("database_schema_version"))
        if not written_by or written_by > running or (schema and backup_schema and backup_schema > schema):
            continue
        return path, manifest
    return None


def _pre_upgrade_hint(backup: str, orthanc_version, database_version) -> str:
    root = os.path.dirname(backup)
    found = fitting_pre_upgrade(root, orthanc_version, database_version)
    if found is None:
        return f"; no pre-upgrade backup in {root} was written by Orthanc {orthanc_version} or older"
    path, manifest = found
    return (f"; the newest pre-upgrade backup that Orthanc {orthanc_version} can open is {path} (written by Orthanc "
            f"{manifest.get('orthanc', {}).get('version')}, schema {manifest.get('database_schema_version')}, "
            f"taken {manifest.get('started_at')}): restore it with orthanc_restore_backup={os.path.basename(path)}")


def _nested(inner: str, outer: str) -> bool:
    return inner == outer or inner.startswith(outer.rstrip("/") + "/")


def _container_target(backup: str, manifest: dict, container: dict) -> tuple:
    """For an Orthanc in a container: where the backup's index and storage go (the host folders
    behind the target container's volumes, as orthanc_info found them), and what the target's
    configuration says (its backend). Its configuration is not restored: it is made by the
    container (image, entrypoint, compose files), and kept in the backup's config/ to rebuild it."""
    info = container.get("described") or {}
    backend, storage = info.get("backend"), info.get("storage")
    backup_backend = manifest.get("backend", "sqlite")
    if backend and backend != backup_backend:
        raise PacsError("plan restore", f"the backup holds a {backup_backend} index but the Orthanc in container "
                        f"{container.get('name')} uses {backend}")
    described = {"backend": backup_backend, "storage": storage or "filesystem"}
    if manifest.get("storage_in_database"):
        described["storage"] = backup_backend
    for role in ("index", "storage"):
        described[f"{role}_directory"] = info.get(f"{role}_directory")
    wanted = [r for r, on in (("index", backup_backend == "sqlite"), ("storage", described["storage"] == "filesystem"))
              if on]
    mapped = {v["role"] for v in container.get("volumes") or []}
    missing = [r for r in wanted if r not in mapped]
    if missing:
        raise PacsError("plan restore", f"the {' and '.join(missing)} folder of Orthanc in container "
                        f"{container.get('name')} is on no volume: a restore there would be lost with the container")
    return described


def plan(backup: str, config_path: str, orthanc_version, database_version, force: bool,
         environ: dict | None = None, container: dict | None = None) -> dict:
    """Where the backup's configuration, index and storage go on this host, and whether the
    host's Orthanc can open the backup's index. ``environ`` is the environment Orthanc's service
    sees, for ${VAR} in the configuration (default: this process's). ``container``: the target is
    the Orthanc in that container (orthanc_info's ``container``, with ``described``: its backend,
    storage and host folders): index and storage go into its volumes, the configuration stays."""
    backup = os.path.realpath(backup)
    manifest = read_manifest(backup)
    if container:
        return _plan_targets(backup, manifest, _container_target(backup, manifest, container), orthanc_version,
                             database_version, force, {}, None, container)
    source = manifest.get("source", {})
    config_copy = os.path.join(backup, _layout.CONFIG)
    names = sorted(os.listdir(config_copy))
    is_folder = source.get("config_is_folder")
    if is_folder is None:
        is_folder = os.path.isdir(config_path) or len(names) != 1
    if is_folder:
        target_config, target_base = config_path, config_path
        read_from = config_copy
    else:
        if len(names) != 1:
            raise PacsError("plan restore", f"the backup holds {len(names)} configuration files but {config_path} is one file")
        target_config, target_base = config_path, os.path.dirname(config_path)
        read_from = os.path.join(config_copy, names[0])
    described = _config.describe(read_from, environ, base_dir=target_base)
    return _plan_targets(backup, manifest, described, orthanc_version, database_version, force,
                         {"config": target_config}, is_folder, None)


def _plan_targets(backup, manifest, described, orthanc_version, database_version, force, targets, is_folder,
                  container) -> dict:
    refusals = []
    backup_version = manifest.get("orthanc", {}).get("version")
    backup_schema = manifest.get("database_schema_version")
    if not version_tuple(orthanc_version):
        refusals.append("the version of this host's Orthanc is unknown")
    elif version_tuple(backup_version) > version_tuple(orthanc_version):
        refusals.append(f"the backup was written by Orthanc {backup_version}, this host runs {orthanc_version}: "
                        "an older Orthanc can break on a newer index")
    if database_version and backup_schema and version_tuple(backup_schema) > version_tuple(database_version):
        refusals.append(f"the backup's index has schema {backup_schema}, this host's Orthanc expects {database_version}")
    database = None
    if described["backend"] != "sqlite":
        found = db_dump.find_dump(backup)
        if not found:
            raise PacsError("plan restore", f"the configuration in the backup uses a {described['backend']} index "
                            "but the backup holds no database dump")
        if found[0] != described["backend"]:
            raise PacsError("plan restore", f"the backup holds a {found[0]} dump but its configuration uses "
                            f"{described['backend']}")
        database = {"engine": found[0], "format": found[1], "dump": found[2],
                    "storage_in_database": described["storage"] != "filesystem"}
    elif described["storage"] != "filesystem":
        raise PacsError("plan restore", "a SQLite index with the files in a database cannot be restored")
    if refusals and not force:
        hint = _pre_upgrade_hint(backup, orthanc_version, database_version) if version_tuple(orthanc_version) else ""
        raise PacsError("plan restore", "; ".join(refusals) + hint + ". Restore onto an Orthanc at least as new, "
                        "or set force to restore anyway")
    if described["backend"] == "sqlite":
        targets["index"] = described["index_directory"]
    if described["storage"] == "filesystem":
        targets["storage"] = described["storage_directory"]
    return {"backup": backup, "manifest": manifest, "config_is_folder": bool(is_folder), "targets": targets,
            "refusals_overridden": refusals, "counts": manifest.get("counts", {}), "database": database,
            "deleted_during_capture": manifest.get("storage", {}).get("deleted_during_capture") or [],
            # mount sources (a volume's _data, a bind-mounted folder): emptied and refilled, never moved
            "keep_folders": sorted((container or {}).get("keep_folders") or [])}


def _aside_roots(targets: dict) -> list:
    """The paths to move aside: no path inside another one that moves."""
    paths = sorted(set(targets.values()), key=len)
    roots = []
    for path in paths:
        if not any(_nested(path, root) for root in roots):
            roots.append(path)
    return roots


def _data_owner(plan_result: dict, owner: str | None, group: str | None) -> tuple:
    if owner or group:
        recorded = plan_result["manifest"].get("source", {}).get("storage_owner") or {}
        return resolve_ids(owner or recorded.get("owner", "root"), group or recorded.get("group", "root"))
    recorded = plan_result["manifest"].get("source", {}).get("storage_owner")
    if recorded:
        return resolve_ids(recorded["owner"], recorded["group"])
    return 0, 0


def _write_journal(path: str, journal: dict) -> None:
    _layout.write_json_atomic(path, journal, sync_dir=True)


def apply(plan_result: dict, restore_id: str, journal_path: str, link: bool, owner: str | None = None,
          group: str | None = None, workers: int = 4, progress=None) -> dict:
    """Move the current data aside (rename, never delete), then restore configuration, index
    and storage. Each move is written to a journal first, so that ``rollback`` undoes exactly
    what happened, even after this process was killed. Orthanc must be stopped. ``progress`` (a
    _progress.Progress) counts the storage files put in place, of the manifest's."""
    if not _ID.match(restore_id):
        raise PacsError("restore", f"invalid restore id {restore_id!r}")
    targets, backup = plan_result["targets"], plan_result["backup"]
    live_index = os.path.join(targets["index"], "index") if targets.get("index") else None
    holder = _sqlite.lock_holder(live_index) if live_index and os.path.exists(live_index) else None
    if holder is not None:
        raise PacsError("restore", f"process {holder} holds {live_index}: stop Orthanc first")
    uid, gid = _data_owner(plan_result, owner, group)
    journal = {"restore_id": restore_id, "backup": backup, "targets": targets, "roots": []}
    try:
        for path in _aside_roots(targets):
            existed = os.path.lexists(path)
            aside = path.rstrip("/") + ASIDE + restore_id if existed else None
            if aside and os.path.lexists(aside):
                raise PacsError("move current data aside", f"{aside} exists already")
            entry = {"path": path, "aside": aside}
            if path in plan_result.get("keep_folders", []):
                entry["mode"] = "contents"  # the folder stays (a volume's _data): its contents move
            journal["roots"].append(entry)
            _write_journal(journal_path, journal)
            if aside:
                _move_aside(path, aside, entry, journal, journal_path)
        # configuration, as it was (modes and owners by name); none for a container (its own)
        config_copy = os.path.join(backup, _layout.CONFIG)
        if "config" not in targets:
            pass
        elif plan_result["config_is_folder"]:
            copy_tree_as_is(config_copy, targets["config"])
        else:
            os.makedirs(os.path.dirname(targets["config"]), exist_ok=True)
            name = os.listdir(config_copy)[0]
            shutil.copy2(os.path.join(config_copy, name), targets["config"])
            st = os.stat(os.path.join(config_copy, name))
            os.chown(targets["config"], st.st_uid, st.st_gid)
        for rel, info in (plan_result["manifest"].get("config_files", {}) if "config" in targets else {}).items():
            dest = os.path.join(targets["config"], rel) if plan_result["config_is_folder"] else targets["config"]
            if os.path.lexists(dest):
                os.lchown(dest, *resolve_ids(info["owner"], info["group"]))
        # index and storage, owned by Orthanc's user
        for folder in (targets.get("index"), targets.get("storage")):
            if folder:
                os.makedirs(folder, mode=0o750, exist_ok=True)
                os.chown(folder, uid, gid)
        if targets.get("index"):
            index_target = os.path.join(targets["index"], "index")
            index_source = os.path.join(backup, _layout.INDEX, "index")
            if not _sqlite.clone_file(index_source, index_target):  # a reflink where the filesystem can
                shutil.copyfile(index_source, index_target)
            os.chmod(index_target, 0o640)
            os.chown(index_target, uid, gid)
        files = 0
        if targets.get("storage"):
            placer = _storage.Placer(os.path.join(backup, _layout.STORAGE), targets["storage"], None, link, workers,
                                     owner=(uid, gid))
            if progress is not None:
                stored = plan_result["manifest"].get("storage") or {}
                progress.totals(stored.get("files"), stored.get("bytes"), estimated=True)
                placer.on_done = progress.add
            for uuid, _entry in _storage.walk_storage(os.path.join(backup, _layout.STORAGE)):
                placer.place(uuid, None)
                files += 1
            if placer.finish("restore storage"):
                raise PacsError("restore storage", "files vanished from the backup while it was restored")
    except OSError as exc:
        raise PacsError("restore", os_error_cause(exc))
    return {"journal": journal_path, "moved_aside": [r for r in journal["roots"] if r["aside"]],
            "storage_files": files, "targets": targets, "owner": [uid, gid]}


def _empty(folder: str) -> None:
    for name in os.listdir(folder):
        child = os.path.join(folder, name)
        if os.path.isdir(child) and not os.path.islink(child):
            shutil.rmtree(child)
        else:
            os.unlink(child)


def _move_aside(path: str, aside: str, entry: dict, journal: dict, journal_path: str) -> None:
    """Rename ``path`` to ``aside``; a folder that cannot be renamed (a mount point, a folder of
    a container's image layer: EBUSY, EXDEV) is copied aside instead, then emptied in place. The
    journal says which, and when the copy was whole, so that a rollback knows what to do."""
    if entry.get("mode") == "contents":
        os.mkdir(aside, 0o700)
        for name in sorted(os.listdir(path)):
            os.rename(os.path.join(path, name), os.path.join(aside, name))
        entry["contents_moved"] = True
        _write_journal(journal_path, journal)
        return
    try:
        os.rename(path, aside)
        return
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.EBUSY) or not os.path.isdir(path):
            raise
    entry["mode"] = "copied"
    _write_journal(journal_path, journal)
    copy_tree_as_is(path, aside)
    entry["copy_complete"] = True
    _write_journal(journal_path, journal)
    _empty(path)


def rollback(journal_path: str) -> dict:
    """Undo a restore from its journal: remove what it created, move back what it set aside.
    A path whose move aside never happened is the live data: it is left alone."""
    try:
        with open(journal_path, "r", encoding="utf-8") as handle:
            journal = json.load(handle)
    except FileNotFoundError:
        return {"changed": False, "removed": [], "moved_back": [], "journal": None}
    removed, moved_back = [], []
    try:
        for root in reversed(journal["roots"]):
            path, aside = root["path"], root["aside"]
            if aside and not os.path.lexists(aside):
                continue  # never moved: still the live data
            if root.get("mode") == "contents":
                # whatever the restore put there goes; what was set aside comes back (a move that
                # was cut short left some names in place: they are the live data, kept)
                aside_names = set(os.listdir(aside))
                for name in os.listdir(path):
                    if name in aside_names or root.get("contents_moved"):
                        child = os.path.join(path, name)
                        if os.path.isdir(child) and not os.path.islink(child):
                            shutil.rmtree(child)
                        else:
                            os.unlink(child)
                for name in sorted(aside_names):
                    os.rename(os.path.join(aside, name), os.path.join(path, name))
                os.rmdir(aside)
                removed.append(path)
                moved_back.append(path)
                continue
            if root.get("mode") == "copied":
                if not root.get("copy_complete"):
                    shutil.rmtree(aside)  # the copy was cut short: the live data was never emptied
                    continue
                _empty(path)
                copy_tree_as_is(aside, path)
                shutil.rmtree(aside)
                removed.append(path)
                moved_back.append(path)
                continue
            if os.path.lexists(path):
                if os.path.isdir(path) and not os.path.islink(path):
                    shutil.rmtree(path)
                else:
                    os.unlink(path)
                removed.append(path)
            if aside:
                os.rename(aside, path)
                moved_back.append(path)
    except OSError as exc:
        raise PacsError("roll back restore", os_error_cause(exc))
    os.unlink(journal_path)
    return {"changed": bool(removed or moved_back), "removed": removed, "moved_back": moved_back,
            "journal": journal_path}

# -*- coding: utf-8 -*-
# Copyright: pacs.orthanc contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Point restore: put selected patients, studies or series of a backup back into the running
production Orthanc, over its REST API, without stopping it.

The backup is served by a scratch Orthanc (``_drill.Scratch``); the selection is resolved there
(exact matches only); each instance is looked up in production by its Orthanc id (the same in
every Orthanc: a hash of its DICOM UIDs); the missing ones are fetched from the scratch Orthanc,
checked against the MD5 the backup's index records, POSTed to production, and checked again
there (``/instances/<id>/attachments/dicom/md5``). Decide, then act: nothing is sent before the
whole selection was found. A failure while sending deletes again what this run added, so that
a failed run leaves production as it was."""

from __future__ import annotations

import hashlib
import os
import urllib.error

from ansible_collections.pacs.orthanc.plugins.module_utils import _drill, _probe, _rest
from ansible_collections.pacs.orthanc.plugins.module_utils._common import PacsError

__metaclass__ = type

# option: (Orthanc level, DICOM tag, words for a message)
SELECTORS = {
    "patient_ids": ("Patient", "PatientID", "patient with PatientID"),
    "study_uids": ("Study", "StudyInstanceUID", "study with StudyInstanceUID"),
    "accession_numbers": ("Study", "AccessionNumber", "study with AccessionNumber"),
    "series_uids": ("Series", "SeriesInstanceUID", "series with SeriesInstanceUID"),
}
LEVEL_PATHS = {"Patient": "patients", "Study": "studies", "Series": "series", "Instance": "instances"}


class Production:
    """The production Orthanc, through its REST API."""

    def __init__(self, url: str, username: str | None, password: str | None, timeout: float = 60):
        self.url, self.username, self.password, self.timeout = url, username, password, timeout
        self.session = _rest.Session(url, username, password, timeout)

    def check_answers(self, consequence: str = "nothing was restored") -> dict:
        record = _probe.ask(self.url, self.username, self.password, min(self.timeout, 10))
        if record["state"] != _probe.ANSWERING:
            raise PacsError("ask production Orthanc", f"{_probe.sentence(record)}: {consequence}",
                            orthanc_state=record["state"])
        return record["system"]

    def md5(self, instance: str):
        """The MD5 production records for the instance's DICOM file; None when it does not hold
        the instance."""
        try:
            self.session.request(f"/instances/{instance}")
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                return None
            raise
        try:
            return self.session.request(f"/instances/{instance}/attachments/dicom/md5").decode("ascii").strip()
        except urllib.error.HTTPError:  # StoreMD5ForAttachments false: hash what it serves
            return hashlib.md5(self.session.request(f"/instances/{instance}/file")).hexdigest()

    def store(self, data: bytes) -> dict:
        return self.session.post("/instances", data, content_type="application/dicom")

    def delete(self, instance: str) -> None:
        self.session.request(f"/instances/{instance}", "DELETE")


def _find_exact(scratch, level: str, tag: str, value: str) -> list:
    """Orthanc ids at ``level`` whose ``tag`` is exactly ``value`` (a '*' or '?' in it is no wildcard)."""
    answers = scratch.post("/tools/find", {"Level": level, "Query": {tag: value}, "Expand": True})
    found = []
    for resource in answers or []:
        tags = dict(resource.get("PatientMainDicomTags") or {}, **(resource.get("MainDicomTags") or {}))
        if tags.get(tag) == value:
            found.append(resource["ID"])
    return found


def _level_of(scratch, orthanc_id: str):
    for level, path in LEVEL_PATHS.items():
        try:
            scratch.get(f"/{path}/{_rest.quoted(orthanc_id)}")
            return level
        except urllib.error.HTTPError as exc:
            if exc.code != 404:
                raise
    return None


def _instances_of(scratch, level: str, orthanc_id: str) -> list:
    if level == "Instance":
        return [orthanc_id]
    return sorted(i["ID"] for i in scratch.get(f"/{LEVEL_PATHS[level]}/{orthanc_id}/instances"))


def _describe(scratch, level: str, orthanc_id: str) -> dict:
    """A few tags of a resource, for the report."""
    data = scratch.get(f"/{LEVEL_PATHS[level]}/{orthanc_id}")
    tags = dict(data.get("PatientMainDicomTags") or {}, **(data.get("MainDicomTags") or {}))
    keep = ("PatientID", "PatientName", "StudyInstanceUID", "AccessionNumber", "StudyDate", "StudyDescription",
            "SeriesInstanceUID", "Modality", "SOPInstanceUID")
    return dict({"level": level, "orthanc_id": orthanc_id}, **{k: tags[k] for k in keep if k in tags})


def resolve(scratch, selection: dict, backup: str) -> list:
    """One entry per requested value: what it matched in the backup and which instances. Fails,
    naming every value the backup lacks, before anything is sent."""
    items, lacking = [], []
    for option, values in selection.items():
        for value in values or []:
            if option == "orthanc_ids":
                level = _level_of(scratch, value)
                ids = [value] if level else []
                words = "resource with Orthanc id"
            else:
                level, tag, words = SELECTORS[option]
                ids = _find_exact(scratch, level, tag, value)
            if not ids:
                lacking.append(f"no {words} {value}")
                continue
            instances = sorted({i for resource in ids for i in _instances_of(scratch, level, resource)})
            items.append({"selector": option, "value": value, "level": level,
                          "resources": [_describe(scratch, level, r) for r in ids], "instances": instances})
    if lacking:
        raise PacsError("find the selection in the backup", f"the backup {backup} holds {'; '.join(lacking)}: "
                        "nothing was restored (production was not changed)")
    return items


def restore_items(backup: str, selection: dict, production: Production, workdir: str, orthanc_binary: str,
                  check_mode: bool = False, start_timeout: float = 60) -> dict:
    system = production.check_answers()
    # started on the index alone: only the files of the selection are placed, once it is known
    scratch = _drill.Scratch(backup, workdir, orthanc_binary, keep=False, start_timeout=start_timeout,
                             all_files=False)
    result = {"backup": scratch.backup, "backup_started_at": scratch.manifest.get("started_at"),
              "production": production.url, "production_version": system.get("Version"),
              "check_mode": check_mode, "restored": 0, "already_present": 0, "differing": 0, "verified": 0,
              "restored_instances": [], "differing_instances": []}
    with scratch:
        items = resolve(scratch, selection, scratch.backup)
        expected = scratch.index_md5s()
        wanted = sorted({i for item in items for i in item["instances"]})
        missing, present = [], {}
        try:
            for instance in wanted:
                found = production.md5(instance)
                if found is None:
                    missing.append(instance)
                else:
                    present[instance] = found
        except _rest.REQUEST_ERRORS as exc:
            raise PacsError("compare with production", f"production Orthanc at {production.url}: "
                            f"{_rest.failure(exc)}: nothing was restored")
        differing = sorted(i for i, md5 in present.items() if md5 != expected.get(i))
        if not check_mode and missing:
            scratch.place(_drill.attachment_uuids(os.path.join(scratch.backup, "index", "index"), missing))
        for item in items:
            item["already_present"] = sum(1 for i in item["instances"] if i in present)
            item["to_restore"] = sum(1 for i in item["instances"] if i not in present)
            item["instance_count"] = len(item.pop("instances"))
        result.update({"items": items, "instances": len(wanted), "already_present": len(present),
                       "differing": len(differing), "differing_instances": differing[:20],
                       "to_restore": len(missing)})
        if check_mode or not missing:
            result["changed"] = bool(missing)
            return result
        added = []
        try:
            for instance in missing:
                step = "fetch from the backup"
                data = scratch.file(instance)
                if hashlib.md5(data).hexdigest() != expected.get(instance):
                    raise PacsError(step, f"the scratch Orthanc served instance {instance} with another MD5 than "
                                    "the backup's index records: the backup is damaged (run backup_verify)")
                step = "send to production"
                answer = production.store(data) or {}
                if answer.get("ID") != instance:
                    raise PacsError(step, f"production stored instance {instance} as {answer.get('ID')} "
                                    f"({answer.get('Status')})")
                if answer.get("Status") != "AlreadyStored":
                    added.append(instance)
                step = "check the restored instance"
                if production.md5(instance) != expected[instance]:
                    raise PacsError(step, f"production serves instance {instance} with another MD5 than the backup")
                result["verified"] += 1
        except (PacsError,) + _rest.REQUEST_ERRORS as exc:
            cause = exc.cause if isinstance(exc, PacsError) else f"production Orthanc at {production.url}: {_rest.failure(exc)}"
            undone, left = _undo(production, added)
            tail = (f"the {len(undone)} instances this run had added were deleted again: production is as before"
                    if not left else f"{len(left)} instances this run added could not be deleted again: {', '.join(left[:5])}")
            raise PacsError(exc.step if isinstance(exc, PacsError) else step, f"{cause}; {tail}",
                            restored_then_removed=undone, left_in_production=left)
        result.update({"restored": len(added), "restored_instances": added, "changed": bool(added)})
    return result


def _undo(production: Production, added: list) -> tuple:
    undone, left = [], []
    for instance in reversed(added):
        try:
            production.delete(instance)
            undone.append(instance)
        except _rest.REQUEST_ERRORS:
            left.append(instance)
    return undone, left

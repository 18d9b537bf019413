# -*- coding: utf-8 -*-
# Copyright: pacs.orthanc contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Reconciliation after a restore: ask the DICOM modalities configured in Orthanc which studies
they hold since a date (C-FIND through Orthanc's REST API, ``POST /modalities/<m>/query``), say
per modality which of them the restored Orthanc lacks or holds with fewer instances, and on
request pull them back (C-MOVE, ``POST /queries/<id>/answers/<n>/retrieve``, to Orthanc's own
AET: the modality must know Orthanc as a move destination), then compare again."""

from __future__ import annotations

import datetime
import re

from ansible_collections.pacs.orthanc.plugins.module_utils import _layout, _rest
from ansible_collections.pacs.orthanc.plugins.module_utils._common import PacsError

__metaclass__ = type

QUERY_TAGS = ("StudyInstanceUID", "StudyDate", "PatientID", "AccessionNumber", "NumberOfStudyRelatedInstances")


def study_date(since: str) -> str:
    """The DICOM date (YYYYMMDD) of ``since``: a DICOM date, an ISO date, or an ISO time (UTC)."""
    text = str(since).strip()
    try:
        if re.match(r"^\d{8}$", text):
            return datetime.datetime.strptime(text, "%Y%m%d").strftime("%Y%m%d")
        return _layout.parse_time(text).astimezone(datetime.timezone.utc).strftime("%Y%m%d")
    except ValueError:
        raise PacsError("read the time window", f"since={since!r} is neither a date (YYYYMMDD, YYYY-MM-DD) nor an "
                        "ISO time")


class Reconciler:
    def __init__(self, production):
        self.production = production  # _items.Production: its session waits up to its timeout per answer

    def _get(self, path: str):
        return self.production.session.get(path)

    def _post(self, path: str, data):
        return self.production.session.post(path, data)

    def modalities(self, wanted: list) -> list:
        try:
            configured = sorted(self._get("/modalities"))
        except _rest.REQUEST_ERRORS as exc:
            raise PacsError("list the modalities", f"Orthanc at {self.production.url}: {_rest.failure(exc)}")
        if not wanted:
            if not configured:
                raise PacsError("list the modalities", f"Orthanc at {self.production.url} has no DicomModalities "
                                "configured: there is nobody to ask")
            return configured
        unknown = [m for m in wanted if m not in configured]
        if unknown:
            raise PacsError("list the modalities", f"{', '.join(unknown)} not configured in Orthanc at "
                            f"{self.production.url} (configured: {', '.join(configured) or 'none'})")
        return list(wanted)

    def ask(self, modality: str, since: str) -> dict:
        """C-FIND at study level: {"query": id, "answers": [{index, tags...}]}."""
        query = {tag: "" for tag in QUERY_TAGS}
        query["StudyDate"] = f"{since}-"
        answer = self._post(f"/modalities/{_rest.quoted(modality)}/query", {"Level": "Study", "Query": query})
        found = self._get(f"/queries/{answer['ID']}/answers?expand&simplify")
        return {"query": answer["ID"], "answers": [dict(a, index=i) for i, a in enumerate(found or [])]}

    def local_count(self, uid: str):
        """Instances the restored Orthanc holds of the study (None: it does not hold it)."""
        ids = self._post("/tools/find", {"Level": "Study", "Query": {"StudyInstanceUID": uid}})
        if not ids:
            return None
        return sum(int(self._get(f"/studies/{i}/statistics").get("CountInstances", 0)) for i in ids)

    def compare(self, modality: str, since: str) -> dict:
        asked = self.ask(modality, since)
        lacking = []
        for answer in asked["answers"]:
            uid = answer.get("StudyInstanceUID")
            if not uid:
                continue
            remote = answer.get("NumberOfStudyRelatedInstances")
            remote = int(remote) if str(remote or "").strip().isdigit() else None
            local = self.local_count(uid)
            if local is None or (remote is not None and local < remote):
                lacking.append({"study_uid": uid, "study_date": answer.get("StudyDate"),
                                "patient_id": answer.get("PatientID"), "accession_number": answer.get("AccessionNumber"),
                                "instances_modality": remote, "instances_orthanc": local or 0,
                                "state": "missing" if local is None else "incomplete", "index": answer["index"]})
        return {"modality": modality, "since": since, "studies": len(asked["answers"]), "lacking": lacking,
                "query": asked["query"], "error": None}

    def retrieve(self, report: dict, aet: str) -> list:
        """C-MOVE each lacking study of ``report`` to ``aet``; returns the failures."""
        failures = []
        for study in report["lacking"]:
            try:
                self._post(f"/queries/{report['query']}/answers/{study['index']}/retrieve",
                           {"TargetAet": aet, "Synchronous": True})
            except _rest.REQUEST_ERRORS as exc:
                failures.append({"study_uid": study["study_uid"], "cause": _rest.failure(exc)})
        return failures


def _public(report: dict) -> dict:
    out = {k: v for k, v in report.items() if k != "query"}
    out["lacking"] = [{k: v for k, v in s.items() if k != "index"} for s in report.get("lacking", [])]
    return out


def reconcile(production, modalities: list, since: str, retrieve: bool, check_mode: bool = False) -> dict:
    system = production.check_answers("no modality was asked")
    reconciler = Reconciler(production)
    names = reconciler.modalities(modalities)
    day = study_date(since)
    reports, errors = [], []
    for name in names:
        try:
            reports.append(reconciler.compare(name, day))
        except _rest.REQUEST_ERRORS as exc:
            cause = _rest.failure(exc)
            reports.append({"modality": name, "since": day, "studies": None, "lacking": [], "error": cause})
            errors.append(f"modality {name}: {cause}")
    result = {"since": day, "production": production.url, "aet": system.get("DicomAet"), "retrieved": [],
              "retrieve_failures": [], "changed": False}
    if retrieve and not check_mode:
        for report in reports:
            if report["error"] or not report["lacking"]:
                continue
            failures = reconciler.retrieve(report, system.get("DicomAet") or "ORTHANC")
            failed = {f["study_uid"] for f in failures}
            result["retrieve_failures"] += [dict(f, modality=report["modality"]) for f in failures]
            result["retrieved"] += [{"modality": report["modality"], "study_uid": s["study_uid"]}
                                    for s in report["lacking"] if s["study_uid"] not in failed]
        result["before_retrieve"] = [_public(r) for r in reports]
        if result["retrieved"]:
            result["changed"] = True
        if result["retrieved"] or result["retrieve_failures"]:
            try:
                reports = [reconciler.compare(r["modality"], day) if not r["error"] else r for r in reports]
            except _rest.REQUEST_ERRORS as exc:
                raise PacsError("compare again after the retrieve", _rest.failure(exc), **result)
    elif retrieve:
        result["would_retrieve"] = sum(len(r["lacking"]) for r in reports)
    result["modalities"] = [_public(r) for r in reports]
    result["lacking"] = sum(len(r["lacking"]) for r in reports)
    if errors:
        raise PacsError("ask the modalities (C-FIND)", "; ".join(errors), **result)
    return result

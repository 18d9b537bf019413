"""Restoring what was lost, not everything, against real Orthanc servers: pre-upgrade backups that
retention keeps and the restore's version guard names; point restore of one study into a running
production Orthanc; reconciliation with a modality after a restore."""

from __future__ import annotations

import datetime
import hashlib
import io
import json
import re
import threading
import time

import pydicom
import pytest

from tests.support import checks, dicomgen
from tests.support.orthanc_server import free_port
from tests.support.playbook import local_host, run_module, run_playbook, write_inventory

pytestmark = pytest.mark.slow


def test_pre_upgrade_backup_outlives_retention_and_the_guard_names_it(servers, tmp_path):
    server = servers("upgrade")
    checks.store_studies(server, tmp_path, patients=1, via="rest", instances=1)
    root = tmp_path / "backups"
    inventory = write_inventory(tmp_path / "inventory.json", {
        "upgrade": local_host(server, root, orthanc_backup_settle_seconds=0, orthanc_backup_keep=1)})

    def backup(**extra):
        result = run_playbook(inventory, extra_vars=extra)
        assert result.returncode == 0, result.stdout
        return (root / "latest").resolve().name

    older = backup()
    marked = backup(orthanc_backup_pre_upgrade=True, orthanc_backup_pre_upgrade_keep_days=30)
    manifest = checks.read_manifest(root / marked)
    marker = manifest["pre_upgrade"]
    system = server.rest("GET", "/system")
    assert marker["orthanc_version"] == system["Version"] == "1.10.1"
    assert marker["plugins"] == {}  # the test Orthancs load no plugin
    assert marker["database_version"] == str(system["DatabaseVersion"]) == marker["index_schema_version"]
    assert "index_schema_patch_level" in marker
    assert marker["keep_days"] == 30 and marker["keep_until"][:10] > manifest["started_at"][:10]
    assert "pre_upgrade" not in checks.read_manifest(root / older)
    newer = backup()
    assert checks.complete_backups(root) == [marked, newer]  # the older ordinary neighbour went, not it
    newest = backup()
    assert checks.complete_backups(root) == [marked, newest]  # and the newer one too

    # Only one Orthanc version is installed here: "a backup from a newer Orthanc" is the newest
    # backup with its manifest saying so (the guard reads the manifest)
    path = root / newest / "manifest.json"
    faked = json.loads(path.read_text())
    faked["orthanc"]["version"] = "1.12.9"
    path.write_text(json.dumps(faked))
    # the restore playbook's step 'Plan the restore' (test_restore.py runs the whole playbook into it)
    refused = run_module("backup_restore", {"state": "planned", "backup": str(root / "latest"),
                                            "config_path": str(server.config_path), "orthanc_version": "1.10.1",
                                            "database_version": "6"})
    assert refused["failed"] and refused["step"] == "plan restore"
    assert "written by Orthanc 1.12.9, this host runs 1.10.1" in refused["cause"]
    assert f"the newest pre-upgrade backup that Orthanc 1.10.1 can open is {root / marked}" in refused["cause"]
    assert f"orthanc_restore_backup={marked}" in refused["cause"]


def md5s_over_rest(server) -> dict:
    """{instance id: MD5 that Orthanc's REST API gives for its DICOM file}."""
    return {i: server.instance_md5(i) for i in server.instances()}


def recap_changed(output: str, host: str) -> int:
    return int(re.search(rf"^{host}\s*:.*changed=(\d+)", output, re.M).group(1))


def test_point_restore_of_a_deleted_study_while_production_answers(servers, tmp_path):
    server = servers("prod")
    checks.store_studies(server, tmp_path, patients=3, via="rest")
    root = tmp_path / "backups"
    inventory = write_inventory(tmp_path / "inventory.json", {
        "prod": local_host(server, root, orthanc_backup_settle_seconds=0,
                           orthanc_restore_items_workdir=str(tmp_path / "scratch"))})
    assert run_playbook(inventory).returncode == 0
    before, pid = md5s_over_rest(server), server.pid()
    assert len(before) == 9
    study = server.rest("GET", "/studies?expand")[0]
    uid = study["MainDicomTags"]["StudyInstanceUID"]
    lost = {i["ID"] for i in server.rest("GET", f"/studies/{study['ID']}/instances")}
    series = server.rest("GET", f"/series/{study['Series'][0]}")["MainDicomTags"]["SeriesInstanceUID"]
    answers, stop = [], threading.Event()

    def poll():
        while not stop.is_set():
            answers.append(server.answers())
            time.sleep(0.05)

    poller = threading.Thread(target=poll)
    poller.start()
    try:
        server.rest("DELETE", f"/studies/{study['ID']}")
        after_loss = md5s_over_rest(server)
        assert set(before) - set(after_loss) == lost and len(lost) == 3
        selection = {"orthanc_restore_study_uids": [uid]}

        # check mode, the study named every way there is: the same 3 instances
        tags = study["MainDicomTags"]
        every_way = {"orthanc_restore_study_uids": [uid], "orthanc_restore_accession_numbers": [tags["AccessionNumber"]],
                     "orthanc_restore_patient_ids": [study["PatientMainDicomTags"]["PatientID"]],
                     "orthanc_restore_series_uids": [series], "orthanc_restore_orthanc_ids": [study["ID"]]}
        listed = run_playbook(inventory, playbook="restore_items.yml", extra_vars=every_way, check=True)
        assert listed.returncode == 0, listed.stdout
        assert f"prod: would restore 3 of 3 instances from {(root / 'latest').resolve()}" in listed.stdout
        assert all(value[0] in listed.stdout for value in every_way.values())
        assert md5s_over_rest(server) == after_loss

        restored = run_playbook(inventory, playbook="restore_items.yml", extra_vars=selection)
        assert restored.returncode == 0, restored.stdout
        assert "prod: restored 3 of 3 instances" in restored.stdout and "(3 with the MD5 of the backup)" in restored.stdout
        assert md5s_over_rest(server) == before  # the study is back, byte for byte; the others untouched

        # one value a line, as an AWX survey's textarea gives it
        again = run_playbook(inventory, playbook="restore_items.yml", extra_vars={"orthanc_restore_study_uids": f"{uid}\n"})
        assert again.returncode == 0, again.stdout
        assert "prod: restored 0 of 3 instances" in again.stdout and "3 already in production" in again.stdout
        assert recap_changed(again.stdout, "prod") == 0

        unknown = run_playbook(inventory, playbook="restore_items.yml",
                               extra_vars={"orthanc_restore_study_uids": [uid, "1.2.3.4.5"]})
        assert unknown.returncode != 0
        line = re.search(r"Point restore of prod failed at step .*", unknown.stdout).group(0)
        assert "'find the selection in the backup'" in line
        assert "holds no study with StudyInstanceUID 1.2.3.4.5" in line and "as it was before this run" in line
    finally:
        stop.set()
        poller.join()
    assert len(answers) > 20 and all(answers)  # production answered throughout
    assert server.pid() == pid and md5s_over_rest(server) == before
    assert not any((tmp_path / "scratch").iterdir())  # every scratch Orthanc is gone

    closed = write_inventory(tmp_path / "closed.json", {
        "prod": local_host(server, root, orthanc_url=f"http://127.0.0.1:{free_port()}")})
    unreachable = run_playbook(closed, playbook="restore_items.yml", extra_vars={"orthanc_restore_study_uids": [uid]})
    line = re.search(r"Point restore of prod failed at step .*", unreachable.stdout).group(0)
    assert "'ask production Orthanc'" in line and "ORTHANC IS NOT ANSWERING" in line


def datasets(server) -> dict:
    """{SOPInstanceUID: (MD5 of the pixel data, StudyDate)} of every instance."""
    found = {}
    for instance in server.instances():
        ds = pydicom.dcmread(io.BytesIO(server.instance_file(instance)))
        found[ds.SOPInstanceUID] = (hashlib.md5(ds.PixelData).hexdigest(), ds.StudyDate)
    return found


def lacking_line(output: str, host: str, modality: str) -> str:
    return re.search(rf'"msg": "{host} {modality}: .*"', output).group(0)


def test_reconcile_with_a_modality_after_a_full_restore(servers, tmp_path):
    prod_dicom, modality_dicom = free_port(), free_port()
    pacs = servers("pacs", dicom_port=prod_dicom,
                   extra_config={"DicomModalities": {"scanner": ["MODALITY", "127.0.0.1", modality_dicom]}})
    scanner = servers("scanner", dicom_port=modality_dicom, extra_config={
        "DicomAet": "MODALITY", "DicomModalities": {"pacs": ["ORTHANC", "127.0.0.1", prod_dicom]}})
    today = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d")

    def study(name, date=today, instances=2):
        files = dicomgen.make_study(tmp_path / name, name, f"Test^{name}", instances_per_series=instances, study_date=date)
        for path in files:
            scanner.store_rest(path)  # the modality holds every study it made
        return files

    def uid(files):
        return pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID

    kept, grown = study("kept"), study("grown", instances=3)
    study("old", date="20240101")  # outside the window: never reported
    for path in kept + grown[:2]:
        pacs.store_rest(path)
    root = tmp_path / "backups"
    inventory = write_inventory(tmp_path / "inventory.json", {
        "pacs": local_host(pacs, root, orthanc_backup_settle_seconds=0)})
    assert run_playbook(inventory).returncode == 0
    # after the backup the modality sends two new studies and the last instance of "grown"
    late = [study("late1"), study("late2")]
    for path in late[0] + late[1] + grown[2:]:
        pacs.store_rest(path)
    assert run_playbook(inventory, playbook="restore.yml", extra_vars={"orthanc_restore_confirm": True}).returncode == 0
    assert pacs.statistics()["CountInstances"] == 4  # what the backup held

    report = run_playbook(inventory, playbook="reconcile.yml")
    assert report.returncode == 0, report.stdout
    line = lacking_line(report.stdout, "pacs", "scanner")
    assert f"4 studies since {today}, 3 lacking" in line
    assert set(re.findall(r"\d+(?:\.\d+){5,}", line)) == {uid(late[0]), uid(late[1]), uid(grown)}
    assert f"{uid(grown)} (incomplete, {today}, 2 of 3 instances)" in line
    assert f"{uid(late[0])} (missing, {today}, 0 of 2 instances)" in line

    dry = run_playbook(inventory, playbook="reconcile.yml", extra_vars={"orthanc_reconcile_retrieve": True}, check=True)
    assert dry.returncode == 0 and pacs.statistics()["CountInstances"] == 4

    pulled = run_playbook(inventory, playbook="reconcile.yml", extra_vars={"orthanc_reconcile_retrieve": True})
    assert pulled.returncode == 0, pulled.stdout
    assert f"4 studies since {today}, 0 lacking after the retrieve" in lacking_line(pulled.stdout, "pacs", "scanner")
    # C-STORE rewrites the file meta header (the sender's AET...): compare the datasets themselves
    assert datasets(pacs) == {sop: data for sop, data in datasets(scanner).items() if data[1] == today}

    scanner.stop()
    silent = run_playbook(inventory, playbook="reconcile.yml")
    assert silent.returncode != 0
    failure = re.search(r"Reconciliation of pacs failed at step .*", silent.stdout).group(0)
    assert "'ask the modalities (C-FIND)'" in failure and "modality scanner: HTTP" in failure

"""Off-site shipping to restic repositories (issue 14, part 1), with real Orthanc servers, real
restic, a local repository and `rclone serve restic --append-only` on loopback."""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import os
import re
import pathlib
import secrets
import signal
import shutil
import subprocess
import tempfile
import time

import pytest

from tests.support import checks, procs
from tests.support.orthanc_server import free_port
from tests.support.playbook import MODULE_PYTHON, local_host, run_module, run_playbook, write_inventory
from ansible_collections.pacs.orthanc.plugins.module_utils import _verify

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(shutil.which("restic") is None or shutil.which("rclone") is None,
                                 reason="needs restic and rclone (scripts/setup.sh)")]


def restic(repository, password_file, *args, check=True):
    env = dict(os.environ, RESTIC_REPOSITORY=str(repository), RESTIC_PASSWORD_FILE=str(password_file),
               RESTIC_CACHE_DIR=str(pathlib.Path(password_file).parent / "restic-cache"))
    result = subprocess.run(["restic", *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, timeout=300, check=False)
    if check:
        assert result.returncode == 0, result.stderr
    return result


def snapshots(repository, password_file) -> list:
    return sorted(json.loads(restic(repository, password_file, "snapshots", "--json").stdout or "[]"),
                  key=lambda s: s["time"])


def tree_hashes(root: pathlib.Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in root.rglob("*") if p.is_file()}


def password_file(tmp_path: pathlib.Path, name: str = "restic-password"):
    secret = "offsite-" + secrets.token_hex(12)
    path = tmp_path / name
    path.write_text(secret + "\n")
    path.chmod(0o600)
    return secret, path


def leftover_password_files(secret: str) -> list:
    """The module's temporary password files that hold ``secret`` (other tests running beside this
    one have theirs, with their own secrets)."""
    found = []
    for path in pathlib.Path(tempfile.gettempdir()).glob("pacs-orthanc-restic-*"):
        with contextlib.suppress(OSError):
            if secret in path.read_text():
                found.append(path)
    return found


@contextlib.contextmanager
def append_only_server(folder: pathlib.Path):
    """`rclone serve restic --append-only` on a free loopback port; yields its rest: URL."""
    port = free_port()
    log = open(folder.parent / "rclone.log", "wb")  # pylint: disable=consider-using-with
    proc = subprocess.Popen(["rclone", "serve", "restic", "--append-only", "--addr", f"127.0.0.1:{port}",
                             str(folder)], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while True:
            with contextlib.suppress(OSError):
                import socket  # pylint: disable=import-outside-toplevel
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            assert proc.poll() is None and time.monotonic() < deadline, "rclone serve restic did not start"
            time.sleep(0.2)
        yield f"rest:http://127.0.0.1:{port}/"
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def test_ship_twice_restore_byte_for_byte_no_secret(servers, tmp_path):
    server = servers("offa")
    checks.store_studies(server, tmp_path, patients=2, via="rest", instances=4, pixel_bytes=100_000)
    root, repo = tmp_path / "backups", tmp_path / "repo"
    secret, pw_file = password_file(tmp_path)
    inventory = write_inventory(tmp_path / "inventory.json", {"offa": local_host(
        server, root, orthanc_offsite="restic", orthanc_restic_repository=str(repo),
        orthanc_restic_password=secret, orthanc_restic_init=True)})
    with procs.SecretWatch(secret, {"restic"}) as watch:
        first = run_playbook(inventory, verbosity=3)
    assert first.returncode == 0, first.stdout
    assert watch.seen, "the sampler never saw restic run"
    assert not watch.leaks, watch.leaks
    assert secret not in first.stdout  # -vvv: module arguments and results included
    assert not leftover_password_files(secret)  # the temporary password file is gone
    [snap] = snapshots(repo, pw_file)
    local = (root / "latest").resolve()
    assert snap["hostname"] == "offa" and snap.get("parent") is None
    assert {"pacs.orthanc", "host:offa", f"backup:{local.name}", "strategy:stop"} <= set(snap["tags"])
    assert "offa: ok," in first.stdout and f"off site: snapshot {snap['short_id']}" in first.stdout
    for path in local.rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path

    # a second backup: its snapshot has the first as parent and adds little
    checks.store_studies(server, tmp_path, patients=1, via="rest", instances=1, pixel_bytes=20_000)
    time.sleep(1.1)
    second = run_playbook(inventory)
    assert second.returncode == 0, second.stdout
    first_snap, second_snap = snapshots(repo, pw_file)
    assert first_snap["id"] == snap["id"] and second_snap["parent"] == snap["id"]
    local = (root / "latest").resolve()
    assert f"backup:{local.name}" in second_snap["tags"]
    total_bytes = sum(p.stat().st_size for p in local.rglob("*") if p.is_file())
    found = re.search(r"off site: snapshot (\w+), ([\d.]+) (B|KiB|MiB|GiB) added", second.stdout)
    assert found and found.group(1) == second_snap["short_id"], second.stdout
    added = float(found.group(2)) * {"B": 1, "KiB": 1024, "MiB": 1024 ** 2, "GiB": 1024 ** 3}[found.group(3)]
    assert 0 < added < total_bytes / 2, (added, total_bytes)  # the new instance, index and manifest, not all

    # restored from the repository, the backup is the local one byte for byte, and verifies
    scratch = tmp_path / "scratch"
    restic(repo, pw_file, "restore", second_snap["id"], "--target", str(scratch))
    assert tree_hashes(scratch) == tree_hashes(local)
    manifest = checks.read_manifest(scratch)
    assert manifest["files"] and all(hashlib.sha256((scratch / rel).read_bytes()).hexdigest() == digest
                                     for rel, digest in manifest["files"].items())
    report = _verify.verify_backup(str(scratch), md5="all")
    assert report["ok"], report["problems"]

    # the same backup again: nothing to do (check mode says the same)
    args = {"source": str(local), "host": "offa", "repository": str(repo), "password_file": str(pw_file)}
    for check in (True, False):
        again = run_module("offsite_restic", args, check=check)
        assert not again["failed"] and again["changed"] is False and again["already_shipped"] is True, again
        assert again["snapshot_id"] == second_snap["id"]
    assert len(snapshots(repo, pw_file)) == 2

    # a snapshot tagged with this backup that lacks a file (as restic's exit code 3 leaves one) is
    # not taken as shipped: the backup is shipped again, whole
    repo2, partial = tmp_path / "repo2", tmp_path / "partial" / local.name
    shutil.copytree(local, partial)
    victim = next(p for p in (partial / "storage").rglob("*") if p.is_file())
    victim.unlink()
    restic(repo2, pw_file, "init")
    env = dict(os.environ, RESTIC_REPOSITORY=str(repo2), RESTIC_PASSWORD_FILE=str(pw_file))
    subprocess.run(["restic", "backup", ".", "-q", "--host", "offa", "--tag", "pacs.orthanc",
                    "--tag", f"backup:{local.name}"], cwd=partial, env=env, check=True, timeout=300)
    [broken] = snapshots(repo2, pw_file)
    shipped = run_module("offsite_restic", dict(args, repository=str(repo2)))
    assert not shipped["failed"] and shipped["changed"] and shipped["already_shipped"] is False, shipped
    assert shipped["parent"] == broken["id"] and shipped["snapshot_id"] != broken["id"]
    scratch2 = tmp_path / "scratch2"
    restic(repo2, pw_file, "restore", shipped["snapshot_id"], "--target", str(scratch2))
    assert tree_hashes(scratch2) == tree_hashes(local)


def test_append_only_host_cannot_forget_maintenance_can(servers, tmp_path):
    """Through `rclone serve restic --append-only` (the hosts' credentials) a host ships, and
    neither restic nor the maintenance play can forget; with the administrator's access (the
    folder itself) the maintenance play forgets and prunes, keeps the pre-upgrade snapshot and the
    newest, checks a rotating slice of the data (position kept) and drills the newest snapshot."""
    server = servers("offb")
    checks.store_studies(server, tmp_path, patients=1, via="rest", instances=2, pixel_bytes=50_000)
    folder = tmp_path / "rclone-repo"
    folder.mkdir()
    secret, pw_file = password_file(tmp_path)
    root = tmp_path / "backups"
    maintenance = {"ansible_connection": "local", "ansible_python_interpreter": MODULE_PYTHON,
                   "orthanc_restic_admin_password_file": str(pw_file), "orthanc_offsite_keep_last": 1,
                   "orthanc_offsite_keep_daily": 0, "orthanc_offsite_keep_weekly": 0, "orthanc_offsite_keep_monthly": 0,
                   "orthanc_offsite_read_days": 3, "orthanc_offsite_state_dir": str(tmp_path / "state"),
                   "orthanc_offsite_drill_dir": str(tmp_path / "drill"), "orthanc_offsite_drill_sample": 0}
    with append_only_server(folder) as url:
        inventory = write_inventory(tmp_path / "inventory.json", {"offb": local_host(
            server, root, orthanc_offsite="restic", orthanc_restic_repository=url,
            orthanc_restic_password_file=str(pw_file), orthanc_restic_init=True,
            orthanc_restic_limit_upload=100_000)})
        result = run_playbook(inventory)
        assert result.returncode == 0, result.stdout
        [snap] = snapshots(url, pw_file)
        assert snap["hostname"] == "offb" and "pre-upgrade" not in snap["tags"]
        # two more backups (copies of the first under later names, shipped by the module through
        # the same server: append-only access adds snapshots), the first one taken before an
        # upgrade (manifest key pre_upgrade): it is tagged pre-upgrade
        first = (root / "latest").resolve()
        stamp = datetime.datetime.strptime(first.name[:15], "%Y%m%dT%H%M%S")

        def copy_of(seconds, **manifest_updates):
            name = (stamp + datetime.timedelta(seconds=seconds)).strftime("%Y%m%dT%H%M%SZ")
            path = tmp_path / "copies" / name
            shutil.copytree(first, path)
            manifest = json.loads((path / "manifest.json").read_text())
            manifest.update(name=name, **manifest_updates)
            (path / "manifest.json").write_text(json.dumps(manifest))
            return path

        ship = {"host": "offb", "repository": url, "password_file": str(pw_file)}
        tagged = run_module("offsite_restic", dict(ship, source=str(copy_of(1, pre_upgrade={"from": "1.10.1"}))))
        assert not tagged["failed"] and "pre-upgrade" in tagged["tags"], tagged
        later_one = run_module("offsite_restic", dict(ship, source=str(copy_of(2))))
        assert not later_one["failed"] and "pre-upgrade" not in later_one["tags"], later_one
        assert later_one["parent"].startswith(tagged["snapshot_id"])
        assert len(snapshots(url, pw_file)) == 3
        # the maintenance play with the hosts' (append-only) access: restic's forget fails (restic
        # 0.14 may print a stack trace: its exit code decides, after its retries), nothing removed
        admin_inv = write_inventory(tmp_path / "admin.json", {"admin": dict(
            maintenance, orthanc_restic_admin_repository=url, orthanc_offsite_check=False,
            orthanc_offsite_drill=False)}, group="offsite_maintenance")
        denied = run_playbook(admin_inv, playbook="offsite_maintenance.yml")
        assert denied.returncode != 0
        assert re.search(r"Maintenance of the off-site repository on admin failed: step 'forget old off-site "
                         r"snapshots': restic exited with \d+.*do these credentials allow deleting", denied.stdout), denied.stdout
        assert len(snapshots(url, pw_file)) == 3
    before = {s["id"]: s for s in snapshots(folder, pw_file)}
    newest = max(before.values(), key=lambda s: s["time"])
    # the administrator's access: forget keeps the newest and the pre-upgrade snapshot
    admin_inv = write_inventory(tmp_path / "admin.json", {"admin": dict(
        maintenance, orthanc_restic_admin_repository=str(folder))}, group="offsite_maintenance")
    dry = run_playbook(admin_inv, playbook="offsite_maintenance.yml", check=True)
    assert dry.returncode == 0, dry.stdout
    assert "forget (check mode, nothing removed): 1 snapshots removed, 2 kept (offb)" in dry.stdout
    assert "check: would read data slices 1 of 3" in dry.stdout and "would be fetched and verified" in dry.stdout
    assert set(s["id"] for s in snapshots(folder, pw_file)) == set(before)
    assert not (tmp_path / "state").exists() and not (tmp_path / "drill").exists()  # check mode wrote nothing
    done = run_playbook(admin_inv, playbook="offsite_maintenance.yml")
    assert done.returncode == 0, done.stdout
    after = {s["id"]: s for s in snapshots(folder, pw_file)}
    pre_id = next(i for i in before if i.startswith(tagged["snapshot_id"]))  # restic 0.14's summary: a short id
    assert set(after) == {newest["id"], pre_id}, (before, after)
    assert snap["id"] not in after
    assert "forget: 1 snapshots removed, 2 kept (offb)" in done.stdout
    assert "check: ok, data slices 1 of 3 read (next: 2)" in done.stdout
    assert re.search(rf"drill offb: snapshot {newest['short_id']} \(backup \w+\) verified, \d+ files hashed, "
                     r"2 instances served with the MD5 the index records", done.stdout), done.stdout
    assert not (tmp_path / "drill" / "offb").exists()
    state = json.loads(next((tmp_path / "state").glob("offsite-check-*.json")).read_text())
    assert state["next"] == 2 and state["slices"] == 3
    # the next day's run reads the next slice
    state["last_read_at"] = "2000-01-01T00:00:00.000000Z"  # long ago: every slice is due, at most all
    next(iter((tmp_path / "state").glob("offsite-check-*.json"))).write_text(json.dumps(state))
    later = run_playbook(admin_inv, playbook="offsite_maintenance.yml",
                         extra_vars={"orthanc_offsite_forget": False, "orthanc_offsite_drill": False})
    assert later.returncode == 0, later.stdout
    assert "check: ok, data slices 2, 3, 1 of 3 read (next: 2)" in later.stdout


def test_wrong_password_and_uninitialised_repository(servers, tmp_path):
    server = servers("offc")
    checks.store_studies(server, tmp_path, patients=1, via="rest", instances=2, pixel_bytes=50_000)
    root, repo = tmp_path / "backups", tmp_path / "repo"
    _secret, pw_file = password_file(tmp_path)
    host = local_host(server, root, orthanc_offsite="restic", orthanc_restic_repository=str(repo),
                      orthanc_restic_password_file=str(pw_file))
    inventory = write_inventory(tmp_path / "inventory.json", {"offc": host})
    missing = run_playbook(inventory)
    assert missing.returncode != 0
    assert "there is no restic repository at" in missing.stdout and "orthanc_restic_init" in missing.stdout
    assert "OFF-SITE SHIPPING FAILED" in missing.stdout
    assert not repo.exists()  # not initialised behind the operator's back
    local = (root / "latest").resolve()
    before = tree_hashes(local)
    assert _verify.verify_backup(str(local), md5="all")["ok"]

    restic(repo, pw_file, "init")
    _other, wrong_file = password_file(tmp_path, "wrong-password")
    inventory = write_inventory(tmp_path / "inventory.json", {"offc": dict(
        host, orthanc_restic_password_file=str(wrong_file))})
    time.sleep(1.1)
    wrong = run_playbook(inventory)
    assert wrong.returncode != 0
    assert "wrong restic password" in wrong.stdout, wrong.stdout
    assert snapshots(repo, pw_file) == []  # nothing recorded as shipped
    assert tree_hashes(local) == before  # the earlier local backup is untouched
    newest = (root / "latest").resolve()
    assert _verify.verify_backup(str(newest), md5="all")["ok"]

    # a REST server that does not answer; the back end's credentials are masked at -vvv
    env_secret = "envsecret-" + secrets.token_hex(8)
    inventory = write_inventory(tmp_path / "inventory.json", {"offc": dict(
        host, orthanc_restic_repository=f"rest:http://127.0.0.1:{free_port()}/",
        orthanc_restic_environment={"AWS_SECRET_ACCESS_KEY": env_secret})})
    time.sleep(1.1)
    unreachable = run_playbook(inventory, verbosity=3)
    assert unreachable.returncode != 0
    assert "cannot be reached" in unreachable.stdout and "connection refused" in unreachable.stdout
    assert env_secret not in unreachable.stdout
    assert tree_hashes(local) == before


def contents(server) -> dict:
    """{SOP Instance UID: MD5 of the DICOM file Orthanc serves} for every instance."""
    return {server.instance_sop_uid(i): hashlib.md5(server.instance_file(i)).hexdigest() for i in server.instances()}


def test_restore_from_offsite_after_everything_local_is_wiped(servers, tmp_path):
    """C-STORE'd studies, backup, off-site snapshot; Orthanc's data AND the local backups wiped;
    the restore fetches the newest snapshot of the host, verifies and restores it: every instance's
    MD5 over REST is the same, a new store is accepted, the fetched copy is gone."""
    server = servers("offr")
    checks.store_studies(server, tmp_path, patients=2, via="cstore", instances=3, pixel_bytes=60_000)
    root, repo, staging = tmp_path / "backups", tmp_path / "repo", tmp_path / "staging"
    secret, pw_file = password_file(tmp_path)
    host = local_host(server, root, orthanc_offsite="restic", orthanc_restic_repository=str(repo),
                      orthanc_restic_password=secret, orthanc_restic_init=True)
    inventory = write_inventory(tmp_path / "inventory.json", {"offr": host})
    assert run_playbook(inventory).returncode == 0
    stored = contents(server)
    assert len(stored) == 6
    [snap] = snapshots(repo, pw_file)

    server.stop()
    for folder in (server.storage_dir, server.index_dir, root):
        shutil.rmtree(folder)
    server.start()
    assert server.statistics()["CountInstances"] == 0
    restore_vars = {"orthanc_restore_confirm": True, "orthanc_restore_source": "offsite",
                    "orthanc_restore_staging_dir": str(staging)}
    # check mode finds the snapshot and changes nothing
    dry = run_playbook(inventory, playbook="restore.yml", extra_vars=restore_vars, check=True)
    assert dry.returncode == 0, dry.stdout
    assert server.statistics()["CountInstances"] == 0 and not list(staging.glob("*/*"))
    with procs.SecretWatch(secret, {"restic"}) as watch:
        result = run_playbook(inventory, playbook="restore.yml", extra_vars=restore_vars, verbosity=3)
    assert result.returncode == 0, result.stdout
    assert watch.seen and not watch.leaks, watch.leaks
    assert secret not in result.stdout and not leftover_password_files(secret)
    assert snap["id"] in result.stdout  # the result names the snapshot restored
    assert contents(server) == stored
    assert list(staging.glob("*")) == [staging / "offr"] and not list((staging / "offr").iterdir())
    assert oct(staging.stat().st_mode & 0o777) == "0o700"
    checks.store_studies(server, tmp_path, patients=1, via="rest", instances=1)
    assert server.statistics()["CountInstances"] == len(stored) + 1

    # a snapshot id that is not there: refused before anything is touched
    missing = run_playbook(inventory, playbook="restore.yml", extra_vars=dict(restore_vars, orthanc_restore_backup="deadbeef"))
    assert missing.returncode != 0
    assert re.search(r"Restore of offr failed at step 'Fetch the backup from the restic repository': "
                     r"the restic repository holds no pacs.orthanc snapshot deadbeef\. Nothing was changed", missing.stdout), missing.stdout
    assert server.statistics()["CountInstances"] == len(stored) + 1


def test_point_restore_from_offsite_after_the_local_backups_are_gone(servers, tmp_path):
    """restore_items with orthanc_restore_source=offsite (issue 16): a backup shipped off site, the
    local backups removed, a study deleted from production; check mode lists it from a fetched
    copy, the run puts it back by StudyInstanceUID with the MD5s over REST of before, the fetched
    copy is gone each time, and the repository's password is in no process's arguments."""
    server = servers("offi")
    checks.store_studies(server, tmp_path, patients=2, via="rest", instances=2, pixel_bytes=20_000)
    root, repo, staging = tmp_path / "backups", tmp_path / "repo", tmp_path / "staging"
    secret = password_file(tmp_path)[0]
    inventory = write_inventory(tmp_path / "inventory.json", {"offi": local_host(
        server, root, orthanc_offsite="restic", orthanc_restic_repository=str(repo), orthanc_restic_password=secret,
        orthanc_restic_init=True, orthanc_restore_staging_dir=str(staging),
        orthanc_restore_items_workdir=str(tmp_path / "scratch"))})
    assert run_playbook(inventory).returncode == 0
    name = (root / "latest").resolve().name
    shutil.rmtree(root)
    before = {i: server.instance_md5(i) for i in server.instances()}
    study = server.rest("GET", "/studies?expand")[0]
    lost = {i["ID"] for i in server.rest("GET", f"/studies/{study['ID']}/instances")}
    server.rest("DELETE", f"/studies/{study['ID']}")
    after_loss = {i: server.instance_md5(i) for i in server.instances()}
    assert set(before) - set(after_loss) == lost and len(lost) == 2
    selection = {"orthanc_restore_source": "offsite",
                 "orthanc_restore_study_uids": [study["MainDicomTags"]["StudyInstanceUID"]]}

    listed = run_playbook(inventory, playbook="restore_items.yml", extra_vars=selection, check=True)
    assert listed.returncode == 0, listed.stdout
    assert f"offi: would restore 2 of 2 instances from {staging / 'offi' / name}" in listed.stdout
    assert {i: server.instance_md5(i) for i in server.instances()} == after_loss
    assert not list((staging / "offi").iterdir())  # the copy fetched to list it is gone
    with procs.SecretWatch(secret, {"restic"}) as watch:
        restored = run_playbook(inventory, playbook="restore_items.yml", extra_vars=selection, verbosity=3)
    assert restored.returncode == 0, restored.stdout
    assert watch.seen and not watch.leaks, watch.leaks
    assert secret not in restored.stdout and not leftover_password_files(secret)
    assert f"offi: restored 2 of 2 instances from {staging / 'offi' / name} (2 with the MD5 of the backup)" \
        in restored.stdout
    assert {i: server.instance_md5(i) for i in server.instances()} == before  # byte for byte; the rest untouched
    assert not list((staging / "offi").iterdir()) and not root.exists()


@contextlib.contextmanager
def ping_server():
    """A tiny healthchecks-like HTTP server on loopback; yields (base URL, the calls it got)."""
    import http.server  # pylint: disable=import-outside-toplevel
    import threading  # pylint: disable=import-outside-toplevel
    calls = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def _record(self):
            length = int(self.headers.get("Content-Length") or 0)
            calls.append((self.command, self.path, self.rfile.read(length).decode(errors="replace")))
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"OK")

        do_GET = do_POST = do_HEAD = _record

        def log_message(self, *args):  # quiet
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", calls
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_pings_status_and_freshness(servers, tmp_path):
    """A host backed up and shipped off site pings start then success, a broken host start then
    fail (with its summary line); the status file and metrics hold the newest off-site snapshot;
    the freshness playbook fails naming the stale hosts and passes on fresh ones."""
    server = servers("offp")
    checks.store_studies(server, tmp_path, patients=1, via="rest", instances=2, pixel_bytes=20_000)
    root, repo, metrics = tmp_path / "backups", tmp_path / "repo", tmp_path / "metrics"
    secret, pw_file = password_file(tmp_path)
    with ping_server() as (url, calls):
        good = local_host(server, root, orthanc_offsite="restic", orthanc_restic_repository=str(repo),
                          orthanc_restic_password=secret, orthanc_restic_init=True,
                          orthanc_ping_url=f"{url}/good/", orthanc_backup_textfile_dir=str(metrics))
        broken = dict(local_host(server, tmp_path / "broken-backups"), orthanc_config_path=str(tmp_path / "nothing"),
                      orthanc_url=f"http://127.0.0.1:{free_port()}", orthanc_ping_url=f"{url}/bad")
        inventory = write_inventory(tmp_path / "inventory.json", {"offp": good, "broken": broken})
        result = run_playbook(inventory)
        assert result.returncode != 0 and "offp: ok," in result.stdout, result.stdout
        paths = [(method, path) for method, path, _body in calls]
        assert sorted(paths) == [("POST", "/bad/fail"), ("POST", "/bad/start"), ("POST", "/good"),
                                 ("POST", "/good/start")], calls
        assert paths.index(("POST", "/good/start")) < paths.index(("POST", "/good"))
        bodies = {path: body for _method, path, body in calls}
        assert bodies["/good"].startswith("offp: ok,") and "off site: snapshot" in bodies["/good"]
        assert bodies["/bad/fail"].startswith("broken: ")
        assert secret not in result.stdout

    [snap] = snapshots(repo, pw_file)
    status = json.loads((root / "status.json").read_text())
    assert status["newest_offsite_snapshot"]["id"].startswith(status["last_offsite_success"]["snapshot_id"])
    assert snap["id"].startswith(status["last_offsite_success"]["snapshot_id"])
    assert status["last_offsite"]["result"] == "ok" and secret not in json.dumps(status)
    prom = (metrics / "pacs_orthanc_backup.prom").read_text()
    assert re.search(r'pacs_orthanc_backup_offsite_newest_snapshot_timestamp_seconds\{host="offp"\} \d+', prom), prom

    fresh = run_playbook(inventory, playbook="freshness.yml")
    assert fresh.returncode != 0
    assert re.search(r"1 of 2 hosts have stale backups \(more than 26 h\): broken: STALE: no newest complete backup",
                     fresh.stdout), fresh.stdout
    assert "offp: fresh (newest backup 0" in fresh.stdout
    only_good = run_playbook(inventory, playbook="freshness.yml", limit="offp")
    assert only_good.returncode == 0, only_good.stdout
    # older than the threshold: the newest backup and the off-site snapshot are both named
    strict = run_playbook(inventory, playbook="freshness.yml", limit="offp",
                          extra_vars={"orthanc_freshness_max_age_hours": 0.0001})
    assert strict.returncode != 0
    assert re.search(r"offp: STALE: newest complete backup [\d.]+ h old, off-site snapshot [\d.]+ h old", strict.stdout), strict.stdout
    # an off-site repository that cannot be read is stale, with its cause
    inventory = write_inventory(tmp_path / "inventory.json", {"offp": dict(good, orthanc_restic_repository=str(tmp_path / "none"))})
    unread = run_playbook(inventory, playbook="freshness.yml")
    assert unread.returncode != 0 and "off-site repository not read at step" in unread.stdout, unread.stdout


@pytest.mark.fault
@pytest.mark.skipif(os.geteuid() != 0, reason="mounts a small filesystem: needs root")
def test_disk_full_and_interrupted_upload(servers, tmp_path):
    """A repository whose disk fills up, and an upload killed midway (module and restic): the run
    fails naming host, step and cause, no snapshot and no success is recorded, the local backup is
    untouched, and the next run ships it whole."""
    server = servers("offf")
    checks.store_studies(server, tmp_path, patients=1, via="rest", instances=4, pixel_bytes=1_000_000)
    root, mount = tmp_path / "backups", tmp_path / "small"
    secret, pw_file = password_file(tmp_path)
    checks.mount_tmpfs(mount, "2m")
    try:
        repo = mount / "repo"
        host = local_host(server, root, orthanc_offsite="restic", orthanc_restic_repository=str(repo),
                          orthanc_restic_password_file=str(pw_file), orthanc_restic_init=True)
        inventory = write_inventory(tmp_path / "inventory.json", {"offf": host})
        full = run_playbook(inventory)
        assert full.returncode != 0
        assert re.search(r"Shipping the backup of offf to the restic repository failed at step 'back up to the restic "
                         r"repository': .*no space left on device", full.stdout, re.I), full.stdout
        assert "OFF-SITE SHIPPING FAILED" in full.stdout
        local = (root / "latest").resolve()
        before = tree_hashes(local)
        assert snapshots(repo, pw_file) == []
        status = json.loads((root / "status.json").read_text())
        assert status["last_offsite"]["result"] == "failed" and "newest_offsite_snapshot" not in status
        # room again: the same backup ships whole, and the repository checks clean
        subprocess.run(["mount", "-o", "remount,size=64m", str(mount)], check=True)
        args = {"source": str(local), "host": "offf", "repository": str(repo), "password_file": str(pw_file)}
        shipped = run_module("offsite_restic", args)
        assert not shipped["failed"] and shipped["changed"] and not shipped["already_shipped"], shipped
        assert restic(repo, pw_file, "check").returncode == 0
        assert run_module("offsite_restic", args)["already_shipped"] is True
        assert tree_hashes(local) == before
    finally:
        checks.umount(mount)

    # an upload killed midway (the module and restic, SIGKILL)
    repo2 = tmp_path / "repo2"
    restic(repo2, pw_file, "init")
    inventory = write_inventory(tmp_path / "inventory.json", {"offf": dict(
        host, orthanc_restic_repository=str(repo2), orthanc_restic_limit_upload=256)})
    time.sleep(1.1)
    play = run_playbook(inventory, pipelining=False, popen=True)
    killed, deadline = [], time.monotonic() + 240
    while not killed and play.poll() is None and time.monotonic() < deadline:
        # the upload runs in the background (async): its processes are the play's by their mark
        uploading = [pid for pid in procs.play_processes(play.pid) if procs.cmdline(pid).startswith("restic backup")]
        if uploading:
            time.sleep(1.5)  # some data on its way
            killed = procs.module_processes(play.pid, "offsite_restic") + uploading
            for pid in killed:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        time.sleep(0.05)
    output = play.communicate(timeout=300)[0]
    assert killed, "the upload was never caught running:\n" + output
    assert play.returncode != 0
    assert re.search(r"Shipping the backup of offf to the restic repository failed at step 'Make the restic snapshot': "
                     r"the (module process|shipping) ended without a result", output), output
    assert snapshots(repo2, pw_file) == []
    status = json.loads((root / "status.json").read_text())
    assert status["last_offsite"]["result"] == "failed"
    assert "newest_offsite_snapshot" not in status  # never a success recorded
    newest = (root / "latest").resolve()
    assert _verify.verify_backup(str(newest), md5="all")["ok"]
    again = run_module("offsite_restic", dict(args, source=str(newest), repository=str(repo2)))
    assert not again["failed"] and again["changed"], again
    scratch = tmp_path / "scratch"
    restic(repo2, pw_file, "restore", "latest", "--target", str(scratch))
    assert tree_hashes(scratch) == tree_hashes(newest)

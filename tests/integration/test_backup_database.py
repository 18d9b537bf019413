"""PostgreSQL and MariaDB indexes against real servers: hot dumps with the engines' own tools,
restores into fresh databases that Orthanc writes to, passwords never exposed, clear failures.

Orthanc runs Debian's orthanc-postgresql / orthanc-mysql plugins, with the files either in the
database (EnableStorage) or on disk. Databases and users are made per test with random
passwords (tests/support/databases.py); the servers are started by scripts/databases.sh."""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import re
import shutil
import stat
import threading
import time

import pytest

from tests.support import checks, databases, dicomgen, procs
from tests.support.playbook import local_host, run_module, run_playbook, write_inventory
from ansible_collections.pacs.orthanc.plugins.module_utils import _verify

pytestmark = pytest.mark.slow

CONFIRM = {"orthanc_restore_confirm": True}
ENGINES = ["postgresql", "mysql"]


@pytest.fixture
def database(request):
    """Factory of fresh databases (and their users) on the real servers, dropped at the end.
    Tests ask for it before ``servers``, so that their Orthancs stop before the databases go."""
    made = []

    def make(engine: str, with_database: bool = True) -> databases.Database:
        available = databases.pg_available() if engine == "postgresql" else databases.my_available()
        if not available:
            pytest.fail(f"the {engine} server does not answer: run scripts/databases.sh")
        name = f"pacs_{engine[:2]}_{os.getpid()}_{len(made)}_{int(time.time() * 1000) % 100000}"
        db = databases.Database(engine, name).create(with_database)
        made.append(db)
        return db

    yield make
    for db in made:
        db.drop()


def contents(server) -> dict:
    """{SOP Instance UID: MD5 of the DICOM file served} of every instance."""
    return {server.instance_sop_uid(i): hashlib.md5(server.instance_file(i)).hexdigest() for i in server.instances()}


def db_server(servers, database, engine, in_db, name="pacs"):
    db = database(engine)
    server = servers(name, extra_config=db.orthanc_config(storage_in_database=in_db))
    system = server.rest("GET", "/system")
    assert system["DatabaseBackendPlugin"], system  # really on the database plugin
    assert bool(system.get("StorageAreaPlugin")) == in_db, system
    return db, server


def destroy_and_restore(server, db, inventory):
    """A lost server: Orthanc stopped, its database dropped, its storage wiped; then the restore
    playbook, which creates the database again."""
    server.stop()
    db.drop_database()
    shutil.rmtree(server.storage_dir)
    server.storage_dir.mkdir()
    return run_playbook(inventory, playbook="restore.yml", extra_vars=CONFIRM)


def fingerprint(backup: pathlib.Path) -> dict:
    return {str(p.relative_to(backup)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(backup.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("in_db", [True, False], ids=["files-in-db", "files-on-disk"])
def test_check_mode_of_a_database_orthanc(database, servers, tmp_path, in_db):
    """--check of a PostgreSQL Orthanc, files in the database (no hot pass, so no storage count)
    or on disk: a summary line, no folder, no lock, no keeper, Orthanc never stopped."""
    db, server = db_server(servers, database, "postgresql", in_db)
    checks.store_studies(server, tmp_path, patients=1, via="rest")
    root = tmp_path / "backups"
    inventory = write_inventory(tmp_path / "inventory.json", {
        "pacs": local_host(server, root, orthanc_backup_settle_seconds=0, **db.restore_vars())})
    pid = server.pid()
    result = run_playbook(inventory, check=True)
    assert result.returncode == 0, result.stdout
    files = 0 if in_db else 3
    assert f"pacs: check mode, would back up {files} files" in result.stdout, result.stdout
    assert server.pid() == pid and server.answers()
    assert not root.exists() and not procs.keepers_of(root)


@pytest.mark.parametrize("in_db", [True, False], ids=["files-in-db", "files-on-disk"])
@pytest.mark.parametrize("engine", ENGINES)
def test_round_trip_into_a_fresh_database(database, servers, tmp_path, engine, in_db):
    db, server = db_server(servers, database, engine, in_db)
    checks.store_studies(server, tmp_path, patients=2, via="rest")
    checks.store_studies(server, tmp_path, patients=1, via="cstore")
    stored = contents(server)
    assert len(stored) == 9
    root = tmp_path / "backups"
    inventory = write_inventory(tmp_path / "inventory.json", {
        "pacs": local_host(server, root, orthanc_backup_settle_seconds=0, **db.restore_vars())})
    pid_before = server.pid()
    result = run_playbook(inventory)
    assert result.returncode == 0, result.stdout
    assert server.pid() == pid_before  # Orthanc was never stopped
    backup = (root / "latest").resolve()
    manifest = checks.read_manifest(backup)
    assert manifest["backend"] == engine and manifest["strategy"] == "dump"
    assert manifest["downtime_seconds"] == 0 and manifest["stopped_at"] is None
    assert manifest["storage_in_database"] is in_db
    assert manifest["counts"] == {"patients": 3, "studies": 3, "series": 3, "instances": 9}
    # files on disk: the completion compared the dump's listing with the storage state in SQL and
    # read the files placed new (all, in a first backup); files in the database: each one checked
    assert manifest["verification"]["storage_check"] == ("all" if in_db else "changed")
    assert manifest["verification"]["files_compared"] == (None if in_db else 9)
    # files on disk: the dump was read once, by the delta pass, which recorded its listing in the
    # storage state for the completion; files in the database: no delta pass, the completion reads it
    assert manifest["verification"]["dump_listing"] == ("read" if in_db else "recorded")
    dump = backup / manifest["dump"]["path"]
    assert dump.is_file() and stat.S_IMODE(dump.stat().st_mode) == 0o600
    assert hashlib.sha256(dump.read_bytes()).hexdigest() == manifest["dump"]["sha256"] == manifest["files"][manifest["dump"]["path"]]
    assert manifest["dump"]["server_version"] and manifest["dump"]["tool_version"]
    assert (backup / "storage").exists() is (not in_db)
    report = _verify.verify_backup(str(backup), md5="all")
    assert report["ok"], report
    assert report["files_hashed"] == 9  # every file's MD5, whether in the dump or in storage/
    assert db.password not in (backup / "manifest.json").read_text()

    # destroy: Orthanc stopped, its database dropped, its storage wiped
    result = destroy_and_restore(server, db, inventory)
    assert result.returncode == 0, result.stdout
    assert server.answers()
    assert contents(server) == stored
    # the restored database accepts writes: one new instance is stored and served
    new = dicomgen.make_study(tmp_path / "new", "new-study", "New^Patient", series=1, instances_per_series=1)
    server.store_rest(new[0])
    assert server.statistics()["CountInstances"] == 10
    assert db.count("Resources") == 4 + 4 + 4 + 10  # the new patient, study, series and instance are in the table


@pytest.mark.parametrize("engine", ENGINES)
def test_backup_while_instances_keep_arriving(database, servers, tmp_path, engine):
    """Files on disk, index in the database: Orthanc answers throughout; the restored server serves
    every instance its index lists, or the backup names the ones it cannot."""
    db, server = db_server(servers, database, engine, in_db=False)
    checks.store_studies(server, tmp_path, patients=2, via="rest")
    root = tmp_path / "backups"
    inventory = write_inventory(tmp_path / "inventory.json", {
        "pacs": local_host(server, root, orthanc_backup_settle_seconds=0, **db.restore_vars())})
    pid = server.pid()
    stop = threading.Event()
    failures, polls, stored, deleted = [], [0], [], []
    sources = dicomgen.make_instances(tmp_path / "stream", 400, size_range=(10_000, 60_000), seed=7)

    def poll():
        while not stop.is_set():
            if not server.answers(timeout=30):  # a slow answer under load is still an answer
                failures.append(time.time())
            polls[0] += 1
            time.sleep(0.03)

    def feed():
        for i, path in enumerate(sources):
            if stop.is_set():
                break
            stored.append(server.store_rest(path))
            if i % 5 == 4:  # delete some while the backup runs, too
                victim = stored.pop(0)
                server.rest("DELETE", f"/instances/{victim}")
                deleted.append(victim)

    threads = [threading.Thread(target=poll), threading.Thread(target=feed)]
    for thread in threads:
        thread.start()
    try:
        result = run_playbook(inventory)
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    assert result.returncode == 0, result.stdout
    assert polls[0] > 10 and not failures, f"{len(failures)} of {polls[0]} polls unanswered"
    assert server.pid() == pid  # never stopped
    assert len(stored) + len(deleted) > 5, "nothing was stored during the backup"
    backup = (root / "latest").resolve()
    manifest = checks.read_manifest(backup)
    report = _verify.verify_backup(str(backup), md5="all")
    assert report["ok"], report
    known = set(manifest["storage"]["deleted_during_capture"])

    result = destroy_and_restore(server, db, inventory)
    assert result.returncode == 0, result.stdout
    assert server.statistics()["CountInstances"] == manifest["counts"]["instances"]
    unservable = []
    for instance in server.instances():
        try:
            data = server.instance_file(instance)
        except Exception:  # pylint: disable=broad-except  # Orthanc answers 404/500 for a lost file
            unservable.append(instance)
            continue
        assert hashlib.md5(data).hexdigest() == server.instance_md5(instance)
    # the instances that cannot be served are exactly those whose file the backup named as
    # deleted while the dump ran
    uuids = db.dicom_uuids()
    assert len(uuids) == manifest["counts"]["instances"]
    assert {uuids[instance] for instance in unservable} == known & set(uuids.values()), (unservable, known)


@pytest.mark.fault
@pytest.mark.parametrize("engine", ENGINES)
def test_no_password_in_ps_output_or_files(database, servers, tmp_path, engine):
    db, server = db_server(servers, database, engine, in_db=True)
    paths = dicomgen.make_instances(tmp_path / "big", 40, size_range=(400_000, 600_000), seed=8)
    for path in paths:
        server.store_rest(path)
    root = tmp_path / "backups"
    inventory = write_inventory(tmp_path / "inventory.json", {"pacs": local_host(server, root)})
    tools = {"pg_dump", "mysqldump", "mariadb-dump", "psql", "mysql", "pg_restore"}
    with procs.SecretWatch(db.password, tools) as watch:
        result = run_playbook(inventory, verbosity=3)
    assert result.returncode == 0, result.stdout
    assert watch.seen & {"pg_dump", "mysqldump", "mariadb-dump"}, "the sampler never saw the dump tool run"
    assert not watch.leaks, watch.leaks
    assert db.password not in result.stdout  # -vvv output, module arguments and results included
    backup = (root / "latest").resolve()
    assert stat.S_IMODE(root.stat().st_mode) == 0o700 and stat.S_IMODE(backup.stat().st_mode) == 0o700
    for path in backup.rglob("*"):
        if path.is_file() and db.password.encode() in path.read_bytes():
            # only Orthanc's own configuration holds it, copied with its mode, inside the 0700 backup
            assert path.relative_to(backup).parts[0] == "config", path
    leftovers = list(pathlib.Path("/tmp").glob("pacs-orthanc-db-*"))
    assert not leftovers, leftovers  # the private password files are gone


@pytest.mark.fault
@pytest.mark.parametrize("engine", ENGINES)
def test_dump_failures_are_clear_and_leave_nothing(database, servers, tmp_path, engine):
    db, server = db_server(servers, database, engine, in_db=True)
    checks.store_studies(server, tmp_path, patients=1, via="rest")
    root = tmp_path / "backups"
    hostvars = local_host(server, root)
    inventory = write_inventory(tmp_path / "inventory.json", {"pacs": hostvars})
    assert run_playbook(inventory).returncode == 0
    earlier = {name: fingerprint(root / name) for name in checks.complete_backups(root)}
    tool = "pg_dump" if engine == "postgresql" else "mysqldump"
    cases = [
        ({"orthanc_backup_db_password": "wrong-" + db.password[::-1]}, r"refused the credentials"),
        # 127.0.0.1 rather than localhost: MySQL then uses TCP, not the socket, so the port applies
        ({"orthanc_backup_db_host": "127.0.0.1", "orthanc_backup_db_port": 1}, r"cannot connect to"),
        ({"orthanc_backup_db_bin_dir": str(tmp_path / "no-tools")}, rf"{tool} was not found in"),
    ]
    for extra, cause in cases:
        result = run_playbook(inventory, extra_vars=extra)
        assert result.returncode != 0, result.stdout
        match = re.search(r"Backup of pacs failed at step '([^']*)': (.*)", result.stdout)
        assert match, result.stdout
        assert "Dump the database" in match.group(1) and re.search(cause, match.group(2)), match.group(0)
        assert "wrong-" not in match.group(0) and db.password not in result.stdout
        assert server.answers()
        assert not [p for p in root.iterdir() if p.name.endswith(".incomplete")]
        assert {name: fingerprint(root / name) for name in checks.complete_backups(root)} == earlier


@pytest.mark.fault
def test_disk_full_during_a_dump(database, servers, tmp_path):
    db, server = db_server(servers, database, "postgresql", in_db=True)
    paths = dicomgen.make_instances(tmp_path / "big", 12, size_range=(400_000, 600_000), seed=9)
    for path in paths:
        server.store_rest(path)
    root = tmp_path / "small"
    root.mkdir()
    checks.mount_tmpfs(root, "1M")
    try:
        inventory = write_inventory(tmp_path / "inventory.json", {
            "pacs": local_host(server, root, orthanc_backup_space_check=False, orthanc_backup_min_free_bytes=0)})
        result = run_playbook(inventory)
        assert result.returncode != 0
        match = re.search(r"Backup of pacs failed at step '([^']*)': (.*)", result.stdout)
        assert match and "Dump the database" in match.group(1), result.stdout
        assert "No space left on device" in match.group(2), match.group(0)
        assert server.answers()
        # no dump, no .part, no folder, no lock: only the monitoring status of the failed run
        assert sorted(p.name for p in root.iterdir() if p.name != "status.json") == []
    finally:
        checks.umount(root)


@pytest.mark.fault
@pytest.mark.parametrize("engine", ENGINES)
def test_db_restore_refuses_a_database_that_holds_tables(database, servers, tmp_path, engine):
    db, server = db_server(servers, database, engine, in_db=False)
    checks.store_studies(server, tmp_path, patients=1, via="rest")
    dest = tmp_path / ("orthanc.sql" if engine == "mysql" else "orthanc.pgdump")
    dumped = run_module("db_dump", {"config_path": str(server.config_path), "dest": str(dest)})
    assert not dumped["failed"], dumped
    assert dumped["sha256"] == hashlib.sha256(dest.read_bytes()).hexdigest()
    assert db.password not in json.dumps(dumped)
    admin = ({"admin_username": db.admin_user, "admin_password": db.admin_password} if engine == "postgresql"
             else {"admin_unix_socket": databases.MY_SOCKET})
    before = db.count("Resources")
    refused = run_module("db_restore", {"dump": str(dest), "config_path": str(server.config_path), **admin})
    assert refused["failed"] and "is not empty" in refused["msg"], refused
    assert db.count("Resources") == before
    # into another, fresh database: created (MySQL with utf8mb4_unicode_ci), filled, counted
    other = db.name + "_copy"
    db.extra.append(other)
    restored = run_module("db_restore", {"dump": str(dest), "config_path": str(server.config_path), "database": other,
                                         **admin})
    assert not restored["failed"], restored
    assert restored["created"] and restored["counts"]["instances"] == 3
    if engine == "mysql":
        collation = databases.my_sql(f"SELECT DEFAULT_COLLATION_NAME FROM information_schema.SCHEMATA "
                                     f"WHERE SCHEMA_NAME = '{other}'").strip()
        assert collation == "utf8mb4_unicode_ci"
        routines = int(databases.my_sql(f"SELECT COUNT(*) FROM information_schema.ROUTINES "
                                        f"WHERE ROUTINE_SCHEMA = '{other}'").strip())
        assert routines > 0  # Orthanc's procedures came along
    assert db.password not in json.dumps(restored)


def test_the_postgresql_dump_is_compressed_at_the_level_asked(database, servers, tmp_path):
    """pg_dump runs with the level given (default 1, recorded in the dump's result); 0 writes a
    larger archive than 9; a level outside 0-9 is refused with its value named, nothing written."""
    db, server = db_server(servers, database, "postgresql", in_db=True)
    checks.store_studies(server, tmp_path, patients=1, via="rest")
    sizes = {}
    for level in (None, 0, 9):
        dest = tmp_path / f"level-{level}.pgdump"
        params = {"config_path": str(server.config_path), "dest": str(dest)}
        if level is not None:
            params["compression"] = level
        dumped = run_module("db_dump", params)
        assert not dumped["failed"], dumped
        assert dumped["compression"] == (1 if level is None else level)
        sizes[level] = dest.stat().st_size
    assert sizes[0] > sizes[None] > 0 and sizes[0] > sizes[9], sizes
    dest = tmp_path / "level-12.pgdump"
    refused = run_module("db_dump", {"config_path": str(server.config_path), "dest": str(dest), "compression": 12})
    assert refused["failed"] and "compression level must be 0 (none) to 9, not 12" in refused["msg"], refused
    assert not dest.exists() and not list(tmp_path.glob("level-12*"))


def _statement(output: str) -> str:
    """The statement that the run's final message tells the operator to run (after 'run as ...: ')."""
    messages = [json.loads(m) for m in re.findall(r'"msg": ("(?:[^"\\]|\\.)*")', output)]
    assert messages, output
    match = re.search(r"run as [^:]+: ((?:GRANT|ALTER|REVOKE|SET)[^;]*;)", messages[-1])
    assert match, messages[-1]
    return match.group(1)


def _refused_before_the_stop(result, server, pid: int, expected: str) -> str:
    assert result.returncode != 0, result.stdout
    assert "failed at step 'Check the target database'" in result.stdout, result.stdout
    assert "Nothing was changed" in result.stdout, result.stdout
    assert expected in result.stdout, result.stdout
    assert server.pid() == pid and server.answers()  # Orthanc was never stopped
    return _statement(result.stdout)


@pytest.mark.parametrize("in_db", [True, False], ids=["files-in-db", "files-on-disk"])
def test_postgresql_restore_with_a_createdb_admin_that_is_no_member(database, servers, tmp_path, in_db):
    """The admin that the docs describe: CREATEDB, not a superuser, not a member of Orthanc's role.
    Into a dropped database it creates the database as its own, grants it to Orthanc's role, and
    Orthanc's role restores the dump itself: every table and large object is Orthanc's."""
    db, server = db_server(servers, database, "postgresql", in_db)
    admin, password = f"{db.name}_cdb", "cdb-" + os.urandom(8).hex()
    databases.pg_sql(f"CREATE ROLE {admin} LOGIN CREATEDB PASSWORD '{password}';")
    try:
        checks.store_studies(server, tmp_path, patients=2, via="rest")
        stored = contents(server)
        root = tmp_path / "backups"
        inventory = write_inventory(tmp_path / "inventory.json", {"pacs": local_host(
            server, root, orthanc_backup_settle_seconds=0, orthanc_restore_db_admin_username=admin,
            orthanc_restore_db_admin_password=password)})
        assert run_playbook(inventory).returncode == 0
        result = destroy_and_restore(server, db, inventory)
        assert result.returncode == 0, result.stdout
        assert contents(server) == stored
        member = databases.pg_sql(f"SELECT pg_has_role('{admin}', '{db.user}', 'MEMBER')").strip()
        assert member == "f"  # nothing was granted to the admin
        owners = databases.pg_sql("SELECT DISTINCT pg_get_userbyid(relowner) FROM pg_class c JOIN pg_namespace n "
                                  "ON n.oid = c.relnamespace WHERE n.nspname = 'public' UNION "
                                  "SELECT DISTINCT pg_get_userbyid(lomowner) FROM pg_largeobject_metadata",
                                  db.name).split()
        assert owners == [db.user]
        new = dicomgen.make_study(tmp_path / "new", "new-study", "New^Patient", series=1, instances_per_series=1)
        server.store_rest(new[0])
        assert server.statistics()["CountInstances"] == len(stored) + 1
        assert password not in result.stdout
    finally:
        server.stop()
        databases.pg_sql(f"DROP DATABASE IF EXISTS {db.name} WITH (FORCE);", check=False)
        databases.pg_sql(f"DROP ROLE IF EXISTS {admin};", check=False)


@pytest.mark.fault
def test_postgresql_admin_without_privileges_is_refused_before_the_stop(database, servers, tmp_path):
    """A login role with no privileges, replacing Orthanc's running database: refused before
    Orthanc is stopped, each time with the one statement that is missing; once they are run, the
    same restore works."""
    db, server = db_server(servers, database, "postgresql", in_db=True)
    admin, password = f"{db.name}_nop", "nop-" + os.urandom(8).hex()
    databases.pg_sql(f"CREATE ROLE {admin} LOGIN PASSWORD '{password}';")
    try:
        checks.store_studies(server, tmp_path, patients=1, via="rest")
        stored = contents(server)
        root = tmp_path / "backups"
        inventory = write_inventory(tmp_path / "inventory.json", {"pacs": local_host(
            server, root, orthanc_backup_settle_seconds=0, orthanc_restore_db_admin_username=admin,
            orthanc_restore_db_admin_password=password, orthanc_restore_db_replace=True)})
        assert run_playbook(inventory).returncode == 0
        pid = server.pid()
        statement = _refused_before_the_stop(run_playbook(inventory, playbook="restore.yml", extra_vars=CONFIRM),
                                             server, pid, f"cannot drop the database '{db.name}'")
        assert statement == f'GRANT "{db.user}" TO "{admin}";'
        databases.pg_sql(statement)
        statement = _refused_before_the_stop(run_playbook(inventory, playbook="restore.yml", extra_vars=CONFIRM),
                                             server, pid, "may not create databases")
        assert statement == f'ALTER ROLE "{admin}" CREATEDB;'
        databases.pg_sql(statement)
        result = run_playbook(inventory, playbook="restore.yml", extra_vars=CONFIRM)
        assert result.returncode == 0, result.stdout
        assert contents(server) == stored
        assert password not in result.stdout
    finally:
        server.stop()
        databases.pg_sql(f"DROP DATABASE IF EXISTS {db.name} WITH (FORCE);", check=False)
        databases.pg_sql(f"DROP ROLE IF EXISTS {admin};", check=False)


@pytest.mark.fault
def test_mysql_admin_without_privileges_is_refused_before_the_stop(database, servers, tmp_path):
    """A MariaDB admin with too few privileges: refused before Orthanc is stopped with the exact
    GRANT (the database's privileges with GRANT OPTION, then SET USER for the dump's definers);
    once run, the same restore works."""
    db, server = db_server(servers, database, "mysql", in_db=False)
    admin, password = f"{db.name}_adm", "adm-" + os.urandom(8).hex()
    databases.my_sql(f"CREATE USER '{admin}'@'localhost' IDENTIFIED BY '{password}';"
                     f"GRANT CREATE, DROP, SELECT ON {db.name}.* TO '{admin}'@'localhost';")
    try:
        checks.store_studies(server, tmp_path, patients=1, via="rest")
        stored = contents(server)
        root = tmp_path / "backups"
        inventory = write_inventory(tmp_path / "inventory.json", {"pacs": local_host(
            server, root, orthanc_backup_settle_seconds=0, orthanc_restore_db_admin_username=admin,
            orthanc_restore_db_admin_password=password, orthanc_restore_db_replace=True)})
        assert run_playbook(inventory).returncode == 0
        pid = server.pid()
        statement = _refused_before_the_stop(run_playbook(inventory, playbook="restore.yml", extra_vars=CONFIRM),
                                             server, pid, "GRANT OPTION")
        assert statement.startswith("GRANT INSERT, UPDATE, DELETE") and statement.endswith(
            f"ON `{db.name}`.* TO '{admin}'@'localhost' WITH GRANT OPTION;"), statement
        databases.my_sql(statement)
        statement = _refused_before_the_stop(run_playbook(inventory, playbook="restore.yml", extra_vars=CONFIRM),
                                             server, pid, f"defined by {db.user}@localhost")
        assert statement == f"GRANT SET USER ON *.* TO '{admin}'@'localhost';"
        databases.my_sql(statement + f"GRANT SELECT ON mysql.user TO '{admin}'@'localhost';")
        result = run_playbook(inventory, playbook="restore.yml", extra_vars=CONFIRM)
        assert result.returncode == 0, result.stdout
        assert contents(server) == stored
        assert password not in result.stdout
    finally:
        server.stop()
        databases.my_sql(f"DROP USER IF EXISTS '{admin}'@'localhost';", check=False)

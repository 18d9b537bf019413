"""A PostgreSQL or MariaDB server in its own container, beside an Orthanc whose plugin connects to
it: backed up by the collection with the dump strategy, the dump made by the container's own
tools (through the engine's exec), the database dropped, restored into the container by the
restore role, every instance compared byte for byte, and no password on any command line of the
machine meanwhile (nor in the environment of any process outside the containers).

The database containers run the test image (Debian 12's PostgreSQL 15 and MariaDB) with an
entrypoint that sets the server up from the variables of the official images (POSTGRES_PASSWORD;
MARIADB_ROOT_PASSWORD, MARIADB_DATABASE, MARIADB_USER, MARIADB_PASSWORD), on a free port, with
--init and --network host (dockerd has no bridge here). Orthanc runs on the host (Debian's
package and plugins), its configuration naming the container's port."""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import subprocess
import time

import pytest

from tests.containers.conftest import DATA, IMAGE, OrthancContainer, engine_ready
from tests.support import checks, databases, procs
from tests.support.orthanc_server import OrthancServer, free_port, stop_all
from tests.support.playbook import MODULE_PYTHON, local_host, run_module, run_playbook, write_inventory
from ansible_collections.pacs.orthanc.plugins.module_utils._db import container as db_container, listing

pytestmark = pytest.mark.slow

CONFIRM = {"orthanc_restore_confirm": True}
DUMP_TOOLS = {"pg_dump", "mysqldump", "mariadb-dump"}
RESTORE_TOOLS = {"pg_restore", "mysql", "mariadb"}


class DbContainer:
    """One database server container of the test image, removed at the end (only this one)."""

    def __init__(self, engine: str, kind: str):
        self.engine, self.kind = engine, kind
        self.name = f"pacs-dbc-{kind[:2]}-{secrets.token_hex(4)}"
        self.project = self.name + "-project"  # labelled as the service "db" of a compose project
        self.port = free_port()
        if kind == "postgresql":
            # the postgres image's usual pairing with Orthanc: user and database postgres
            self.user, self.database = "postgres", "postgres"
            self.password = "pg-" + secrets.token_hex(12)
            self.env = {"POSTGRES_PASSWORD": self.password}
            self.secrets = [self.password]
        else:
            self.user, self.database = "orthanc", "orthanc"
            self.password = "my-" + secrets.token_hex(12)
            self.root_password = "root-" + secrets.token_hex(12)
            self.env = {"MARIADB_ROOT_PASSWORD": self.root_password, "MARIADB_DATABASE": self.database,
                        "MARIADB_USER": self.user, "MARIADB_PASSWORD": self.password}
            self.secrets = [self.password, self.root_password]

    def _run(self, argv, check: bool = True, timeout: float = 120, env: dict | None = None) -> subprocess.CompletedProcess:
        proc = subprocess.run([self.engine, *argv], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, check=False, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"{self.engine} {argv[0]}: {proc.stderr.strip()[-500:]}")
        return proc

    def start(self) -> "DbContainer":
        script = DATA / ("postgres-entrypoint.sh" if self.kind == "postgresql" else "mariadb-entrypoint.sh")
        names = [arg for name in ["DB_PORT", *self.env] for arg in ("-e", name)]
        labels = ["--label", f"com.docker.compose.project={self.project}", "--label", "com.docker.compose.service=db"]
        self._run(["run", "-d", "--init", "--network", "host", "--name", self.name, *names, *labels,
                   "-v", f"{script}:/entrypoint.sh:ro", IMAGE, "sh", "/entrypoint.sh"],
                  env=dict(os.environ, DB_PORT=str(self.port), **self.env))  # values not on argv: -e NAME
        deadline = time.monotonic() + 90
        while True:
            probe = self.sql("SELECT 1", database="template1" if self.kind == "postgresql" else "", check=False)
            if probe.returncode == 0 and probe.stdout.strip() == "1":
                return self
            assert time.monotonic() < deadline, f"{self.name} did not come up: {self._run(['logs', self.name]).stderr}"
            time.sleep(0.3)

    def sql(self, sql: str, database: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
        """SQL as the server's superuser through its local socket (no password needed there)."""
        database = self.database if database is None else database
        if self.kind == "postgresql":
            argv = ["exec", "-u", "postgres", self.name, "psql", "-h", "/var/run/postgresql", "-p", str(self.port),
                    "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-d", database, "-c", sql]
        else:
            argv = ["exec", self.name, "mariadb", "-N", "-B", "-e", sql] + ([database] if database else [])
        return self._run(argv, check=check)

    def drop_database(self) -> None:
        if self.kind == "postgresql":
            self.sql(f"DROP DATABASE {self.database} WITH (FORCE)", database="template1")
        else:
            self.sql(f"DROP DATABASE {self.database}", database="")

    def orthanc_config(self, storage_in_database: bool) -> dict:
        section = {"EnableIndex": True, "EnableStorage": storage_in_database, "Host": "127.0.0.1",
                   "Port": self.port, "Database": self.database, "Username": self.user, "Password": self.password,
                   "Lock": True}
        if self.kind == "postgresql":
            return {"Plugins": databases.PG_PLUGINS, "PostgreSQL": section}
        section["UnixSocket"] = ""  # TCP to the container, not the host's own MariaDB socket
        return {"Plugins": databases.MY_PLUGINS, "MySQL": section}

    def remove(self) -> None:
        self._run(["rm", "-f", *(["-t", "0"] if self.engine == "podman" else []), self.name], check=False)


@pytest.fixture
def db_containers():
    """Factory: db_containers(engine, kind) -> a started DbContainer; each removed at the end."""
    made = []

    def make(engine: str, kind: str) -> DbContainer:
        problem = engine_ready(engine)
        if problem:
            pytest.fail(problem)  # scripts/containers.sh prepares both engines
        one = DbContainer(engine, kind)
        made.append(one)
        return one.start()

    yield make
    for one in made:
        one.remove()


@pytest.fixture
def orthancs(tmp_path):
    """Factory of Orthancs on this host (Debian's package), stopped at the end (before the
    database containers go: ask for this fixture after db_containers)."""
    started = []

    def make(name: str, **kwargs) -> OrthancServer:
        server = OrthancServer(tmp_path / name, name=name, **kwargs)
        server.start()
        started.append(server)
        return server

    yield make
    stop_all(started)


def contents(server) -> dict:
    """{SOP Instance UID: MD5 of the DICOM file served} of every instance."""
    return {server.instance_sop_uid(i): hashlib.md5(server.instance_file(i)).hexdigest() for i in server.instances()}


@pytest.mark.parametrize("engine,kind", [("podman", "postgresql"), ("podman", "mysql"), ("docker", "postgresql")],
                         ids=["podman-postgresql", "podman-mariadb", "docker-postgresql"])
def test_round_trip_with_the_database_in_its_own_container(db_containers, orthancs, tmp_path, engine, kind):
    """PostgreSQL with the files in the database (large objects through exec's standard output),
    MariaDB with the files on disk: dumped hot by the container's own tool, restored by the
    container's own tools after the database was dropped, as the container's superuser whose
    password only the container's environment holds (MariaDB's root)."""
    db = db_containers(engine, kind)
    in_db = kind == "postgresql"
    server = orthancs("pacs", extra_config=db.orthanc_config(storage_in_database=in_db))
    assert server.rest("GET", "/system")["DatabaseBackendPlugin"]
    checks.store_studies(server, tmp_path, patients=2, via="rest")
    stored = contents(server)
    assert len(stored) == 6
    root = tmp_path / "backups"
    inventory = write_inventory(tmp_path / "inventory.json", {"pacs": local_host(
        server, root, orthanc_backup_settle_seconds=0, orthanc_db_container=db.name,
        orthanc_container_engine=engine)})
    pid_before = server.pid()
    with procs.SecretWatch(db.secrets, DUMP_TOOLS | RESTORE_TOOLS | {"psql"}, host_environ_only=True) as watch:
        # a dump of a few instances lasts milliseconds: on a loaded machine the watch may read the
        # dump tool's process only after it ended (seen in CI, mariadb-dump, other suites beside
        # it); another backup then gives it another look, at most three in all
        outputs = []
        for _attempt in range(3):
            backed_up = run_playbook(inventory, verbosity=3)
            outputs.append(backed_up.stdout)
            assert backed_up.returncode == 0, backed_up.stdout
            assert server.pid() == pid_before  # Orthanc was never stopped
            dumped_by = set(watch.seen)
            if dumped_by & DUMP_TOOLS:
                break

        # destroy: Orthanc stopped, its database dropped in the container, its storage wiped
        server.stop()
        db.drop_database()
        if not in_db:
            shutil.rmtree(server.storage_dir)
            server.storage_dir.mkdir()
        restored = run_playbook(inventory, playbook="restore.yml", extra_vars=CONFIRM, verbosity=3)
    assert restored.returncode == 0, restored.stdout
    assert dumped_by & DUMP_TOOLS, "the sampler never saw the dump tool run"
    assert watch.seen & RESTORE_TOOLS, "the sampler never saw the restore tool run"
    assert not watch.leaks, watch.leaks
    for secret in db.secrets:
        assert all(secret not in out for out in outputs) and secret not in restored.stdout  # -vvv: arguments, results

    backup = (root / "latest").resolve()
    manifest = checks.read_manifest(backup)
    assert manifest["backend"] == kind and manifest["strategy"] == "dump"
    assert manifest["downtime_seconds"] == 0
    assert manifest["counts"]["instances"] == 6
    dump = manifest["dump"]
    assert dump["container"] == db.name  # made by the container's own tool
    assert dump["database"]["container"] == db.name and dump["database"]["host"] == "127.0.0.1"
    version = db.sql("SHOW server_version" if kind == "postgresql" else "SELECT VERSION()").stdout.strip()
    assert dump["server_version"] == version
    assert hashlib.sha256((backup / dump["path"]).read_bytes()).hexdigest() == dump["sha256"]
    if kind == "postgresql":
        # the container's pg_restore reads the dump (verification, delta pass) as the host's does
        with db_container.reader(db.name, None, "read") as reader:
            assert reader.container is not None and reader.container.name == db.name
        through_container = listing.read_pg_dump(str(backup / dump["path"]), container=db.name)
        assert through_container == listing.read_pg_dump(str(backup / dump["path"]))
        assert len(through_container["stored"]) == 6  # every DICOM file, with its size and MD5

    assert server.answers()
    assert contents(server) == stored  # every instance, byte for byte
    if kind == "postgresql":
        owner = db.sql("SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = current_database()")
        assert owner.stdout.strip() == db.user
    else:
        collation = db.sql("SELECT DEFAULT_COLLATION_NAME FROM information_schema.SCHEMATA "
                           f"WHERE SCHEMA_NAME = '{db.database}'", database="").stdout.strip()
        assert collation == "utf8mb4_unicode_ci"


def test_containerised_orthanc_beside_its_postgresql_container(db_containers, tmp_path):
    """The compose layout of Orthanc Team's samples: Orthanc (the orthancteam-like entrypoint, its
    effective configuration generated inside the container) and PostgreSQL as the services
    "orthanc" and "db" of one project, the configuration's host being "db". The backup role finds
    both by the compose labels and dumps with the db container's pg_dump; the studies are then
    deleted through Orthanc, and the restore role replaces the database inside its container
    (orthanc_restore_db_replace) between the Orthanc container's stop and start. A project
    without the database service is a clear failure."""
    db = db_containers("podman", "postgresql")
    labels = ["--label", f"com.docker.compose.project={db.project}", "--label", "com.docker.compose.service=orthanc",
              "--add-host", "db:127.0.0.1"]  # "db" as the project's network would resolve it
    orthanc = OrthancContainer("podman", tmp_path, volume=True, extra=labels)
    section = dict(db.orthanc_config(storage_in_database=True)["PostgreSQL"], Host="db")
    (orthanc.etc / "postgresql.json").write_text(json.dumps({
        "Plugins": ["/usr/share/orthanc/plugins/libOrthancPostgreSQLIndex.so",
                    "/usr/share/orthanc/plugins/libOrthancPostgreSQLStorage.so"], "PostgreSQL": section}))
    try:
        orthanc.run()
        assert orthanc.rest("GET", "/system")["DatabaseBackendPlugin"]
        orthanc.store(tmp_path, patients=2)
        stored = orthanc.contents()
        assert len(stored) == 6
        inventory = write_inventory(tmp_path / "inventory.json", {"c": {
            "ansible_connection": "local", "ansible_python_interpreter": MODULE_PYTHON, "orthanc_url": orthanc.url,
            "orthanc_backup_root": str(tmp_path / "backups"), "orthanc_backup_settle_seconds": 0,
            "orthanc_compose_project": db.project, "orthanc_container_engine": "podman",
            "orthanc_restore_db_replace": True}})
        with procs.SecretWatch(db.secrets, DUMP_TOOLS | RESTORE_TOOLS, host_environ_only=True) as watch:
            backed_up = run_playbook(inventory)
            assert backed_up.returncode == 0, backed_up.stdout
            for patient in orthanc.rest("GET", "/patients"):
                orthanc.rest("DELETE", f"/patients/{patient}")
            assert orthanc.rest("GET", "/statistics")["CountInstances"] == 0
            restored = run_playbook(inventory, playbook="restore.yml", extra_vars=CONFIRM)
            assert restored.returncode == 0, restored.stdout
        assert watch.seen & {"pg_dump"} and watch.seen & {"pg_restore"}
        assert not watch.leaks, watch.leaks
        manifest = checks.read_manifest((tmp_path / "backups" / "latest").resolve())
        assert manifest["strategy"] == "dump" and manifest["dump"]["container"] == db.name
        assert manifest["downtime_seconds"] == 0
        orthanc.wait()
        assert orthanc.contents() == stored
        # a project without the service that the configuration's host names: a clear failure
        other = run_module("db_dump", {"config_path": str(orthanc.etc / "postgresql.json"),
                                       "compose_project": db.project + "-other", "dest": str(tmp_path / "x.pgdump")})
        assert other["failed"] and "compose service 'db' of project" in other["msg"] and "not found" in other["msg"]
        assert not (tmp_path / "x.pgdump").exists()
    finally:
        orthanc.remove()

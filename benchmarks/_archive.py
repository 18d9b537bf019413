r"""One synthetic archive that Orthanc accepts as its own, for every benchmark.

Storing GiBs or millions of instances over REST would take too long, so ``build_archive``
builds the archive of a private Orthanc 1.10.1 (tests/support/orthanc_server.py) synthetically
but consistently:

1. Orthanc starts on empty folders, creates its schema and stores a few real instances over
   REST (``SEED_INSTANCES``), then it is stopped;
2. the rows Orthanc wrote for its first instance and that instance's parents are the templates.
   For each synthetic file, the rows of one instance (and, when needed, of a new series, study
   and patient) are written: ``Resources`` with public IDs computed as Orthanc computes them,
   ``MainDicomTags``, ``DicomIdentifiers``, ``Metadata``, ``Changes``, and one ``AttachedFiles``
   row with a fresh UUID and the true size and MD5 of the random bytes written to
   ``storage/xx/yy/uuid``. ``GlobalIntegers`` 0 and 1 are set to the totals;
3. with ``index_ratio``, the index is grown with free-text instance tags until it is that
   fraction of the storage (real rows take only about 1 KB per instance);
4. Orthanc starts again and must count what the index holds, know a few synthetic instances
   and give the MD5 of the file written for them.

It streams: file sizes and the hierarchy are generators, each file is written and forgotten,
rows go to the index in batches of ``BATCH`` instances, and the padding is one SQL statement per
round. Memory does not grow with the number of instances (issue 15 asks for 1 M and 5 M).

At scale (issue 15: 1 M and 5 M instances) the time goes to creating files and to inserting
rows into B-trees, so: the files are written by ``WRITERS`` processes with ``os.open`` /
``os.write`` / ``futimens`` while this process makes the rows of the next batch; Orthanc's
secondary indexes are dropped before the rows and made again after them (one sort each instead
of a random insertion per row); the SQLite connection of the builder has no fsync, its journal
in memory and a large page cache; PostgreSQL's rows are spooled to files in COPY's format while
the files are written and loaded afterwards in one transaction (no fsync of PostgreSQL's stalls
the file creation; neither triggers nor foreign-key checks fire per row: what the triggers keep
is set from the tables afterwards).

The archive is given by its size (``size_bytes``) or by its number of instances (``instances``).
``backend`` names the index: ``sqlite`` (Orthanc's default, written with Python's sqlite3) or
``postgresql`` (Debian's orthanc-postgresql plugin on the server that scripts/databases.sh
starts, in a new database with a random name; rows loaded with ``psql``'s ``\copy`` by the
database's superuser, the passwords in ``PGPASSWORD``, never on a command line; files stay on
disk).
"""

from __future__ import annotations

import hashlib
import math
import multiprocessing
import os
import random
import secrets
import shutil
import sqlite3
import subprocess
import time
import uuid as uuidlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from _bench import GIB, log  # also sys.path, for tests.support

from tests.support import databases, dicomgen  # noqa: E402
from tests.support.orthanc_server import OrthancServer  # noqa: E402

MIN_FILE, MAX_FILE = 10_000, 1_000_000      # bytes of one stored file (log-uniform in between)
ARCHIVE_AGE = 30 * 86400                    # synthetic files are dated a month back
BATCH = 5_000                               # instances whose rows are written at once
SEED_SERIES, SEED_PER_SERIES = 2, 3         # real instances stored over REST first
SEED_INSTANCES = SEED_SERIES * SEED_PER_SERIES
BACKENDS = ("sqlite", "postgresql")

# Orthanc's resource types (Resources.resourceType) and change types (Changes.changeType).
PATIENT, STUDY, SERIES, INSTANCE = 1, 2, 3, 4
LEVELS = {PATIENT: "patients", STUDY: "studies", SERIES: "series", INSTANCE: "instances"}
CHANGE_NEW = {INSTANCE: 2, PATIENT: 3, SERIES: 4, STUDY: 5}
CHANGE_STABLE = {PATIENT: 12, STUDY: 13, SERIES: 14}
# Orthanc's metadata types whose value depends on the resource (the others are copied as they are).
META_INDEX_IN_SERIES, META_RECEPTION_DATE, META_LAST_UPDATE = 1, 2, 7
# Free-text instance tags of the DICOM dictionary, used to grow the index to its target size:
# ImageComments (LT), IdentifyingComments (LT), DerivationDescription (ST),
# CommentsOnThePerformedProcedureStep (ST), AdditionalPatientHistory (LT), ... Each round of
# inflation adds one of them to every synthetic instance.
PADDING_TAGS = [(0x0020, 0x4000), (0x0008, 0x4000), (0x0008, 0x2111), (0x0040, 0x0280),
                (0x0010, 0x21B0), (0x0032, 0x4000), (0x0040, 0x2400), (0x0040, 0x3001)]
PADDING_MAX_CHARS = 10_240                  # the LT limit
PADDING_OFFSETS = 64                        # each instance's padding starts at one of these offsets

Tag = tuple[int, int]


def public_id(*identifiers: str) -> str:
    """Orthanc's public ID: SHA-1 of the DICOM identifiers joined by '|', in 5 groups of 8."""
    digest = hashlib.sha1("|".join(identifiers).encode()).hexdigest()
    return "-".join(digest[i:i + 8] for i in range(0, 40, 8))


def storage_path(storage: Path, uuid: str) -> Path:
    """Where Orthanc keeps the attachment ``uuid``: ``storage/xx/yy/uuid``."""
    return storage / uuid[0:2] / uuid[2:4] / uuid


def file_sizes(rng: random.Random, total_bytes: int | None = None, count: int | None = None,
               low: int = MIN_FILE, high: int = MAX_FILE) -> Iterator[int]:
    """File sizes, log-uniform between ``low`` and ``high``: ``count`` of them, or as many as
    add up to about ``total_bytes`` (the last one smaller, none below ``low``)."""
    if (total_bytes is None) == (count is None):
        raise ValueError("give total_bytes or count")
    lo, hi = math.log(low), math.log(high)
    if count is not None:
        for _number in range(count):
            yield int(math.exp(rng.uniform(lo, hi)))
        return
    remaining = total_bytes
    while remaining > low:
        size = min(remaining, int(math.exp(rng.uniform(lo, hi))))
        yield size
        remaining -= size


def plan_hierarchy(rng: random.Random) -> Iterator[tuple[int, int, int, int]]:
    """(patient_no, study_no, series_no, instance_no), endlessly: patients with 1-3 studies of
    1-4 series of 5-80 instances, numbered from 1."""
    patient = study = 0
    while True:
        patient += 1
        for _study in range(rng.randint(1, 3)):
            study += 1
            for series in range(1, rng.randint(1, 4) + 1):
                for instance in range(1, rng.randint(5, 80) + 1):
                    yield patient, study, series, instance


def new_uid(rng: random.Random) -> str:
    """A DICOM UID under the 2.25 root (a UUID as a decimal number), drawn from ``rng``."""
    return f"2.25.{rng.getrandbits(128)}"


# --------------------------------------------------------------------------------------------
# The index


@dataclass
class Templates:
    """The rows Orthanc itself wrote for one real instance and its parents, by resource type:
    MainDicomTags and DicomIdentifiers as {(group, element): value}, Metadata as {type: value}."""
    main_tags: dict[int, dict[Tag, str]]
    identifiers: dict[int, dict[Tag, str]]
    metadata: dict[int, dict[int, str]]


@dataclass
class Rows:
    """Rows not yet written to the index, by table."""
    resources: list[tuple] = field(default_factory=list)
    main_tags: list[tuple] = field(default_factory=list)
    identifiers: list[tuple] = field(default_factory=list)
    metadata: list[tuple] = field(default_factory=list)
    attachments: list[tuple] = field(default_factory=list)
    changes: list[tuple] = field(default_factory=list)


class SqliteIndex:
    """Orthanc's SQLite index (``IndexDirectory/index``), written with sqlite3 while Orthanc is
    stopped: the rows in one transaction, the padding one statement per round."""

    TYPE_OFFSET = 0  # Resources.resourceType = PATIENT .. INSTANCE

    CACHE_KIB = 2 * 1024 * 1024  # the builder's page cache (only what is used is allocated)

    def __init__(self, server: OrthancServer) -> None:
        self.path = server.index_dir / "index"
        self.conn = sqlite3.connect(self.path, isolation_level=None)
        # The builder's own connection, alone on the file: no fsync, the rollback journal in
        # memory (the file's own mode is put back by finish), a large cache so that the B-trees
        # being filled stay in memory, the file locked once.
        self.journal_mode = self.conn.execute("PRAGMA journal_mode").fetchone()[0]
        for pragma in ("synchronous = OFF", "journal_mode = MEMORY", f"cache_size = -{self.CACHE_KIB}",
                       "locking_mode = EXCLUSIVE", "temp_store = MEMORY"):
            self.conn.execute(f"PRAGMA {pragma}")
        self.dropped: list[tuple[str, str]] = []  # (name, CREATE INDEX statement)

    def templates(self) -> Templates:
        """The rows Orthanc wrote for its first instance and that instance's parents."""
        conn = self.conn
        chain: dict[int, int] = {}  # resourceType -> internalId
        internal_id = conn.execute(
            "SELECT MIN(internalId) FROM Resources WHERE resourceType = ?", (INSTANCE,)).fetchone()[0]
        while internal_id is not None:
            rtype, parent = conn.execute(
                "SELECT resourceType, parentId FROM Resources WHERE internalId = ?", (internal_id,)).fetchone()
            chain[rtype] = internal_id
            internal_id = parent
        if sorted(chain) != [PATIENT, STUDY, SERIES, INSTANCE]:
            raise RuntimeError(f"unexpected resource hierarchy in the seeded index: {chain}")

        def tags(table: str, rid: int) -> dict[Tag, str]:
            return {(g, e): v for g, e, v in conn.execute(
                f"SELECT tagGroup, tagElement, value FROM {table} WHERE id = ?", (rid,))}

        return Templates(
            main_tags={t: tags("MainDicomTags", rid) for t, rid in chain.items()},
            identifiers={t: tags("DicomIdentifiers", rid) for t, rid in chain.items()},
            metadata={t: dict(conn.execute("SELECT type, value FROM Metadata WHERE id = ?", (rid,)))
                      for t, rid in chain.items()},
        )

    def next_id(self) -> int:
        return self.conn.execute("SELECT COALESCE(MAX(internalId), 0) + 1 FROM Resources").fetchone()[0]

    def begin(self) -> None:
        """Open the transaction and drop Orthanc's secondary indexes (made again by commit:
        one sort per index instead of a random B-tree insertion per row)."""
        self.conn.execute("BEGIN")
        self.dropped = self.conn.execute(
            "SELECT name, sql FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL ORDER BY name").fetchall()
        for name, _sql in self.dropped:
            self.conn.execute(f'DROP INDEX "{name}"')

    def write(self, rows: Rows) -> None:
        conn = self.conn
        conn.executemany("INSERT INTO Resources (internalId, resourceType, publicId, parentId) VALUES (?,?,?,?)",
                         rows.resources)
        conn.executemany("INSERT INTO MainDicomTags VALUES (?,?,?,?)", rows.main_tags)
        conn.executemany("INSERT INTO DicomIdentifiers VALUES (?,?,?,?)", rows.identifiers)
        conn.executemany("INSERT INTO Metadata VALUES (?,?,?)", rows.metadata)
        conn.executemany("INSERT INTO AttachedFiles VALUES (?,?,?,?,?,?,?,?)", rows.attachments)
        conn.executemany("INSERT INTO Changes (changeType, internalId, resourceType, date) VALUES (?,?,?,?)",
                         rows.changes)

    def commit(self) -> None:
        for _name, sql in self.dropped:
            self.conn.execute(sql)
        self.dropped = []
        self.conn.execute("COMMIT")

    def size(self) -> int:
        """Bytes of the database file (pages in use plus free pages)."""
        return (self.conn.execute("PRAGMA page_count").fetchone()[0]
                * self.conn.execute("PRAGMA page_size").fetchone()[0])

    def pad(self, first_id: int, tag: Tag, text: str, chars: int) -> int:
        """Give every instance from internalId ``first_id`` on a MainDicomTags row ``tag`` of
        ``chars`` characters of ``text`` (from an offset that depends on the instance)."""
        return self.conn.execute(
            "INSERT INTO MainDicomTags SELECT internalId, ?, ?, substr(?, (internalId * 7) % ? + 1, ?) "
            "FROM Resources WHERE resourceType = ? AND internalId >= ?",
            (tag[0], tag[1], text, PADDING_OFFSETS, chars, INSTANCE, first_id)).rowcount

    def finish(self) -> dict[str, int]:
        """Set GlobalIntegers 0/1 to the totals of AttachedFiles (Orthanc's triggers keep them
        on INSERT; set them from the table all the same), check the database, close it.
        Returns the counts of resources."""
        conn = self.conn
        try:
            conn.execute("BEGIN")
            conn.execute("UPDATE GlobalIntegers SET value = (SELECT COALESCE(SUM(compressedSize), 0) "
                         "FROM AttachedFiles) WHERE key = 0")
            conn.execute("UPDATE GlobalIntegers SET value = (SELECT COALESCE(SUM(uncompressedSize), 0) "
                         "FROM AttachedFiles) WHERE key = 1")
            conn.execute("COMMIT")
            counts = {LEVELS[t]: n for t, n in conn.execute(
                "SELECT resourceType, COUNT(*) FROM Resources GROUP BY resourceType ORDER BY resourceType")}
            problems = conn.execute("PRAGMA quick_check").fetchall()
            if problems != [("ok",)]:
                raise RuntimeError(f"the built index fails quick_check: {problems[:5]}")
            conn.execute(f"PRAGMA journal_mode = {self.journal_mode}")  # the file's own mode again
            return counts
        finally:
            self.close()

    def close(self) -> None:
        self.conn.close()  # checkpoints the WAL into index

    def final_bytes(self) -> int:
        """Bytes of the index files on disk (after close)."""
        return sum(p.stat().st_size for p in self.path.parent.glob("index*"))


COPY_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})
NULL = "\\N"


class PostgresIndex:
    r"""Orthanc's index in PostgreSQL (orthanc-postgresql 4.0), written while Orthanc is stopped.

    The rows are spooled in COPY's text format into one file per table next to the archive
    (``begin``/``write``: no database work while the files are written, so that PostgreSQL's
    fsyncs do not stall the creation of millions of files); ``commit`` then loads them in one
    transaction of one ``psql`` session of the database's superuser: the public tables'
    secondary indexes dropped, ``session_replication_role = replica`` (neither Orthanc's
    triggers nor the foreign-key checks fire, row by row), ``\copy`` of each spool file, the
    indexes created again from their own definitions (one sort each). ``finish`` then sets what
    the triggers keep (GlobalIntegers, PatientRecyclingOrder, the sequence of internalIds) from
    the tables. The password is in ``PGPASSWORD``, never on a command line. The plugin numbers
    resource types from 0."""

    TYPE_OFFSET = -1
    TABLES = {  # Rows field -> COPY target
        "resources": "resources (internalid, resourcetype, publicid, parentid)",
        "main_tags": "maindicomtags (id, taggroup, tagelement, value)",
        "identifiers": "dicomidentifiers (id, taggroup, tagelement, value)",
        "metadata": "metadata (id, type, value, revision)",
        "attachments": "attachedfiles (id, filetype, uuid, compressedsize, uncompressedsize, compressiontype, "
                       "uncompressedhash, compressedhash, revision)",
        "changes": "changes (changetype, internalid, resourcetype, date)",
    }

    def __init__(self, server: OrthancServer, database: databases.Database, spool: Path) -> None:
        section = server.extra_config["PostgreSQL"]
        where = ["-h", str(section["Host"]), "-p", str(section["Port"]), "-d", section["Database"]]
        self.argv = ["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", *where, "-U", section["Username"]]
        self.env = dict(os.environ, PGPASSWORD=section["Password"])
        self.admin_argv = ["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", *where, "-U", database.admin_user]
        self.admin_env = dict(os.environ, PGPASSWORD=database.admin_password)
        self.spool_dir = spool
        self.spool: dict[str, object] = {}
        self.first_id = 0

    def query(self, sql: str, admin: bool = False) -> list[list[str]]:
        """Rows of a query, as strings (no NULL nor tab expected in what is read here)."""
        proc = subprocess.run([*(self.admin_argv if admin else self.argv), "-A", "-t", "-F", "\t", "-c", sql],
                              env=self.admin_env if admin else self.env, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"psql: {proc.stderr.strip()}")
        return [line.split("\t") for line in proc.stdout.splitlines() if line]

    def templates(self) -> Templates:
        off = self.TYPE_OFFSET
        chain: dict[int, int] = {}
        found = self.query(f"SELECT MIN(internalid) FROM resources WHERE resourcetype = {INSTANCE + off}")
        internal_id = int(found[0][0]) if found and found[0][0] else None
        while internal_id is not None:
            rtype, parent = self.query(f"SELECT resourcetype, parentid FROM resources WHERE internalid = {internal_id}")[0]
            chain[int(rtype) - off] = internal_id
            internal_id = int(parent) if parent else None
        if sorted(chain) != [PATIENT, STUDY, SERIES, INSTANCE]:
            raise RuntimeError(f"unexpected resource hierarchy in the seeded index: {chain}")

        def tags(table: str, rid: int) -> dict[Tag, str]:
            return {(int(g), int(e)): v for g, e, v in self.query(
                f"SELECT taggroup, tagelement, value FROM {table} WHERE id = {rid}")}

        return Templates(
            main_tags={t: tags("maindicomtags", rid) for t, rid in chain.items()},
            identifiers={t: tags("dicomidentifiers", rid) for t, rid in chain.items()},
            metadata={t: {int(k): v for k, v in self.query(f"SELECT type, value FROM metadata WHERE id = {rid}")}
                      for t, rid in chain.items()},
        )

    def next_id(self) -> int:
        self.first_id = int(self.query("SELECT COALESCE(MAX(internalid), 0) + 1 FROM resources")[0][0])
        return self.first_id

    def begin(self) -> None:
        self.spool_dir.mkdir(parents=True, exist_ok=True)
        self.spool = {name: open(self.spool_dir / f"{name}.copy", "w", encoding="utf-8", buffering=1 << 20)
                      for name in self.TABLES}

    def write(self, rows: Rows) -> None:
        """Append the rows to the spool files, in COPY's text format (only text can hold a
        character COPY escapes; revision 0, as Orthanc 1.10 writes)."""
        esc = COPY_ESCAPES
        out = self.spool
        out["resources"].write("".join(
            f"{rid}\t{rtype}\t{pub}\t{NULL if parent is None else parent}\n" for rid, rtype, pub, parent in rows.resources))
        for name in ("main_tags", "identifiers"):
            out[name].write("".join(f"{rid}\t{g}\t{e}\t{v.translate(esc)}\n" for rid, g, e, v in getattr(rows, name)))
        out["metadata"].write("".join(f"{rid}\t{k}\t{v.translate(esc)}\t0\n" for rid, k, v in rows.metadata))
        out["attachments"].write("".join(f"{rid}\t{ftype}\t{uuid}\t{c}\t{u}\t{ct}\t{uh}\t{ch}\t0\n"
                                         for rid, ftype, uuid, c, u, ct, uh, ch in rows.attachments))
        out["changes"].write("".join(f"{ctype}\t{rid}\t{rtype}\t{date}\n" for ctype, rid, rtype, date in rows.changes))

    def commit(self) -> None:
        """Load the spool files in one transaction (see the class); remove them."""
        for handle in self.spool.values():
            handle.close()
        self.spool = {}
        indexes = self.query(  # the public tables' indexes that back no constraint
            "SELECT i.indexname, i.indexdef FROM pg_indexes i WHERE i.schemaname = 'public' AND NOT EXISTS "
            "(SELECT 1 FROM pg_constraint c WHERE c.conindid = (quote_ident(i.schemaname) || '.' || "
            "quote_ident(i.indexname))::regclass) ORDER BY i.indexname", admin=True)
        script = ("SET session_replication_role = replica;\nSET maintenance_work_mem = '512MB';\n"
                  "SET synchronous_commit = off;\nBEGIN;\n"
                  + "".join(f'DROP INDEX public."{name}";\n' for name, _def in indexes)
                  + "".join(f"\\copy {target} FROM '{self.spool_dir / (name + '.copy')}'\n"
                            for name, target in self.TABLES.items())
                  + "".join(f"{definition};\n" for _name, definition in indexes)
                  + "COMMIT;\n")
        proc = subprocess.run(self.admin_argv, input=script, env=self.admin_env, capture_output=True, text=True,
                              check=False)
        shutil.rmtree(self.spool_dir, ignore_errors=True)
        if proc.returncode != 0:
            raise RuntimeError(f"psql: {proc.stderr.strip()}")

    def size(self) -> int:
        """Bytes of Orthanc's tables with their indexes and TOAST (not the empty database's own)."""
        return int(self.query(
            "SELECT COALESCE(SUM(pg_total_relation_size(c.oid)), 0) FROM pg_class c JOIN pg_namespace n "
            "ON n.oid = c.relnamespace WHERE n.nspname = 'public' AND c.relkind = 'r'")[0][0])

    def pad(self, first_id: int, tag: Tag, text: str, chars: int) -> int:
        literal = text.replace("'", "''")
        return int(self.query(
            f"WITH added AS (INSERT INTO maindicomtags SELECT internalid, {tag[0]}, {tag[1]}, "
            f"substr('{literal}'::text, ((internalid * 7) % {PADDING_OFFSETS} + 1)::integer, {chars}) FROM resources "
            f"WHERE resourcetype = {INSTANCE + self.TYPE_OFFSET} AND internalid >= {first_id} RETURNING 1) "
            "SELECT COUNT(*) FROM added")[0][0])

    def finish(self) -> dict[str, int]:
        """What the disabled triggers keep, set from the tables; the counts of resources."""
        off = self.TYPE_OFFSET
        self.query(
            "BEGIN; "
            "SELECT setval('resources_internalid_seq', (SELECT MAX(internalid) FROM resources)); "
            "UPDATE globalintegers SET value = (SELECT COALESCE(SUM(compressedsize), 0) FROM attachedfiles) WHERE key = 0; "
            "UPDATE globalintegers SET value = (SELECT COALESCE(SUM(uncompressedsize), 0) FROM attachedfiles) WHERE key = 1; "
            + "".join(f"UPDATE globalintegers SET value = (SELECT COUNT(*) FROM resources WHERE resourcetype = {t}) "
                      f"WHERE key = {t + 2}; " for t in range(4))
            + "UPDATE globalintegers SET value = (SELECT COALESCE(MAX(seq), 0) FROM changes) WHERE key = 6; "
            f"INSERT INTO patientrecyclingorder (patientid) SELECT internalid FROM resources "
            f"WHERE resourcetype = {PATIENT + off} AND internalid >= {self.first_id} ORDER BY internalid; "
            "COMMIT; ANALYZE;")
        return {LEVELS[int(t) - off]: int(n) for t, n in self.query(
            "SELECT resourcetype, COUNT(*) FROM resources GROUP BY resourcetype ORDER BY resourcetype")}

    def close(self) -> None:
        for handle in self.spool.values():
            handle.close()
        self.spool = {}
        shutil.rmtree(self.spool_dir, ignore_errors=True)

    def final_bytes(self) -> int:
        return self.size()


# --------------------------------------------------------------------------------------------
# The rows of one instance


def fill_tags(template: dict[Tag, str], values: dict[Tag, str]) -> dict[Tag, str]:
    """The template's tags with our values where we have one, else the template's value."""
    return {tag: values.get(tag, old) for tag, old in template.items()}


def fill_identifiers(template_ids: dict[Tag, str], template_main: dict[Tag, str],
                     values: dict[Tag, str]) -> dict[Tag, str]:
    """DicomIdentifiers rows: like MainDicomTags, upper-cased where Orthanc upper-cased
    (names, descriptions), as seen in the template."""
    out = {}
    for tag, old in template_ids.items():
        value = values.get(tag, old)
        upper = old != template_main.get(tag, old) and old == template_main.get(tag, old).upper()
        out[tag] = value.upper() if upper else value
    return out


class Synthesizer:
    """Appends to ``rows`` the rows of each new instance and of the parents it opens."""

    def __init__(self, tpl: Templates, next_id: int, rng: random.Random, date: str, type_offset: int = 0) -> None:
        self.tpl, self.next_id, self.rng, self.date, self.offset = tpl, next_id, rng, date, type_offset
        self.rows = Rows()
        self.current: dict[int, tuple[int, str, dict]] = {}  # level -> (internalId, publicId, values)
        self.keys: dict[int, int] = {}  # level -> number of the open parent

    def _resource(self, level: int, parent: int | None, pub: str, values: dict, extra_meta: dict) -> int:
        rid, tpl, rows = self.next_id, self.tpl, self.rows
        self.next_id += 1
        rows.resources.append((rid, level + self.offset, pub, parent))
        rows.main_tags.extend((rid, g, e, v) for (g, e), v in fill_tags(tpl.main_tags[level], values).items())
        rows.identifiers.extend((rid, g, e, v) for (g, e), v in
                                fill_identifiers(tpl.identifiers[level], tpl.main_tags[level], values).items())
        meta = {**tpl.metadata[level], **{k: v for k, v in extra_meta.items() if k in tpl.metadata[level]}}
        rows.metadata.extend((rid, k, v) for k, v in meta.items())
        rows.changes.append((CHANGE_NEW[level], rid, level + self.offset, self.date))
        if level in CHANGE_STABLE:
            rows.changes.append((CHANGE_STABLE[level], rid, level + self.offset, self.date))
        return rid

    def _open(self, level: int, number: int, parent: int | None, pub: str, values: dict) -> None:
        rid = self._resource(level, parent, pub, values, {META_LAST_UPDATE: self.date})
        self.current[level] = (rid, pub, values)
        self.keys[level] = number

    def instance(self, position: tuple[int, int, int, int]) -> tuple[int, str]:
        """The rows of the instance at ``position`` (from plan_hierarchy); (internalId, publicId)."""
        p_no, st_no, se_no, in_no = position
        rng = self.rng
        if self.keys.get(PATIENT) != p_no:
            values = {(0x0010, 0x0010): f"Synthetic^Patient{p_no}", (0x0010, 0x0020): f"SYN{p_no:07d}",
                      (0x0010, 0x0030): f"19{rng.randint(30, 99)}0{rng.randint(1, 9)}1{rng.randint(0, 9)}",
                      (0x0010, 0x0040): rng.choice("MFO")}
            self._open(PATIENT, p_no, None, public_id(values[(0x0010, 0x0020)]), values)
        if self.keys.get(STUDY) != st_no:
            values = {**self.current[PATIENT][2], (0x0020, 0x000D): new_uid(rng), (0x0020, 0x0010): str(st_no),
                      (0x0008, 0x0020): f"20{rng.randint(10, 24)}0{rng.randint(1, 9)}1{rng.randint(0, 9)}",
                      (0x0008, 0x0030): f"{rng.randint(7, 19):02d}{rng.randint(0, 59):02d}00",
                      (0x0008, 0x0050): f"SYNACC{st_no:07d}", (0x0008, 0x1030): f"Synthetic study {st_no}"}
            self._open(STUDY, st_no, self.current[PATIENT][0],
                       public_id(values[(0x0010, 0x0020)], values[(0x0020, 0x000D)]), values)
            self.keys.pop(SERIES, None)
        study = self.current[STUDY][2]
        if self.keys.get(SERIES) != se_no:
            values = {(0x0020, 0x000E): new_uid(rng), (0x0020, 0x0011): str(se_no),
                      (0x0008, 0x0060): rng.choice(["CT", "MR", "CR", "US", "OT"]),
                      (0x0008, 0x103E): f"Synthetic series {se_no}"}
            self._open(SERIES, se_no, self.current[STUDY][0],
                       public_id(study[(0x0010, 0x0020)], study[(0x0020, 0x000D)], values[(0x0020, 0x000E)]),
                       values)
        sop_uid = new_uid(rng)
        pub = public_id(study[(0x0010, 0x0020)], study[(0x0020, 0x000D)],
                        self.current[SERIES][2][(0x0020, 0x000E)], sop_uid)
        rid = self._resource(INSTANCE, self.current[SERIES][0], pub,
                             {(0x0008, 0x0018): sop_uid, (0x0020, 0x0013): str(in_no)},
                             {META_INDEX_IN_SERIES: str(in_no), META_RECEPTION_DATE: self.date})
        return rid, pub

    def attach(self, rid: int, file_uuid: str, size: int, md5: str) -> None:
        """The instance's DICOM attachment: fileType 1, uncompressed (compressionType 1)."""
        self.rows.attachments.append((rid, 1, file_uuid, size, size, 1, md5, md5))

    def take(self) -> Rows:
        rows, self.rows = self.rows, Rows()
        return rows


# --------------------------------------------------------------------------------------------
# The archive


@dataclass
class Archive:
    """An archive built by ``build_archive``, held by its OrthancServer (running); ``close``
    stops it (and drops the PostgreSQL database)."""
    server: OrthancServer
    target_bytes: int | None                 # the size asked for, or None when built by count
    files: int                               # storage files (the seed's included)
    storage_bytes: int
    index_bytes: int
    padding_rows: int
    counts: dict[str, int]
    build_seconds: float
    sample_instances: list[tuple[str, str]] = field(default_factory=list)  # (publicId, md5)
    backend: str = "sqlite"
    database: databases.Database | None = None  # the index's database (postgresql)

    def close(self) -> None:
        """Stop Orthanc and drop the index's database, if it has one."""
        self.server.stop()
        if self.database is not None:
            self.database.drop()
            self.database = None

    @property
    def size_gib(self) -> float:
        """The size asked for in GiB (the storage's when built by count)."""
        return (self.target_bytes if self.target_bytes is not None else self.storage_bytes) / GIB


def seed_real_instances(server: OrthancServer, workdir: Path) -> None:
    """Let Orthanc create its schema and store a few real instances over REST."""
    files = dicomgen.make_study(workdir / "seed-dicom", "SEED0001", "Seed^Patient", series=SEED_SERIES,
                                instances_per_series=SEED_PER_SERIES, seed=1)
    for path in files:
        server.store_rest(path)
    shutil.rmtree(workdir / "seed-dicom")


Index = SqliteIndex | PostgresIndex


WRITERS = 2          # processes that write the storage files (this machine has 2 cores)
CHUNK = 250          # files per task given to a writer
_folders: set[str] = set()  # the folders a writer process made already


def _write_chunk(task: tuple[str, float, list[tuple[str, int]]]) -> list[str]:
    """In a writer process: write random bytes of each (uuid, size) to ``root/xx/yy/uuid``,
    dated ``mtime``; return their MD5s, in order."""
    root, mtime, items = task
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    md5s = []
    for file_uuid, size in items:
        data = os.urandom(size)
        md5s.append(hashlib.md5(data).hexdigest())
        folder = f"{root}/{file_uuid[0:2]}/{file_uuid[2:4]}"
        if folder not in _folders:
            os.makedirs(folder, exist_ok=True)
            _folders.add(folder)
        fd = os.open(f"{folder}/{file_uuid}", flags, 0o666)
        try:
            done = os.write(fd, data)
            while done < size:  # a short write (regular files rarely do)
                done += os.write(fd, data[done:])
            os.utime(fd, (mtime, mtime))
        finally:
            os.close(fd)
    return md5s


def write_files(index: Index, tpl: Templates, storage: Path, sizes: Iterator[int],
                rng: random.Random) -> tuple[int, int, int, list[tuple[str, str]]]:
    """Write one storage file per size and the rows of its instance, in batches.

    The rows are made here, the files by ``WRITERS`` processes (``_write_chunk``: the bytes,
    their MD5, the file), a batch at a time: while the writers write batch k, this process makes
    the rows of batch k+1 and writes those of batch k-1 to the index with their MD5s.

    Returns the first synthetic internalId, the files and bytes written and a few
    (publicId, md5) samples."""
    first_id = index.next_id()
    synth = Synthesizer(tpl, first_id, rng, time.strftime("%Y%m%dT%H%M%S", time.gmtime(time.time() - ARCHIVE_AGE)),
                        index.TYPE_OFFSET)
    old = time.time() - ARCHIVE_AGE
    root = os.fspath(storage)
    samples: list[tuple[str, str]] = []
    totals = {"files": 0, "written": 0}
    next_log = [time.monotonic() + 30]
    pending = None  # (rows, [(rid, pub)], [(uuid, size)], AsyncResult) of the batch being written

    def complete(batch) -> None:
        rows, meta, items, result = batch
        md5s = [md5 for chunk in result.get() for md5 in chunk]
        for (rid, pub), (file_uuid, size), md5 in zip(meta, items, md5s):
            rows.attachments.append((rid, 1, file_uuid, size, size, 1, md5, md5))  # as Synthesizer.attach
            if (len(samples) < 3 or rng.random() < 0.001) and len(samples) < 6:
                samples.append((pub, md5))
            totals["written"] += size
        totals["files"] += len(items)
        index.write(rows)
        if time.monotonic() > next_log[0]:
            log(f"  {totals['files']} files, {totals['written'] / GIB:.2f} GiB")
            next_log[0] = time.monotonic() + 30

    getrandbits = rng.getrandbits
    with multiprocessing.get_context("fork").Pool(WRITERS) as pool:
        meta: list[tuple[int, str]] = []
        items: list[tuple[str, int]] = []
        for position, size in zip(plan_hierarchy(rng), sizes):
            meta.append(synth.instance(position))
            items.append((str(uuidlib.UUID(int=getrandbits(128), version=4)), size))
            if len(items) == BATCH:
                result = pool.map_async(_write_chunk, [(root, old, items[i:i + CHUNK])
                                                       for i in range(0, len(items), CHUNK)])
                if pending is not None:
                    complete(pending)
                pending = (synth.take(), meta, items, result)
                meta, items = [], []
        if items:
            result = pool.map_async(_write_chunk, [(root, old, items[i:i + CHUNK])
                                                   for i in range(0, len(items), CHUNK)])
            if pending is not None:
                complete(pending)
            pending = (synth.take(), meta, items, result)
        if pending is not None:
            complete(pending)
    return first_id, totals["files"], totals["written"], samples


def inflate_index(index: Index, first_id: int, instances: int, target_bytes: int,
                  rng: random.Random) -> int:
    """Add free-text MainDicomTags rows (one PADDING_TAGS tag per synthetic instance and round)
    until the index reaches target_bytes. Returns the number of rows added."""
    added = 0
    letters = "ABCDEFGHIJKLMNOPQRSTUVWXYZ abcdefghijklmnopqrstuvwxyz 0123456789.,"
    for tag in PADDING_TAGS:
        missing = target_bytes - index.size()
        if missing <= 0 or instances == 0:
            break
        chars = max(16, min(PADDING_MAX_CHARS, int(missing / instances * 0.95)))
        text = "".join(rng.choice(letters) for _char in range(PADDING_MAX_CHARS + PADDING_OFFSETS))
        added += index.pad(first_id, tag, text, chars)
    return added


def check_archive(server: OrthancServer, counts: dict[str, int], samples: list[tuple[str, str]]) -> None:
    """Orthanc starts on the archive, counts what the index holds, and knows sampled instances
    with the MD5 of the file we wrote."""
    stats = server.rest("GET", "/statistics")
    seen = {"patients": stats["CountPatients"], "studies": stats["CountStudies"],
            "series": stats["CountSeries"], "instances": stats["CountInstances"]}
    if seen != counts:
        raise RuntimeError(f"Orthanc counts {seen}, the index holds {counts}")
    for pub, md5 in samples:
        if server.instance_md5(pub) != md5:
            raise RuntimeError(f"Orthanc's MD5 of {pub} differs from the file written")
        server.rest("GET", f"/instances/{pub}")


def dir_bytes(root: Path) -> tuple[int, int]:
    """(files, bytes) under root."""
    files = size = 0
    for dirpath, _dirs, names in os.walk(root):
        for name in names:
            files += 1
            size += os.lstat(os.path.join(dirpath, name)).st_size
    return files, size


def build_archive(workdir: Path, *, size_bytes: int | None = None, instances: int | None = None,
                  index_ratio: float = 0.0, seed: int = 1, backend: str = "sqlite",
                  file_size: tuple[int, int] = (MIN_FILE, MAX_FILE), name: str = "bench") -> Archive:
    """Build an archive in a new private Orthanc under ``workdir/orthanc``; leave it running.

    The synthetic files add up to about ``size_bytes``, or there are ``instances`` of them
    (one file each), with sizes log-uniform in ``file_size``. With ``index_ratio``, the index
    is grown to that fraction of the storage bytes written. ``seed`` fixes the archive's shape
    (the hierarchy, sizes, UIDs and UUIDs; the bytes are random)."""
    if backend not in BACKENDS:
        raise ValueError(f"index backend {backend!r}: this builder writes {', '.join(BACKENDS)}")
    t0 = time.monotonic()
    rng = random.Random(seed)
    sizes = file_sizes(rng, total_bytes=size_bytes, count=instances, low=file_size[0], high=file_size[1])
    database = None
    if backend == "postgresql":
        database = databases.Database("postgresql", f"bench_{secrets.token_hex(6)}").create()
    server = OrthancServer(workdir / "orthanc", name=name,
                           extra_config=database.orthanc_config(storage_in_database=False) if database else None)
    try:
        server.start()
        try:
            seed_real_instances(server, workdir)
        finally:
            server.stop()
        seed_files, seed_bytes = dir_bytes(server.storage_dir)  # Orthanc's own (the seed)
        index = (SqliteIndex(server) if database is None
                 else PostgresIndex(server, database, workdir / f"{name}-rows"))
        try:
            tpl = index.templates()
            log(f"  writing the files and their rows ({size_bytes / GIB:.2f} GiB, {backend} index)"
                if size_bytes is not None else f"  writing {instances} files and their rows ({backend} index)")
            index.begin()
            started = time.monotonic()
            first_id, files, written, samples = write_files(index, tpl, server.storage_dir, sizes, rng)
            log(f"  {files} files and their rows written in {time.monotonic() - started:.0f} s; committing")
            started = time.monotonic()
            index.commit()
            log(f"  index committed (indexes made again) in {time.monotonic() - started:.0f} s")
            padding = 0
            if index_ratio > 0:
                target = int(index_ratio * written)
                log(f"  growing the index from {index.size() / 2 ** 20:.1f} MiB towards {target / 2 ** 20:.1f} MiB")
                padding = inflate_index(index, first_id, files, target, rng)
        except BaseException:
            index.close()
            raise
        started = time.monotonic()
        counts = index.finish()
        os.sync()
        log(f"  totals set, index checked, synced in {time.monotonic() - started:.0f} s; starting Orthanc")
        files, storage_bytes = seed_files + files, seed_bytes + written
        index_bytes = index.final_bytes()
        server.start()
        check_archive(server, counts, samples)
    except BaseException:
        server.stop()
        if database is not None:
            database.drop()
        raise
    return Archive(server, size_bytes, files, storage_bytes, index_bytes, padding, counts,
                   time.monotonic() - t0, samples, backend, database)


def store_generated(server: OrthancServer, folder: Path, count: int, size_range: tuple[int, int],
                    seed: int) -> tuple[int, float]:
    """Store ``count`` real DICOM instances (tests/support/dicomgen.py, sizes uniform in
    ``size_range``) over REST; returns the bytes of the files and the seconds the stores took."""
    files = dicomgen.make_instances(folder, count, size_range=size_range, seed=seed)
    size = sum(p.stat().st_size for p in files)
    started = time.monotonic()
    for path in files:
        server.store_rest(path)
    seconds = time.monotonic() - started
    shutil.rmtree(folder)
    return size, seconds

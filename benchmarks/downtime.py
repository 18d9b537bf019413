"""How long is Orthanc unreachable during a backup? Three procedures on the same archive.

For each archive size this benchmark

1. builds a realistic archive in a private Orthanc 1.10.1 (tests/support/orthanc_server.py):
   files of 10 KB to 1 MB (log-uniform sizes) in Orthanc's ``xx/yy/uuid`` layout and a large
   SQLite index. Storing GiBs over REST would take too long, so the archive is built
   synthetically but consistently: Orthanc creates its schema and stores a few real instances,
   then rows that follow the pattern of Orthanc's own rows are inserted with sqlite3, one
   instance per file written to the storage with its true size and MD5;
2. measures, from outside, the downtime of
   - ``floor``: stop Orthanc, ``cp`` the ``index*`` files, start Orthanc (no backup can stop
     Orthanc for less than this);
   - ``documented``: stop Orthanc, ``cp -a`` storage + index + configuration, start Orthanc
     (the procedure of Orthanc's book);
   - ``ours``: playbooks/backup.yml (hot pass, stop, index capture, delta pass, start), with
     ``orthanc_backup_link_mode: copy`` for a full and then an incremental backup, and once
     with the default ``link_mode: auto`` (which hard-links here: same filesystem);
   - with ``--snapshot``: ``ours snapshot``, playbooks/backup.yml with
     ``orthanc_backup_snapshot: btrfs`` (Orthanc never stopped: a read-only btrfs snapshot is
     captured), a full and an incremental backup. The archive then lives in a btrfs subvolume
     of a loop-mounted image file in the workdir, for every procedure (needs root);
   A poller thread GETs ``/system`` every 20 ms; the downtime is the longest interval between
   two answers;
3. prints one table per size and a comparison across sizes. It reports what it measured and
   never judges: it exits non-zero only when something broke.

Run ``python3 benchmarks/downtime.py --help``; see benchmarks/README.md to read the output.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import math
import os
import random
import re
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid as uuidlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

REPO = Path(__file__).resolve().parents[1]
COLLECTIONS = REPO / ".work" / "collections"
for _path in (REPO, COLLECTIONS):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from pydicom.uid import generate_uid  # noqa: E402

from tests.support import dicomgen  # noqa: E402
from tests.support.orthanc_server import OrthancError, OrthancServer  # noqa: E402
from tests.support.playbook import link_collection, local_host, run_playbook, write_inventory  # noqa: E402

GIB = 1024 ** 3
MIN_FILE, MAX_FILE = 10_000, 1_000_000      # bytes of one stored file (log-uniform in between)
POLL_INTERVAL = 0.02                        # seconds between two GET /system
DROP_CACHES = Path("/proc/sys/vm/drop_caches")
ARCHIVE_AGE = 30 * 86400                    # synthetic files are dated a month back

# Orthanc's resource types (Resources.resourceType) and change types (Changes.changeType).
PATIENT, STUDY, SERIES, INSTANCE = 1, 2, 3, 4
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


# --------------------------------------------------------------------------------------------
# Small helpers


def log(message: str) -> None:
    """Progress on stderr, so stdout holds only the results."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def human(n: float) -> str:
    """1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def public_id(*identifiers: str) -> str:
    """Orthanc's public ID: SHA-1 of the DICOM identifiers joined by '|', in 5 groups of 8."""
    digest = hashlib.sha1("|".join(identifiers).encode()).hexdigest()
    return "-".join(digest[i:i + 8] for i in range(0, 40, 8))


def storage_path(storage: Path, uuid: str) -> Path:
    return storage / uuid[0:2] / uuid[2:4] / uuid


def sqlite_size(conn: sqlite3.Connection) -> int:
    """Bytes of the database file (pages in use plus free pages)."""
    return conn.execute("PRAGMA page_count").fetchone()[0] * conn.execute("PRAGMA page_size").fetchone()[0]


def dir_bytes(root: Path) -> tuple[int, int]:
    """(files, bytes) under root."""
    files = size = 0
    for dirpath, _dirs, names in os.walk(root):
        for name in names:
            files += 1
            size += os.lstat(os.path.join(dirpath, name)).st_size
    return files, size


def flush_and_maybe_drop_caches(cold: bool) -> None:
    """Write dirty pages back (so no flush runs during a measurement), then empty the page
    cache when ``cold``."""
    os.sync()
    if cold:
        DROP_CACHES.write_text("3\n")


def cold_supported() -> bool:
    """Whether the page cache can be dropped (root and a writable /proc/sys)."""
    return DROP_CACHES.exists() and os.access(DROP_CACHES, os.W_OK)


# --------------------------------------------------------------------------------------------
# Phase 1: build an archive


@dataclass
class Templates:
    """The rows Orthanc itself wrote for one real instance and its parents, by resource type:
    MainDicomTags and DicomIdentifiers as {(group, element): value}, Metadata as {type: value}."""
    main_tags: dict[int, dict[tuple[int, int], str]]
    identifiers: dict[int, dict[tuple[int, int], str]]
    metadata: dict[int, dict[int, str]]


@dataclass
class Archive:
    """An archive built by ``build_archive``, held by a (stopped) OrthancServer."""
    server: OrthancServer
    size_gib: float
    files: int
    storage_bytes: int
    index_bytes: int
    padding_rows: int
    counts: dict[str, int]
    build_seconds: float
    sample_instances: list[tuple[str, str]] = field(default_factory=list)  # (publicId, md5)


def seed_real_instances(server: OrthancServer, workdir: Path) -> None:
    """Let Orthanc create its schema and store a few real instances over REST."""
    files = dicomgen.make_study(workdir / "seed-dicom", "SEED0001", "Seed^Patient", series=2,
                                instances_per_series=3, seed=1)
    for path in files:
        server.store_rest(path)
    shutil.rmtree(workdir / "seed-dicom")


def read_templates(conn: sqlite3.Connection) -> Templates:
    """Read the rows Orthanc wrote for its first instance and that instance's parents."""
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

    def tags(table: str, rid: int) -> dict[tuple[int, int], str]:
        return {(g, e): v for g, e, v in conn.execute(
            f"SELECT tagGroup, tagElement, value FROM {table} WHERE id = ?", (rid,))}

    return Templates(
        main_tags={t: tags("MainDicomTags", rid) for t, rid in chain.items()},
        identifiers={t: tags("DicomIdentifiers", rid) for t, rid in chain.items()},
        metadata={t: dict(conn.execute("SELECT type, value FROM Metadata WHERE id = ?", (rid,)))
                  for t, rid in chain.items()},
    )


def plan_files(total_bytes: int, rng: random.Random) -> list[int]:
    """File sizes, log-uniform between MIN_FILE and MAX_FILE, adding up to about total_bytes."""
    sizes: list[int] = []
    remaining = total_bytes
    lo, hi = math.log(MIN_FILE), math.log(MAX_FILE)
    while remaining > MIN_FILE:
        size = min(remaining, int(math.exp(rng.uniform(lo, hi))))
        sizes.append(size)
        remaining -= size
    return sizes


def plan_hierarchy(n_instances: int, rng: random.Random) -> Iterator[tuple[int, int, int, int]]:
    """Yield (patient_no, study_no, series_no, instance_no) for n_instances: patients with 1-3
    studies of 1-4 series of 5-80 instances, numbered from 1."""
    made = patient = study = 0
    while made < n_instances:
        patient += 1
        for _study in range(rng.randint(1, 3)):
            study += 1
            for series in range(1, rng.randint(1, 4) + 1):
                for instance in range(1, rng.randint(5, 80) + 1):
                    if made == n_instances:
                        return
                    yield patient, study, series, instance
                    made += 1


def fill_tags(template: dict[tuple[int, int], str], values: dict[tuple[int, int], str]) -> dict[tuple[int, int], str]:
    """The template's tags with our values where we have one, else the template's value."""
    return {tag: values.get(tag, old) for tag, old in template.items()}


def fill_identifiers(template_ids: dict[tuple[int, int], str], template_main: dict[tuple[int, int], str],
                     values: dict[tuple[int, int], str]) -> dict[tuple[int, int], str]:
    """DicomIdentifiers rows: like MainDicomTags, upper-cased where Orthanc upper-cased
    (names, descriptions), as seen in the template."""
    out = {}
    for tag, old in template_ids.items():
        value = values.get(tag, old)
        upper = old != template_main.get(tag, old) and old == template_main.get(tag, old).upper()
        out[tag] = value.upper() if upper else value
    return out


def write_synthetic(conn: sqlite3.Connection, tpl: Templates, storage: Path, sizes: list[int],
                    rng: random.Random) -> tuple[list[int], list[tuple[str, str]]]:
    """Write one storage file per size and the rows of its instance (and of new parents).

    Returns the internalIds of the synthetic instances and a few (publicId, md5) samples."""
    next_id = conn.execute("SELECT COALESCE(MAX(internalId), 0) + 1 FROM Resources").fetchone()[0]
    now = time.strftime("%Y%m%dT%H%M%S", time.gmtime(time.time() - ARCHIVE_AGE))
    old = time.time() - ARCHIVE_AGE
    resources, main_rows, ident_rows, meta_rows, attach_rows, changes = [], [], [], [], [], []
    instance_ids: list[int] = []
    samples: list[tuple[str, str]] = []
    current: dict[int, tuple[int, str, dict]] = {}  # level -> (internalId, publicId, values) of the open parent
    keys: dict[int, int] = {}  # level -> number of the open parent

    def add_resource(level: int, parent: int | None, pub: str, values: dict, extra_meta: dict) -> int:
        nonlocal next_id
        rid = next_id
        next_id += 1
        resources.append((rid, level, pub, parent))
        main_rows.extend((rid, g, e, v) for (g, e), v in fill_tags(tpl.main_tags[level], values).items())
        ident_rows.extend((rid, g, e, v) for (g, e), v in
                          fill_identifiers(tpl.identifiers[level], tpl.main_tags[level], values).items())
        meta = {**tpl.metadata[level], **{k: v for k, v in extra_meta.items() if k in tpl.metadata[level]}}
        meta_rows.extend((rid, k, v) for k, v in meta.items())
        changes.append((CHANGE_NEW[level], rid, level, now))
        if level in CHANGE_STABLE:
            changes.append((CHANGE_STABLE[level], rid, level, now))
        return rid

    for (p_no, st_no, se_no, in_no), size in zip(plan_hierarchy(len(sizes), rng), sizes):
        if keys.get(PATIENT) != p_no:
            values = {(0x0010, 0x0010): f"Synthetic^Patient{p_no}", (0x0010, 0x0020): f"SYN{p_no:07d}",
                      (0x0010, 0x0030): f"19{rng.randint(30, 99)}0{rng.randint(1, 9)}1{rng.randint(0, 9)}",
                      (0x0010, 0x0040): rng.choice("MFO")}
            pub = public_id(values[(0x0010, 0x0020)])
            current[PATIENT] = (add_resource(PATIENT, None, pub, values, {META_LAST_UPDATE: now}), pub, values)
            keys[PATIENT] = p_no
        if keys.get(STUDY) != st_no:
            values = {**current[PATIENT][2], (0x0020, 0x000D): generate_uid(), (0x0020, 0x0010): str(st_no),
                      (0x0008, 0x0020): f"20{rng.randint(10, 24)}0{rng.randint(1, 9)}1{rng.randint(0, 9)}",
                      (0x0008, 0x0030): f"{rng.randint(7, 19):02d}{rng.randint(0, 59):02d}00",
                      (0x0008, 0x0050): f"SYNACC{st_no:07d}", (0x0008, 0x1030): f"Synthetic study {st_no}"}
            pub = public_id(values[(0x0010, 0x0020)], values[(0x0020, 0x000D)])
            current[STUDY] = (add_resource(STUDY, current[PATIENT][0], pub, values, {META_LAST_UPDATE: now}),
                              pub, values)
            keys[STUDY] = st_no
            keys.pop(SERIES, None)
        if keys.get(SERIES) != se_no:
            values = {(0x0020, 0x000E): generate_uid(), (0x0020, 0x0011): str(se_no),
                      (0x0008, 0x0060): rng.choice(["CT", "MR", "CR", "US", "OT"]),
                      (0x0008, 0x103E): f"Synthetic series {se_no}"}
            study_values = current[STUDY][2]
            pub = public_id(study_values[(0x0010, 0x0020)], study_values[(0x0020, 0x000D)],
                            values[(0x0020, 0x000E)])
            current[SERIES] = (add_resource(SERIES, current[STUDY][0], pub, values, {META_LAST_UPDATE: now}),
                               pub, values)
            keys[SERIES] = se_no
        sop_uid = generate_uid()
        values = {(0x0008, 0x0018): sop_uid, (0x0020, 0x0013): str(in_no)}
        pub = public_id(current[STUDY][2][(0x0010, 0x0020)], current[STUDY][2][(0x0020, 0x000D)],
                        current[SERIES][2][(0x0020, 0x000E)], sop_uid)
        rid = add_resource(INSTANCE, current[SERIES][0], pub, values,
                           {META_INDEX_IN_SERIES: str(in_no), META_RECEPTION_DATE: now})
        instance_ids.append(rid)

        data = os.urandom(size)
        md5 = hashlib.md5(data).hexdigest()
        file_uuid = str(uuidlib.uuid4())
        path = storage_path(storage, file_uuid)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        os.utime(path, (old, old))
        attach_rows.append((rid, 1, file_uuid, size, size, 1, md5, md5))
        if len(samples) < 3 or rng.random() < 0.001:
            samples.append((pub, md5))

    conn.executemany("INSERT INTO Resources (internalId, resourceType, publicId, parentId) VALUES (?,?,?,?)",
                     resources)
    conn.executemany("INSERT INTO MainDicomTags VALUES (?,?,?,?)", main_rows)
    conn.executemany("INSERT INTO DicomIdentifiers VALUES (?,?,?,?)", ident_rows)
    conn.executemany("INSERT INTO Metadata VALUES (?,?,?)", meta_rows)
    conn.executemany("INSERT INTO AttachedFiles VALUES (?,?,?,?,?,?,?,?)", attach_rows)
    conn.executemany("INSERT INTO Changes (changeType, internalId, resourceType, date) VALUES (?,?,?,?)",
                     changes)
    return instance_ids, samples[:6]


def inflate_index(conn: sqlite3.Connection, instance_ids: list[int], target_bytes: int,
                  rng: random.Random) -> int:
    """Add free-text MainDicomTags rows (one PADDING_TAGS tag per instance and round) until the
    index reaches target_bytes. Returns the number of rows added."""
    added = 0
    letters = "ABCDEFGHIJKLMNOPQRSTUVWXYZ abcdefghijklmnopqrstuvwxyz 0123456789.,"
    for tag in PADDING_TAGS:
        missing = target_bytes - sqlite_size(conn)
        if missing <= 0:
            break
        chars = max(16, min(PADDING_MAX_CHARS, int(missing / len(instance_ids) * 0.95)))
        base = "".join(rng.choice(letters) for _char in range(PADDING_MAX_CHARS + 64))
        rows = [(rid, tag[0], tag[1], base[(rid * 7) % 64:(rid * 7) % 64 + chars]) for rid in instance_ids]
        conn.executemany("INSERT INTO MainDicomTags VALUES (?,?,?,?)", rows)
        added += len(rows)
    return added


def index_counts(conn: sqlite3.Connection) -> dict[str, int]:
    names = {PATIENT: "patients", STUDY: "studies", SERIES: "series", INSTANCE: "instances"}
    return {names[t]: n for t, n in conn.execute(
        "SELECT resourceType, COUNT(*) FROM Resources GROUP BY resourceType")}


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


def build_archive(workdir: Path, size_gib: float, index_ratio: float, seed: int) -> Archive:
    """Build an archive of size_gib GiB in a new private Orthanc under workdir; leave it running.

    Orthanc creates its schema and stores a few real instances; then it is stopped and the
    synthetic files and rows are added with sqlite3 in one transaction; the index is grown to
    index_ratio x the archive; GlobalIntegers 0/1 are set to the totals of AttachedFiles; Orthanc
    is started again and must count everything."""
    t0 = time.monotonic()
    rng = random.Random(seed)
    server = OrthancServer(workdir / "orthanc", name=f"bench{str(size_gib).replace('.', '_')}")
    server.start()
    try:
        seed_real_instances(server, workdir)
    finally:
        server.stop()
    index_file = server.index_dir / "index"
    conn = sqlite3.connect(index_file, isolation_level=None)
    try:
        conn.execute("PRAGMA synchronous = OFF")
        tpl = read_templates(conn)
        sizes = plan_files(int(size_gib * GIB), rng)
        log(f"  writing {len(sizes)} files ({human(sum(sizes))}) and their rows")
        conn.execute("BEGIN")
        instance_ids, samples = write_synthetic(conn, tpl, server.storage_dir, sizes, rng)
        conn.execute("COMMIT")
        target = int(index_ratio * size_gib * GIB)
        log(f"  growing the index from {human(sqlite_size(conn))} towards {human(target)}")
        conn.execute("BEGIN")
        padding = inflate_index(conn, instance_ids, target, rng)
        # Orthanc's triggers keep these totals on INSERT; set them from the table all the same.
        conn.execute("UPDATE GlobalIntegers SET value = (SELECT COALESCE(SUM(compressedSize), 0) "
                     "FROM AttachedFiles) WHERE key = 0")
        conn.execute("UPDATE GlobalIntegers SET value = (SELECT COALESCE(SUM(uncompressedSize), 0) "
                     "FROM AttachedFiles) WHERE key = 1")
        conn.execute("COMMIT")
        counts = index_counts(conn)
        problems = conn.execute("PRAGMA quick_check").fetchall()
        if problems != [("ok",)]:
            raise RuntimeError(f"the built index fails quick_check: {problems[:5]}")
    finally:
        conn.close()  # checkpoints the WAL into index
    os.sync()
    files, storage_bytes = dir_bytes(server.storage_dir)
    index_bytes = sum(p.stat().st_size for p in server.index_dir.glob("index*"))
    server.start()
    check_archive(server, counts, samples)
    return Archive(server, size_gib, files, storage_bytes, index_bytes, padding, counts,
                   time.monotonic() - t0, samples)


# --------------------------------------------------------------------------------------------
# Phase 2: measuring downtime


@dataclass
class Outage:
    """What the poller saw: the longest interval without an answer (monotonic seconds) and
    when it began and ended (wall clock, to line it up with the playbook's output)."""
    seconds: float
    began: float
    ended: float
    outages: int
    probes: int


class Poller:
    """GET /system every POLL_INTERVAL in a thread; records the longest interval between two
    answers. Use as a context manager around the procedure; ``result`` is set on exit."""

    def __init__(self, port: int, interval: float = POLL_INTERVAL) -> None:
        self.port, self.interval = port, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._lock = threading.Lock()
        self.result: Outage | None = None
        self._longest = (0.0, 0.0, 0.0)
        self._last_ok: tuple[float, float] | None = None  # (monotonic, wall)
        self._down = False
        self._outages = self._probes = 0
        self.still_down = False

    def _probe(self) -> bool:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=1)
        try:
            conn.request("GET", "/system")
            response = conn.getresponse()
            response.read()
            return response.status == 200
        except (OSError, http.client.HTTPException):
            return False
        finally:
            conn.close()

    def _run(self) -> None:
        next_tick = time.monotonic()
        while not self._stop.is_set():
            ok = self._probe()
            mono, wall = time.monotonic(), time.time()
            with self._lock:
                self._probes += 1
                if ok:
                    if self._down and self._last_ok is not None:
                        gap = mono - self._last_ok[0]
                        if gap > self._longest[0]:
                            self._longest = (gap, self._last_ok[1], wall)
                    self._down = False
                    self._last_ok = (mono, wall)
                elif not self._down:
                    self._down = True
                    self._outages += 1
            next_tick = max(next_tick + self.interval, time.monotonic())  # no burst after a slow probe
            self._stop.wait(max(0.0, next_tick - time.monotonic()))

    def __enter__(self) -> "Poller":
        if not self._probe():
            raise OrthancError(f"Orthanc does not answer on port {self.port} before the measurement")
        self._thread.start()
        while self._last_ok is None:
            time.sleep(0.005)
        return self

    def __exit__(self, *exc) -> None:
        time.sleep(0.1)  # a few answers after the procedure, so the end of the outage is seen
        self._stop.set()
        self._thread.join()
        with self._lock:
            self.still_down = self._down
            gap, began, ended = self._longest
            self.result = Outage(gap, began, ended, self._outages, self._probes)


@dataclass
class Measurement:
    """One procedure's result."""
    procedure: str
    downtime: float                       # seen by the poller
    manifest_downtime: float | None = None
    notes: str = ""
    tasks: list[tuple[str, float, float]] = field(default_factory=list)  # (task, seconds, in outage)
    phases: dict[str, float] = field(default_factory=dict)  # the role's own timing of its stopped window


def timed(fn: Callable[[], object]) -> float:
    t0 = time.monotonic()
    fn()
    return time.monotonic() - t0


def measure_floor(archive: Archive, workdir: Path, cold: bool) -> Measurement:
    """Stop Orthanc, cp its index* files, start it."""
    server = archive.server
    dest = workdir / "floor-copy"
    dest.mkdir()
    flush_and_maybe_drop_caches(cold)
    with Poller(server.http_port) as poller:
        stop = timed(server.stop)
        files = sorted(str(p) for p in server.index_dir.glob("index*"))
        copy = timed(lambda: subprocess.run(["cp", *files, str(dest)], check=True))
        start = timed(server.start)
    shutil.rmtree(dest)
    return Measurement("floor", poller.result.seconds,
                       notes=f"stop {stop:.2f} s, cp index* {copy:.2f} s, start {start:.2f} s")


def measure_documented(archive: Archive, workdir: Path, cold: bool) -> Measurement:
    """Stop Orthanc, cp -a storage + index + configuration into a fresh folder, start it."""
    server = archive.server
    dest = workdir / "documented-copy"
    dest.mkdir()
    flush_and_maybe_drop_caches(cold)
    with Poller(server.http_port) as poller:
        stop = timed(server.stop)
        copy = timed(lambda: subprocess.run(
            ["cp", "-a", str(server.storage_dir), str(server.index_dir), str(server.config_path), str(dest)],
            check=True))
        start = timed(server.start)
    shutil.rmtree(dest)
    return Measurement("documented", poller.result.seconds,
                       notes=f"stop {stop:.2f} s, cp -a {copy:.2f} s, start {start:.2f} s")


TASK_RE = re.compile(r"^TASK \[(?:[\w.]+ : )?(.+?)\] \*+$")


def task_times(lines: list[tuple[float, str]], outage: Outage) -> list[tuple[str, float, float]]:
    """(task, seconds, seconds inside the outage) from the wall-clock times at which the
    playbook printed its task banners (a task lasts until the next banner)."""
    banners = [(t, m.group(1)) for t, line in lines if (m := TASK_RE.match(line))]
    ends = [t for t, line in lines if line.startswith(("PLAY [", "PLAY RECAP"))]
    out = []
    for i, (start, name) in enumerate(banners):
        later = [t for t, _n in banners[i + 1:]] + [t for t in ends if t > start]
        end = min(later) if later else lines[-1][0]
        inside = max(0.0, min(end, outage.ended) - max(start, outage.began))
        out.append((name, end - start, inside))
    return out


def run_ours(archive: Archive, root: Path, link_mode: str, label: str, workdir: Path,
             cold: bool, rep: int, extra_vars: dict | None = None) -> tuple[Measurement, dict, Path]:
    """Run playbooks/backup.yml on the archive's Orthanc; returns the measurement, the new
    backup's manifest and its folder. The playbook's output, each line with the time it was
    read, goes to workdir/playbook-<label>-round<rep>.log."""
    server = archive.server
    extra = {"orthanc_backup_link_mode": link_mode} if link_mode != "auto" else {}
    extra.update(extra_vars or {})
    slug = re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-")
    inventory = write_inventory(workdir / f"inventory-{slug}.json",
                                {"bench": local_host(server, root, **extra)})
    flush_and_maybe_drop_caches(cold)
    lines: list[tuple[float, str]] = []
    t0 = time.monotonic()
    with Poller(server.http_port) as poller:
        proc = run_playbook(inventory, popen=True)
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append((time.time(), line.rstrip("\n")))
        rc = proc.wait()
    total = time.monotonic() - t0
    (workdir / f"playbook-{slug}-round{rep + 1}.log").write_text(
        "".join(f"{time.strftime('%H:%M:%S', time.localtime(t))}.{int(t % 1 * 1000):03d} {line}\n"
                for t, line in lines))
    if rc != 0:
        raise RuntimeError(f"the playbook failed ({label}), rc {rc}:\n" + "\n".join(l for _t, l in lines[-40:]))
    if poller.still_down:
        raise RuntimeError(f"Orthanc does not answer after the playbook ({label})")
    backup = (root / "latest").resolve()
    manifest = json.loads((backup / "manifest.json").read_text())
    storage = manifest["storage"]
    notes = (f"playbook {total:.1f} s; {storage['files']} files, {storage.get('new_files', 0)} new "
             f"({storage.get('copied_files', 0)} copied, {storage.get('linked_files', 0)} linked from previous)")
    if manifest.get("strategy") == "snapshot":
        snap = manifest["capture"]["snapshot"]
        timings = snap.get("timings", {})
        notes += (f"; {poller.result.probes} polls, {poller.result.outages} without answer; snapshot held "
                  f"{snap.get('held_seconds', 0):.2f} s (create {snap.get('create_seconds', 0):.3f} s, index "
                  f"{timings.get('index', 0):.2f} s, storage {timings.get('storage', 0):.2f} s, release "
                  f"{snap.get('release_seconds', 0):.3f} s)")
    downtime = manifest["downtime_seconds"]
    m = Measurement(label, poller.result.seconds, float(downtime) if downtime is not None else None, notes,
                    task_times(lines, poller.result), dict(manifest.get("downtime_phases") or {}))
    return m, manifest, backup


def verify(backup: Path) -> dict:
    """The collection's offline verification (every file's size and MD5 against the index)."""
    from ansible_collections.pacs.orthanc.plugins.module_utils._verify import verify_backup
    report = verify_backup(str(backup), md5="all")
    if not report["ok"] or report["orphans"]:
        raise RuntimeError(f"verify_backup fails on {backup}: {report['problems']}, "
                           f"{report['orphans']} orphans")
    return report


def add_new_files(archive: Archive, workdir: Path, fraction: float = 0.01) -> int:
    """Store about ``fraction`` of the archive's file count as real instances over REST."""
    count = max(24, round(archive.files * fraction))
    files = dicomgen.make_instances(workdir / "new-dicom", count, size_range=(MIN_FILE, MAX_FILE), seed=7)
    for path in files:
        archive.server.store_rest(path)
    shutil.rmtree(workdir / "new-dicom")
    return count


def measure_ours(archive: Archive, workdir: Path, args: argparse.Namespace, rep: int) -> list[Measurement]:
    """Our playbook three times: a full and an incremental backup with link_mode=copy (with
    about 1% new files stored in between), and a full backup with the default link_mode=auto.
    Every backup is verified offline; the backups are removed afterwards, except those of the
    last round with --keep."""
    keep = args.keep and rep == args.repeat - 1
    results = []
    root = workdir / f"backups-copy-{rep}"
    log("  ours, link_mode=copy, full backup")
    m, _manifest, first = run_ours(archive, root, "copy", "ours full (copy)", workdir, args.cold, rep)
    results.append(m)
    report = verify(first)
    log(f"  verify_backup ok on the full backup: {report['files_hashed']} files hashed")
    added = add_new_files(archive, workdir)
    log(f"  stored {added} new instances over REST; ours, link_mode=copy, incremental backup")
    time.sleep(1.1)  # backups are named by the second
    m, _manifest, second = run_ours(archive, root, "copy", "ours incr (copy)", workdir, args.cold, rep)
    m.notes += f"; {added} instances stored just before"
    results.append(m)
    verify(second)
    if not keep:
        shutil.rmtree(root)
    log("  ours, link_mode=auto (hard links: same filesystem), full backup")
    root = workdir / f"backups-auto-{rep}"
    m, _manifest, third = run_ours(archive, root, "auto", "ours full (auto)", workdir, args.cold, rep)
    results.append(m)
    verify(third)
    if not keep:
        shutil.rmtree(root)
    if args.snapshot:
        root = workdir / f"backups-snapshot-{rep}"
        log("  ours, orthanc_backup_snapshot=btrfs (Orthanc not stopped), full backup")
        snapshot = {"orthanc_backup_snapshot": "btrfs"}
        m, _manifest, fourth = run_ours(archive, root, "auto", "ours snapshot full", workdir, args.cold, rep,
                                        snapshot)
        results.append(m)
        verify(fourth)
        added = add_new_files(archive, workdir)
        log(f"  stored {added} new instances over REST; ours, snapshot, incremental backup")
        time.sleep(1.1)
        m, _manifest, fifth = run_ours(archive, root, "auto", "ours snapshot incr", workdir, args.cold, rep,
                                       snapshot)
        m.notes += f"; {added} instances stored just before"
        results.append(m)
        verify(fifth)
        if not keep:
            shutil.rmtree(root)
    return results


class LoopBtrfs:
    """A btrfs filesystem in a sparse image file, loop-mounted at ``mount_point`` with one
    subvolume ``vol`` that holds the archive and the backups (so that link_mode=auto still
    hard-links). Only the loop device attached here is detached."""

    def __init__(self, image: Path, mount_point: Path, size_bytes: int) -> None:
        self.image, self.mount_point, self.loop = image, mount_point, None
        subprocess.run(["truncate", "-s", str(size_bytes), str(image)], check=True)
        self.loop = subprocess.run(["losetup", "--find", "--show", str(image)], check=True,
                                   capture_output=True, text=True).stdout.strip()
        try:
            subprocess.run(["mkfs.btrfs", "-q", self.loop], check=True, capture_output=True)
            mount_point.mkdir(parents=True, exist_ok=True)
            subprocess.run(["mount", self.loop, str(mount_point)], check=True)
            self.volume = mount_point / "vol"
            subprocess.run(["btrfs", "subvolume", "create", str(self.volume)], check=True, capture_output=True)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if subprocess.run(["mountpoint", "-q", str(self.mount_point)], check=False).returncode == 0:
            if subprocess.run(["umount", str(self.mount_point)], check=False).returncode != 0:
                subprocess.run(["umount", "-l", str(self.mount_point)], check=False)
        if self.loop:
            subprocess.run(["losetup", "-d", self.loop], check=False)
            self.loop = None
        self.image.unlink(missing_ok=True)


def combine(runs: list[Measurement]) -> Measurement:
    """One line per procedure from its repetitions: the median downtime (the notes and task
    times of the repetition closest to it), with the range when repeated."""
    median = statistics.median(m.downtime for m in runs)
    closest = min(runs, key=lambda m: abs(m.downtime - median))
    manifests = [m.manifest_downtime for m in runs if m.manifest_downtime is not None]
    notes = closest.notes
    if len(runs) > 1:
        notes = (f"median of {len(runs)}: {min(m.downtime for m in runs):.2f}-"
                 f"{max(m.downtime for m in runs):.2f} s; " + notes)
    return Measurement(closest.procedure, median, statistics.median(manifests) if manifests else None,
                       notes, closest.tasks, closest.phases)


def measure_size(size_gib: float, workdir: Path, args: argparse.Namespace) -> tuple[Archive, list[Measurement]]:
    """Build one archive and measure every procedure on it (``args.repeat`` rounds, the
    procedures taking turns); Orthanc is stopped at the end."""
    workdir.mkdir(parents=True)
    log(f"== {size_gib:g} GiB: building the archive in {workdir}")
    archive = None
    loop = None
    try:
        if args.snapshot:
            # archive, copies and backups: about 3x the archive at most, plus room for metadata
            loop = LoopBtrfs(workdir.parent / f"{workdir.name}.btrfs.img", workdir / "mnt",
                             int(3.2 * size_gib * GIB) + GIB)
            workdir = loop.volume
            log(f"  on btrfs: {loop.loop} mounted at {loop.mount_point}, subvolume {workdir}")
        archive = build_archive(workdir, size_gib, args.index_ratio, args.seed)
        log(f"  built in {archive.build_seconds:.0f} s: {archive.files} files, {human(archive.storage_bytes)}, "
            f"index {human(archive.index_bytes)}, {archive.counts}")
        rounds: list[list[Measurement]] = []
        for rep in range(args.repeat):
            if args.repeat > 1:
                log(f"  round {rep + 1} of {args.repeat}")
            log("  floor: stop, cp index*, start")
            results = [measure_floor(archive, workdir, args.cold)]
            log("  documented: stop, cp -a storage index config, start")
            results.append(measure_documented(archive, workdir, args.cold))
            results += measure_ours(archive, workdir, args, rep)
            rounds.append(results)
        return archive, [combine(list(same)) for same in zip(*rounds)]
    finally:
        if archive is not None:
            archive.server.stop()
        else:
            try:
                OrthancServer.load(workdir / "orthanc").stop()
            except (OrthancError, OSError):
                pass
        if loop is not None:
            if args.keep:
                log(f"  --keep: {loop.mount_point} stays mounted ({loop.loop}); umount it and losetup -d it")
            else:
                loop.close()


# --------------------------------------------------------------------------------------------
# Phase 3: report


def print_size_table(archive: Archive, results: list[Measurement], cold: bool) -> None:
    floor = max(results[0].downtime, 1e-9)
    print()
    print(f"=== Archive {archive.size_gib:g} GiB: {archive.files} files, {human(archive.storage_bytes)} storage, "
          f"index {human(archive.index_bytes)} ({archive.index_bytes / archive.storage_bytes:.0%} of the storage), "
          f"{archive.counts['instances']} instances; built in {archive.build_seconds:.0f} s "
          f"({archive.padding_rows} free-text MainDicomTags rows added to reach the index size); "
          f"{'cold' if cold else 'warm'} page cache")
    print(f"{'procedure':<20} {'downtime (s)':>12} {'x floor':>8} {'manifest (s)':>12}  notes")
    for m in results:
        manifest = f"{m.manifest_downtime:.2f}" if m.manifest_downtime is not None else "-"
        print(f"{m.procedure:<20} {m.downtime:>12.2f} {m.downtime / floor:>8.2f} {manifest:>12}  {m.notes}")
    print("expected (issue): ours within 1.3x the floor; ours snapshot: no outage at all (issue 7).")
    print("downtime = longest interval without an answer to GET /system (polled every 20 ms); manifest = "
          "the role's own downtime_seconds (from the stop command to Orthanc answering again).")
    for m in results:
        inside = [(name, secs, ins) for name, secs, ins in m.tasks if ins > 0.005]
        if inside:
            parts = "; ".join(f"'{name}' {ins:.2f} s" + (f" of {secs:.2f}" if secs - ins > 0.05 else "")
                              for name, secs, ins in inside)
            print(f"  {m.procedure}: Ansible tasks inside the outage: {parts}")
        if m.phases:
            order = ["stop", "capture", "delta", "start"]
            names = sorted(m.phases, key=lambda n: order.index(n) if n in order else len(order))
            parts = ", ".join(f"{name} {m.phases[name]:.2f} s" for name in names)
            print(f"  {' ' * len(m.procedure)}  the role's phases (manifest downtime_phases): {parts} "
                  f"(sum {sum(m.phases.values()):.2f} s)")


def print_comparison(runs: list[tuple[Archive, list[Measurement]]]) -> None:
    if len(runs) < 2:
        return
    base_archive, base = runs[0]
    print()
    print(f"=== When the archive grows (compared with {base_archive.size_gib:g} GiB)")
    header = f"{'procedure':<20} " + " ".join(f"{a.size_gib:>8g} GiB" for a, _r in runs)
    print(header + "   " + "  ".join(f"{a.size_gib:g}/{base_archive.size_gib:g}" for a, _r in runs[1:]))
    archive_ratio = "  ".join(f"{a.storage_bytes / base_archive.storage_bytes:>5.2f}x" for a, _r in runs[1:])
    print(f"{'(archive bytes)':<20} " + " ".join(f"{human(a.storage_bytes):>12}" for a, _r in runs)
          + "   " + archive_ratio)
    for i, m in enumerate(base):
        row = [r[i].downtime for _a, r in runs]
        ratios = "  ".join(f"{v / max(row[0], 1e-9):>5.2f}x" for v in row[1:])
        print(f"{m.procedure:<20} " + " ".join(f"{v:>10.2f} s" for v in row) + "   " + ratios)
    print("expected (issue): ours nearly unchanged when the archive doubles (about 1.0x), while the "
          "documented procedure's downtime doubles (about the archive's ratio).")


# --------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="0.5,1",
                        help="archive sizes in GiB, comma-separated (default 0.5,1; the issue's "
                             "'a few GiB' is --sizes 2,4)")
    parser.add_argument("--workdir", type=Path,
                        help="where archives and backups go (default: a new folder in /var/tmp); "
                             "must be on a disk with room for about 2.5x the largest size")
    parser.add_argument("--keep", action="store_true",
                        help="keep the workdir at the end (archives, the last round's backups, "
                             "playbook logs)")
    parser.add_argument("--cold", action="store_true",
                        help="drop the page cache before each procedure (needs root and a "
                             "writable /proc/sys/vm/drop_caches)")
    parser.add_argument("--index-ratio", type=float, default=0.12,
                        help="target index size as a fraction of the archive (default 0.12)")
    parser.add_argument("--repeat", type=int, default=3,
                        help="rounds of every procedure on each archive; the median is shown (default 3)")
    parser.add_argument("--seed", type=int, default=20241129, help="random seed of the archive's shape")
    parser.add_argument("--snapshot", action="store_true",
                        help="also measure orthanc_backup_snapshot=btrfs; every procedure then runs on a "
                             "loop-mounted btrfs image in the workdir (needs root and btrfs-progs)")
    args = parser.parse_args(argv)
    try:
        args.size_list = [float(s) for s in args.sizes.split(",") if s.strip()]
    except ValueError:
        parser.error(f"--sizes: not a list of numbers: {args.sizes!r}")
    if not args.size_list or min(args.size_list) <= 0:
        parser.error("--sizes: give positive sizes in GiB")
    if args.repeat < 1:
        parser.error("--repeat: at least 1")
    if args.snapshot and (os.geteuid() != 0 or shutil.which("mkfs.btrfs") is None):
        parser.error("--snapshot: needs root (losetup, mount) and btrfs-progs (mkfs.btrfs)")
    if args.cold and not cold_supported():
        parser.error(f"--cold: {DROP_CACHES} is not writable here (not root, or /proc/sys is read-only)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if shutil.which("Orthanc") is None and not Path("/usr/sbin/Orthanc").exists():
        print("Orthanc is not installed: run scripts/setup.sh", file=sys.stderr)
        return 2
    link_collection()
    workdir = (args.workdir.resolve() if args.workdir
               else Path(tempfile.mkdtemp(prefix="orthanc-downtime-", dir="/var/tmp")))
    workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    runs: list[tuple[Archive, list[Measurement]]] = []
    status = 0
    try:
        for size in args.size_list:
            runs.append(measure_size(size, workdir / f"size-{size:g}GiB", args))
    except Exception as exc:  # report what broke, with what was measured so far
        print(f"\nBENCHMARK BROKE: {type(exc).__name__}: {exc}", file=sys.stderr)
        status = 1
    finally:
        print(f"\nOrthanc {subprocess.run(['Orthanc', '--version'], capture_output=True, text=True, check=False).stdout.split()[1]}, "
              f"{os.cpu_count()} CPUs; backup roots are on the filesystem of the storage, so 'ours' uses "
              "orthanc_backup_link_mode=copy (with the default auto, live files would be hard-linked, "
              "which is cheaper than a backup to another disk: shown as 'ours full (auto)').")
        print("Cache: " + ("cold (page cache dropped before each procedure)." if args.cold else
                           "warm (nothing dropped between procedures; --cold drops the page cache"
                           + (")." if cold_supported() else ", but it is not available here).")))
        for archive, results in runs:
            print_size_table(archive, results, args.cold)
        print_comparison(runs)
        print(f"\nTotal time {time.monotonic() - t0:.0f} s; workdir {workdir}"
              + (" (kept)" if args.keep else " (removed)"))
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    return status


if __name__ == "__main__":
    sys.exit(main())

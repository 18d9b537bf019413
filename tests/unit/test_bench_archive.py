"""The benchmarks' shared archive builder (benchmarks/_archive.py) and downtime poller
(benchmarks/_poll.py), on a real private Orthanc: what the index says is what the storage holds,
and the poller sees an outage exactly when there is one."""

from __future__ import annotations

import hashlib
import os
import random
import sqlite3
import sys
import time
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
if str(BENCHMARKS) not in sys.path:
    sys.path.insert(0, str(BENCHMARKS))

import _archive  # noqa: E402  pylint: disable=wrong-import-position
import _poll  # noqa: E402  pylint: disable=wrong-import-position
from tests.support import databases  # noqa: E402  pylint: disable=wrong-import-position

INSTANCES = 50


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    """An archive of 50 synthetic instances (plus Orthanc's seed), index grown to 3x the
    storage; Orthanc stopped, so the index can be read."""
    built = _archive.build_archive(tmp_path_factory.mktemp("bench-archive"), instances=INSTANCES,
                                   index_ratio=3.0, seed=11, file_size=(2_000, 40_000), name="benchunit")
    stats = built.server.statistics()
    built.server.stop()
    yield built, stats
    built.server.stop()


def rows(index: Path, sql: str) -> list[tuple]:
    conn = sqlite3.connect(f"file:{index}?mode=ro", uri=True)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


def storage_files(storage: Path) -> dict[str, Path]:
    return {path.name: path for path in storage.rglob("*") if path.is_file()}


@pytest.mark.slow
def test_index_lists_exactly_the_files_with_their_md5(archive):
    built, stats = archive
    index, storage = built.server.index_dir / "index", built.server.storage_dir
    on_disk = storage_files(storage)
    attached = rows(index, "SELECT uuid, fileType, compressedSize, uncompressedSize, compressionType, "
                           "uncompressedMD5, compressedMD5 FROM AttachedFiles")
    assert len(attached) == len(on_disk) == built.files == INSTANCES + _archive.SEED_INSTANCES
    assert {row[0] for row in attached} == set(on_disk)
    for uuid, file_type, compressed, uncompressed, compression, md5, compressed_md5 in attached:
        path = on_disk[uuid]
        assert path.relative_to(storage) == Path(uuid[0:2], uuid[2:4], uuid)
        data = path.read_bytes()
        assert (file_type, compression) == (1, 1)
        assert compressed == uncompressed == len(data)
        assert md5 == compressed_md5 == hashlib.md5(data).hexdigest()
    assert built.storage_bytes == sum(len(p.read_bytes()) for p in on_disk.values())
    synthetic = [p for p in on_disk.values() if p.stat().st_mtime < time.time() - 29 * 86400]
    assert len(synthetic) == INSTANCES  # dated a month back; the seed's files are new


@pytest.mark.slow
def test_counts_agree_between_index_orthanc_and_archive(archive):
    built, stats = archive
    index = built.server.index_dir / "index"
    counts = {_archive.LEVELS[t]: n for t, n in rows(
        index, "SELECT resourceType, COUNT(*) FROM Resources GROUP BY resourceType")}
    assert counts == built.counts
    assert counts["instances"] == INSTANCES + _archive.SEED_INSTANCES
    assert counts["patients"] >= 2 and counts["studies"] >= 2 and counts["series"] >= 3
    assert {"patients": stats["CountPatients"], "studies": stats["CountStudies"], "series": stats["CountSeries"],
            "instances": stats["CountInstances"]} == counts
    assert int(stats["TotalDiskSize"]) == built.storage_bytes
    totals = dict(rows(index, "SELECT key, value FROM GlobalIntegers WHERE key IN (0, 1)"))
    assert totals == {0: built.storage_bytes, 1: built.storage_bytes}
    # every instance has its own parents' chain and exactly one DICOM attachment
    orphans = rows(index, "SELECT COUNT(*) FROM Resources r WHERE r.resourceType > 1 AND NOT EXISTS "
                          "(SELECT 1 FROM Resources p WHERE p.internalId = r.parentId "
                          "AND p.resourceType = r.resourceType - 1)")
    assert orphans == [(0,)]
    assert rows(index, "SELECT COUNT(DISTINCT publicId) FROM Resources") == [(sum(counts.values()),)]
    assert rows(index, "PRAGMA integrity_check") == [("ok",)]


@pytest.mark.slow
def test_index_is_grown_to_its_ratio_by_padding_the_synthetic_instances(archive):
    built, _stats = archive
    index = built.server.index_dir / "index"
    target = 3.0 * built.storage_bytes
    assert built.padding_rows > 0 and built.padding_rows % INSTANCES == 0
    assert built.index_bytes >= 0.9 * target
    padded = rows(index, "SELECT COUNT(*) FROM MainDicomTags WHERE tagGroup = 32 AND tagElement = 16384")
    assert padded == [(INSTANCES,)]  # ImageComments: the synthetic instances only, not the seed


@pytest.mark.slow
def test_poller_sees_no_outage_while_orthanc_answers_and_one_across_a_restart(archive):
    server = archive[0].server
    server.start()
    try:
        with _poll.Poller(server.http_port) as poller:
            time.sleep(0.5)
        quiet = poller.result
        with _poll.Poller(server.http_port) as poller:
            before = time.time()
            server.stop()
            stopped = time.time()
            server.start()
        outage = poller.result
    finally:
        server.stop()
    assert quiet.seconds == 0.0 and quiet.outages == quiet.failures == 0 and quiet.probes >= 5
    assert outage.outages == 1 and outage.failures >= 1 and not poller.still_down
    assert outage.seconds > 0 and before - 0.1 <= outage.began <= stopped <= outage.ended
    with pytest.raises(_poll.PollerError):
        with _poll.Poller(server.http_port):
            pass


@pytest.mark.slow
@pytest.mark.skipif(not databases.pg_available(), reason="PostgreSQL is not running: scripts/databases.sh")
def test_postgresql_index_lists_exactly_the_files_and_orthanc_counts_them(tmp_path):
    built = _archive.build_archive(tmp_path, instances=INSTANCES, index_ratio=3.0, seed=12,
                                   file_size=(2_000, 40_000), name="benchunitpg", backend="postgresql")
    database = built.database
    try:
        stats = built.server.statistics()
        built.server.stop()

        def query(sql: str) -> list[list[str]]:
            return [line.split("|") for line in databases.pg_sql(sql, database.name).splitlines() if line]

        on_disk = storage_files(built.server.storage_dir)
        attached = query("SELECT uuid, filetype, compressedsize, uncompressedsize, compressiontype, "
                         "uncompressedhash, compressedhash FROM attachedfiles")
        assert len(attached) == len(on_disk) == built.files == INSTANCES + _archive.SEED_INSTANCES
        assert {row[0] for row in attached} == set(on_disk)
        for uuid, file_type, compressed, uncompressed, compression, md5, compressed_md5 in attached:
            data = on_disk[uuid].read_bytes()
            assert (file_type, compression) == ("1", "1")
            assert int(compressed) == int(uncompressed) == len(data)
            assert md5 == compressed_md5 == hashlib.md5(data).hexdigest()
        counts = {_archive.LEVELS[int(t) + 1]: int(n) for t, n in query(
            "SELECT resourcetype, COUNT(*) FROM resources GROUP BY resourcetype")}  # types from 0 here
        assert counts == built.counts and counts["instances"] == INSTANCES + _archive.SEED_INSTANCES
        assert {"patients": stats["CountPatients"], "studies": stats["CountStudies"],
                "series": stats["CountSeries"], "instances": stats["CountInstances"]} == counts
        assert int(stats["TotalDiskSize"]) == built.storage_bytes
        totals = {int(k): int(v) for k, v in query("SELECT key, value FROM globalintegers")}
        assert totals[0] == totals[1] == built.storage_bytes
        assert [totals[t + 2] for t in range(4)] == [counts[_archive.LEVELS[t + 1]] for t in range(4)]
        assert totals[6] == int(query("SELECT MAX(seq) FROM changes")[0][0])
        assert int(query("SELECT COUNT(*) FROM patientrecyclingorder")[0][0]) == counts["patients"]
        assert built.padding_rows > 0 and built.padding_rows % INSTANCES == 0
        assert built.index_bytes >= 0.9 * 3.0 * built.storage_bytes
        # Orthanc can still add an instance after the load: the sequence of internalIds follows
        built.server.start()
        _archive.store_generated(built.server, tmp_path / "more", 2, (2_000, 4_000), seed=5)
        assert built.server.statistics()["CountInstances"] == counts["instances"] + 2
    finally:
        built.close()
    assert database.name not in databases.pg_sql("SELECT datname FROM pg_database")


def test_file_sizes_stream_to_the_total_or_the_count():
    sizes = list(_archive.file_sizes(random.Random(3), total_bytes=5_000_000))
    assert all(_archive.MIN_FILE <= s <= _archive.MAX_FILE for s in sizes[:-1])
    assert 5_000_000 - _archive.MIN_FILE <= sum(sizes) <= 5_000_000
    counted = list(_archive.file_sizes(random.Random(3), count=100, low=1_000, high=2_000))
    assert len(counted) == 100 and all(1_000 <= s <= 2_000 for s in counted)
    one, two = _archive.plan_hierarchy(random.Random(3)), _archive.plan_hierarchy(random.Random(3))
    first = [next(one) for _n in range(1_000)]
    assert first == [next(two) for _n in range(1_000)]  # the seed fixes the shape
    assert first[0] == (1, 1, 1, 1) and len(set(first)) == 1_000
    with pytest.raises(ValueError):
        next(_archive.file_sizes(random.Random(3)))


def test_unknown_backend_is_refused(tmp_path):
    with pytest.raises(ValueError, match="mysql"):
        _archive.build_archive(tmp_path, instances=1, backend="mysql")
    assert not os.listdir(tmp_path)

"""How fast is ``backup_verify`` compared with ``md5sum`` over the same files?

The issue expects the offline verification of a backup (``_verify.verify_backup`` with
``md5="all"``, which the ``pacs.orthanc.backup_verify`` module runs) to hash storage at no less
than 1.5 times the throughput of ``md5sum``, on tiny files (1-4 KB) as on realistic ones (10 KB -
1 MB). This benchmark, for each of the two shapes (``--gib`` and ``--tiny``), in one run:

1. builds a synthetic but consistent backup folder from the archive of the benchmarks' shared
   builder (benchmarks/_archive.py: a private Orthanc's own schema and rows, files of 10 KB to
   1 MB with log-uniform sizes): its ``storage/xx/yy/uuid`` files, its SQLite index as
   ``index/index`` (``AttachedFiles`` with the true size and MD5 of every file), ``config/``
   and a ``manifest.json`` in the format of ``_backupset.close_backup``; then checks that
   verify_backup finds it ok;
2. times, over the same files in the same order (sorted by uuid, i.e. folder by folder of
   storage/, the order verify_backup reads them in): ``md5sum`` (one at a
   time), two ``md5sum`` in parallel, ``verify_backup(md5="all", workers=W)`` for each W,
   ``verify_backup(md5="none")`` (everything but the hashing), and ``cat >/dev/null`` (one and
   two readers) as a floor. Each measurement runs ``--repeat`` times (rounds take turns) and
   the best run is reported. With ``--cold`` the page cache is dropped before every run;
3. prints a table with the throughput of each method and its ratio to a single ``md5sum``.

It reports what it measured and never judges the numbers: it exits non-zero only when something
broke (a command failed, or verify_backup did not find the backup ok).

    python3 benchmarks/verify.py [--gib 1] [--workers 1,2,4] [--workdir DIR] [--cold] [--keep]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import resource
import shutil
import socket
import sqlite3
import ssl
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from _bench import DROP_CACHES, GIB, cold_supported, drop_caches, log  # also sys.path
from _archive import build_archive

try:
    from ansible_collections.pacs.orthanc.plugins.module_utils import _sqlite, _storage, _verify  # noqa: E402
except ImportError as _exc:  # pragma: no cover - a setup problem, not a measurement
    sys.exit(f"cannot import the collection ({_exc}): run `bash scripts/setup.sh` first")

XARGS_CHUNK = 500                           # files per md5sum / cat process in the parallel runs
MIN_CHUNKS = 8                              # ... fewer on small sets, so that both get work


class BenchmarkError(Exception):
    """Something broke: the run is not a measurement."""


# --------------------------------------------------------------------------------------------
# Phase 1: build a backup folder


@dataclass
class Backup:
    """A synthetic backup folder and the storage files its index lists, in the index's order."""
    path: Path
    files: list[str]                    # paths relative to storage/, in AttachedFiles order
    total_bytes: int
    counts: dict[str, int]
    index_bytes: int

    @property
    def storage(self) -> Path:
        return self.path / "storage"


def write_config_and_manifest(path: Path, counts: dict, orthanc: dict) -> None:
    """config/orthanc.json and a manifest.json in the format of _backupset.close_backup."""
    config = path / "config"
    config.mkdir()
    (config / "orthanc.json").write_text(json.dumps(
        {"Name": "benchmark", "StorageDirectory": "/var/lib/orthanc/db",
         "IndexDirectory": "/var/lib/orthanc/db", "StorageCompression": False}, indent=2) + "\n")
    files = {}
    for file in sorted(p for p in path.rglob("*") if p.is_file() and not p.is_relative_to(path / "storage")):
        files[str(file.relative_to(path))] = hashlib.sha256(file.read_bytes()).hexdigest()
    schema = str(orthanc["DatabaseVersion"])
    manifest = {
        "format": "pacs.orthanc.backup", "format_version": 1, "name": path.name, "host": socket.gethostname(),
        "orthanc": {"version": orthanc["Version"], "name": "benchmark", "database_version": schema},
        "database_schema_version": schema, "backend": "sqlite", "storage_compression": False,
        "counts": counts, "files": files,
        # as _backupset.close_backup writes it: the completion check ran PRAGMA integrity_check
        # (build_backup runs it before it measures), so backup_verify need not run it again
        "verification": {"md5": "all", "index_integrity": "integrity_check"},
    }
    (path / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def build_backup(workdir: Path, gib: float, seed: int, tiny: int = 0) -> Backup:
    """A consistent backup folder of about ``gib`` GiB of storage (or, with ``tiny``, that many
    files of 1-4 KB, as benchmarks/scale.py stores), checked with verify_backup: the storage and
    the index of an archive from benchmarks/_archive.py."""
    path = workdir / "20240101T000000Z"
    started = time.perf_counter()
    if tiny:
        log(f"building a backup of {tiny} files of 1-4 KB in {path}")
        archive = build_archive(workdir / "build", instances=tiny, file_size=(1_000, 4_000), seed=seed,
                                name="benchverify")
    else:
        log(f"building a {gib:g} GiB backup in {path}")
        archive = build_archive(workdir / "build", size_bytes=int(gib * GIB), seed=seed, name="benchverify")
    server = archive.server
    orthanc = server.rest("GET", "/system")
    server.stop()
    conn = sqlite3.connect(server.index_dir / "index", isolation_level=None)
    try:  # one self-contained file, as the backup's index/index
        conn.execute("PRAGMA journal_mode = DELETE")
    finally:
        conn.close()
    (path / "index").mkdir(parents=True)
    os.rename(server.index_dir / "index", path / "index" / "index")
    os.rename(server.storage_dir, path / "storage")
    shutil.rmtree(workdir / "build")
    write_config_and_manifest(path, archive.counts, orthanc)
    os.sync()
    total = archive.storage_bytes
    log(f"built {archive.files} files, {total / GIB:.2f} GiB, in {time.perf_counter() - started:.1f} s; "
        "checking it with verify_backup")
    backup = Backup(path, [], total, archive.counts, (path / "index" / "index").stat().st_size)
    problems = _sqlite.check_integrity(str(path / "index" / "index"), "full")
    if problems:
        raise BenchmarkError(f"the synthetic index fails PRAGMA integrity_check: {problems}")
    report = _verify.verify_backup(str(path), md5="all", workers=2)
    if not report["ok"]:
        raise BenchmarkError(f"the synthetic backup does not verify: {_verify.describe_problems(report['problems'])}")
    if (report["files_hashed"], report["bytes_hashed"], report["orphans"]) != (archive.files, total, 0):
        raise BenchmarkError(f"verify_backup hashed {report['files_hashed']} files / {report['bytes_hashed']} "
                             f"bytes with {report['orphans']} orphans; expected {archive.files} / {total} / 0")
    # The order verify_backup reads in (sorted by uuid: folder by folder); the external tools get the same list.
    listed = sorted(_sqlite.attachments(str(path / "index" / "index")))
    backup.files = [_storage.relpath(uuid) for uuid in listed]
    if len(backup.files) != archive.files or not all((backup.storage / rel).is_file() for rel in backup.files):
        raise BenchmarkError("the index does not list the files that were written")
    return backup


# --------------------------------------------------------------------------------------------
# Phase 2: measure


@dataclass
class Method:
    """One way to read (and maybe hash) every storage file; ``run`` raises when it fails."""
    name: str
    run: Callable[[], None]
    hashes: bool = True                  # False for the reading floor and the md5=none row
    reads: bool = True                   # False when the file contents are not read at all
    runs: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)   # user + system seconds of each run, children included

    @property
    def best(self) -> float:
        return min(self.runs)


def run_xargs(backup: Backup, argv: list[str]) -> None:
    """Feed the NUL-separated file list to ``xargs -0 <argv>`` in storage/; output discarded."""
    data = b"".join(rel.encode() + b"\0" for rel in backup.files)
    proc = subprocess.run(["xargs", "-0", *argv], input=data, cwd=backup.storage,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, check=False)
    if proc.returncode != 0:
        raise BenchmarkError(f"xargs {' '.join(argv)} exited with {proc.returncode}: "
                             f"{proc.stderr.decode(errors='replace').strip()[-300:]}")


def run_verify(backup: Backup, md5: str, workers: int) -> None:
    """verify_backup as the module calls it; it must find the backup ok and hash what it should."""
    report = _verify.verify_backup(str(backup.path), md5=md5, workers=workers)
    expected = len(backup.files) if md5 == "all" else 0
    if not report["ok"] or report["files_hashed"] != expected:
        raise BenchmarkError(f"verify_backup(md5={md5}, workers={workers}): ok={report['ok']}, "
                             f"{report['files_hashed']} files hashed (expected {expected}); "
                             f"{_verify.describe_problems(report['problems'])}")


def methods(backup: Backup, workers: list[int]) -> list[Method]:
    """Every measurement, in the order the rounds run them and the table lists them."""
    chunk = ["-n", str(max(1, min(XARGS_CHUNK, math.ceil(len(backup.files) / MIN_CHUNKS))))]
    result = [
        Method("md5sum", lambda: run_xargs(backup, ["md5sum"])),
        Method("md5sum x2 (xargs -P2)", lambda: run_xargs(backup, ["-P2", *chunk, "md5sum"])),
    ]
    for count in workers:
        result.append(Method(f"verify_backup workers={count}",
                             lambda count=count: run_verify(backup, "all", count)))
    index = str(backup.path / "index" / "index")
    result += [
        Method("verify_backup md5=none", lambda: run_verify(backup, "none", max(workers)), hashes=False, reads=False),
        Method("index integrity_check", lambda: _sqlite.check_integrity(index, "full"), hashes=False, reads=False),
        Method("cat >/dev/null", lambda: run_xargs(backup, ["cat"]), hashes=False),
        Method("cat x2 (xargs -P2)", lambda: run_xargs(backup, ["-P2", *chunk, "cat"]), hashes=False),
    ]
    return result


def resident_fraction(backup: Backup, sample: int = 200) -> float | None:
    """Fraction of a sample of storage bytes that is in the page cache (util-linux fincore),
    or None when fincore is missing."""
    if not shutil.which("fincore"):
        return None
    step = max(1, len(backup.files) // sample)
    paths = [str(backup.storage / rel) for rel in backup.files[::step]]
    proc = subprocess.run(["fincore", "--bytes", "--noheadings", "--raw", "--output", "RES,SIZE", *paths],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        return None
    resident = size = 0
    for line in proc.stdout.split("\n"):
        if line.strip():
            res, total = line.split()
            resident, size = resident + int(res), size + int(total)
    return min(1.0, resident / size) if size else 0.0  # RES counts whole pages


def check_cold(backup: Backup) -> str:
    """Read some files, drop the cache and look whether they left it. Returns a description of
    what --cold does on this machine; raises nothing, the caller decides."""
    if not cold_supported():
        return f"NOT dropped: {DROP_CACHES} is not writable (needs root and a writable /proc/sys)"
    run_xargs(backup, ["cat"])
    before = resident_fraction(backup)
    if not drop_caches():
        return "NOT dropped: the kernel refused the write to drop_caches"
    after = resident_fraction(backup)
    if before is None or after is None:
        return "dropped (not checked: no fincore)"
    if after > 0.05:
        return f"NOT dropped: {after:.0%} of a sample stays cached after the drop (was {before:.0%})"
    return f"dropped before every run (checked with fincore: {before:.0%} of a sample cached before, {after:.0%} after)"


def cpu_seconds() -> float:
    """User and system CPU time of this process and of its waited-for children (md5sum, cat,
    verify_backup's worker processes): what a run cost the machine, whatever else runs on it."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def measure(backup: Backup, todo: list[Method], repeat: int, cold: bool) -> None:
    """Rounds of every method in turn; dirty pages flushed (and with ``cold`` the cache
    dropped) before each run."""
    for round_number in range(1, repeat + 1):
        for method in todo:
            if cold:
                if not drop_caches():
                    raise BenchmarkError("the page cache could be dropped at first and then not any more")
            else:
                os.sync()
            cpu_before = cpu_seconds()
            started = time.perf_counter()
            method.run()
            method.runs.append(time.perf_counter() - started)
            method.cpu.append(cpu_seconds() - cpu_before)
            log(f"  round {round_number}: {method.name:<28} {method.runs[-1]:7.2f} s, CPU {method.cpu[-1]:6.2f} s")


# --------------------------------------------------------------------------------------------
# Phase 3: report


def environment(load_at_start: float) -> str:
    md5sum = subprocess.run(["md5sum", "--version"], capture_output=True, text=True, check=False)
    version = md5sum.stdout.split("\n")[0] if md5sum.returncode == 0 else "md5sum ?"
    return (f"{os.cpu_count()} CPUs, Python {platform.python_version()} (hashlib.md5 from {ssl.OPENSSL_VERSION}), "
            f"{version}; 1-min load average {load_at_start:.2f} at the start, {os.getloadavg()[0]:.2f} at the end")


def report(backup: Backup, todo: list[Method], cache: str, repeat: int, load_at_start: float, shape: str) -> str:
    """The table: best time, throughput over the storage bytes and ratio to one md5sum."""
    gib = backup.total_bytes / GIB
    reference = next(m for m in todo if m.name == "md5sum").best
    lines = [
        f"=== verify vs md5sum, {shape}: {len(backup.files)} storage files, {gib:.2f} GiB "
        f"(index {backup.index_bytes / 1024 ** 2:.1f} MiB; counts {backup.counts})",
        f"    cache: {cache}; best of {repeat} runs",
        f"    {environment(load_at_start)}",
        f"{'method':<30}{'seconds':>9}{'GiB/s':>8}{'x md5sum':>10}{'CPU s':>8}{'x CPU':>7}  runs (s)",
    ]
    reference_cpu = min(next(m for m in todo if m.name == "md5sum").cpu)
    for method in todo:
        runs = ", ".join(f"{t:.2f}" for t in method.runs)
        if method.reads:
            throughput = f"{gib / method.best:8.2f}"
            ratio = f"{reference / method.best:10.2f}"
        else:
            throughput, ratio = f"{'-':>8}", f"{'-':>10}"
        note = "" if method.hashes else ("  (reads no file: everything but the hashing)" if not method.reads
                                         else "  (reading floor, no hashing)")
        if method.name == "index integrity_check":
            note = "  (part of every verify_backup: PRAGMA integrity_check of index/index, beside the storage check)"
        cpu = min(method.cpu)
        cpu_ratio = f"{reference_cpu / cpu:7.2f}" if method.reads and cpu > 0 else f"{'-':>7}"
        lines.append(f"{method.name:<30}{method.best:9.2f}{throughput}{ratio}{cpu:8.2f}{cpu_ratio}  {runs}{note}")
    verifies = [m for m in todo if m.name.startswith("verify_backup workers=")]
    best = min(verifies, key=lambda m: m.best)
    lines.append("x md5sum = throughput / throughput of one md5sum (higher is better); CPU s = the least user+system "
                 "time of a run, children included; x CPU = md5sum's CPU time / the method's (the machine's cost, "
                 "less sensitive to other load than the wall time).")
    lines.append(f"expected (issue): verification at least 1.5x md5sum's throughput; measured: "
                 f"{reference / best.best:.2f}x at best ({best.name}), "
                 + ", ".join(f"{m.name.split()[1]}: {reference / m.best:.2f}x" for m in verifies) + ".")
    pair = next((m for m in todo if m.name.startswith("md5sum x2")), None)
    if pair:
        lines.append("same parallelism: against two md5sum in parallel, "
                     + ", ".join(f"{m.name.split()[1]}: {pair.best / m.best:.2f}x" for m in verifies) + ".")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", maxsplit=1)[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gib", type=float, default=1.0,
                        help="storage size in GiB of the backup of realistic files, 10 KB-1 MB (default 1; 0 skips it)")
    parser.add_argument("--tiny", type=int, default=100_000,
                        help="files in the backup of tiny files, 1-4 KB as benchmarks/scale.py stores (default "
                             "100000; 0 skips it)")
    parser.add_argument("--workers", default=f"1,2,{os.cpu_count() or 1},4" if (os.cpu_count() or 1) not in (1, 2, 4)
                        else "1,2,4", help="comma-separated verify_backup worker counts (default 1,2,4 and the CPUs)")
    parser.add_argument("--workdir", type=Path, default=Path("/var/tmp"),
                        help="a new orthanc-verify-* folder is made in it (default /var/tmp)")
    parser.add_argument("--cold", action="store_true",
                        help="drop the page cache before every run (root, writable /proc/sys)")
    parser.add_argument("--keep", action="store_true", help="keep the workdir at the end")
    parser.add_argument("--repeat", type=int, default=2, help="runs of each measurement (default 2)")
    parser.add_argument("--seed", type=int, default=1, help="random seed of the backup's shape")
    args = parser.parse_args(argv)
    try:
        args.workers = [int(w) for w in args.workers.split(",") if w.strip()]
    except ValueError:
        parser.error("--workers takes integers, e.g. 1,2,4")
    if not args.workers or min(args.workers) < 1 or args.gib < 0 or args.tiny < 0 or args.repeat < 1 \
            or not (args.gib or args.tiny):
        parser.error("--workers and --repeat must be positive, --gib and --tiny not both 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    args.workdir.mkdir(parents=True, exist_ok=True)
    shapes = [(f"realistic files (10 KB-1 MB, {args.gib:g} GiB)", args.gib, 0)] if args.gib else []
    if args.tiny:
        shapes.append((f"tiny files (1-4 KB, {args.tiny} files)", 0, args.tiny))
    for shape, gib, tiny in shapes:
        load_at_start = os.getloadavg()[0]
        workdir = Path(tempfile.mkdtemp(prefix="orthanc-verify-", dir=args.workdir))
        try:
            backup = build_backup(workdir, gib, args.seed, tiny)
            cache = "warm (nothing dropped; dirty pages flushed before each run)"
            cold = args.cold
            if cold:
                cache = "cold: " + check_cold(backup)
                if "NOT dropped" in cache:
                    log(f"--cold: the page cache is {cache[len('cold: '):]}; the figures below are warm")
                    cache += " -> figures are WARM"
                    cold = False
            log(f"measuring {shape} ({cache})")
            todo = methods(backup, args.workers)
            measure(backup, todo, args.repeat, cold)
            print(report(backup, todo, cache, args.repeat, load_at_start, shape), flush=True)
        except BenchmarkError as exc:
            log(f"FAILED: {exc}")
            return 1
        finally:
            if args.keep:
                log(f"kept {workdir}")
            else:
                shutil.rmtree(workdir, ignore_errors=True)
    print(f"total run time {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

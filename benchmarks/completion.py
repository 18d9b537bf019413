"""What completing a nightly incremental backup costs (``backup_set state=complete``), before and
after the check of what changed (issue 15).

Builds N storage files in ``xx/yy/uuid`` folders and a SQLite index with Orthanc's own tables for
them (``memory.build``: one instance, one attachment with its MD5 per file), a first backup
(``_storage.hot_pass``, hard links, completed with md5=none), then P% new files (in the storage
and the index, as Orthanc stores them) and the second backup's hot pass (linked from the first
backup, the new files linked from the live storage). Then times, each in a child process of its
own, alternating, ``_backupset.close_backup(..., md5="new", check_mode=True)`` (the check and the
manifest, not the rename) of that incomplete backup:

- "before": the collection's ``plugins/`` as of ``--before`` (default ``main``), exported with
  ``git archive``: every file the index lists statted, storage/'s folders listed, new ones hashed;
- "after": this checkout: the index compared with the storage state in SQL, only the new files
  statted and hashed (``storage_check: changed``).

Also timed apart, for scale: ``PRAGMA integrity_check`` of the index (part of both, beside the
storage check) and ``find storage -type f | wc -l``. The index is grown to about
``--index-bytes-per-file`` (default 1,000, as a real Orthanc index) with rows of Orthanc's
``Metadata`` table, so that its integrity check costs what a real one does.

    python3 benchmarks/completion.py --files 200000 [--percent 1] [--rounds 2] [--before main]
                                     [--index-bytes-per-file 1000]
                                     [--workdir /var/tmp/completion] [--keep]

The work folder is deleted at the end unless ``--keep``. Results on stdout, progress on stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import _bench
from _bench import log
from memory import build
from stop_window import add_files


def step(args) -> dict:
    """One close_backup in check mode (``--code before|after``), in this child process."""
    work = Path(args.work)
    if args.code == "before":
        sys.path.insert(0, str(work / "before"))  # its ansible_collections/pacs/orthanc/plugins first
    from ansible_collections.pacs.orthanc.plugins.module_utils import _backupset, _sqlite  # noqa: E402
    name = (work / "name").read_text()
    out = {"code_from": str(Path(_backupset.__file__).parents[3])}
    if args.code == "integrity":
        t0 = time.monotonic()
        problems = _sqlite.check_integrity(str(work / "backups" / f"{name}.incomplete" / "index" / "index"), "full")
        out.update(seconds=time.monotonic() - t0, problems=len(problems))
        return out
    t0 = time.monotonic()
    result = _backupset.close_backup(str(work / "backups"), name, "bench", {}, 7, md5="new", workers=2,
                                     check_mode=True)
    out["seconds"] = time.monotonic() - t0
    verification = result["verification"]
    out.update(ok=verification["ok"], checked=verification["files_checked"], hashed=verification["files_hashed"],
               compared=verification.get("files_compared"), storage_check=verification.get("storage_check", "all"))
    return out


def run_step(work: Path, code: str) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--step", "--code", code, "--work", str(work)],
                          check=True, capture_output=True, text=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


METADATA = """CREATE TABLE IF NOT EXISTS Metadata(
       id INTEGER REFERENCES Resources(internalId) ON DELETE CASCADE,
       type INTEGER,
       value TEXT,
       PRIMARY KEY(id, type)
       )"""


def pad_index(index: Path, per_file: int) -> None:
    """Grow the index towards ``per_file`` bytes per instance, as a real Orthanc index is (959 MiB
    for 1,000,006 instances, benchmarks/README.md "At scale"): Orthanc's own Metadata table, rows
    of 80 characters per instance, so that PRAGMA integrity_check has a real index's work."""
    rows = max(0, round((per_file - 200) / 110))  # what add_files writes per instance, then a row's cost
    conn = sqlite3.connect(index, isolation_level=None)
    conn.execute("PRAGMA synchronous = OFF")
    conn.execute(METADATA)
    conn.execute("BEGIN")
    conn.execute("WITH RECURSIVE k(t) AS (SELECT 1 UNION ALL SELECT t + 1 FROM k WHERE t < ?) "
                 "INSERT OR IGNORE INTO Metadata SELECT r.internalId, 100 + k.t, hex(randomblob(40)) "
                 "FROM Resources AS r, k", (rows,))
    conn.execute("COMMIT")
    conn.close()


def prepare(work: Path, n: int, percent: float, before: str, per_file: int) -> int:
    """The live archive, a complete first backup and the incomplete second one; returns the new files."""
    from ansible_collections.pacs.orthanc.plugins.module_utils import _backupset, _storage  # noqa: E402
    build(work, n)
    if per_file:
        pad_index(work / "index", per_file)
    export = work / "before" / "ansible_collections" / "pacs" / "orthanc"
    export.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(_bench.REPO), "archive", before, "plugins"], check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(export)], input=archive, check=True)
    (work / "etc").mkdir()
    (work / "etc" / "orthanc.json").write_text('{"Name": "bench"}')
    root = work / "backups"
    for number in range(2):
        if number == 1:
            new = int(n * percent / 100)
            log(f"  {new} new files ({percent}%)")
            add_files(work / "live", work / "index", new, random.Random(n + 1), age=600, keep=False, md5=True)
            if per_file:
                pad_index(work / "index", per_file)
            time.sleep(1.1)  # backups are named by the second
        log(f"  index {(work / 'index').stat().st_size / 2 ** 20:.0f} MiB")
        opened = _backupset.open_backup(str(root), str(work / "etc"), str(work), str(work / "live"), space_check=False)
        t0 = time.monotonic()
        previous = os.path.join(opened["previous"], "storage") if opened["previous"] else None
        hot = _storage.hot_pass(str(work / "live"), opened["storage_path"], opened["state_file"], previous=previous,
                                link_mode="auto", settle=0)
        os.makedirs(opened["index_path"])
        shutil.copyfile(work / "index", os.path.join(opened["index_path"], "index"))
        log(f"  backup {number + 1}: hot pass {time.monotonic() - t0:.0f} s ({hot['new_files']} new, "
            f"{hot['linked_files']} linked from the previous backup)")
        if number == 0:
            _backupset.close_backup(str(root), opened["name"], "bench", {}, 7, md5="none")
    (work / "name").write_text(opened["name"])
    return hot["new_files"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", maxsplit=1)[0])
    parser.add_argument("--files", type=int, default=200_000)
    parser.add_argument("--percent", type=float, default=1.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--before", default="main", help="the git revision of 'before' (default main)")
    parser.add_argument("--index-bytes-per-file", type=int, default=1000,
                        help="grow the index to about this per instance, as a real one (0: as built)")
    parser.add_argument("--workdir", type=Path, default=Path("/var/tmp/completion"))
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--step", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--code", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.step:
        print(json.dumps(step(args)))
        return 0
    work = args.workdir / f"n{args.files}"
    shutil.rmtree(work, ignore_errors=True)
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    load = os.getloadavg()[0]
    rows = []
    try:
        new = prepare(work, args.files, args.percent, args.before, args.index_bytes_per_file)
        os.sync()
        t0 = time.monotonic()
        subprocess.run(f"find {work / 'backups'}/*.incomplete/storage -type f | wc -l", shell=True, check=True,
                       stdout=subprocess.DEVNULL)
        find = time.monotonic() - t0
        times: dict = {"before": [], "after": [], "integrity": []}
        for number in range(args.rounds):
            for code in (("before", "after", "integrity") if number % 2 == 0 else ("integrity", "after", "before")):
                log(f"  round {number + 1}: {code}")
                got = run_step(work, code)
                if code != "integrity" and not got["ok"]:
                    raise RuntimeError(f"{code}: the backup failed its check: {got}")
                times[code].append(got)
        for code in ("before", "after"):
            got = times[code][-1]
            rows.append((code, ", ".join(f"{g['seconds']:.1f}" for g in times[code]), got["storage_check"],
                         got.get("compared") or "", got["checked"], got["hashed"]))
        before = min(g["seconds"] for g in times["before"])
        after = min(g["seconds"] for g in times["after"])
        integrity = min(g["seconds"] for g in times["integrity"])
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(f"{args.files:,} files, {args.percent}% new ({new:,}); {os.cpu_count()} CPUs; started {started}; "
          f"load average {load:.2f} at the start, {os.getloadavg()[0]:.2f} at the end; before = {args.before}")
    print("| code | seconds (each round) | storage check | rows compared in SQL | files statted | files hashed |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(str(cell) for cell in row) + " |")
    print(f"\nafter / before (best of each): {after / before:.2f} ({after:.1f} s / {before:.1f} s); "
          f"PRAGMA integrity_check alone {integrity:.1f} s; find storage -type f: {find:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Peak memory (RSS) of the modules' work on an archive of N files (issue 15.4).

Builds N storage files in ``xx/yy/uuid`` folders and a SQLite index with Orthanc's own tables for
them (``stop_window.add_files``: one instance and one attachment per file, with its MD5), then
runs, each in its own child process so that its peak RSS (``VmHWM``) is its own, the work of:

- ``hot pass``: ``_storage.hot_pass`` into an empty backup (link_mode auto: hard links here);
- ``delta``: ``_storage.Delta`` fetch then tidy against the index after 1% new files;
- ``complete (md5 new)``: what ``backup_set state=complete`` checks: ``_verify.verify_backup``
  with md5 of the files the state file says are new (here: all of them, a first backup);
- ``verify (md5 all)``: ``backup_verify``'s ``_verify.verify_backup(md5="all")``;
- ``server complete (md5 new)``: ``backup_ship``'s check on the server of a copy whose previous
  backup holds all but 1% of its files (``_ship.complete``'s selection and verification);
- ``restore copy``: ``_restore.apply``'s storage loop (walk the backup, place every file; hard
  links here).

    python3 benchmarks/memory.py --files 1000000 [--workdir /var/tmp/memory] [--keep]

``--keep`` keeps the built archive; a later run with the same ``--workdir`` and ``--files``
reuses it (to measure before and after a change without building twice). Results on stdout.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import random
import resource
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import _bench
from _bench import log
from stop_window import SCHEMA, add_files, peak_rss_mib

STEPS = ("none", "hot", "delta", "complete", "verify", "server", "restore")
LABELS = {"none": "a child that only imports", "hot": "hot pass (1 backup, hard links)",
          "delta": "delta pass, 1% new (fetch + tidy)", "complete": "complete: verify, md5 of new files",
          "verify": "backup_verify md5=all", "server": "server complete: verify, md5 of new (1% new)",
          "restore": "restore copy (walk + place, hard links)"}


def step(name: str, work: Path) -> dict:
    from ansible_collections.pacs.orthanc.plugins.module_utils import _restore, _ship, _storage, _verify  # noqa: F401
    src, index = work / "live", work / "index"
    backup = work / "backup"
    out: dict = {}
    t0 = time.monotonic()
    if name == "hot":
        result = _storage.hot_pass(str(src), str(backup / "storage"), str(work / "state.db"), link_mode="auto",
                                   settle=0)
        out["files"] = result["files"]
    elif name == "delta":
        result = _storage.delta_pass(str(src), str(backup / "storage"), str(work / "state.db"),
                                     index=str(index), link_mode="auto")
        out.update(files=result["files"], fetched=result["fetched_files"])
    elif name == "complete":
        with _storage.State(str(work / "state.db"), readonly=True) as state:
            report = _complete_filter(state, backup)
        out.update(hashed=report["files_hashed"], ok=report["ok"])
    elif name == "verify":
        report = _verify.verify_backup(str(backup), md5="all")
        out.update(hashed=report["files_hashed"], ok=report["ok"], orphans=report["orphans"])
    elif name == "server":
        report = _server_check(work)
        out.update(hashed=report["files_hashed"], ok=report["ok"])
    elif name == "restore":
        placer = _storage.Placer(str(backup / "storage"), str(work / "restored"), None, True, 4)
        files = 0
        for uuid, _entry in _storage.walk_storage(str(backup / "storage")):
            placer.place(uuid, None)
            files += 1
        placer.finish("restore storage")
        out["files"] = files
    out["seconds"] = time.monotonic() - t0
    out["rss_mib"] = peak_rss_mib()
    # worker processes (verification): the largest one's peak (pages shared with this process
    # at fork included); the step's whole footprint is at most rss_mib + workers x that
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    if children:
        out["worker_peak_rss_mib"] = round(children)
    return out


def _complete_filter(state, backup: Path) -> dict:
    """backup_set complete's verification, as _backupset.close_backup runs it."""
    from ansible_collections.pacs.orthanc.plugins.module_utils import _verify
    if hasattr(state, "is_new"):  # this checkout: one look-up in the state file per file
        return _verify.verify_backup(str(backup), md5="new", hash_filter=state.is_new)
    new_files = state.new_uuids()  # before issue 15.4: the set of every new uuid
    return _verify.verify_backup(str(backup), md5="new", hash_filter=lambda u: u in new_files)


def _server_check(work: Path) -> dict:
    """_ship.complete's selection of new files (against the previous backup) and verification."""
    from ansible_collections.pacs.orthanc.plugins.module_utils import _ship, _verify
    previous = work / "previous"
    if hasattr(_ship, "NewFiles"):  # this checkout: an inode comparison per file asked about
        chosen = _ship.NewFiles(str(work / "backup"), str(previous))
    else:  # before issue 15.4: the set of every new uuid
        fresh = _ship.new_storage_files(str(work / "backup"), str(previous))
        chosen = fresh.__contains__
    return _verify.verify_backup(str(work / "backup"), md5="new", hash_filter=chosen)


def run_step(work: Path, name: str) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--step", name, "--work", str(work)],
                          check=True, capture_output=True, text=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def build(work: Path, n: int) -> None:
    """The live storage and its index (n files), and a 'previous' backup: hard links to all but
    the last 1% of the files, for the server's check."""
    shutil.rmtree(work, ignore_errors=True)
    (work / "live").mkdir(parents=True)
    conn = sqlite3.connect(work / "index")
    conn.executescript(SCHEMA + "CREATE TABLE GlobalProperties(property INTEGER PRIMARY KEY, value TEXT);"
                       "INSERT INTO GlobalProperties VALUES (1, '6');")
    conn.close()
    rng = random.Random(n)
    t0 = time.monotonic()
    log(f"N={n}: writing the files and the index")
    add_files(work / "live", work / "index", n, rng, age=3600, keep=False, md5=True)
    log(f"  built in {time.monotonic() - t0:.0f} s; index {(work / 'index').stat().st_size / 2 ** 20:.0f} MiB")
    (work / "built").write_text(str(n))


def bench(work: Path, n: int, keep: bool) -> list:
    if not (work / "built").exists() or (work / "built").read_text() != str(n):
        build(work, n)
    for leftover in ("backup", "restored", "previous", "state.db"):
        path = work / leftover
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    rows = [("none", run_step(work, "none"))]
    log("  hot pass")
    rows.append(("hot", run_step(work, "hot")))
    added = add_files(work / "live", work / "index", n // 100, random.Random(n + 1), age=60, md5=True)
    try:
        log(f"  delta ({len(added)} new files)")
        rows.append(("delta", run_step(work, "delta")))
        (work / "backup" / "index").mkdir(parents=True)
        shutil.copyfile(work / "index", work / "backup" / "index" / "index")
        # the previous backup on the server: everything but the new 1%, as hard links
        previous = work / "previous" / "storage"
        added_set = set(added)
        for uuid, entry in _walk(work / "backup" / "storage"):
            if uuid not in added_set:
                target = previous / uuid[0:2] / uuid[2:4]
                target.mkdir(parents=True, exist_ok=True)
                os.link(entry, target / uuid)
        del added_set
        for name in ("complete", "verify", "server", "restore"):
            log(f"  {LABELS[name]}")
            rows.append((name, run_step(work, name)))
    finally:
        # the live files added for the delta go, so that a rerun with --keep starts alike
        conn = sqlite3.connect(work / "index")
        conn.execute("DELETE FROM AttachedFiles WHERE id > ?", (n,))
        conn.execute("DELETE FROM Resources WHERE internalId > ?", (n,))
        conn.commit()
        conn.close()
        for uuid in added:
            os.unlink(work / "live" / uuid[0:2] / uuid[2:4] / uuid)
        for leftover in ("backup", "restored", "previous"):
            shutil.rmtree(work / leftover, ignore_errors=True)
    if not keep:
        shutil.rmtree(work)
    return rows


def _walk(root: Path):
    importlib.invalidate_caches()  # .work/collections may have been made after this process started
    from ansible_collections.pacs.orthanc.plugins.module_utils import _storage
    for uuid, entry in _storage.walk_storage(str(root)):
        yield uuid, entry.path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", maxsplit=1)[0])
    parser.add_argument("--files", type=int, default=1_000_000)
    parser.add_argument("--workdir", default="/var/tmp/memory")
    parser.add_argument("--keep", action="store_true", help="keep the built archive for a later run")
    parser.add_argument("--step", choices=STEPS, help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.step:
        if args.step == "none":
            from ansible_collections.pacs.orthanc.plugins.module_utils import _restore, _ship, _storage, _verify  # noqa: F401
            print(json.dumps({"rss_mib": peak_rss_mib(), "seconds": 0.0}))
        else:
            print(json.dumps(step(args.step, Path(args.work))))
        return
    work = Path(args.workdir) / f"n{args.files}"
    load = os.getloadavg()
    try:
        rows = bench(work, args.files, args.keep)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    commit = subprocess.run(["git", "-C", str(_bench.REPO), "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True, check=False).stdout.strip()
    print(f"{args.files:,} files; checkout {commit}; load average at the start {load[0]:.2f}, at the end "
          f"{os.getloadavg()[0]:.2f}; {os.cpu_count()} CPUs")
    print("| step | seconds | peak RSS (MiB) | notes |")
    print("|---|---:|---:|---|")
    for name, got in rows:
        notes = ", ".join(f"{k} {v}" for k, v in got.items() if k not in ("seconds", "rss_mib"))
        print(f"| {LABELS[name]} | {got['seconds']:.1f} | {got['rss_mib']:.0f} | {notes} |")


if __name__ == "__main__":
    main()

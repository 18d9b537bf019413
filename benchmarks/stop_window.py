"""What the stop window costs beyond the index copy, old code against new (issue 15.2, 15.4).

Builds N storage files in ``xx/yy/uuid`` folders and a SQLite index with Orthanc's own tables for
them (``Resources`` and ``AttachedFiles`` as Orthanc 1.10 creates them, one instance and one
attachment per file), runs the hot pass of the collection's ``_storage``, then adds 0.1% and 1%
new files (to the storage and the index, as Orthanc would while it runs) and times what the
stopped window does with the storage: the delta computation and the copy of the new files.

"old" is ``_storage`` as of commit OLD_COMMIT (a state file of one text line per file, read
into a dict; the index's attachments read into a dict; compared in Python; the state rewritten),
"new" is this checkout's (a SQLite state database; SQLite lists what the index has that the
state lacks; the rest after Orthanc's start, timed apart as ``after start``). Each step runs in
its own process, so that its peak RSS (``VmHWM``) is its own.

    python3 benchmarks/stop_window.py --files 100000 1000000 [--workdir /var/tmp/stop-window]

The work folder is deleted at the end. Results on stdout (a table), progress on stderr.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import random
import resource
import shutil
import sqlite3
import subprocess
import sys
import time
import uuid as uuidlib
from pathlib import Path

import _bench
from _bench import log

OLD_COMMIT = "b4b9e54"  # main before issue 15: text state file, dicts

# Orthanc 1.10's PrepareDatabase.sql (Debian's /usr/sbin/Orthanc), the two tables the delta reads
SCHEMA = """
CREATE TABLE Resources(
       internalId INTEGER PRIMARY KEY AUTOINCREMENT,
       resourceType INTEGER,
       publicId TEXT,
       parentId INTEGER REFERENCES Resources(internalId) ON DELETE CASCADE
       );
CREATE TABLE AttachedFiles(
       id INTEGER REFERENCES Resources(internalId) ON DELETE CASCADE,
       fileType INTEGER,
       uuid TEXT,
       compressedSize INTEGER,
       uncompressedSize INTEGER,
       compressionType INTEGER,
       uncompressedMD5 TEXT,
       compressedMD5 TEXT,
       PRIMARY KEY(id, fileType)
       );
CREATE INDEX ChildrenIndex ON Resources(parentId);
CREATE INDEX PublicIndex ON Resources(publicId);
CREATE INDEX ResourceTypeIndex ON Resources(resourceType);
"""
INSTANCE = 3  # Orthanc's ResourceType_Instance in the index


def peak_rss_mib() -> float:
    """This process's peak RSS (VmHWM: ru_maxrss would carry the parent's over fork and exec)."""
    with open("/proc/self/status", encoding="ascii") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def add_files(storage: Path, index: Path, count: int, rng: random.Random, age: float, keep: bool = True,
              md5: bool = False) -> list:
    """Write ``count`` files of 100-400 bytes and their rows; returns their uuids (``keep``).
    ``md5``: record each file's MD5 in the index, as Orthanc does (for verification)."""
    conn = sqlite3.connect(index, isolation_level=None)
    conn.execute("PRAGMA synchronous = OFF")
    next_id = conn.execute("SELECT COALESCE(MAX(internalId), 0) + 1 FROM Resources").fetchone()[0]
    stamp = time.time() - age
    made, uuids, rows, files = set(), [], [], []
    conn.execute("BEGIN")
    for number in range(count):
        name = str(uuidlib.UUID(int=rng.getrandbits(128), version=4))
        size = rng.randint(100, 400)
        folder = storage / name[0:2] / name[2:4]
        if name[0:4] not in made:
            folder.mkdir(parents=True, exist_ok=True)
            made.add(name[0:4])
        path = folder / name
        data = os.urandom(size)
        path.write_bytes(data)
        os.utime(path, (stamp, stamp))
        rid = next_id + number
        digest = hashlib.md5(data).hexdigest() if md5 else ""
        rows.append((rid, INSTANCE, f"{rid:08x}-bench", None))
        files.append((rid, 1, name, size, size, 1, digest, digest))
        if keep:
            uuids.append(name)
        if len(rows) >= 20000:
            conn.executemany("INSERT INTO Resources VALUES (?,?,?,?)", rows)
            conn.executemany("INSERT INTO AttachedFiles VALUES (?,?,?,?,?,?,?,?)", files)
            rows, files = [], []
    conn.executemany("INSERT INTO Resources VALUES (?,?,?,?)", rows)
    conn.executemany("INSERT INTO AttachedFiles VALUES (?,?,?,?,?,?,?,?)", files)
    conn.execute("COMMIT")
    conn.close()
    return uuids


def load_storage(which: str, work: Path):
    """The _storage module of this checkout ("new") or of OLD_COMMIT ("old")."""
    from ansible_collections.pacs.orthanc.plugins.module_utils import _storage  # noqa: E402 (after _bench)
    if which == "new":
        return _storage
    path = work / "old_storage.py"
    if not path.exists():
        path.write_text(subprocess.run(["git", "-C", str(_bench.REPO), "show",
                                        f"{OLD_COMMIT}:plugins/module_utils/_storage.py"],
                                       check=True, capture_output=True, text=True).stdout)
    spec = importlib.util.spec_from_file_location("old_storage", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def step(args) -> dict:
    """One measured step, run in a child process: prints {"seconds", "rss_mib", ...}."""
    work = Path(args.work)
    storage = load_storage(args.code, work)
    src, index = work / "live", work / "index"
    dest, state = work / f"backup-{args.code}" / "storage", work / f"state-{args.code}"
    out: dict = {}
    t0 = time.monotonic()
    if args.step == "hot":
        result = storage.hot_pass(str(src), str(dest), str(state), link_mode="auto", settle=0)
        out["files"] = result["files"]
    elif args.code == "old":  # what stopped_capture did inside the window
        from ansible_collections.pacs.orthanc.plugins.module_utils import _sqlite  # noqa: E402
        wanted = {u: size for u, (size, _md5) in _sqlite.attachments(str(index)).items()}
        result = storage.delta_pass(str(src), str(dest), str(state), wanted, link_mode="auto")
        out.update(fetched=result["fetched_files"], removed=result["removed_files"], files=result["files"])
    else:  # inside the window: fetch; after Orthanc's start: tidy
        with storage.Delta(str(src), str(dest), str(state), index=str(index), link_mode="auto") as delta:
            result = delta.fetch()
            out["seconds"] = time.monotonic() - t0
            t1 = time.monotonic()
            result.update(delta.tidy())
            out["after_start_seconds"] = time.monotonic() - t1
        out.update(fetched=result["fetched_files"], removed=result["removed_files"], files=result["files"])
    out.setdefault("seconds", time.monotonic() - t0)
    out["rss_mib"] = peak_rss_mib()
    return out


def run_step(work: Path, code: str, name: str) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--step", name, "--code", code, "--work", str(work)],
                          check=True, capture_output=True, text=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def baseline_rss(work: Path) -> float:
    """Peak RSS of a child that only imports (Python, sqlite3, the collection's modules)."""
    proc = subprocess.run([sys.executable, __file__, "--step", "none", "--code", "new", "--work", str(work)],
                          check=True, capture_output=True, text=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])["rss_mib"]


def remove_added(work: Path, added: list) -> None:
    """Take the fetched files out of both backups, so that each measurement starts alike."""
    for code in ("old", "new"):
        for name in added:
            try:
                os.unlink(work / f"backup-{code}" / "storage" / name[0:2] / name[2:4] / name)
            except FileNotFoundError:
                pass


def bench(n: int, root: Path) -> list:
    work = root / f"n{n}"
    shutil.rmtree(work, ignore_errors=True)
    (work / "live").mkdir(parents=True)
    conn = sqlite3.connect(work / "index")
    conn.executescript(SCHEMA)
    conn.close()
    rng = random.Random(n)
    t0 = time.monotonic()
    log(f"N={n}: writing the files and the index")
    add_files(work / "live", work / "index", n, rng, age=3600, keep=False)
    log(f"  built in {time.monotonic() - t0:.0f} s; index {(work / 'index').stat().st_size / 2 ** 20:.0f} MiB")
    rows = []
    t0 = time.monotonic()
    shutil.copyfile(work / "index", work / "index.copy")  # what the window does anyway, for scale
    rows.append((n, "copy of the index (in the window either way)", "", time.monotonic() - t0, None, None))
    os.unlink(work / "index.copy")
    for code in ("old", "new"):
        log(f"  hot pass ({code})")
        hot = run_step(work, code, "hot")
        shutil.copyfile(work / f"state-{code}", work / f"state-{code}.hot")
        rows.append((n, "hot pass (Orthanc runs)", code, hot["seconds"], None, hot["rss_mib"]))
    added: list = []
    for percent in (0.1, 1.0):
        added += add_files(work / "live", work / "index", int(n * percent / 100) - len(added), rng, age=60)
        for code in ("old", "new"):
            remove_added(work, added)
            shutil.copyfile(work / f"state-{code}.hot", work / f"state-{code}")
            log(f"  window with {percent}% new ({len(added)} files), {code}")
            got = run_step(work, code, "window")
            if got["fetched"] != len(added) or got["files"] != n + len(added):
                raise RuntimeError(f"{code} fetched {got['fetched']} of {len(added)} new files: {got}")
            rows.append((n, f"stop window, {percent}% new", code, got["seconds"], got.get("after_start_seconds"),
                         got["rss_mib"]))
    shutil.rmtree(work)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", maxsplit=1)[0])
    parser.add_argument("--files", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--workdir", default="/var/tmp/stop-window")
    parser.add_argument("--step", help=argparse.SUPPRESS)
    parser.add_argument("--code", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.step == "none":
        load_storage("new", Path(args.work))
        print(json.dumps({"rss_mib": peak_rss_mib()}))
        return
    if args.step:
        print(json.dumps(step(args)))
        return
    root = Path(args.workdir)
    root.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg()
    try:
        base = baseline_rss(root)
        rows = []
        for n in args.files:
            rows += bench(n, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"load average at the start: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}, at the end: "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}; {os.cpu_count()} CPUs; "
          f"a child that only imports peaks at {base:.0f} MiB RSS")
    print("| files | step | code | seconds | after start (s) | peak RSS (MiB) |")
    print("|---:|---|---|---:|---:|---:|")
    for n, name, code, seconds, after, rss in rows:
        after_text = f"{after:.2f}" if after is not None else ""
        rss_text = f"{rss:.0f}" if rss is not None else ""
        print(f"| {n:,} | {name} | {code} | {seconds:.2f} | {after_text} | {rss_text} |")


if __name__ == "__main__":
    main()

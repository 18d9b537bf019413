"""What the stop window costs beyond the index copy, by way of computing the delta (issue 15.2, 15.4).

Builds N storage files in ``xx/yy/uuid`` folders and a SQLite index with Orthanc's own tables for
them (``Resources``, ``AttachedFiles`` and ``Changes`` as Orthanc 1.10 creates them, one instance,
one attachment and one ``NewInstance`` change per file, as Orthanc logs it), runs the hot pass of
the collection's ``_storage`` (which records the change position it began at), then adds 0.1% and
1% new files (to the storage and the index, with their changes, as Orthanc would while it runs)
and times what the stopped window does with the storage: the delta computation and the copy of
the new files.

"full" is this checkout's ``_storage`` comparing every attachment of the index with the state
(SQLite's join, what the window did before the change log was used), "changes" examines only the
attachments named by the changes past the hot pass's position (``Delta.window_plan``); for both,
what runs after Orthanc's start is timed apart (``after start``: for "changes" the full comparison
as a safety net, then the removal of deleted files). "old" (``--old``) is ``_storage`` as of
commit OLD_COMMIT (a text state file read into a dict, the index's attachments into another,
compared in Python). Each step runs in its own process, so that its peak RSS (``VmHWM``) is its own.

    python3 benchmarks/stop_window.py --files 100000 1000000 [--percent 0.1 1] [--old]
                                      [--workdir /var/tmp/stop-window]

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
CREATE TABLE Changes(
       seq INTEGER PRIMARY KEY AUTOINCREMENT,
       changeType INTEGER,
       internalId INTEGER REFERENCES Resources(internalId) ON DELETE CASCADE,
       resourceType INTEGER,
       date TEXT
       );
CREATE INDEX ChildrenIndex ON Resources(parentId);
CREATE INDEX PublicIndex ON Resources(publicId);
CREATE INDEX ResourceTypeIndex ON Resources(resourceType);
CREATE INDEX ChangesIndex ON Changes(internalId);
"""
INSTANCE = 4  # Orthanc's resource type of an instance in the index (Resources.resourceType)
NEW_INSTANCE = 2  # Orthanc's ChangeType_NewInstance (Changes.changeType)


def peak_rss_mib() -> float:
    """This process's peak RSS (VmHWM: ru_maxrss would carry the parent's over fork and exec)."""
    with open("/proc/self/status", encoding="ascii") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def add_files(storage: Path, index: Path, count: int, rng: random.Random, age: float, keep: bool = True,
              md5: bool = False, placed=None) -> list:
    """Write ``count`` files of 100-400 bytes and their rows; returns their uuids (``keep``).
    ``md5``: record each file's MD5 in the index, as Orthanc does (for verification).
    ``placed``: write no file, but call ``placed([(uuid, size), ...])`` for each batch of rows
    (``--state-only``: what the hot pass would have recorded)."""
    conn = sqlite3.connect(index, isolation_level=None)
    conn.execute("PRAGMA synchronous = OFF")
    next_id = conn.execute("SELECT COALESCE(MAX(internalId), 0) + 1 FROM Resources").fetchone()[0]
    stamp = time.time() - age
    made, uuids, rows, files, changes = set(), [], [], [], []
    conn.execute("BEGIN")
    for number in range(count):
        name = str(uuidlib.UUID(int=rng.getrandbits(128), version=4))
        size = rng.randint(100, 400)
        data = os.urandom(size) if placed is None or md5 else b""
        if placed is None:
            folder = storage / name[0:2] / name[2:4]
            if name[0:4] not in made:
                folder.mkdir(parents=True, exist_ok=True)
                made.add(name[0:4])
            path = folder / name
            path.write_bytes(data)
            os.utime(path, (stamp, stamp))
        rid = next_id + number
        digest = hashlib.md5(data).hexdigest() if md5 else ""
        rows.append((rid, INSTANCE, f"{rid:08x}-bench", None))
        files.append((rid, 1, name, size, size, 1, digest, digest))
        changes.append((NEW_INSTANCE, rid, INSTANCE, "20261130T000000"))
        if keep:
            uuids.append(name)
        if len(rows) >= 20000:
            if placed is not None:
                placed([(f[2], f[3]) for f in files])
            conn.executemany("INSERT INTO Resources VALUES (?,?,?,?)", rows)
            conn.executemany("INSERT INTO AttachedFiles VALUES (?,?,?,?,?,?,?,?)", files)
            conn.executemany(CHANGE, changes)
            rows, files, changes = [], [], []
    if placed is not None:
        placed([(f[2], f[3]) for f in files])
    conn.executemany("INSERT INTO Resources VALUES (?,?,?,?)", rows)
    conn.executemany("INSERT INTO AttachedFiles VALUES (?,?,?,?,?,?,?,?)", files)
    conn.executemany(CHANGE, changes)
    conn.execute("COMMIT")
    conn.close()
    return uuids


CHANGE = "INSERT INTO Changes (changeType, internalId, resourceType, date) VALUES (?,?,?,?)"


def load_storage(which: str, work: Path):
    """The _storage module of this checkout ("full", "changes") or of OLD_COMMIT ("old")."""
    from ansible_collections.pacs.orthanc.plugins.module_utils import _storage  # noqa: E402 (after _bench)
    if which != "old":
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


def change_position(index: Path) -> int:
    """What ``GET /changes?last`` answers: the last seq Orthanc's change log gave."""
    conn = sqlite3.connect(index)
    try:
        return conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'Changes'").fetchone()[0]
    finally:
        conn.close()


def state_of(code: str) -> str:
    return "old" if code == "old" else "new"  # "full" and "changes" share the hot pass of this checkout


def step(args) -> dict:
    """One measured step, run in a child process: prints {"seconds", "rss_mib", ...}."""
    work = Path(args.work)
    storage = load_storage(args.code, work)
    src, index = work / "live", work / "index"
    dest, state = work / f"backup-{state_of(args.code)}" / "storage", work / f"state-{state_of(args.code)}"
    out: dict = {}
    t0 = time.monotonic()
    if args.step == "hot":
        extra = {} if args.code == "old" else {"change_position": change_position(index)}
        result = storage.hot_pass(str(src), str(dest), str(state), link_mode="auto", settle=0, **extra)
        out["files"] = result["files"]
    elif args.code == "old":  # what stopped_capture did inside the window
        from ansible_collections.pacs.orthanc.plugins.module_utils import _sqlite  # noqa: E402
        wanted = {u: size for u, (size, _md5) in _sqlite.attachments(str(index)).items()}
        result = storage.delta_pass(str(src), str(dest), str(state), wanted, link_mode="auto")
        out.update(fetched=result["fetched_files"], removed=result["removed_files"], files=result["files"])
    else:  # inside the window: fetch (by changes or in full); after Orthanc's start: the rest
        with storage.Delta(str(src), str(dest), str(state), index=str(index), link_mode="auto") as delta:
            if args.code == "changes":
                plan = delta.window_plan()
                if plan["mode"] != "changes":
                    raise RuntimeError(f"the window pass would not run by changes: {plan}")
                result = delta.fetch(changes_since=plan["change_position"])
            else:
                result = delta.fetch()
            out["seconds"] = time.monotonic() - t0
            t1 = time.monotonic()
            if args.code == "changes":  # the safety net: the full comparison, once Orthanc runs
                late = delta.fetch()
                if late["fetched_files"] or late["missing_files"]:
                    raise RuntimeError(f"the window missed files that its changes named: {late}")
            result.update(delta.tidy())
            out["after_start_seconds"] = time.monotonic() - t1
        out.update(fetched=result["fetched_files"], removed=result["removed_files"], files=result["files"],
                   compare_seconds=result["compare_seconds"])
    out.setdefault("seconds", time.monotonic() - t0)
    out["rss_mib"] = peak_rss_mib()
    return out


def run_step(work: Path, code: str, name: str) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--step", name, "--code", code, "--work", str(work)],
                          check=True, capture_output=True, text=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def baseline_rss(work: Path) -> float:
    """Peak RSS of a child that only imports (Python, sqlite3, the collection's modules)."""
    proc = subprocess.run([sys.executable, __file__, "--step", "none", "--code", "full", "--work", str(work)],
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


def fill_state(work: Path, n: int, rng: random.Random) -> None:
    """--state-only: the index's rows for N files that are not written, and the state the hot pass
    would have left for them (written by this checkout's State, as the hot pass writes it: placed
    by hard link, and the change position before the walk)."""
    from ansible_collections.pacs.orthanc.plugins.module_utils import _storage  # noqa: E402
    (work / "backup-new" / "storage").mkdir(parents=True)
    with _storage.State(str(work / "state-new")) as state:
        add_files(work / "live", work / "index", n, rng, age=3600, keep=False,
                  placed=lambda pairs: state.put([(u, size, _storage.ORIGIN_LINK) for u, size in pairs]))
        state.set_change_position(change_position(work / "index"))


def bench(n: int, root: Path, percents: list, codes: list, state_only: bool = False) -> list:
    work = root / f"n{n}"
    shutil.rmtree(work, ignore_errors=True)
    (work / "live").mkdir(parents=True)
    conn = sqlite3.connect(work / "index")
    conn.executescript(SCHEMA)
    conn.close()
    rng = random.Random(n)
    t0 = time.monotonic()
    if state_only:
        codes = [code for code in codes if code != "old"]
        log(f"N={n}: writing the index and the state (--state-only: no archived file is written)")
        fill_state(work, n, rng)
    else:
        log(f"N={n}: writing the files and the index")
        add_files(work / "live", work / "index", n, rng, age=3600, keep=False)
    log(f"  built in {time.monotonic() - t0:.0f} s; index {(work / 'index').stat().st_size / 2 ** 20:.0f} MiB")
    rows = []
    t0 = time.monotonic()
    shutil.copyfile(work / "index", work / "index.copy")  # what the window does anyway, for scale
    rows.append((n, "copy of the index (in the window either way)", "", time.monotonic() - t0, None, None, None))
    os.unlink(work / "index.copy")
    for state in sorted({state_of(code) for code in codes}, reverse=True):
        if state_only:
            shutil.copyfile(work / f"state-{state}", work / f"state-{state}.hot")
            rows.append((n, "hot pass: not run (--state-only, its state written directly)", "", 0.0, None, None, None))
            continue
        log(f"  hot pass ({state})")
        hot = run_step(work, "old" if state == "old" else "full", "hot")
        shutil.copyfile(work / f"state-{state}", work / f"state-{state}.hot")
        rows.append((n, "hot pass (Orthanc runs)", "old" if state == "old" else "full, changes",
                     hot["seconds"], None, hot["rss_mib"], None))
    added: list = []
    for percent in percents:
        added += add_files(work / "live", work / "index", int(n * percent / 100) - len(added), rng, age=60)
        for code in codes:
            remove_added(work, added)
            shutil.copyfile(work / f"state-{state_of(code)}.hot", work / f"state-{state_of(code)}")
            log(f"  window with {percent}% new ({len(added)} files), {code}")
            got = run_step(work, code, "window")
            if got["fetched"] != len(added) or got["files"] != n + len(added):
                raise RuntimeError(f"{code} fetched {got['fetched']} of {len(added)} new files: {got}")
            rows.append((n, f"stop window, {percent}% new", code, got["seconds"], got.get("after_start_seconds"),
                         got["rss_mib"], got.get("compare_seconds")))
    shutil.rmtree(work)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", maxsplit=1)[0])
    parser.add_argument("--files", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--percent", type=float, nargs="+", default=[0.1, 1.0],
                        help="new files after the hot pass, in percent of N (cumulative, ascending)")
    parser.add_argument("--old", action="store_true", help=f"also time _storage of {OLD_COMMIT} (dicts)")
    parser.add_argument("--state-only", action="store_true",
                        help="write no archived file: fill the index and the hot pass's state directly (the window "
                             "reads neither the archived files nor the tree; the new files are real)")
    parser.add_argument("--workdir", default="/var/tmp/stop-window")
    parser.add_argument("--step", help=argparse.SUPPRESS)
    parser.add_argument("--code", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.step == "none":
        load_storage("full", Path(args.work))
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
            rows += bench(n, root, sorted(args.percent), (["old"] if args.old else []) + ["full", "changes"],
                          args.state_only)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"load average at the start: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}, at the end: "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}; {os.cpu_count()} CPUs; "
          f"a child that only imports peaks at {base:.0f} MiB RSS")
    print("| files | step | code | seconds | of which finding the candidates | after start (s) | peak RSS (MiB) |")
    print("|---:|---|---|---:|---:|---:|---:|")
    for n, name, code, seconds, after, rss, compare in rows:
        after_text = f"{after:.2f}" if after is not None else ""
        rss_text = f"{rss:.0f}" if rss is not None else ""
        compare_text = f"{compare:.3f}" if compare is not None else ""
        print(f"| {n:,} | {name} | {code} | {seconds:.2f} | {compare_text} | {after_text} | {rss_text} |")


if __name__ == "__main__":
    main()

"""What a backup format costs per backup at millions of files (issue 15.5): measurement only.

Two ways to keep many backups of one Orthanc storage area (``xx/yy/uuid`` files written once):

- ``tree`` (the format today): each backup is a whole ``storage/xx/yy/uuid`` tree; files that did
  not change are hard links to the previous backup's. Adding a backup links every file (and makes
  every folder); removing one (retention) unlinks every file.
- ``pool``: each file is stored once in a shared ``pool/xx/yy/uuid``; a backup is a sorted list of
  the uuids it holds (one text file). Adding a backup writes the new files into the pool and the
  list; removing one deletes its list and the pool files that no neighbouring backup lists
  (Orthanc never re-creates a uuid, so a file absent from the next backup is absent from all
  later ones, and one absent from the previous backup was created after all earlier ones).

The archive and both formats live on a loop-mounted XFS image (tests/support/loopfs.py, needs
root and xfsprogs), so that the machine's own filesystem is not filled with millions of inodes;
the image is removed at the end. Between the two backups Orthanc's activity is simulated: 1% new
files (``--new``), 0.2% deleted.

    python3 benchmarks/format_study.py --files 1000000 [--image-dir /var/tmp]

Results (a table) on stdout, progress on stderr.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import subprocess
import sys
import time
import uuid as uuidlib
from pathlib import Path

from _bench import log

from tests.support import loopfs  # noqa: E402


def relpath(uuid: str) -> str:
    return os.path.join(uuid[0:2], uuid[2:4], uuid)


def write_files(root: Path, count: int, rng: random.Random, made: set) -> list:
    """``count`` new files of 100-400 bytes under root/xx/yy/; their uuids."""
    names = []
    for _number in range(count):
        name = str(uuidlib.UUID(int=rng.getrandbits(128), version=4))
        folder = root / name[0:2] / name[2:4]
        if name[0:4] not in made:
            folder.mkdir(parents=True, exist_ok=True)
            made.add(name[0:4])
        with open(folder / name, "wb") as handle:
            handle.write(os.urandom(rng.randint(100, 400)))
        names.append(name)
    return names


def live_names(root: Path):
    """uuids of the live storage, from a walk of its folders (names only)."""
    for d1 in os.scandir(root):
        for d2 in os.scandir(d1.path):
            for entry in os.scandir(d2.path):
                yield entry.name


def link_tree(live: Path, dest: Path, previous: Path | None) -> int:
    """The tree format: a new backup tree, every file linked (from the previous backup when it
    holds it, else from the live storage, as the hot pass does on one filesystem)."""
    made = set()
    files = 0
    for name in live_names(live):
        rel = relpath(name)
        shard = name[0:4]
        if shard not in made:
            os.makedirs(dest / name[0:2] / name[2:4], exist_ok=True)
            made.add(shard)
        source = previous / rel if previous is not None and os.path.exists(previous / rel) else live / rel
        os.link(source, dest / rel)
        files += 1
    return files


def pool_add(live: Path, pool: Path, lists: Path, name: str, previous_list: Path | None) -> tuple:
    """The pool format: the live uuids, sorted, merged with the previous backup's list; the ones
    it lacks are linked into the pool; the list is written. Returns (files, new files)."""
    current = sorted(live_names(live))
    new = 0
    made = set()
    previous = open(previous_list, "r", encoding="ascii") if previous_list else None
    try:
        prev = previous.readline().rstrip("\n") if previous else ""
        with open(lists / (name + ".part"), "w", encoding="ascii") as out:
            for uuid in current:
                while prev and prev < uuid:
                    prev = previous.readline().rstrip("\n")
                if prev != uuid:  # not in the previous backup: into the pool
                    shard = uuid[0:4]
                    if shard not in made:
                        os.makedirs(pool / uuid[0:2] / uuid[2:4], exist_ok=True)
                        made.add(shard)
                    os.link(live / relpath(uuid), pool / relpath(uuid))
                    new += 1
                out.write(uuid + "\n")
        os.rename(lists / (name + ".part"), lists / name)
    finally:
        if previous:
            previous.close()
    return len(current), new


def pool_remove(pool: Path, lists: Path, name: str, neighbours: list) -> int:
    """Remove one backup of the pool format: the pool files its list holds that no neighbour's
    list holds, then its list. Returns the files removed from the pool."""
    handles = [open(lists / n, "r", encoding="ascii") for n in neighbours]
    heads = [h.readline().rstrip("\n") for h in handles]
    removed = 0
    try:
        with open(lists / name, "r", encoding="ascii") as doomed:
            for line in doomed:
                uuid = line.rstrip("\n")
                kept = False
                for i, handle in enumerate(handles):
                    while heads[i] and heads[i] < uuid:
                        heads[i] = handle.readline().rstrip("\n")
                    kept = kept or heads[i] == uuid
                if not kept:
                    os.unlink(pool / relpath(uuid))
                    removed += 1
    finally:
        for handle in handles:
            handle.close()
    os.unlink(lists / name)
    return removed


def timed(label: str, fn, rows: list, note=lambda r: ""):
    os.sync()
    log(f"  {label}")
    t0 = time.monotonic()
    result = fn()
    seconds = time.monotonic() - t0
    rows.append((label, seconds, note(result)))
    return result


def study(root: Path, n: int, new_fraction: float) -> list:
    rng = random.Random(n)
    live = root / "live"
    live.mkdir()
    made: set = set()
    log(f"writing {n} live files")
    t0 = time.monotonic()
    write_files(live, n, rng, made)
    log(f"  in {time.monotonic() - t0:.0f} s")
    rows: list = []
    tree1, tree2 = root / "tree" / "b1", root / "tree" / "b2"
    pool, lists = root / "pool" / "files", root / "pool" / "lists"
    lists.mkdir(parents=True)
    timed("tree: first backup (link every file, make every folder)", lambda: link_tree(live, tree1, None), rows,
          lambda f: f"{f:,} files")
    timed("pool: first backup (every file into the pool, the list)",
          lambda: pool_add(live, pool, lists, "b1", None), rows, lambda r: f"{r[0]:,} files, {r[1]:,} new")
    # Orthanc's day: new files, a few deleted
    added = write_files(live, int(n * new_fraction), rng, made)
    victims = rng.sample(sorted(live_names(live)), int(n * 0.002))
    for uuid in victims:
        os.unlink(live / relpath(uuid))
    log(f"Orthanc's day: {len(added):,} new files, {len(victims):,} deleted")
    timed(f"tree: next backup, {new_fraction:.0%} new (link every file)", lambda: link_tree(live, tree2, tree1), rows,
          lambda f: f"{f:,} files")
    timed(f"pool: next backup, {new_fraction:.0%} new (new files + list)",
          lambda: pool_add(live, pool, lists, "b2", lists / "b1"), rows, lambda r: f"{r[0]:,} files, {r[1]:,} new")
    timed("`cp -al` of the tree (for scale: the cheapest whole-tree link)",
          lambda: subprocess.run(["cp", "-al", str(tree2), str(root / "tree" / "cpal")], check=True), rows)
    timed("`rm -rf` of that copy", lambda: subprocess.run(["rm", "-rf", str(root / "tree" / "cpal")], check=True), rows)
    timed("tree: retention of one backup (shutil.rmtree: unlink every file)", lambda: shutil.rmtree(tree1), rows)
    timed("pool: retention of one backup (merge with the next list, unlink what it alone holds)",
          lambda: pool_remove(pool, lists, "b1", ["b2"]), rows, lambda r: f"{r:,} pool files removed")
    sizes = {"tree": _du(root / "tree"), "pool files": _du(pool), "pool lists": _du(lists)}
    rows.append(("space after (du)", 0.0, ", ".join(f"{k} {v}" for k, v in sizes.items())))
    return rows


def _du(path: Path) -> str:
    out = subprocess.run(["du", "-sh", "--apparent-size", str(path)], capture_output=True, text=True, check=False)
    inodes = subprocess.run(["du", "-s", "--inodes", str(path)], capture_output=True, text=True, check=False)
    return f"{out.stdout.split()[0] if out.stdout else '?'} ({inodes.stdout.split()[0] if inodes.stdout else '?'} inodes)"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", maxsplit=1)[0])
    parser.add_argument("--files", type=int, default=1_000_000)
    parser.add_argument("--new", type=float, default=0.01, help="fraction of new files between the backups")
    parser.add_argument("--image-dir", type=Path, default=Path("/var/tmp"),
                        help="where the sparse XFS image goes (it grows to about 10 KiB per file)")
    args = parser.parse_args()
    if not loopfs.available("xfs"):
        print("needs root and xfsprogs (mkfs.xfs)", file=sys.stderr)
        return 2
    folder = Path(args.image_dir) / f"format-study-{os.getpid()}"
    folder.mkdir(parents=True)
    size = max(2 * 1024 ** 3, args.files * 24 * 1024)
    fs = None
    load = os.getloadavg()
    try:
        fs = loopfs.LoopFilesystem(folder, "xfs", str(size))
        log(f"XFS on {fs.loop} at {fs.mount_point}")
        rows = study(fs.mount_point, args.files, args.new)
    finally:
        if fs is not None:
            fs.close()
        shutil.rmtree(folder, ignore_errors=True)
    print(f"{args.files:,} files of 100-400 bytes on a loop-mounted XFS; {os.cpu_count()} CPUs; load average "
          f"{load[0]:.2f} at the start, {os.getloadavg()[0]:.2f} at the end")
    print("| step | seconds | notes |")
    print("|---|---:|---|")
    for label, seconds, note in rows:
        print(f"| {label} | {seconds:.1f} | {note} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Retention of one backup against ``rm -rf`` of it (issue 15: "no slower than rm -rf").

Builds N small storage files in ``xx/yy/uuid`` folders (``stop_window.add_files``), then, for each
method and round, a backup of them as the hot pass makes one (a hard link per file, ``os.link``,
into ``<root>/<name>/storage/xx/yy/``, and a manifest) and times its removal by:

- ``rm -rf``;
- ``shutil.rmtree`` (what ``_layout.remove_backup`` ran before);
- ``remove_backup`` (this checkout: rename, then storage/'s top-level folders removed by
  ``REMOVE_WORKERS`` worker processes), and ``remove_tree`` with other numbers of workers
  (``--workers``; 1 is ``shutil.rmtree``).

Methods alternate within a round and the order is reversed every other round; ``sync`` runs before
each removal (the page cache cannot be dropped here: warm cache). Each removal runs alone.

    python3 benchmarks/retention.py --files 500000 [--rounds 2] [--workers 2 4] [--workdir /var/tmp/retention]

The work folder is deleted at the end. Results on stdout, progress on stderr.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from _bench import log  # also sys.path
from stop_window import SCHEMA, add_files

from ansible_collections.pacs.orthanc.plugins.module_utils import _layout, _storage  # noqa: E402

NAME = "20261130T010000Z"


def link_backup(source: Path, root: Path) -> int:
    """A backup of ``source``'s files as hard links (what an incremental holds); returns the files."""
    storage = root / NAME / _layout.STORAGE
    made, files = set(), 0
    for uuid, entry in _storage.walk_storage(str(source)):
        folder = storage / uuid[0:2] / uuid[2:4]
        if uuid[0:4] not in made:
            folder.mkdir(parents=True, exist_ok=True)
            made.add(uuid[0:4])
        os.link(entry.path, folder / uuid)
        files += 1
    (root / NAME / _layout.MANIFEST).write_text("{}")
    return files


def remover(method: str):
    if method == "rm -rf":
        return lambda root: subprocess.run(["rm", "-rf", str(root / NAME)], check=True)
    if method == "shutil.rmtree":
        return lambda root: shutil.rmtree(root / NAME)
    workers = int(method.split("=")[1])
    if workers == _layout.REMOVE_WORKERS:  # what retention runs: rename, then remove_tree
        return lambda root: _layout.remove_backup(str(root), NAME)
    return lambda root: _layout.remove_tree(str(root / NAME), workers=workers)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", maxsplit=1)[0])
    parser.add_argument("--files", type=int, default=500_000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--workers", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--workdir", type=Path, default=Path("/var/tmp/retention"))
    args = parser.parse_args()
    work = args.workdir
    shutil.rmtree(work, ignore_errors=True)
    (work / "live").mkdir(parents=True)
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    loads = [os.getloadavg()[0]]
    methods = ["rm -rf", "shutil.rmtree"] + [f"remove_backup workers={w}" for w in args.workers]
    times: dict = {m: [] for m in methods}
    try:
        conn = sqlite3.connect(work / "index")
        conn.executescript(SCHEMA)
        conn.close()
        log(f"writing {args.files} files")
        add_files(work / "live", work / "index", args.files, random.Random(args.files), age=3600, keep=False)
        root = work / "root"
        root.mkdir()
        for number in range(args.rounds):
            for method in (methods if number % 2 == 0 else list(reversed(methods))):
                t0 = time.monotonic()
                files = link_backup(work / "live", root)
                built = time.monotonic() - t0
                os.sync()
                loads.append(os.getloadavg()[0])
                t0 = time.monotonic()
                remover(method)(root)
                seconds = time.monotonic() - t0
                if os.listdir(root):
                    raise RuntimeError(f"{method} left {os.listdir(root)}")
                times[method].append(seconds)
                log(f"  round {number + 1}: {method} {seconds:.1f} s ({files} files; built in {built:.0f} s; "
                    f"load {loads[-1]:.1f})")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    reference = min(times["rm -rf"])
    print(f"{args.files:,} hard-linked files in xx/yy/uuid; {os.cpu_count()} CPUs; started {started}; "
          f"load average {min(loads):.1f}-{max(loads):.1f}; warm cache, sync before each removal")
    print("| method | seconds (each round) | best / best of rm -rf |")
    print("|---|---|---|")
    for method in methods:
        print(f"| {method} | {', '.join(f'{s:.1f}' for s in times[method])} | "
              f"{min(times[method]) / reference:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

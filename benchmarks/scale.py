"""Issue 15's table in one run: a SQLite Orthanc archive of N instances, and side by side the
downtime against the floor, a nightly incremental with 0.1% and 1% new instances against
``rsync -a --link-dest`` and ``cp -al`` of the same tree, ``backup_verify`` (md5 all) against
``md5sum``, and retention of one backup against ``rm -rf``.

It composes the other benchmarks' pieces: the archive from ``_archive.build_archive`` (a private
Orthanc 1.10.1, synthetic but consistent files and rows), the downtime of the floor and of the
real backup playbook from ``downtime.py`` (``measure_floor``, ``run_ours``, the poller), new
instances stored over REST (``_archive.store_generated``). The backups go to a root on the
archive's filesystem (``link_mode`` auto: hard links, the cheapest case for every tool). Peak
memory of each module is measured apart, by ``memory.py`` (a module run by Ansible is not a child
this script can measure). One round of each: the times are as noisy as the machine.

    python3 benchmarks/scale.py --instances 1000000 [--workdir /var/tmp/scale] [--keep]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _bench import log  # also sys.path
from _archive import build_archive, store_generated
import downtime

from ansible_collections.pacs.orthanc.plugins.module_utils import _layout, _verify  # noqa: E402


def timed(argv: list) -> float:
    os.sync()
    t0 = time.monotonic()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
    return time.monotonic() - t0


def nightly(archive, workdir: Path, root: Path, fraction: float, label: str, rows: list, args) -> Path:
    """Store ``fraction`` new instances, run the backup playbook, and time rsync --link-dest and
    cp -al of the same storage tree against the previous backup."""
    previous = (root / "latest").resolve()
    count = max(1, round(archive.files * fraction))
    log(f"  storing {count} new instances over REST ({fraction:.1%})")
    store_generated(archive.server, workdir / f"new-{label}", count, (1_000, 4_000), seed=len(rows) + 7)
    shutil.rmtree(workdir / f"new-{label}", ignore_errors=True)
    time.sleep(1.1)  # backups are named by the second
    log(f"  ours, incremental ({label})")
    m, manifest, backup = downtime.run_ours(archive, root, "auto", f"ours incr {label}", workdir, False, 0)
    storage = archive.server.storage_dir
    rsync_dest, cpal_dest = workdir / f"rsync-{label}", workdir / f"cpal-{label}"
    log("  rsync -a --link-dest of the same tree")
    rsync = timed(["rsync", "-a", f"--link-dest={previous / 'storage'}", f"{storage}/", str(rsync_dest)])
    log("  cp -al of the same tree")
    cpal = timed(["cp", "-al", str(storage), str(cpal_dest)])
    for folder in (rsync_dest, cpal_dest):
        shutil.rmtree(folder)
    rows.append((f"nightly incremental, {label} new ({manifest['storage']['new_files']:,} files)",
                 f"{m.notes.split(';', maxsplit=1)[0].replace('playbook ', '')}",
                 f"rsync --link-dest {rsync:.1f} s, cp -al {cpal:.1f} s",
                 f"downtime {m.downtime:.2f} s"))
    return backup


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", maxsplit=1)[0])
    parser.add_argument("--instances", type=int, default=1_000_000)
    parser.add_argument("--workdir", type=Path)
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="orthanc-scale-", dir="/var/tmp"))
    workdir.mkdir(parents=True, exist_ok=True)
    rows: list = []
    archive = None
    status = 0
    try:
        log(f"building {args.instances:,} instances")
        archive = build_archive(workdir, instances=args.instances, file_size=(1_000, 4_000), index_ratio=0.05)
        log(f"  built in {archive.build_seconds:.0f} s: {archive.files:,} files, index {archive.index_bytes / 2**20:.0f} MiB")
        root = workdir / "backups"
        log("  floor: stop, cp index*, start")
        floor = downtime.measure_floor(archive, workdir, False)
        log("  ours, first backup")
        first, _manifest, first_backup = downtime.run_ours(archive, root, "auto", "ours full", workdir, False, 0)
        rows.append(("downtime, first backup", f"{first.downtime:.2f} s", f"floor {floor.downtime:.2f} s",
                     f"{first.downtime / max(floor.downtime, 1e-9):.2f}x the floor; phases {first.phases}"))
        last = None
        for fraction, label in ((0.001, "0.1%"), (0.01, "1%")):
            last = nightly(archive, workdir, root, fraction, label, rows, args)
        log("  backup_verify md5=all, then md5sum of the same files")
        os.sync()
        t0 = time.monotonic()
        report = _verify.verify_backup(str(last), md5="all")
        ours = time.monotonic() - t0
        if not report["ok"]:
            raise RuntimeError(f"verify_backup fails: {report['problems']}")
        md5sum = timed(["bash", "-c", f"find {last / 'storage'} -type f -print0 | xargs -0 md5sum"])
        rows.append((f"backup_verify md5=all ({report['files_hashed']:,} files)", f"{ours:.1f} s",
                     f"md5sum {md5sum:.1f} s", f"{md5sum / max(ours, 1e-9):.2f}x md5sum's throughput"))
        log("  retention: remove the first backup, and rm -rf of a cp -al copy of it")
        subprocess.run(["cp", "-al", str(first_backup), str(workdir / "copy-of-first")], check=True)
        os.sync()
        t0 = time.monotonic()
        _layout.remove_backup(str(root), first_backup.name)
        ours_rm = time.monotonic() - t0
        rmrf = timed(["rm", "-rf", str(workdir / "copy-of-first")])
        rows.append(("retention of one backup", f"{ours_rm:.1f} s", f"rm -rf {rmrf:.1f} s",
                     f"{ours_rm / max(rmrf, 1e-9):.2f}x rm -rf"))
    except Exception as exc:  # report what was measured so far
        print(f"\nBENCHMARK BROKE: {type(exc).__name__}: {exc}", file=sys.stderr)
        status = 1
    finally:
        if archive is not None:
            archive.close()
        print(f"{args.instances:,} instances, SQLite index, Orthanc 1.10.1; {os.cpu_count()} CPUs; "
              f"load average {os.getloadavg()[0]:.2f} at the end; backups on the archive's filesystem (hard links)")
        print("| step | ours | reference | ratio, notes |")
        print("|---|---|---|---|")
        for row in rows:
            print("| " + " | ".join(row) + " |")
        print("Peak memory of each module: benchmarks/memory.py.")
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    return status


if __name__ == "__main__":
    sys.exit(main())

"""Issue 15's table in one run: an Orthanc archive of N instances (SQLite or PostgreSQL index),
and side by side the downtime against the floor, a nightly incremental with 0.1% and 1% new
instances against ``rsync -a --link-dest`` and ``cp -al`` of the same tree, ``backup_verify``
(md5 all) against ``md5sum``, the restore's storage copy against ``cp -al``, retention of one
backup against ``rm -rf``, and the peak RSS of the module work run outside Ansible.

It composes the other benchmarks' pieces: the archive from ``_archive.build_archive`` (a private
Orthanc 1.10.1, synthetic but consistent files and rows), the downtime of the floor and of the
real backup playbook from ``downtime.py`` (``measure_floor``, ``run_ours``, the poller), new
instances stored over REST (``_archive.store_generated``). The backups go to a root on the
archive's filesystem (``link_mode`` auto: hard links, the cheapest case for every tool).

The hot pass, ``backup_verify`` and the restore's storage copy also run outside Ansible, each in
a child process of its own (``memory.py``'s steps), so that their peak RSS (``VmHWM``) is theirs
alone (a module run by Ansible is not a child this script can measure). With ``--backend
postgresql`` the backup uses the dump strategy: Orthanc is not stopped, and the reference of the
first backup is ``pg_dump -Fc`` of the same database. One round of each: the times are as noisy
as the machine.

    python3 benchmarks/scale.py --instances 1000000 [--backend sqlite|postgresql] [--workdir DIR] [--keep]
        [--only-nightly | --only-downtime]

``--only-nightly``: the first backup (its row without the floor) and the two nightly rows, nothing
else (the hot pass, verify, restore and retention rows are skipped). ``--only-downtime`` (SQLite):
the floor, the first backup's downtime, and the floor once more after it (the first floor follows
the build, the second the backup's own writes: the page cache and the writeback differ).

``--filesystem xfs`` (or ``btrfs``, with ``--only-downtime``): the archive, its index and the
backups on a loop-mounted image of that filesystem in the workdir (XFS made with reflink=1,
``downtime.mount_filesystem``), so that the backup captures the index by reflink; Orthanc's own
stop and start (nothing copied) is measured before and after the backup, the reference the issue
sets there (ours within 1.2x of it). The image is sparse and grows to about 6 KiB per instance
plus the index.
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
from _archive import BACKENDS, build_archive, store_generated
from _poll import Poller
import downtime
import memory

from ansible_collections.pacs.orthanc.plugins.module_utils import _layout  # noqa: E402


class Rows(list):
    """The table's rows, each also logged when it is made: a run stopped before its end (a 5 M run
    lasts hours) keeps what it measured in its log."""

    def append(self, row) -> None:
        super().append(row)
        log("  row: | " + " | ".join(row) + " |")


def timed(argv: list) -> float:
    os.sync()
    t0 = time.monotonic()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
    return time.monotonic() - t0


def nightly(archive, workdir: Path, root: Path, fraction: float, label: str, rows: list, args,
            references: bool = True):
    """Store ``fraction`` new instances, run the backup playbook, and (``references``) time rsync
    --link-dest and cp -al of the same storage tree against the previous backup. Returns the new
    backup's folder and the downtime measurement."""
    previous = (root / "latest").resolve()
    count = max(1, round(archive.files * fraction))
    log(f"  storing {count} new instances over REST ({fraction:.1%})")
    store_generated(archive.server, workdir / f"new-{label}", count, (1_000, 4_000), seed=len(rows) + 7)
    shutil.rmtree(workdir / f"new-{label}", ignore_errors=True)
    time.sleep(1.1)  # backups are named by the second
    log(f"  ours, incremental ({label})")
    m, manifest, backup = downtime.run_ours(archive, root, "auto", f"ours incr {label}", workdir, False, 0)
    playbook = float(m.notes.split(";", maxsplit=1)[0].split()[1])  # "playbook 12.3 s"
    steps = "; ".join(f"{step} {times.get('seconds', 0):.1f} s" for step, times in (manifest.get("steps") or {}).items())
    title = f"nightly incremental, {label} new ({manifest['storage']['new_files']:,} files)"
    if not references:
        rows.append((title, f"Orthanc unanswered {m.downtime:.2f} s", f"playbook {playbook:.1f} s",
                     f"phases {m.phases}; index_capture {manifest.get('index_capture')}; {steps}"))
        return backup, m
    storage = archive.server.storage_dir
    rsync_dest, cpal_dest = workdir / f"rsync-{label}", workdir / f"cpal-{label}"
    log("  rsync -a --link-dest of the same tree")
    rsync = timed(["rsync", "-a", f"--link-dest={previous / 'storage'}", f"{storage}/", str(rsync_dest)])
    log("  cp -al of the same tree")
    cpal = timed(["cp", "-al", str(storage), str(cpal_dest)])
    for folder in (rsync_dest, cpal_dest):
        shutil.rmtree(folder)
    rows.append((title, f"{playbook:.1f} s (whole playbook)",
                 f"rsync --link-dest {rsync:.1f} s, cp -al {cpal:.1f} s",
                 f"{playbook / max(rsync, 1e-9):.2f}x rsync; Orthanc unanswered {m.downtime:.2f} s; " + steps))
    return backup, m


def stop_start(archive, workdir: Path, rounds: int = 3):
    """Orthanc's own stop and start, nothing copied, ``rounds`` times (each is seconds, and a
    round costs only that): the median, with the range in its notes."""
    return downtime.combine([downtime.measure_stop_start(archive, workdir, False) for _round in range(rounds)])


def stop_start_commands(archive, rounds: int = 3):
    """Orthanc stopped and started through the very commands the backup role runs here
    (``orthanc_stop_command`` / ``orthanc_start_command`` of ``downtime.run_ours``: a Python script
    that signals the instance and waits), nothing copied, ``rounds`` times: the median. What the
    role's stop window costs before any work of its own."""
    server = archive.server
    runs = []
    for _round in range(rounds):
        with Poller(server.http_port) as poller:
            stop = downtime.timed(lambda: subprocess.run(["/bin/sh", "-c", server.stop_command()], check=True))
            start = downtime.timed(lambda: subprocess.run(["/bin/sh", "-c", server.start_command()], check=True))
        runs.append(downtime.Measurement("stop+start (commands)", poller.result.seconds,
                                         notes=f"stop {stop:.2f} s, start {start:.2f} s"))
    return downtime.combine(runs)


def module_step(workdir: Path, name: str, backup: Path | None = None, live: Path | None = None) -> dict:
    """One of memory.py's steps ("hot", "verify", "restore") in a child process, on this
    archive: its seconds and peak RSS (MiB)."""
    work = workdir / "steps"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    if backup is not None:
        (work / "backup").symlink_to(backup)
    if live is not None:
        (work / "live").symlink_to(live)
    os.sync()
    try:
        return memory.run_step(work, name)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def pg_dump_seconds(archive, workdir: Path, level: list | None = None) -> float:
    """``pg_dump -Fc`` of the index's database into a file (the dump strategy's raw tool), at its
    own compression level, or with ``level`` (e.g. ["-Z", "1"])."""
    section = archive.server.extra_config["PostgreSQL"]
    target = workdir / "raw.dump"
    env = dict(os.environ, PGPASSWORD=section["Password"])
    t0 = time.monotonic()
    subprocess.run(["pg_dump", "-Fc", *(level or []), "-h", str(section["Host"]), "-p", str(section["Port"]), "-U",
                    section["Username"], "-f", str(target), section["Database"]], check=True, env=env)
    seconds = time.monotonic() - t0
    target.unlink()
    return seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", maxsplit=1)[0])
    parser.add_argument("--instances", type=int, default=1_000_000)
    parser.add_argument("--backend", choices=BACKENDS, default="sqlite")
    parser.add_argument("--workdir", type=Path)
    parser.add_argument("--keep", action="store_true")
    only = parser.add_mutually_exclusive_group()
    only.add_argument("--only-nightly", action="store_true", help="the first backup and the nightly rows only")
    only.add_argument("--only-downtime", action="store_true",
                      help="SQLite: the floor, the first backup's downtime and the floor again, nothing else")
    parser.add_argument("--filesystem", choices=["default", "xfs", "btrfs"], default="default",
                        help="with --only-downtime: the archive and the backups on a loop-mounted image of this "
                             "filesystem in the workdir (xfs with reflink=1), and Orthanc's own stop+start "
                             "measured too; default: the workdir's own filesystem")
    args = parser.parse_args()
    if args.only_downtime and args.backend != "sqlite":
        parser.error("--only-downtime measures the stop window: SQLite only (a database index is dumped hot)")
    if args.filesystem != "default" and not args.only_downtime:
        parser.error("--filesystem measures the stop window on a reflink filesystem: with --only-downtime")
    if args.filesystem != "default" and not downtime.loopfs.available(args.filesystem):
        parser.error(f"--filesystem {args.filesystem}: needs root (losetup, mount) and "
                     f"{downtime.loopfs.MKFS[args.filesystem][0]}")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="orthanc-scale-", dir="/var/tmp"))
    workdir.mkdir(parents=True, exist_ok=True)
    rows = Rows()
    archive = None
    status = 0
    load_start = os.getloadavg()
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    built = ""
    loop = None
    outer = workdir
    try:
        if args.filesystem != "default":
            # 1-4 KB files take a 4 KiB block and an inode each; the index, its clone and the
            # floor's copies share blocks on a reflink filesystem; sparse, so room costs nothing
            size = args.instances * 12 * 1024 + 8 * 2**30
            loop, workdir = downtime.mount_filesystem(args.filesystem, outer / "loop", size)
            log(f"  on {args.filesystem}: {loop.loop} mounted at {loop.mount_point}, archive in {workdir}")
        log(f"building {args.instances:,} instances ({args.backend} index); load average {load_start[0]:.2f}")
        archive = build_archive(workdir, instances=args.instances, file_size=(1_000, 4_000), index_ratio=0.05,
                                backend=args.backend)
        built = (f"archive built in {archive.build_seconds:.0f} s: {archive.files:,} files, "
                 f"{archive.storage_bytes / 2**30:.2f} GiB, index {archive.index_bytes / 2**20:.0f} MiB, {archive.counts}")
        log("  " + built)
        root = workdir / "backups"
        if args.only_nightly:
            log("  ours, first backup")
            first, _manifest, first_backup = downtime.run_ours(archive, root, "auto", "ours full", workdir, False, 0)
            rows.append(("first backup", first.notes.split(";", maxsplit=1)[0].replace("playbook ", ""), "",
                         f"Orthanc unanswered {first.downtime:.2f} s"))
        elif args.backend == "sqlite":
            log("  floor: stop, cp index*, start")
            floor = downtime.measure_floor(archive, workdir, False)
            bare = commands = None
            if loop is not None:
                log("  stop+start: Orthanc's own stop and start")
                bare = stop_start(archive, workdir)
                rows.append(("Orthanc's own stop and start", "", f"stop+start {bare.downtime:.2f} s",
                             f"{bare.notes}; floor {floor.downtime:.2f} s ({floor.notes})"))
                log("  stop+start through the role's commands")
                commands = stop_start_commands(archive)
                rows.append(("stop+start through the role's stop and start commands", "",
                             f"stop+start {commands.downtime:.2f} s", commands.notes))
            log("  ours, first backup")
            first, manifest, first_backup = downtime.run_ours(archive, root, "auto", "ours full", workdir, False, 0)
            against = (f"{first.downtime / max(bare.downtime, 1e-9):.2f}x stop+start, "
                       f"{first.downtime / max(commands.downtime, 1e-9):.2f}x stop+start by the commands, " if bare else "")
            rows.append(("downtime, first backup", f"{first.downtime:.2f} s", f"floor {floor.downtime:.2f} s",
                         f"{against}{first.downtime / max(floor.downtime, 1e-9):.2f}x the floor; phases "
                         f"{first.phases}; index_capture {manifest.get('index_capture')}; "
                         f"{first.notes.split(';', maxsplit=1)[0]}"))
            if args.only_downtime:
                if loop is not None:
                    log("  stop+start again, after the backup")
                    again = stop_start(archive, workdir)
                    rows.append(("stop+start again, after the first backup", "", f"stop+start {again.downtime:.2f} s",
                                 f"ours {first.downtime / max(again.downtime, 1e-9):.2f}x this one; {again.notes}"))
                    log("  ours, incremental (0.1% new)")
                    _backup, incremental = nightly(archive, workdir, root, 0.001, "0.1%", rows, args,
                                                   references=False)
                    log("  stop+start again, after the incremental")
                    last = stop_start(archive, workdir)
                    rows.append(("stop+start again, after the incremental", "", f"stop+start {last.downtime:.2f} s",
                                 f"the incremental {incremental.downtime / max(last.downtime, 1e-9):.2f}x "
                                 f"this one; {last.notes}"))
                log("  floor again, after the backup")
                again = downtime.measure_floor(archive, workdir, False)
                rows.append(("floor again, after the backups", "", f"floor {again.downtime:.2f} s",
                             f"ours (first backup) {first.downtime / max(again.downtime, 1e-9):.2f}x this floor"))
                return status
        else:
            log("  pg_dump -Fc of the index's database, at its own compression level and at ours (-Z 1)")
            raw = pg_dump_seconds(archive, workdir)
            raw_fast = pg_dump_seconds(archive, workdir, ["-Z", "1"])
            log("  ours, first backup (dump strategy)")
            first, _manifest, first_backup = downtime.run_ours(archive, root, "auto", "ours full", workdir, False, 0)
            rows.append(("first backup (dump strategy, Orthanc not stopped)",
                         first.notes.split(";", maxsplit=1)[0].replace("playbook ", "") + " (whole playbook)",
                         f"pg_dump -Fc {raw:.1f} s (-Z 1: {raw_fast:.1f} s)",
                         f"Orthanc unanswered {first.downtime:.2f} s (manifest's downtime "
                         f"{first.manifest_downtime})"))
        if not args.only_nightly:
            log("  hot pass alone, in a child (peak RSS)")
            hot = module_step(workdir, "hot", live=archive.server.storage_dir)
            log(f"  hot pass alone: {hot['seconds']:.1f} s, peak RSS {hot['rss_mib']:.0f} MiB")
        last = None
        for fraction, label in ((0.001, "0.1%"), (0.01, "1%")):
            last, _m = nightly(archive, workdir, root, fraction, label, rows, args)
        if args.only_nightly:
            return 0
        # in turns, each twice, best of two: the first reader after the nightlies' links and
        # deletions of every file pays for it (benchmarks/README.md, "why scale.py showed 0.36-0.43x")
        log("  backup_verify md5=all in a child and md5sum of the same files, in turns, twice")
        verify_runs, md5sum_runs = [], []
        for which in ("verify", "md5sum", "md5sum", "verify"):  # each first once
            if which == "verify":
                verified = module_step(workdir, "verify", backup=last)
                if not verified["ok"]:
                    raise RuntimeError(f"verify_backup fails on {last}")
                verify_runs.append(verified["seconds"])
            else:
                md5sum_runs.append(timed(["bash", "-c", f"find {last / 'storage'} -type f -print0 | xargs -0 md5sum"]))
        best, md5sum = min(verify_runs), min(md5sum_runs)
        rows.append((f"backup_verify md5=all ({verified['hashed']:,} files)",
                     f"{best:.1f} s (runs {', '.join(f'{t:.1f}' for t in verify_runs)})",
                     f"md5sum {md5sum:.1f} s (runs {', '.join(f'{t:.1f}' for t in md5sum_runs)})",
                     f"{md5sum / max(best, 1e-9):.2f}x md5sum's throughput (best of two, in turns)"))
        log("  restore's storage copy (walk + place, hard links) in a child, then cp -al of the same tree")
        restored = module_step(workdir, "restore", backup=last)
        cpal = timed(["cp", "-al", str(last / "storage"), str(workdir / "cpal-restore")])
        shutil.rmtree(workdir / "cpal-restore")
        rows.append((f"restore: storage copy ({restored['files']:,} files, hard links)", f"{restored['seconds']:.1f} s",
                     f"cp -al {cpal:.1f} s", f"{restored['seconds'] / max(cpal, 1e-9):.2f}x cp -al"))
        log("  retention: remove the first backup, and rm -rf of a cp -al copy of it")
        subprocess.run(["cp", "-al", str(first_backup), str(workdir / "copy-of-first")], check=True)
        os.sync()
        t0 = time.monotonic()
        _layout.remove_backup(str(root), first_backup.name)
        ours_rm = time.monotonic() - t0
        rmrf = timed(["rm", "-rf", str(workdir / "copy-of-first")])
        rows.append(("retention of one backup", f"{ours_rm:.1f} s", f"rm -rf {rmrf:.1f} s",
                     f"{ours_rm / max(rmrf, 1e-9):.2f}x rm -rf"))
        rows.append(("peak RSS (child processes)", f"hot pass {hot['rss_mib']:.0f} MiB ({hot['seconds']:.1f} s), "
                     f"verify md5=all {verified['rss_mib']:.0f} MiB, restore copy {restored['rss_mib']:.0f} MiB",
                     "", "target: under 500 MB at 5 M"))
    except Exception as exc:  # report what was measured so far
        print(f"\nBENCHMARK BROKE: {type(exc).__name__}: {exc}", file=sys.stderr)
        status = 1
    finally:
        if archive is not None:
            archive.close()
        if loop is not None and not args.keep:
            loop.close()
        load_end = os.getloadavg()
        print(f"{args.instances:,} instances, {args.backend} index, Orthanc 1.10.1; {os.cpu_count()} CPUs; started "
              f"{started}; load average {load_start[0]:.2f} at the start, {load_end[0]:.2f} at the end; backups on "
              f"the archive's filesystem (hard links)"
              + (f", a loop-mounted {args.filesystem}" if args.filesystem != "default" else ""))
        if built:
            print(built)
        print("| step | ours | reference | ratio, notes |")
        print("|---|---|---|---|")
        for row in rows:
            print("| " + " | ".join(row) + " |")
        if not args.keep:
            shutil.rmtree(outer, ignore_errors=True)
        elif loop is not None:
            log(f"  --keep: {loop.mount_point} stays mounted ({loop.loop}); umount it and losetup -d it")
    return status


if __name__ == "__main__":
    sys.exit(main())

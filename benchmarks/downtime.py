"""How long is Orthanc unreachable during a backup? Three procedures on the same archive.

For each archive size this benchmark

1. builds a realistic archive in a private Orthanc 1.10.1 with the benchmarks' shared builder
   (benchmarks/_archive.py): files of 10 KB to 1 MB (log-uniform sizes) in Orthanc's
   ``xx/yy/uuid`` layout and a large SQLite index. Storing GiBs over REST would take too long,
   so the archive is built synthetically but consistently: Orthanc creates its schema and stores
   a few real instances, then rows that follow the pattern of Orthanc's own rows are inserted
   with sqlite3, one instance per file written to the storage with its true size and MD5;
2. measures, from outside, the downtime of
   - ``floor``: stop Orthanc, ``cp`` the ``index*`` files, start Orthanc (no backup can stop
     Orthanc for less than this);
   - ``documented``: stop Orthanc, ``cp -a`` storage + index + configuration, start Orthanc
     (the procedure of Orthanc's book);
   - ``ours``: playbooks/backup.yml (hot pass, stop, index capture, delta pass, start), with
     ``orthanc_backup_link_mode: copy`` for a full and then an incremental backup, and once
     with the default ``link_mode: auto`` (which hard-links here: same filesystem);
   - with ``--snapshot``: ``ours snapshot``, playbooks/backup.yml with
     ``orthanc_backup_snapshot: btrfs`` (Orthanc never stopped: a read-only btrfs snapshot is
     captured), a full and an incremental backup. The archive then lives in a btrfs subvolume
     of a loop-mounted image file in the workdir, for every procedure (needs root);
   - with ``--filesystem xfs`` (or ``btrfs``): every procedure runs on a loop-mounted XFS made
     with ``reflink=1`` (or btrfs), where ``ours`` clones the index files (``FICLONE``) instead
     of copying them; a procedure ``stop+start`` (Orthanc's own stop and start, nothing copied)
     is then measured too: on a reflink filesystem the issue expects ours within 1.2x of it;
   A poller thread (benchmarks/_poll.py) GETs ``/system`` every 20 ms; the downtime is the
   longest interval between two answers;
3. prints one table per size and a comparison across sizes. It reports what it measured and
   never judges: it exits non-zero only when something broke.

Run ``python3 benchmarks/downtime.py --help``; see benchmarks/README.md to read the output.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from _bench import DROP_CACHES, GIB, cold_supported, drop_caches, human, log  # also sys.path
from _archive import MAX_FILE, MIN_FILE, Archive, build_archive, store_generated
from _poll import POLL_INTERVAL, Outage, Poller

from tests.support import loopfs  # noqa: E402
from tests.support.orthanc_server import OrthancError, OrthancServer  # noqa: E402
from tests.support.playbook import link_collection, local_host, run_playbook, write_inventory  # noqa: E402


def flush_and_maybe_drop_caches(cold: bool) -> None:
    """Write dirty pages back (so no flush runs during a measurement), then empty the page
    cache when ``cold``."""
    if not cold:
        os.sync()
    elif not drop_caches():
        raise RuntimeError(f"--cold: the page cache could not be dropped ({DROP_CACHES})")


# --------------------------------------------------------------------------------------------
# Phase 1: build an archive (benchmarks/_archive.py); phase 2: measuring downtime


@dataclass
class Measurement:
    """One procedure's result."""
    procedure: str
    downtime: float                       # seen by the poller
    manifest_downtime: float | None = None
    notes: str = ""
    tasks: list[tuple[str, float, float]] = field(default_factory=list)  # (task, seconds, in outage)
    phases: dict[str, float] = field(default_factory=dict)  # the role's own timing of its stopped window


def timed(fn: Callable[[], object]) -> float:
    t0 = time.monotonic()
    fn()
    return time.monotonic() - t0


def measure_stopped(archive: Archive, workdir: Path, cold: bool, procedure: str,
                    copy_label: str, copy_argv: Callable[[Path], list[str]]) -> Measurement:
    """Stop Orthanc, run ``copy_argv(dest)`` into a fresh folder, start Orthanc."""
    server = archive.server
    dest = workdir / f"{procedure}-copy"
    dest.mkdir()
    flush_and_maybe_drop_caches(cold)
    with Poller(server.http_port) as poller:
        stop = timed(server.stop)
        copy = timed(lambda: subprocess.run(copy_argv(dest), check=True))
        start = timed(server.start)
    shutil.rmtree(dest)
    return Measurement(procedure, poller.result.seconds,
                       notes=f"stop {stop:.2f} s, {copy_label} {copy:.2f} s, start {start:.2f} s")


def measure_floor(archive: Archive, workdir: Path, cold: bool) -> Measurement:
    """Stop Orthanc, cp its index* files, start it."""
    index_dir = archive.server.index_dir
    return measure_stopped(archive, workdir, cold, "floor", "cp index*", lambda dest: [
        "cp", *sorted(str(p) for p in index_dir.glob("index*")), str(dest)])


def measure_stop_start(archive: Archive, workdir: Path, cold: bool) -> Measurement:
    """Stop Orthanc and start it, nothing copied: Orthanc's own part of any downtime."""
    return measure_stopped(archive, workdir, cold, "stop+start", "nothing", lambda dest: ["true"])


def measure_documented(archive: Archive, workdir: Path, cold: bool) -> Measurement:
    """Stop Orthanc, cp -a storage + index + configuration into a fresh folder, start it."""
    server = archive.server
    return measure_stopped(archive, workdir, cold, "documented", "cp -a", lambda dest: [
        "cp", "-a", str(server.storage_dir), str(server.index_dir), str(server.config_path), str(dest)])


TASK_RE = re.compile(r"^TASK \[(?:[\w.]+ : )?(.+?)\] \*+$")


def task_times(lines: list[tuple[float, str]], outage: Outage) -> list[tuple[str, float, float]]:
    """(task, seconds, seconds inside the outage) from the wall-clock times at which the
    playbook printed its task banners (a task lasts until the next banner)."""
    banners = [(t, m.group(1)) for t, line in lines if (m := TASK_RE.match(line))]
    ends = [t for t, line in lines if line.startswith(("PLAY [", "PLAY RECAP"))]
    out = []
    for i, (start, name) in enumerate(banners):
        later = [t for t, _n in banners[i + 1:]] + [t for t in ends if t > start]
        end = min(later) if later else lines[-1][0]
        inside = max(0.0, min(end, outage.ended) - max(start, outage.began))
        out.append((name, end - start, inside))
    return out


def run_ours(archive: Archive, root: Path, link_mode: str, label: str, workdir: Path,
             cold: bool, rep: int, extra_vars: dict | None = None) -> tuple[Measurement, dict, Path]:
    """Run playbooks/backup.yml on the archive's Orthanc; returns the measurement, the new
    backup's manifest and its folder. The playbook's output, each line with the time it was
    read, goes to workdir/playbook-<label>-round<rep>.log."""
    server = archive.server
    extra = {"orthanc_backup_link_mode": link_mode} if link_mode != "auto" else {}
    extra.update(extra_vars or {})
    slug = re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-")
    inventory = write_inventory(workdir / f"inventory-{slug}.json",
                                {"bench": local_host(server, root, **extra)})
    flush_and_maybe_drop_caches(cold)
    lines: list[tuple[float, str]] = []
    t0 = time.monotonic()
    with Poller(server.http_port) as poller:
        proc = run_playbook(inventory, popen=True)
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append((time.time(), line.rstrip("\n")))
        rc = proc.wait()
    total = time.monotonic() - t0
    (workdir / f"playbook-{slug}-round{rep + 1}.log").write_text(
        "".join(f"{time.strftime('%H:%M:%S', time.localtime(t))}.{int(t % 1 * 1000):03d} {line}\n"
                for t, line in lines))
    if rc != 0:
        raise RuntimeError(f"the playbook failed ({label}), rc {rc}:\n" + "\n".join(l for _t, l in lines[-40:]))
    if poller.still_down:
        raise RuntimeError(f"Orthanc does not answer after the playbook ({label})")
    backup = (root / "latest").resolve()
    manifest = json.loads((backup / "manifest.json").read_text())
    storage = manifest["storage"]
    notes = (f"playbook {total:.1f} s; index by {manifest.get('index_capture')}; {storage['files']} files, {storage.get('new_files', 0)} new "
             f"({storage.get('copied_files', 0)} copied, {storage.get('linked_files', 0)} linked from previous)")
    if manifest.get("strategy") == "snapshot":
        snap = manifest["capture"]["snapshot"]
        timings = snap.get("timings", {})
        notes += (f"; {poller.result.probes} polls, {poller.result.outages} without answer; snapshot held "
                  f"{snap.get('held_seconds', 0):.2f} s (create {snap.get('create_seconds', 0):.3f} s, index "
                  f"{timings.get('index', 0):.2f} s, storage {timings.get('storage', 0):.2f} s, release "
                  f"{snap.get('release_seconds', 0):.3f} s)")
    downtime = manifest["downtime_seconds"]
    m = Measurement(label, poller.result.seconds, float(downtime) if downtime is not None else None, notes,
                    task_times(lines, poller.result), dict(manifest.get("downtime_phases") or {}))
    return m, manifest, backup


def verify(backup: Path) -> dict:
    """The collection's offline verification (every file's size and MD5 against the index)."""
    from ansible_collections.pacs.orthanc.plugins.module_utils._verify import verify_backup
    report = verify_backup(str(backup), md5="all")
    if not report["ok"] or report["orphans"]:
        raise RuntimeError(f"verify_backup fails on {backup}: {report['problems']}, "
                           f"{report['orphans']} orphans")
    return report


def add_new_files(archive: Archive, workdir: Path, fraction: float = 0.01) -> int:
    """Store about ``fraction`` of the archive's file count as real instances over REST."""
    count = max(24, round(archive.files * fraction))
    store_generated(archive.server, workdir / "new-dicom", count, (MIN_FILE, MAX_FILE), seed=7)
    return count


def measure_ours(archive: Archive, workdir: Path, args: argparse.Namespace, rep: int) -> list[Measurement]:
    """Our playbook three times: a full and an incremental backup with link_mode=copy (with
    about 1% new files stored in between), and a full backup with the default link_mode=auto.
    Every backup is verified offline; the backups are removed afterwards, except those of the
    last round with --keep."""
    keep = args.keep and rep == args.repeat - 1
    results = []
    root = workdir / f"backups-copy-{rep}"
    log("  ours, link_mode=copy, full backup")
    m, _manifest, first = run_ours(archive, root, "copy", "ours full (copy)", workdir, args.cold, rep)
    results.append(m)
    report = verify(first)
    log(f"  verify_backup ok on the full backup: {report['files_hashed']} files hashed")
    added = add_new_files(archive, workdir)
    log(f"  stored {added} new instances over REST; ours, link_mode=copy, incremental backup")
    time.sleep(1.1)  # backups are named by the second
    m, _manifest, second = run_ours(archive, root, "copy", "ours incr (copy)", workdir, args.cold, rep)
    m.notes += f"; {added} instances stored just before"
    results.append(m)
    verify(second)
    if not keep:
        shutil.rmtree(root)
    log("  ours, link_mode=auto (hard links: same filesystem), full backup")
    root = workdir / f"backups-auto-{rep}"
    m, _manifest, third = run_ours(archive, root, "auto", "ours full (auto)", workdir, args.cold, rep)
    results.append(m)
    verify(third)
    if not keep:
        shutil.rmtree(root)
    if args.snapshot:
        root = workdir / f"backups-snapshot-{rep}"
        log("  ours, orthanc_backup_snapshot=btrfs (Orthanc not stopped), full backup")
        snapshot = {"orthanc_backup_snapshot": "btrfs"}
        m, _manifest, fourth = run_ours(archive, root, "auto", "ours snapshot full", workdir, args.cold, rep,
                                        snapshot)
        results.append(m)
        verify(fourth)
        added = add_new_files(archive, workdir)
        log(f"  stored {added} new instances over REST; ours, snapshot, incremental backup")
        time.sleep(1.1)
        m, _manifest, fifth = run_ours(archive, root, "auto", "ours snapshot incr", workdir, args.cold, rep,
                                       snapshot)
        m.notes += f"; {added} instances stored just before"
        results.append(m)
        verify(fifth)
        if not keep:
            shutil.rmtree(root)
    return results


def mount_filesystem(kind: str, folder: Path, size_bytes: int) -> tuple[loopfs.LoopFilesystem, Path]:
    """A loop-mounted ``kind`` filesystem (tests/support/loopfs.py) in ``folder``, and the folder in
    it that holds the archive and the backups (for btrfs a subvolume, which a snapshot needs)."""
    folder.mkdir(parents=True, exist_ok=True)
    fs = loopfs.LoopFilesystem(folder, kind, str(size_bytes))
    volume = fs.mount_point / "vol"
    try:
        if kind == "btrfs":
            subprocess.run(["btrfs", "subvolume", "create", str(volume)], check=True, capture_output=True)
        else:
            volume.mkdir()
    except BaseException:
        fs.close()
        raise
    return fs, volume


def combine(runs: list[Measurement]) -> Measurement:
    """One line per procedure from its repetitions: the median downtime (the notes and task
    times of the repetition closest to it), with the range when repeated."""
    median = statistics.median(m.downtime for m in runs)
    closest = min(runs, key=lambda m: abs(m.downtime - median))
    manifests = [m.manifest_downtime for m in runs if m.manifest_downtime is not None]
    notes = closest.notes
    if len(runs) > 1:
        notes = (f"median of {len(runs)}: {min(m.downtime for m in runs):.2f}-"
                 f"{max(m.downtime for m in runs):.2f} s; " + notes)
    return Measurement(closest.procedure, median, statistics.median(manifests) if manifests else None,
                       notes, closest.tasks, closest.phases)


def measure_size(size_gib: float, workdir: Path, args: argparse.Namespace) -> tuple[Archive, list[Measurement]]:
    """Build one archive and measure every procedure on it (``args.repeat`` rounds, the
    procedures taking turns); Orthanc is stopped at the end."""
    workdir.mkdir(parents=True)
    log(f"== {size_gib:g} GiB: building the archive in {workdir}")
    archive = None
    loop = None
    try:
        if args.filesystem != "default":
            # archive, copies and backups: about 3x the archive at most, plus room for metadata
            loop, workdir = mount_filesystem(args.filesystem, workdir / "loop", int(3.2 * size_gib * GIB) + GIB)
            log(f"  on {args.filesystem}: {loop.loop} mounted at {loop.mount_point}, archive in {workdir}")
        archive = build_archive(workdir, size_bytes=int(size_gib * GIB), index_ratio=args.index_ratio,
                                seed=args.seed, name=f"bench{str(size_gib).replace('.', '_')}")
        log(f"  built in {archive.build_seconds:.0f} s: {archive.files} files, {human(archive.storage_bytes)}, "
            f"index {human(archive.index_bytes)}, {archive.counts}")
        rounds: list[list[Measurement]] = []
        for rep in range(args.repeat):
            if args.repeat > 1:
                log(f"  round {rep + 1} of {args.repeat}")
            log("  floor: stop, cp index*, start")
            results = [measure_floor(archive, workdir, args.cold)]
            if args.filesystem != "default":
                log("  stop+start: Orthanc's own stop and start")
                results.append(measure_stop_start(archive, workdir, args.cold))
            log("  documented: stop, cp -a storage index config, start")
            results.append(measure_documented(archive, workdir, args.cold))
            results += measure_ours(archive, workdir, args, rep)
            rounds.append(results)
        return archive, [combine(list(same)) for same in zip(*rounds)]
    finally:
        if archive is not None:
            archive.close()
        else:
            try:
                OrthancServer.load(workdir / "orthanc").stop()
            except (OrthancError, OSError):
                pass
        if loop is not None:
            if args.keep:
                log(f"  --keep: {loop.mount_point} stays mounted ({loop.loop}); umount it and losetup -d it")
            else:
                loop.close()


# --------------------------------------------------------------------------------------------
# Phase 3: report


def print_size_table(archive: Archive, results: list[Measurement], cold: bool) -> None:
    floor = max(results[0].downtime, 1e-9)
    print()
    print(f"=== Archive {archive.size_gib:g} GiB: {archive.files} files, {human(archive.storage_bytes)} storage, "
          f"index {human(archive.index_bytes)} ({archive.index_bytes / archive.storage_bytes:.0%} of the storage), "
          f"{archive.counts['instances']} instances; built in {archive.build_seconds:.0f} s "
          f"({archive.padding_rows} free-text MainDicomTags rows added to reach the index size); "
          f"{'cold' if cold else 'warm'} page cache")
    print(f"{'procedure':<20} {'downtime (s)':>12} {'x floor':>8} {'manifest (s)':>12}  notes")
    for m in results:
        manifest = f"{m.manifest_downtime:.2f}" if m.manifest_downtime is not None else "-"
        print(f"{m.procedure:<20} {m.downtime:>12.2f} {m.downtime / floor:>8.2f} {manifest:>12}  {m.notes}")
    print("expected (issue): ours within 1.3x the floor (on a reflink filesystem within 1.2x stop+start); "
          "ours snapshot: no outage at all (issue 7).")
    print(f"downtime = longest interval without an answer to GET /system (polled every {POLL_INTERVAL * 1000:.0f} ms); "
          "manifest = the role's own downtime_seconds (from the stop command to Orthanc answering again).")
    for m in results:
        inside = [(name, secs, ins) for name, secs, ins in m.tasks if ins > 0.005]
        if inside:
            parts = "; ".join(f"'{name}' {ins:.2f} s" + (f" of {secs:.2f}" if secs - ins > 0.05 else "")
                              for name, secs, ins in inside)
            print(f"  {m.procedure}: Ansible tasks inside the outage: {parts}")
        if m.phases:
            order = ["stop", "capture", "delta", "start"]
            names = sorted(m.phases, key=lambda n: order.index(n) if n in order else len(order))
            parts = ", ".join(f"{name} {m.phases[name]:.2f} s" for name in names)
            print(f"  {' ' * len(m.procedure)}  the role's phases (manifest downtime_phases): {parts} "
                  f"(sum {sum(m.phases.values()):.2f} s)")


def print_comparison(runs: list[tuple[Archive, list[Measurement]]]) -> None:
    if len(runs) < 2:
        return
    base_archive, base = runs[0]
    print()
    print(f"=== When the archive grows (compared with {base_archive.size_gib:g} GiB)")
    header = f"{'procedure':<20} " + " ".join(f"{a.size_gib:>8g} GiB" for a, _r in runs)
    print(header + "   " + "  ".join(f"{a.size_gib:g}/{base_archive.size_gib:g}" for a, _r in runs[1:]))
    archive_ratio = "  ".join(f"{a.storage_bytes / base_archive.storage_bytes:>5.2f}x" for a, _r in runs[1:])
    print(f"{'(archive bytes)':<20} " + " ".join(f"{human(a.storage_bytes):>12}" for a, _r in runs)
          + "   " + archive_ratio)
    for i, m in enumerate(base):
        row = [r[i].downtime for _a, r in runs]
        ratios = "  ".join(f"{v / max(row[0], 1e-9):>5.2f}x" for v in row[1:])
        print(f"{m.procedure:<20} " + " ".join(f"{v:>10.2f} s" for v in row) + "   " + ratios)
    print("expected (issue): ours nearly unchanged when the archive doubles (about 1.0x), while the "
          "documented procedure's downtime doubles (about the archive's ratio).")


# --------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="0.5,1",
                        help="archive sizes in GiB, comma-separated (default 0.5,1; the issue's "
                             "'a few GiB' is --sizes 2,4)")
    parser.add_argument("--workdir", type=Path,
                        help="where archives and backups go (default: a new folder in /var/tmp); "
                             "must be on a disk with room for about 2.5x the largest size")
    parser.add_argument("--keep", action="store_true",
                        help="keep the workdir at the end (archives, the last round's backups, "
                             "playbook logs)")
    parser.add_argument("--cold", action="store_true",
                        help="drop the page cache before each procedure (needs root and a "
                             "writable /proc/sys/vm/drop_caches)")
    parser.add_argument("--index-ratio", type=float, default=0.12,
                        help="target index size as a fraction of the archive (default 0.12)")
    parser.add_argument("--repeat", type=int, default=3,
                        help="rounds of every procedure on each archive; the median is shown (default 3)")
    parser.add_argument("--seed", type=int, default=20241129, help="random seed of the archive's shape")
    parser.add_argument("--snapshot", action="store_true",
                        help="also measure orthanc_backup_snapshot=btrfs; every procedure then runs on a "
                             "loop-mounted btrfs image in the workdir (needs root and btrfs-progs)")
    parser.add_argument("--filesystem", choices=["default", "xfs", "btrfs"], default="default",
                        help="run every procedure on a loop-mounted image of this filesystem in the workdir "
                             "(xfs is made with reflink=1; needs root and xfsprogs or btrfs-progs), and also "
                             "measure Orthanc's own stop+start; default: the workdir's own filesystem")
    args = parser.parse_args(argv)
    if args.snapshot:
        if args.filesystem not in ("default", "btrfs"):
            parser.error("--snapshot needs --filesystem btrfs")
        args.filesystem = "btrfs"
    try:
        args.size_list = [float(s) for s in args.sizes.split(",") if s.strip()]
    except ValueError:
        parser.error(f"--sizes: not a list of numbers: {args.sizes!r}")
    if not args.size_list or min(args.size_list) <= 0:
        parser.error("--sizes: give positive sizes in GiB")
    if args.repeat < 1:
        parser.error("--repeat: at least 1")
    if args.filesystem != "default" and not loopfs.available(args.filesystem):
        parser.error(f"--filesystem {args.filesystem}: needs root (losetup, mount) and {loopfs.MKFS[args.filesystem][0]}")
    if args.cold and not cold_supported():
        parser.error(f"--cold: {DROP_CACHES} is not writable here (not root, or /proc/sys is read-only)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if shutil.which("Orthanc") is None and not Path("/usr/sbin/Orthanc").exists():
        print("Orthanc is not installed: run scripts/setup.sh", file=sys.stderr)
        return 2
    link_collection()
    workdir = (args.workdir.resolve() if args.workdir
               else Path(tempfile.mkdtemp(prefix="orthanc-downtime-", dir="/var/tmp")))
    workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    runs: list[tuple[Archive, list[Measurement]]] = []
    status = 0
    try:
        for size in args.size_list:
            runs.append(measure_size(size, workdir / f"size-{size:g}GiB", args))
    except Exception as exc:  # report what broke, with what was measured so far
        print(f"\nBENCHMARK BROKE: {type(exc).__name__}: {exc}", file=sys.stderr)
        status = 1
    finally:
        print(f"\nOrthanc {subprocess.run(['Orthanc', '--version'], capture_output=True, text=True, check=False).stdout.split()[1]}, "
              f"{os.cpu_count()} CPUs; backup roots are on the filesystem of the storage, so 'ours' uses "
              "orthanc_backup_link_mode=copy (with the default auto, live files would be hard-linked, "
              "which is cheaper than a backup to another disk: shown as 'ours full (auto)').")
        print("Cache: " + ("cold (page cache dropped before each procedure)." if args.cold else
                           "warm (nothing dropped between procedures; --cold drops the page cache"
                           + (")." if cold_supported() else ", but it is not available here).")))
        for archive, results in runs:
            print_size_table(archive, results, args.cold)
        print_comparison(runs)
        print(f"\nTotal time {time.monotonic() - t0:.0f} s; workdir {workdir}"
              + (" (kept)" if args.keep else " (removed)"))
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    return status


if __name__ == "__main__":
    sys.exit(main())

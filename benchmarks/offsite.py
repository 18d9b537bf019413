"""What does shipping a backup off site with ``offsite_restic`` cost, against raw restic and rsync?

Issue 14 expects the module's upload to cost at most 1.1 times a raw ``restic backup`` of the
same folder. This benchmark, in one run:

1. builds an archive with the benchmarks' shared builder (benchmarks/_archive.py: a private
   Orthanc, synthetic but consistent files of 10 KB to 1 MB, ``--gib`` of them) and backs it up
   with ``playbooks/backup.yml`` (backup B1);
2. ships B1: ``ours`` (the module ``pacs.orthanc.offsite_restic``, run by ``ansible`` as the
   role runs it: the snapshot list, the check that this backup is not shipped yet, ``restic
   backup .`` from inside the folder with a stable host, tags, ``--ignore-ctime`` and the host's
   previous snapshot as parent), ``raw`` (``restic backup <B1>`` into a repository of its own,
   nothing else) and ``rsync`` (``rsync -a`` into a local folder, the way the ship role's
   transfer copies files, without SSH);
3. stores about 1% new instances over REST and backs up again (B2: unchanged files are hard links
   to B1's, so their ctime changed), then ships B2 the same ways: ``ours``; ``raw naive``
   (``restic backup <B2>``: another path, so restic finds no parent and reads every byte again);
   ``raw tuned`` (``restic backup .`` from inside B2 with ``--ignore-ctime`` and ``--parent``, the
   flags the module gives); ``rsync`` (``rsync -a --link-dest`` to the first copy).

It prints each time (for ``ours``, the whole Ansible task and, within it, its ``restic backup``),
the bytes each restic run added, and ours / raw. It never judges the numbers;
it exits non-zero only when something broke. Warm page cache (dirty pages flushed before each run).

    python3 benchmarks/offsite.py [--gib 1] [--workdir /var/tmp] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _bench import GIB, human, log  # also sys.path
from _archive import build_archive, store_generated

from tests.support.playbook import local_host, run_module, run_playbook, write_inventory  # noqa: E402


class BenchmarkError(Exception):
    """Something broke: the run is not a measurement."""


def restic(repo: Path, password_file: Path, args: list, cwd: Path | None = None) -> tuple[float, str]:
    env = dict(os.environ, RESTIC_REPOSITORY=str(repo), RESTIC_PASSWORD_FILE=str(password_file),
               RESTIC_CACHE_DIR=str(repo.parent / "restic-cache"), RESTIC_PROGRESS_FPS="0.0166")
    os.sync()
    started = time.monotonic()
    proc = subprocess.run(["restic", *args], env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, check=False)
    seconds = time.monotonic() - started
    if proc.returncode != 0:
        raise BenchmarkError(f"restic {' '.join(args[:2])} exited with {proc.returncode}: {proc.stderr[-500:]}")
    return seconds, proc.stdout


def added(out: str) -> int:
    for line in out.splitlines():
        if line.startswith("{") and '"summary"' in line:
            return int(json.loads(line).get("data_added", 0))
    return 0


def timed(argv: list) -> float:
    os.sync()
    started = time.monotonic()
    proc = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, check=False)
    if proc.returncode != 0:
        raise BenchmarkError(f"{argv[0]} exited with {proc.returncode}: {proc.stderr[-500:]}")
    return time.monotonic() - started


def ship_ours(backup: Path, repo: Path, password_file: Path) -> tuple[float, int, float]:
    os.sync()
    started = time.monotonic()
    result = run_module("offsite_restic", {"source": str(backup), "host": "bench", "repository": str(repo),
                                           "password_file": str(password_file)})
    seconds = time.monotonic() - started
    if result.get("failed") or not result.get("snapshot_id"):
        raise BenchmarkError(f"offsite_restic failed: {result.get('msg')}")
    return seconds, int(result.get("data_added") or 0), float(result.get("seconds") or 0)


def back_up(inventory: Path, root: Path) -> Path:
    result = run_playbook(inventory)
    if result.returncode != 0:
        raise BenchmarkError("the backup playbook failed:\n" + result.stdout[-3000:])
    return (root / "latest").resolve()


def run(workdir: Path, gib: float) -> list:
    password_file = workdir / "restic-password"
    password_file.write_text(secrets.token_hex(16) + "\n")
    password_file.chmod(0o600)
    ours_repo, raw_repo = workdir / "repo-ours", workdir / "repo-raw"
    for repo in (ours_repo, raw_repo):
        restic(repo, password_file, ["init"])
    log(f"building a {gib:g} GiB archive")
    archive = build_archive(workdir / "archive", size_bytes=int(gib * GIB), name="bench")
    rows = []
    try:
        root = workdir / "backups"
        inventory = write_inventory(workdir / "inventory.json", {"bench": local_host(
            archive.server, root, orthanc_backup_link_mode="copy")})
        log("backup B1")
        first = back_up(inventory, root)
        size = sum(p.stat().st_size for p in first.rglob("*") if p.is_file())
        log("shipping B1: ours, raw, rsync")
        seconds, data, inner = ship_ours(first, ours_repo, password_file)
        rows.append(("first", "ours (offsite_restic, the whole Ansible task)", seconds, data))
        rows.append(("first", "  of which its restic backup", inner, None))
        seconds, out = restic(raw_repo, password_file, ["backup", "--json", "--host", "bench", str(first)])
        rows.append(("first", "raw restic backup <folder>", seconds, added(out)))
        rows.append(("first", "rsync -a (local)", timed(["rsync", "-a", f"{first}/", f"{workdir / 'rsync-1'}/"]), None))

        count = max(24, archive.files // 100)
        log(f"storing {count} new instances, backup B2")
        store_generated(archive.server, workdir / "new", count, (10_000, 1_000_000), seed=7)
        time.sleep(1.1)
        second = back_up(inventory, root)
        log("shipping B2: ours, raw naive, raw tuned, rsync")
        seconds, data, inner = ship_ours(second, ours_repo, password_file)
        rows.append(("nightly", "ours (offsite_restic, the whole Ansible task)", seconds, data))
        rows.append(("nightly", "  of which its restic backup", inner, None))
        tuned_repo = workdir / "repo-tuned"
        shutil.copytree(raw_repo, tuned_repo)  # the same state as raw, for the tuned run
        seconds, out = restic(raw_repo, password_file, ["backup", "--json", "--host", "bench", str(second)])
        rows.append(("nightly", "raw restic backup <folder> (no parent found)", seconds, added(out)))
        _s, listing = restic(tuned_repo, password_file, ["snapshots", "--json", "--latest", "1"])
        parent = json.loads(listing)[-1]["id"]
        seconds, out = restic(tuned_repo, password_file, ["backup", ".", "--json", "--host", "bench",
                                                          "--ignore-ctime", "--parent", parent], cwd=second)
        rows.append(("nightly", "raw restic backup . --ignore-ctime --parent", seconds, added(out)))
        rows.append(("nightly", "rsync -a --link-dest (local)", timed(
            ["rsync", "-a", f"--link-dest={workdir / 'rsync-1'}", f"{second}/", f"{workdir / 'rsync-2'}/"]), None))
        log(f"B1 {human(size)}, {archive.files} files; {count} new instances in B2")
        return [size, archive.files, count, rows]
    finally:
        archive.close()


def report(size: int, files: int, count: int, rows: list) -> str:
    lines = [f"backup of {human(size)} ({files} storage files); nightly: {count} new instances",
             f"{'run':8} {'method':50} {'seconds':>8} {'added':>10}",
             "-" * 80]
    for run_name, method, seconds, data in rows:
        lines.append(f"{run_name:8} {method:50} {seconds:8.1f} {human(data) if data is not None else '-':>10}")
    for run_name, raw_name in (("first", "raw restic backup <folder>"),
                               ("nightly", "raw restic backup . --ignore-ctime --parent")):
        ours = next(r[2] for r in rows if r[0] == run_name and r[1].startswith("ours"))
        inner = next(r[2] for r in rows if r[0] == run_name and r[1].startswith("  of which"))
        raw = next(r[2] for r in rows if r[0] == run_name and r[1] == raw_name)
        lines.append(f"{run_name}: ours / {raw_name} = {ours / raw:.2f}x (its restic backup alone {inner / raw:.2f}x; "
                     f"the rest, {ours - inner:.1f} s, is Ansible and the snapshot list, whatever the size)")
    lines.append(f"load average at the end: {os.getloadavg()[0]:.1f} (2 cores: other work inflates every figure)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", maxsplit=1)[0])
    parser.add_argument("--gib", type=float, default=1.0, help="archive size in GiB (default 1)")
    parser.add_argument("--workdir", type=Path, default=Path("/var/tmp"),
                        help="a new orthanc-offsite-* folder is made in it (default /var/tmp)")
    parser.add_argument("--keep", action="store_true", help="keep the workdir at the end")
    args = parser.parse_args(argv)
    if shutil.which("restic") is None or shutil.which("rsync") is None:
        sys.exit("needs restic and rsync (scripts/setup.sh)")
    args.workdir.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="orthanc-offsite-", dir=args.workdir))
    try:
        print(report(*run(workdir, args.gib)))
        return 0
    except BenchmarkError as exc:
        log(f"FAILED: {exc}")
        return 1
    finally:
        if args.keep:
            log(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())

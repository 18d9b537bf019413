"""How long is a containerised Orthanc unreachable during a backup? The container row of
benchmarks/downtime.py.

For one archive size this benchmark

1. builds a realistic archive with the benchmarks' shared builder (benchmarks/_archive.py: files
   of 10 KB to 1 MB in Orthanc's ``xx/yy/uuid`` layout, a large SQLite index), then moves it onto a
   podman named volume and runs Orthanc on it in a container of the test image
   (localhost/pacs-orthanc-debian12, made by scripts/containers.sh), the way
   ``orthancteam/orthanc`` runs: an entrypoint that generates /tmp/orthanc.json, storage and
   index on the volume at /var/lib/orthanc/db, ``--init``, ``--network host``;
2. measures, from outside (a poller GETs ``/system`` every 20 ms; the downtime is the longest
   interval between two answers), the downtime of
   - ``floor``: ``podman stop``, ``cp`` the volume's ``index*`` files, ``podman start`` (no backup
     of this container can stop Orthanc for less);
   - ``stop; cp -a``: ``podman stop``, ``cp -a`` of the volume's folder, ``podman start`` (what
     ``compose stop; cp -a`` of the volumes does);
   - ``ours``: playbooks/backup.yml with ``orthanc_container`` (hot pass, the container stopped,
     index capture, delta pass, the container started): a full, then an incremental backup;
3. prints one table. It reports what it measured and never judges: it exits non-zero only when
   something broke.

Run ``python3 benchmarks/downtime_container.py --help`` (as root, after scripts/containers.sh has
made the image); see benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _bench import GIB, human, log  # also sys.path
from _archive import build_archive
from _poll import Poller
from downtime import Measurement, add_new_files, task_times, verify

from tests.containers.conftest import OrthancContainer, engine_ready  # noqa: E402
from tests.support.playbook import link_collection, run_playbook, write_inventory  # noqa: E402

ENGINE = "podman"


def wait_answers(orthanc: OrthancContainer, timeout: float = 300) -> None:
    orthanc.wait(timeout)


def measure_stopped(orthanc: OrthancContainer, volume: Path, workdir: Path, procedure: str,
                    copy_label: str, copy_argv) -> Measurement:
    """Stop the container, run ``copy_argv(dest)`` into a fresh folder, start it and wait for
    Orthanc's first answer."""
    dest = workdir / f"{procedure.replace(' ', '').replace(';', '-')}-copy"
    dest.mkdir()
    subprocess.run(["sync"], check=True)
    with Poller(orthanc.port) as poller:
        t0 = time.monotonic()
        subprocess.run([ENGINE, "stop", "-t", "600", orthanc.container], check=True, stdout=subprocess.DEVNULL)
        t1 = time.monotonic()
        subprocess.run(copy_argv(dest), check=True)
        t2 = time.monotonic()
        subprocess.run([ENGINE, "start", orthanc.container], check=True, stdout=subprocess.DEVNULL)
        wait_answers(orthanc)
        t3 = time.monotonic()
    shutil.rmtree(dest)
    return Measurement(procedure, poller.result.seconds,
                       notes=f"stop {t1 - t0:.2f} s, {copy_label} {t2 - t1:.2f} s, start until it answers {t3 - t2:.2f} s")


def run_ours(orthanc: OrthancContainer, root: Path, label: str, workdir: Path, rep: int) -> Measurement:
    """playbooks/backup.yml on the container (orthanc_container, engine podman)."""
    slug = label.replace(" ", "-")
    inventory = write_inventory(workdir / f"inventory-{slug}.json", {"bench": {
        "ansible_connection": "local", "ansible_python_interpreter": sys.executable, "orthanc_url": orthanc.url,
        "orthanc_backup_root": str(root), "orthanc_container": orthanc.container,
        "orthanc_container_engine": ENGINE, "orthanc_backup_link_mode": "copy"}})
    subprocess.run(["sync"], check=True)
    lines: list[tuple[float, str]] = []
    t0 = time.monotonic()
    with Poller(orthanc.port) as poller:
        proc = run_playbook(inventory, popen=True)
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append((time.time(), line.rstrip("\n")))
        rc = proc.wait()
    total = time.monotonic() - t0
    (workdir / f"playbook-{slug}-round{rep + 1}.log").write_text("\n".join(f"{t:.3f} {l}" for t, l in lines) + "\n")
    if rc != 0:
        raise RuntimeError(f"the playbook failed ({label}), rc {rc}:\n" + "\n".join(l for _t, l in lines[-40:]))
    if poller.still_down:
        raise RuntimeError(f"Orthanc does not answer after the playbook ({label})")
    backup = (root / "latest").resolve()
    manifest = json.loads((backup / "manifest.json").read_text())
    storage = manifest["storage"]
    phases = manifest.get("downtime_phases") or {}
    notes = (f"playbook {total:.1f} s; {storage['files']} files, {storage.get('new_files', 0)} new; "
             f"in the stop: " + ", ".join(f"{k} {v:.2f} s" for k, v in phases.items() if isinstance(v, (int, float))))
    verify(backup)
    return Measurement(label, poller.result.seconds, float(manifest["downtime_seconds"]), notes,
                       task_times(lines, poller.result), dict(phases))


class _Adder:
    """What downtime.add_new_files needs of an archive: its file count and a server that stores."""

    def __init__(self, orthanc: OrthancContainer, files: int):
        self.files = files
        self.server = self
        self._orthanc = orthanc

    def store_rest(self, path: Path) -> None:
        self._orthanc.rest("POST", "/instances", path.read_bytes())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=float, default=0.5, help="archive size in GiB (default 0.5)")
    parser.add_argument("--index-ratio", type=float, default=0.12,
                        help="target index size as a fraction of the archive (default 0.12)")
    parser.add_argument("--repeat", type=int, default=3, help="rounds of every procedure; the median is shown")
    parser.add_argument("--workdir", type=Path, help="default: a new folder in /var/tmp")
    parser.add_argument("--keep", action="store_true", help="keep the workdir (playbook logs)")
    parser.add_argument("--seed", type=int, default=20241129)
    args = parser.parse_args(argv)
    why = engine_ready(ENGINE)
    if why:
        print(why, file=sys.stderr)
        return 2
    link_collection()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="pacs-downtime-container-", dir="/var/tmp"))
    workdir.mkdir(parents=True, exist_ok=True)
    orthanc = None
    try:
        log(f"building a {args.size} GiB archive in {workdir}")
        archive = build_archive(workdir, size_bytes=int(args.size * GIB), index_ratio=args.index_ratio,
                                seed=args.seed)
        server = archive.server
        server.stop()
        orthanc = OrthancContainer(ENGINE, workdir, volume=True)
        subprocess.run([ENGINE, "volume", "create", orthanc.volume], check=True, stdout=subprocess.DEVNULL)
        volume = orthanc.volume_dir()
        log(f"moving the archive onto the volume {orthanc.volume} ({volume})")
        for entry in list(server.storage_dir.iterdir()) + sorted(server.index_dir.glob("index*")):
            shutil.move(str(entry), str(volume / entry.name))
        orthanc.run()
        wait_answers(orthanc)
        counted = orthanc.rest("GET", "/statistics")["CountInstances"]
        assert counted == archive.counts["instances"], (counted, archive.counts)
        root = workdir / "backups"
        results: dict[str, list[Measurement]] = {}
        for rep in range(args.repeat):
            log(f"round {rep + 1}/{args.repeat}")
            for m in (
                measure_stopped(orthanc, volume, workdir, "floor", "cp index*",
                                lambda dest: ["cp", *map(str, sorted(volume.glob("index*"))), str(dest)]),
                measure_stopped(orthanc, volume, workdir, "stop; cp -a", "cp -a",
                                lambda dest: ["cp", "-a", str(volume), str(dest)]),
            ):
                results.setdefault(m.procedure, []).append(m)
                log(f"  {m.procedure}: {m.downtime:.2f} s ({m.notes})")
            if root.exists():
                shutil.rmtree(root)
            for label in ("ours full", "ours incremental"):
                if label == "ours incremental":
                    add_new_files(_Adder(orthanc, archive.files), workdir)
                m = run_ours(orthanc, root, label, workdir, rep)
                results.setdefault(label, []).append(m)
                log(f"  {label}: {m.downtime:.2f} s ({m.notes})")
        floor = statistics.median(m.downtime for m in results["floor"])
        print()
        print(f"Containerised SQLite Orthanc ({ENGINE}), archive {human(archive.storage_bytes)} in {archive.files} files, "
              f"index {human(archive.index_bytes)}; median of {args.repeat} rounds")
        print()
        print("| procedure | downtime (s) | x floor | manifest (s) | notes (last round) |")
        print("|---|---|---|---|---|")
        for label, runs in results.items():
            down = statistics.median(m.downtime for m in runs)
            manifest = [m.manifest_downtime for m in runs if m.manifest_downtime is not None]
            print(f"| {label} | {down:.2f} | {down / floor:.2f} | "
                  f"{statistics.median(manifest) if manifest else float('nan'):.2f} | {runs[-1].notes} |"
                  .replace("| nan |", "| - |"))
        return 0
    finally:
        if orthanc is not None:
            orthanc.remove()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())

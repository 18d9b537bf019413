"""A fleet run against a single host: how much longer does backing up N Orthancs take than one?

Starts N private Orthanc 1.10.1 servers (tests/support/orthanc_server.py), stores the same amount
of real DICOM into each over REST, starts a private OpenSSH server on 127.0.0.1 as the backup
server (tests/support/sshd.py), then times playbooks/backup.yml (backup, ship, check on the
server) from start to end:

- ``1 host``: the playbook over one of the hosts;
- ``N hosts, batches B``: the playbook over all N hosts, for each batch setting given.

Every run starts from empty backup roots (a full backup, shipped whole), so all runs do the same
work per host. The ratio is the fleet's wall time over the single host's. Each measurement is
repeated and the median is shown. It reports and never judges: it exits non-zero only when a
run failed.

Run ``python3 benchmarks/fleet.py --help``; see benchmarks/README.md to read the output.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from _bench import log  # also sys.path

from tests.support import checks, sshd  # noqa: E402
from tests.support.orthanc_server import OrthancServer, stop_all  # noqa: E402
from tests.support.playbook import link_collection, local_host, run_playbook  # noqa: E402


def inventory(path: Path, hosts: dict, server: sshd.SshServer, ship_root: Path, max_parallel: int) -> Path:
    data = {"all": {"children": {
        "orthanc": {"hosts": hosts, "vars": server.ship_vars(ship_root, orthanc_ship_max_parallel=max_parallel)},
        "backup_server": {"hosts": {"backupsrv": server.host_vars()}}}}}
    path.write_text(json.dumps(data, indent=2))
    return path


def one_run(work: Path, label: str, orthancs: list, server: sshd.SshServer, batches, max_parallel: int,
            round_no: int) -> dict:
    run_dir = work / f"{label.replace(' ', '_').replace(',', '')}-{round_no}"
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir()
    hosts = {o.name: local_host(o, run_dir / f"backups-{o.name}", orthanc_backup_settle_seconds=0)
             for o in orthancs}
    inv = inventory(run_dir / "inventory.json", hosts, server, run_dir / "server", max_parallel)
    start = time.monotonic()
    result = run_playbook(inv, extra_vars={"orthanc_backup_batches": batches}, timeout=1800)
    seconds = time.monotonic() - start
    (run_dir / "playbook.log").write_text(result.stdout)
    if result.returncode != 0:
        raise SystemExit(f"{label}: the playbook failed (rc {result.returncode}); see {run_dir}/playbook.log\n"
                         + result.stdout[-3000:])
    downtimes, sent = [], 0
    for o in orthancs:
        status = json.loads((run_dir / f"backups-{o.name}" / "status.json").read_text())
        downtimes.append(status["last_success"]["downtime_seconds"])
        sent += status["last_ship"]["bytes_sent"]
        if not checks.complete_backups(run_dir / "server" / o.name):
            raise SystemExit(f"{label}: no complete backup of {o.name} on the server")
    return {"seconds": seconds, "max_downtime": max(downtimes), "sent": sent}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hosts", type=int, default=4, help="Orthanc servers in the fleet (default 4)")
    parser.add_argument("--instances", type=int, default=40, help="instances stored into each (default 40)")
    parser.add_argument("--pixel-bytes", type=int, default=500_000, help="pixel bytes of each instance (default 500 kB)")
    parser.add_argument("--batches", default='[1, "25%"];["100%"]',
                        help="batch settings to measure, JSON lists separated by ';' (default: the playbook's "
                             "[1, \"25%%\"] and all hosts at once)")
    parser.add_argument("--max-parallel", type=int, default=2, help="orthanc_ship_max_parallel (default 2)")
    parser.add_argument("--repeat", type=int, default=2, help="rounds of each measurement (default 2)")
    parser.add_argument("--workdir", type=Path, default=None, help="where everything goes (default: a new /var/tmp/orthanc-fleet-*)")
    parser.add_argument("--keep", action="store_true", help="keep the workdir")
    args = parser.parse_args()
    if not sshd.available():
        raise SystemExit("needs openssh-server, ssh and rsync: run scripts/setup.sh")
    link_collection()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="orthanc-fleet-", dir="/var/tmp"))
    work.mkdir(parents=True, exist_ok=True)
    batch_settings = [json.loads(b) for b in args.batches.split(";") if b.strip()]
    orthancs: list = []
    server = None
    load_start = os.getloadavg()[0]
    begin = time.monotonic()
    try:
        server = sshd.SshServer(work / "sshd")
        server.start()
        dicom = work / "dicom"
        dicom.mkdir(exist_ok=True)
        for number in range(args.hosts):
            orthanc = OrthancServer(work / f"orthanc-{number}", name=f"pacs-{number}")
            orthanc.start()
            orthancs.append(orthanc)
            checks.store_studies(orthanc, dicom, patients=max(1, args.instances // 10), via="rest",
                                 instances=min(10, args.instances), pixel_bytes=args.pixel_bytes)
        stats = orthancs[0].statistics()
        log(f"{args.hosts} Orthancs with {stats['CountInstances']} instances, {int(stats['TotalDiskSize']) / 2**20:.1f} MiB each")
        measurements = [("1 host", orthancs[:1], [1])]
        measurements += [(f"{args.hosts} hosts, batches {json.dumps(b)}", orthancs, b) for b in batch_settings]
        results: dict = {label: [] for label, _o, _b in measurements}
        for round_no in range(args.repeat):
            for label, members, batches in measurements:  # the measurements take turns
                log(f"round {round_no + 1}: {label}")
                results[label].append(one_run(work, label, members, server, batches, args.max_parallel, round_no))
        single = statistics.median(r["seconds"] for r in results["1 host"])
        print(f"=== fleet vs one host: {args.hosts} Orthancs of {stats['CountInstances']} instances "
              f"({int(stats['TotalDiskSize']) / 2**20:.1f} MiB) each, shipped to one backup server over SSH; "
              f"orthanc_ship_max_parallel {args.max_parallel}; median of {args.repeat}")
        print(f"{'run':32} {'wall (s)':>9} {'x 1 host':>9} {'per host (s)':>13} {'max downtime (s)':>17} {'sent (MiB)':>11}  runs (s)")
        for label, members, _batches in measurements:
            runs = results[label]
            wall = statistics.median(r["seconds"] for r in runs)
            print(f"{label:32} {wall:9.1f} {wall / single:9.2f} {wall / len(members):13.1f} "
                  f"{statistics.median(r['max_downtime'] for r in runs):17.2f} "
                  f"{statistics.median(r['sent'] for r in runs) / 2**20:11.1f}  "
                  + ", ".join(f"{r['seconds']:.1f}" for r in runs))
        print(f"x 1 host = the fleet's wall time / one host's; {args.hosts}.00 would be no gain from batching.")
        print(f"1-min load average {load_start:.2f} at the start, {os.getloadavg()[0]:.2f} at the end; "
              f"{os.cpu_count()} CPUs; total {time.monotonic() - begin:.0f} s")
    finally:
        if orthancs:
            stop_all(orthancs)
        if server is not None:
            server.stop()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            log(f"kept {work}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

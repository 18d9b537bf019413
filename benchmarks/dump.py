"""How long does ``pacs.orthanc.db_dump`` take compared with the raw dump tool on the same database?

The issue expects at most 1.1 times the raw tool. In one run, for PostgreSQL and MariaDB (the
servers that scripts/databases.sh starts):

1. creates a database and its user, starts a private Orthanc (Debian's orthanc-postgresql /
   orthanc-mysql plugins) with its files in the database (``EnableStorage``), so the dump holds
   real DICOM, and stores ``--mb`` MB of generated DICOM files over REST;
2. times, taking turns, ``--repeat`` rounds of:
   - raw: ``pg_dump -Fc -Z 1 -f FILE`` (password in PGPASSWORD; the module's default compression
     level, so that the ratio is the module's own overhead) or ``mysqldump --single-transaction
     --routines --triggers --hex-blob DB > FILE`` (password in a defaults file), nothing else;
     and the same followed by an fsync of the file (data on disk, as a backup needs);
   - module code: ``db_dump.dump()``, what the module runs on the host: version query, dump
     streamed through a SHA-256, fsync, read-back check (``pg_restore --list`` / trailer), rename;
   - module: ``ansible localhost -m pacs.orthanc.db_dump`` (Ansible's start-up included);
3. prints the median of each and its ratio to the raw tool.

It reports what it measured; it exits non-zero only when something broke.

    python3 benchmarks/dump.py [--mb 200] [--repeat 3] [--engines postgresql,mysql] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# _bench puts tests.support and the collection on sys.path
import _bench  # noqa: F401  pylint: disable=unused-import
from _archive import store_generated

from tests.support import databases  # noqa: E402
from tests.support.orthanc_server import OrthancServer  # noqa: E402
from tests.support.playbook import run_module  # noqa: E402
from ansible_collections.pacs.orthanc.plugins.module_utils._db import connection as db_connection, dump as db_dump  # noqa: E402


def raw_dump(db: databases.Database, out: Path, work: Path) -> None:
    if db.engine == "postgresql":
        env = dict(os.environ, PGPASSWORD=db.password)
        subprocess.run(["pg_dump", "-h", "127.0.0.1", "-U", db.user, "-d", db.name, "-Fc",
                        "-Z", str(db_dump.DEFAULT_COMPRESSION), "-f", str(out)], env=env, check=True)
    else:
        cnf = work / "raw.cnf"
        cnf.write_text(f"[client]\nuser={db.user}\npassword={db.password}\nsocket={databases.MY_SOCKET}\n")
        cnf.chmod(0o600)
        with open(out, "wb") as handle:
            subprocess.run(["mysqldump", f"--defaults-extra-file={cnf}", "--single-transaction", "--routines",
                            "--triggers", "--hex-blob", db.name], stdout=handle, check=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=int, default=200, help="MB of DICOM stored in the database")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--engines", default="postgresql,mysql")
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="pacs-dump-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    try:
        for engine in args.engines.split(","):
            available = databases.pg_available() if engine == "postgresql" else databases.my_available()
            if not available:
                print(f"{engine}: server not answering; run scripts/databases.sh", file=sys.stderr)
                return 1
            db = databases.Database(engine, f"pacs_bench_{engine[:2]}_{os.getpid()}").create()
            server = OrthancServer(work / f"orthanc-{engine}", name=f"bench-{engine}",
                                   extra_config=db.orthanc_config(storage_in_database=True))
            try:
                server.start()
                count = max(1, args.mb * 1024 * 1024 // 500_000)
                size, seconds = store_generated(server, work / f"dicom-{engine}", count, (400_000, 600_000), seed=3)
                print(f"{engine}: stored {count} files ({size / 1e6:.0f} MB) in {seconds:.1f} s", flush=True)
                section = "PostgreSQL" if engine == "postgresql" else "MySQL"
                conn = db_connection.connection(engine, db.orthanc_config(True)[section])
                times = {"raw": [], "raw + fsync": [], "module code": [], "module (ansible)": []}
                size = 0
                for round_ in range(args.repeat):
                    for label in times:
                        out = work / f"{engine}-{label.replace(' ', '_')}-{round_}.dump"
                        t0 = time.monotonic()
                        if label.startswith("raw"):
                            raw_dump(db, out, work)
                            if label == "raw + fsync":  # what a backup must do before it says done
                                with open(out, "rb") as handle:
                                    os.fsync(handle.fileno())
                        elif label == "module code":
                            db_dump.dump(conn, str(out))
                        else:
                            result = run_module("db_dump", {"config_path": str(server.config_path), "dest": str(out)})
                            if result.get("failed"):
                                print(json.dumps(result), file=sys.stderr)
                                return 1
                        times[label].append(time.monotonic() - t0)
                        size = out.stat().st_size
                        out.unlink()
                raw = statistics.median(times["raw"])
                for label, values in times.items():
                    rows.append((engine, label, statistics.median(values), statistics.median(values) / raw, size))
            finally:
                server.stop()
                db.drop()
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    print(f"\n{'engine':<11} {'method':<18} {'median s':>9} {'x raw':>7}   dump size")
    for engine, label, seconds, ratio, size in rows:
        print(f"{engine:<11} {label:<18} {seconds:9.3f} {ratio:7.2f}   {size / 1e6:.0f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())

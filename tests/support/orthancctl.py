"""Start, stop or query a test Orthanc created by orthanc_server.OrthancServer.

Usage: orthancctl.py start|stop|status ROOT

start   returns once the REST API answers; Orthanc keeps running (detached) afterwards.
stop    returns once the process has exited.
status  prints the state; exit 0 running and answering, 1 running but not answering,
        3 not running.
Any failure exits non-zero with a message on stderr.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from orthanc_server import OrthancError, OrthancServer  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=("start", "stop", "status"))
    parser.add_argument("root", type=Path, help="root directory of the OrthancServer")
    parser.add_argument("--timeout", type=float, default=None, help="seconds to wait")
    args = parser.parse_args(argv)
    try:
        server = OrthancServer.load(args.root)
        if args.action == "start":
            server.start(**({"timeout": args.timeout} if args.timeout else {}))
            print(f"{server.name}: running, PID {server.pid()}, {server.url}")
        elif args.action == "stop":
            server.stop(**({"timeout": args.timeout} if args.timeout else {}))
            print(f"{server.name}: stopped")
        else:
            pid = server.pid()
            if pid is None:
                print(f"{server.name}: not running")
                return 3
            if not server.answers():
                print(f"{server.name}: PID {pid} running but {server.url} does not answer")
                return 1
            print(f"{server.name}: running, PID {pid}, {server.url}")
    except (OrthancError, OSError) as e:
        print(f"orthancctl {args.action} {args.root}: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

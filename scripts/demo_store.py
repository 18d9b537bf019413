"""Store a few sample studies into an Orthanc: one over REST, one over DICOM C-STORE.

    python3 scripts/demo_store.py [--url http://127.0.0.1:8042] [--dicom-port 4242] [--studies 2]
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import tempfile
import urllib.request

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from tests.support import dicomgen  # noqa: E402
from tests.support.orthanc_server import cstore  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8042")
    parser.add_argument("--dicom-port", type=int, default=4242)
    parser.add_argument("--studies", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for number in range(args.studies):
            folder = pathlib.Path(tmp) / str(number)
            folder.mkdir()
            files = dicomgen.make_study(folder, f"DEMO-{number}", f"Demo^Patient{number}", series=2,
                                        instances_per_series=3)
            if number % 2 == 0:
                for path in files:
                    request = urllib.request.Request(args.url.rstrip("/") + "/instances", data=path.read_bytes(),
                                                     method="POST", headers={"Content-Type": "application/dicom"})
                    with urllib.request.urlopen(request, timeout=30) as response:
                        response.read()
                how = "REST"
            else:
                cstore("127.0.0.1", args.dicom_port, files)
                how = "C-STORE"
            print(f"stored study of DEMO-{number}: {len(files)} instances over {how}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

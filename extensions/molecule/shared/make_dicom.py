"""Write the test DICOM of each Orthanc host of a molecule scenario (on the controller).

    make_dicom.py OUT HOST=STUDIES [HOST=STUDIES ...]

For each host, OUT/HOST.tar holds STUDIES studies (one patient each, 2 series of 2 instances, real
pixel data, fresh UIDs) made by tests/support/dicomgen.py, and expected.json, the counts Orthanc
must show once they are stored (one archive: copying it is one transfer, not one per file).
"""

from __future__ import annotations

import json
import pathlib
import shutil
import sys
import tarfile

REPO = pathlib.Path(__file__).resolve().parents[3]
sys.path.insert(0, str(REPO / "tests" / "support"))

from dicomgen import make_study  # noqa: E402  pylint: disable=wrong-import-position

SERIES = 2
INSTANCES_PER_SERIES = 2


def main(out: str, *hosts: str) -> None:
    for spec in hosts:
        host, studies = spec.split("=")
        folder = pathlib.Path(out) / host
        shutil.rmtree(folder, ignore_errors=True)
        n = int(studies)
        for k in range(1, n + 1):
            make_study(folder, patient_id=f"{host}-{k}", patient_name=f"Molecule^{host}^{k}",
                       series=SERIES, instances_per_series=INSTANCES_PER_SERIES, seed=k)
        expected = {"patients": n, "studies": n, "series": n * SERIES,
                    "instances": n * SERIES * INSTANCES_PER_SERIES}
        (folder / "expected.json").write_text(json.dumps(expected) + "\n")
        with tarfile.open(pathlib.Path(out) / f"{host}.tar", "w") as tar:
            for path in sorted(folder.iterdir()):
                tar.add(path, arcname=path.name)


if __name__ == "__main__":
    main(*sys.argv[1:])

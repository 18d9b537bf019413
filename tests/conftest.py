"""Test-wide setup: make this checkout importable and runnable as the pacs.orthanc collection."""

from __future__ import annotations

import os
import pathlib
import sys

REPO = pathlib.Path(__file__).resolve().parent.parent
COLLECTIONS = REPO / ".work" / "collections"


def _link_collection() -> None:
    target = COLLECTIONS / "ansible_collections" / "pacs" / "orthanc"
    target.parent.mkdir(parents=True, exist_ok=True)
    if not target.is_symlink():
        target.symlink_to(REPO)
    if str(COLLECTIONS) not in sys.path:
        sys.path.insert(0, str(COLLECTIONS))
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    os.environ["ANSIBLE_COLLECTIONS_PATH"] = str(COLLECTIONS)


_link_collection()

"""Files laid out as Orthanc's storage area (``xx/yy/uuid``), for the unit tests of the copies."""

from __future__ import annotations

import os
import time
import uuid as uuidlib


def put(root, content: bytes, age: float = 60.0) -> str:
    """Write ``content`` as a new storage file under ``root``, ``age`` seconds old; its uuid."""
    name = str(uuidlib.uuid4())
    path = at(root, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    past = time.time() - age
    os.utime(path, (past, past))
    return name


def at(root, name):
    """Where the file ``name`` lies in the storage tree (or a backup's copy of it) ``root``."""
    return root / name[0:2] / name[2:4] / name

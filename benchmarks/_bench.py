"""What every benchmark shares: the import path, progress on stderr, byte sizes, the page cache.

Importing this module puts the checkout (for ``tests.support``) and ``.work/collections`` (for
``ansible_collections.pacs.orthanc``, linked to this checkout as tests/conftest.py does) on
``sys.path``, so a benchmark imports it first.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COLLECTIONS = REPO / ".work" / "collections"
for _path in (REPO, COLLECTIONS):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from tests.support.playbook import link_collection  # noqa: E402

link_collection()

GIB = 1024 ** 3
DROP_CACHES = Path("/proc/sys/vm/drop_caches")


def log(message: str) -> None:
    """Progress on stderr, so stdout holds only the results."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def human(n: float) -> str:
    """1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def cold_supported() -> bool:
    """Whether the page cache can be dropped (root and a writable /proc/sys)."""
    return DROP_CACHES.exists() and os.access(DROP_CACHES, os.W_OK)


def drop_caches() -> bool:
    """Write dirty pages back and empty the page cache; False when the kernel refuses."""
    os.sync()
    try:
        DROP_CACHES.write_text("3\n")
    except OSError as exc:
        log(f"cannot drop the page cache: {exc}")
        return False
    return True

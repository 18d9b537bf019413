"""Real filesystems in sparse image files, loop-mounted under a test's folder (btrfs, XFS with
reflinks), for the tests of snapshots and reflink captures. Needs root and the mkfs tool."""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess

MKFS = {"btrfs": ["mkfs.btrfs", "-q"], "xfs": ["mkfs.xfs", "-q", "-m", "reflink=1"]}


def available(kind: str) -> bool:
    return os.geteuid() == 0 and shutil.which(MKFS[kind][0]) is not None


class LoopFilesystem:
    """A ``kind`` filesystem in ``folder/<kind>.img``, mounted at ``folder/<kind>``. ``close``
    unmounts it and detaches only the loop device this object attached."""

    def __init__(self, folder: pathlib.Path, kind: str = "btrfs", size: str = "512M"):
        self.kind = kind
        self.image = folder / f"{kind}.img"
        self.mount_point = folder / kind
        self.loop = None
        self.mounted = False
        try:
            subprocess.run(["truncate", "-s", size, str(self.image)], check=True)
            self.loop = subprocess.run(["losetup", "--find", "--show", str(self.image)], check=True,
                                       capture_output=True, text=True).stdout.strip()
            subprocess.run(MKFS[kind] + [self.loop], check=True, capture_output=True)
            self.mount_point.mkdir()
            subprocess.run(["mount", self.loop, str(self.mount_point)], check=True)
            self.mounted = True
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if self.mounted:
            if subprocess.run(["umount", str(self.mount_point)], check=False).returncode != 0:
                subprocess.run(["umount", "-l", str(self.mount_point)], check=False)
            self.mounted = False
        if self.loop:  # only the loop device this object attached
            subprocess.run(["losetup", "-d", self.loop], check=False)
            self.loop = None
        if self.image.exists():
            self.image.unlink()

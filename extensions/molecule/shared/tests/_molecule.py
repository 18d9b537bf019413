"""Helpers of the molecule checks: the scenario's inventory, and modules of the collection run on
its hosts through Ansible (the molecule inventory says how to reach them)."""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from pathlib import Path

INVENTORY = os.environ.get("MOLECULE_INVENTORY_FILE", "")
LOCAL_ROOT = "/var/backups/orthanc"
SERVER_ROOT = "/srv/orthanc-backups"   # orthanc_ship_root's default


def _inventory() -> dict:
    out = subprocess.run(["ansible-inventory", "-i", INVENTORY, "--list"],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out)


def inventory_group(group: str) -> list[str]:
    """Hosts of ``group`` in the scenario's inventory."""
    return sorted(_inventory().get(group, {}).get("hosts", []))


def files_in_database(name: str) -> bool:
    """Whether the scenario stores this host's DICOM files in its database (EnableStorage)."""
    files = _inventory()["_meta"]["hostvars"].get(name, {}).get("pacs_test_config_files", {})
    return any(section.get("EnableStorage") for config in files.values() for section in config.values()
               if isinstance(section, dict))


def run_module(pattern: str, module: str, args: str, *extra: str) -> dict:
    """Run pacs.orthanc.<module> on the hosts matching ``pattern`` (in parallel); results by host name."""
    with tempfile.TemporaryDirectory() as tree:
        proc = subprocess.run(["ansible", pattern, "-i", INVENTORY, "--tree", tree,
                               "-m", f"pacs.orthanc.{module}", "-a", args, *extra],
                              capture_output=True, text=True, check=False, timeout=600)
        results = {p.name: json.loads(p.read_text()) for p in Path(tree).iterdir()}
    if not results:
        raise AssertionError(f"no result from {module} on {pattern}: {proc.stdout}\n{proc.stderr}")
    return results


def counts_of(statistics: dict) -> dict:
    """Orthanc's /statistics as the manifest's counts."""
    return {"patients": statistics["CountPatients"], "studies": statistics["CountStudies"],
            "series": statistics["CountSeries"], "instances": statistics["CountInstances"]}

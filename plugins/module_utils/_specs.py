# -*- coding: utf-8 -*-
# Copyright: pacs.orthanc contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Argument specs shared by several modules, each beside the documentation fragment that describes
it (as _rest.ARGUMENT_SPEC goes with pacs.orthanc.rest)."""

from __future__ import annotations

# pacs.orthanc.capture: where stopped_capture and snapshot_capture write into the incomplete backup
CAPTURE = dict(
    index_dest=dict(type="path", required=True),
    storage_dest=dict(type="path", required=True),
    state_file=dict(type="path", required=True),
    previous=dict(type="path"),
    link_mode=dict(type="str", choices=["auto", "hardlink", "copy"], default="auto"),
    workers=dict(type="int", default=4),
)

# pacs.orthanc.completion: the check of backup_set's and backup_server's 'complete'
COMPLETION = dict(
    md5=dict(type="str", choices=["new", "all", "none"], default="new"),
    workers=dict(type="int", default=2),
)

# pacs.orthanc.container: Orthanc in a container, stopped and started alone (orthanc_control,
# stopped_capture, orthanc_probe)
CONTAINER = dict(
    container=dict(type="str"),
    container_engine=dict(type="str", choices=["auto", "docker", "podman"], default="auto"),
)

# pacs.orthanc.progress: where a long step reports its progress (module_utils/_progress.py)
PROGRESS = dict(
    progress=dict(type="dict", options=dict(
        path=dict(type="path"),
        status_file=dict(type="path"),
        textfile=dict(type="path"),
        interval=dict(type="float", default=30),
        step=dict(type="str"),
        host=dict(type="str"),
    )),
)

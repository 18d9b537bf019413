# -*- coding: utf-8 -*-
# Copyright: pacs.orthanc contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations


class ModuleDocFragment:
    """Where a capture of the index and the storage writes into an incomplete backup (the options of
    stopped_capture and snapshot_capture; their argument spec is _specs.CAPTURE)."""

    DOCUMENTATION = r"""
options:
  index_dest:
    description: Folder that receives the consolidated index copy.
    type: path
    required: true
  storage_dest:
    description: The backup's storage folder.
    type: path
    required: true
  state_file:
    description: The storage state file of the backup, written by the hot pass of M(pacs.orthanc.storage_copy).
    type: path
    required: true
  previous:
    description: The previous backup's storage folder; files of the same name and size are hard-linked from it.
    type: path
  link_mode:
    description: As in M(pacs.orthanc.storage_copy).
    type: str
    choices: [auto, hardlink, copy]
    default: auto
  workers:
    description: Parallel copies.
    type: int
    default: 4
"""

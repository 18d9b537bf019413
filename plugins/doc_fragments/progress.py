# -*- coding: utf-8 -*-
# Copyright: pacs.orthanc contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations


class ModuleDocFragment:
    """Where a long step reports its progress (module_utils/_progress.py); the argument spec is
    _specs.PROGRESS. The roles run such a step with C(async) and show each report with
    M(pacs.orthanc.progress_wait) (roles/common/tasks/progress.yml)."""

    DOCUMENTATION = r"""
options:
  progress:
    description:
      - Report the progress of this step while it runs, at most every O(progress.interval) seconds,
        files and bytes done of the total, rate and time left, and once more when it ends.
      - Without it, nothing is reported.
    type: dict
    suboptions:
      path:
        description:
          - A small JSON file rewritten atomically with each report, read by M(pacs.orthanc.progress_wait).
        type: path
      status_file:
        description:
          - The host's backup status file (see M(pacs.orthanc.backup_status)); each report goes into
            its key C(progress), so that monitoring sees a running step. Not written in check mode.
        type: path
      textfile:
        description: Node-exporter textfile metrics rewritten with the status file (C(pacs_orthanc_backup_progress_*)).
        type: path
      interval:
        description: Seconds between two reports (C(orthanc_progress_interval) in the roles).
        type: float
        default: 30
      step:
        description: The name of the step in the reports (default, the module's own).
        type: str
      host:
        description: The host's name in the reports (the roles pass C(inventory_hostname)).
        type: str
"""
